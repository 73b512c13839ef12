"""SFT runs: `trl.SFTTrainer` on one named LoRA adapter of the shared base model.

`check_dataset` validates columns before anything trains, `resolve_args` turns a user's `RFSFTConfig` values
into the run's full `SFTConfig` keyword arguments (with CPU-safe defaults a user would otherwise trip over),
and `build_trainer` builds the one trainer the run keeps for its whole life.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rf_notebook.configs import RFSFTConfig

__all__ = ["CONFIG", "check_dataset", "resolve_args", "build_trainer", "DATASET_FORMATS"]

CONFIG = RFSFTConfig  # the spec of this trainer's arguments

# Any one of these column sets is a data set SFTTrainer can train on without a formatting function.
DATASET_FORMATS: tuple[tuple[str, ...], ...] = (("prompt", "completion"), ("messages",), ("text",))


def check_dataset(dataset: Any, role: str, formatting_func: Callable | None) -> None:
    """Raise a ValueError naming the data set and the columns SFT needs, before any training starts."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise TypeError(f"the {role} data set is a {type(dataset).__name__}, but must be a datasets.Dataset")
    if len(dataset) == 0:
        raise ValueError(f"the {role} data set is empty, but must have at least one row")
    if formatting_func is not None:
        return
    if not any(all(c in columns for c in fmt) for fmt in DATASET_FORMATS):
        expected = " or ".join("+".join(fmt) for fmt in DATASET_FORMATS)
        raise ValueError(
            f"the {role} data set has columns {list(columns)}, but SFT needs {expected} "
            "(or a formatting_func in RFModelConfig)"
        )


def resolve_args(user: Mapping[str, Any], *, output_dir: str, seed: int, on_gpu: bool) -> dict[str, Any]:
    """The run's `SFTConfig` keyword arguments: the user's values over rf_notebook's defaults.

    Defaults: the experiment's seed (also as `data_seed`, so the sample order is the seed's whatever else
    happened in the process), a loss logged at every step, no checkpoints written by the trainer (the engine
    keeps per-run state itself), no reporting integrations, and on CPU no bf16 and no activation checkpointing.
    """
    args: dict[str, Any] = {
        "output_dir": output_dir,
        "seed": seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    if not on_gpu:
        args.update(bf16=False, fp16=False, activation_checkpointing=False, use_cpu=True)
    args.update(user)
    args.setdefault("data_seed", args["seed"])
    return args


def build_trainer(
    model: Any,
    tokenizer: Any,
    args: Any,
    train_dataset: Any,
    eval_dataset: Any,
    compute_metrics: Callable | None,
    formatting_func: Callable | None,
    callbacks: Sequence[Any],
) -> Any:
    from trl import SFTTrainer

    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        formatting_func=formatting_func,
        callbacks=list(callbacks),
    )
