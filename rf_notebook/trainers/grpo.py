"""GRPO runs: `trl.GRPOTrainer` on one named LoRA adapter of the shared base model (see `_online` for what
GRPO and RLOO share: sampled groups of completions, rewards, the reference model)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rf_notebook.configs import RFGRPOConfig, RFModelConfig
from rf_notebook.trainers import _online

__all__ = ["CONFIG", "check_dataset", "resolve_args", "steps_per_epoch", "rows_per_step", "build_trainer"]

CONFIG = RFGRPOConfig
steps_per_epoch = _online.steps_per_epoch
rows_per_step = _online.rows_per_step


def check_dataset(dataset: Any, role: str, formatting_func: Callable | None) -> None:
    _online.check_dataset(dataset, role, formatting_func, "GRPO")


def resolve_args(user: Mapping[str, Any], *, output_dir: str, seed: int, on_gpu: bool) -> dict[str, Any]:
    return _online.resolve_args(user, CONFIG.target(), output_dir=output_dir, seed=seed, on_gpu=on_gpu)


def build_trainer(
    model: Any,
    tokenizer: Any,
    args: Any,
    train_dataset: Any,
    eval_dataset: Any,
    model_config: RFModelConfig,
    callbacks: Sequence[Any],
) -> Any:
    from trl import GRPOTrainer

    return _online.build_trainer(
        GRPOTrainer, model, tokenizer, args, train_dataset, eval_dataset, model_config, callbacks
    )
