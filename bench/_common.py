"""Shared pieces of the benchmarks: models, sweeps, the machine line, JSON results and BENCHMARKS.md tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from rf_notebook import List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, MODEL_DIR, demo_model_fn

# RF_BENCH_OUT redirects results and tables (the test suite's smoke run writes to a temporary folder).
_OUT = os.environ.get("RF_BENCH_OUT")
RESULTS = Path(_OUT) / "results" if _OUT else Path(__file__).with_name("results")
BENCHMARKS_MD = Path(_OUT) / "BENCHMARKS.md" if _OUT else Path(__file__).parents[1] / "BENCHMARKS.md"
LEARNING_RATES = [3e-3, 1e-3, 3e-4, 1e-4, 2e-3, 5e-4, 2e-4, 5e-5, 4e-3, 8e-4, 4e-4, 8e-5, 6e-3, 6e-4, 6e-5, 1e-5]


def llama512_fn(model_config: Any = None) -> tuple[Any, Any]:
    """A Llama-style model larger than the demo one (hidden 512, 4 layers, ~13M parameters), random init."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config), tokenizer


def qwen05_fn(model_config: Any = None) -> tuple[Any, Any]:
    """A Qwen2.5-0.5B-shaped model (24 layers, hidden 896, vocab 151,936), random init, bfloat16 on a GPU."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32_768,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return Qwen2ForCausalLM(config).to(dtype), tokenizer


MODELS = {"demo": demo_model_fn, "llama512": llama512_fn, "qwen05": qwen05_fn}


class Timing:
    """Wall and process CPU time (every thread's) of a `with` block."""

    wall: float
    cpu: float

    def __enter__(self) -> Timing:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def plain_trainer(
    model_fn: Any,
    training_args: dict[str, Any],
    peft_config: dict[str, Any],
    train: Any,
    evl: Any = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """The baseline: a plain TRL `SFTTrainer` on a fresh base, quiet like rf_notebook's (no PrinterCallback)."""
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = model_fn(None)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**training_args),
        train_dataset=train,
        eval_dataset=evl,
        processing_class=tokenizer,
        peft_config=LoraConfig(**peft_config),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # rf_notebook removes it too: printing is not training
    return trainer


def sweep(n_runs: int, max_steps: int, batch: int, **training_args: Any) -> RFGridSearch:
    """`n_runs` SFT configs that differ only in learning rate (same compute per run)."""
    return RFGridSearch(
        RFModelConfig(
            model_name=DEMO_MODEL,
            peft_config=RFLoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=List(LEARNING_RATES[:n_runs]),
                per_device_train_batch_size=batch,
                max_steps=max_steps,
                **training_args,
            ),
        ),
        trainer_type="SFT",
    )


def parse_args(
    doc: str, argv: list[str] | None, *, runs: bool = True, repeats: int = 3, max_steps: int = 64, num_chunks: int = 8
) -> argparse.Namespace:
    """The arguments every training benchmark takes; also quiets transformers' logging."""
    import transformers

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    if runs:
        parser.add_argument("--runs", type=int, default=4)
    if num_chunks:
        parser.add_argument("--num-chunks", type=int, default=num_chunks)
    parser.add_argument("--max-steps", type=int, default=max_steps)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=repeats)
    transformers.logging.set_verbosity_error()
    return parser.parse_args(argv)


def header(name: str, argv: list[str] | None) -> dict[str, Any]:
    """Date, machine and the exact command of benchmark `name` ("thread-demo" runs `python -m bench.thread`)."""
    import torch

    device = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    return {
        "benchmark": name,
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {device}",
        "command": " ".join([f"python -m bench.{name.split('-')[0]}", *(sys.argv[1:] if argv is None else argv)]),
    }


def save(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Write bench/results/<name>.json; return every result of that benchmark (for its table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    prefix = name.split("-")[0]
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{prefix}*.json"))]


def write_section(key: str, title: str, intro: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Replace (or append) one section of BENCHMARKS.md, delimited by markers, with a fresh table."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    table = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    table += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    block = f"{start}\n## {title}\n\n{intro}\n\n" + "\n".join(table) + f"\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def new_experiment(name: str, workdir: str | Path) -> Any:
    """A fresh experiment in its own folder under `workdir` (an existing one would be reopened with its runs), which
    prepares its data from scratch: what earlier experiments in this process tokenized is forgotten (a later
    `run_fit` on the same data would skip that; plain TRL, compared with it, tokenizes every time)."""
    import tempfile

    from rf_notebook import Experiment
    from rf_notebook.trainers._prepared import clear_shared

    clear_shared()
    return Experiment(name, experiments_dir=tempfile.mkdtemp(dir=workdir))
