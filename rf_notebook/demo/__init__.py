"""The embedded demo: a tiny pretrained causal LM, its tokenizer, and a verifiable arithmetic task.

Everything here works offline on a CPU in minutes:

    from rf_notebook.demo import demo_model_fn, arithmetic_dataset, answer_exact_match, GREEDY_ANSWER
    model, tokenizer = demo_model_fn(RFModelConfig(model_name=DEMO_MODEL))

The model files in `tiny-arith/` are shipped with the package; `python -m rf_notebook.demo._build` is the
script that made them (see its docstring).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rf_notebook.demo._data import (
    GREEDY_ANSWER,
    answer_exact_match,
    arithmetic_dataset,
    exact_match_metrics,
    greedy_exact_match,
)
from rf_notebook.demo._rl import digit_reward, exact_match_reward, preference_dataset, prompt_dataset

__all__ = [
    "DEMO_MODEL",
    "MODEL_DIR",
    "demo_model_fn",
    "GREEDY_ANSWER",
    "answer_exact_match",
    "arithmetic_dataset",
    "exact_match_metrics",
    "greedy_exact_match",
    "preference_dataset",
    "prompt_dataset",
    "exact_match_reward",
    "digit_reward",
]

DEMO_MODEL = "rf-demo/tiny-arith"
MODEL_DIR = Path(__file__).with_name("tiny-arith")


def demo_model_fn(model_config: Any = None) -> tuple[Any, Any]:
    """`create_model_fn` for the demo: loads the shipped model and tokenizer from the package (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    name = _get(model_config, "model_name", DEMO_MODEL)
    if name not in (DEMO_MODEL, str(MODEL_DIR)):
        raise ValueError(f"demo_model_fn loads only {DEMO_MODEL!r}, but model_name is {name!r}")
    kwargs = _get(model_config, "model_kwargs", None) or {}
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 215k-parameter model loads in milliseconds: no bar in the cell
    try:
        model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, **kwargs)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    return model, tokenizer


def _get(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)
