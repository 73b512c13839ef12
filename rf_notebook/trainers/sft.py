"""SFT runs: `trl.SFTTrainer` on one named LoRA adapter of the shared base model.

Each trainer module has the same small surface: `CONFIG` (the spec of its arguments), `check_dataset` (columns,
before anything trains), `resolve_args` (the user's values over rf_notebook's defaults), `steps_per_epoch`,
`rows_per_step` and `rung_multiple` (for the chunk plan) and `build_trainer` (the one trainer a run keeps for its
whole life).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rf_notebook import chunking
from rf_notebook.configs import RFModelConfig, RFSFTConfig
from rf_notebook.trainers._common import MODULE_SURFACE, base_args, check_columns
from rf_notebook.trainers._prepared import PreparedData

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


# Training arguments that do not reach SFTTrainer's data preparation (tokenizing, labels, truncation, packing,
# shuffling): runs that differ only in these train on one prepared copy of the data. Any other difference (max_length,
# packing, seed, dataset_text_field, a field added by a later TRL, ...) gets its own preparation.
OPTIMIZATION_ONLY = frozenset(
    {
        "learning_rate",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "lr_scheduler_type",
        "lr_scheduler_kwargs",
        "warmup_ratio",
        "warmup_steps",
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "optim",
        "optim_args",
        "output_dir",
        "logging_dir",
        "run_name",
    }
)


def preparation_key(
    tokenizer: Any, args: Any, train: Any, evl: Any, formatting_func: Any, prepared: PreparedData
) -> str:
    """What SFTTrainer's preparation of (train, evl) depends on; equal keys give equal prepared data sets. (The
    fields themselves, not `to_dict()`, which writes every `*_token` field, `eos_token` and `pad_token` included, as
    a placeholder.)"""
    relevant = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name not in OPTIMIZATION_ONLY}
    return prepared.key("SFT", tokenizer, (train, evl), formatting_func, relevant)


def _shareable(args: Any) -> bool:
    """Whether a run's prepared data sets can be another's. A packed data set keeps only input_ids and labels, from
    which TRL's constructor can no longer tell a conversational data set (what assistant_only_loss checks): those
    runs prepare their own."""
    return not (args.packing or args.eval_packing or args.assistant_only_loss)


def prepared_rows(
    tokenizer: Any, args: Any, train_dataset: Any, eval_dataset: Any, formatting_func: Any, prepared: PreparedData
) -> int | None:
    """The rows of the training set as an earlier run's trainer prepared it the same way (None: not prepared yet)."""
    if not _shareable(args):
        return None
    key = preparation_key(tokenizer, args, train_dataset, eval_dataset, formatting_func, prepared)
    entry = prepared.get(key, shared=False)  # a trainer of this base was built on it: this one can wait
    return None if entry is None else len(entry[0])


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
    prepared: PreparedData,
) -> Any:
    """`prepared` holds the data sets already prepared by an earlier run's trainer (`_prepared.PreparedData`): a
    run whose preparation would be the same (`preparation_key`) starts from those instead of tokenizing again.
    TRL's own `skip_prepare_dataset` is set only while its trainer is built; its `args` stay the run's own."""
    from trl import SFTTrainer

    formatting_func = model_config.formatting_func
    shareable = _shareable(args)
    key = preparation_key(tokenizer, args, train_dataset, eval_dataset, formatting_func, prepared)
    user_dataset_kwargs = args.dataset_kwargs
    found = prepared.get(key) if shareable else None
    if found is not None:
        train_dataset, eval_dataset = found
        formatting_func = None  # already applied
        args.dataset_kwargs = {**(user_dataset_kwargs or {}), "skip_prepare_dataset": True}
    try:
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            compute_metrics=model_config.compute_metrics,
            formatting_func=formatting_func,
            callbacks=list(callbacks),
        )
    finally:
        args.dataset_kwargs = user_dataset_kwargs
    if shareable:
        prepared.put(key, (trainer.train_dataset, trainer.eval_dataset))
    return trainer
