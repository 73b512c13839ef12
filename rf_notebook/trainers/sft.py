"""SFT runs: `trl.SFTTrainer` on one named LoRA adapter of the shared base model.

Each trainer module has the same small surface: `CONFIG` (the spec of its arguments), `check_dataset` (columns,
before anything trains), `resolve_args` (the user's values over rf_notebook's defaults), `steps_per_epoch`,
`rows_per_step` and `rung_multiple` (for the chunk plan) and `build_trainer` (the one trainer a run keeps for its
whole life).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rf_notebook import chunking
from rf_notebook.configs import RFModelConfig, RFSFTConfig
from rf_notebook.trainers._common import MODULE_SURFACE, base_args, check_columns

__all__ = list(MODULE_SURFACE)

CONFIG = RFSFTConfig

# Any one of these column sets is a data set SFTTrainer can train on without a formatting function.
DATASET_FORMATS: tuple[tuple[str, ...], ...] = (("prompt", "completion"), ("messages",), ("text",))


def check_dataset(dataset: Any, role: str, formatting_func: Callable | None) -> None:
    check_columns(dataset, role, "SFT", DATASET_FORMATS, formatting_func)


def resolve_args(user: Mapping[str, Any], *, output_dir: str, seed: int, on_gpu: bool) -> dict[str, Any]:
    return base_args(user, output_dir=output_dir, seed=seed, on_gpu=on_gpu)


def steps_per_epoch(num_rows: int, args: Any) -> int:
    return chunking.steps_per_epoch(
        num_rows, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.dataloader_drop_last
    )


def rows_per_step(args: Any) -> float:
    return args.per_device_train_batch_size * args.gradient_accumulation_steps


def rung_multiple(args: Any) -> int:
    """Chunk ends fall on multiples of this many optimizer steps (any step: nothing is carried between steps)."""
    return 1


def build_trainer(
    model: Any,
    tokenizer: Any,
    args: Any,
    train_dataset: Any,
    eval_dataset: Any,
    model_config: RFModelConfig,
    callbacks: Sequence[Any],
    *,
    load_reference: Callable[[Any], Any],
) -> Any:
    from trl import SFTTrainer

    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        compute_metrics=model_config.compute_metrics,
        formatting_func=model_config.formatting_func,
        callbacks=list(callbacks),
    )
