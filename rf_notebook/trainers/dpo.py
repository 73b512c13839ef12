"""DPO runs: `trl.DPOTrainer` on one named LoRA adapter of the shared base model.

The reference model is the shared base with adapters disabled (TRL does this itself when it is given a PEFT
model and no `ref_model`): no second copy of the base is ever loaded. A model config whose `ref_model_name`
names another model gets that model (loaded once by the engine, shared by the runs that name it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rf_notebook.configs import RFDPOConfig, RFModelConfig
from rf_notebook.trainers import sft
from rf_notebook.trainers._common import MODULE_SURFACE, base_args, base_is_reference, check_columns
from rf_notebook.trainers._prepared import PreparedData

__all__ = list(MODULE_SURFACE)

CONFIG = RFDPOConfig

# Preference pairs: an explicit prompt, or a prompt shared by the conversations in chosen / rejected.
DATASET_FORMATS: tuple[tuple[str, ...], ...] = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))


def check_dataset(dataset: Any, role: str, formatting_func: Callable | None) -> None:
    check_columns(dataset, role, "DPO", DATASET_FORMATS)


def resolve_args(user: Mapping[str, Any], *, output_dir: str, seed: int, on_gpu: bool) -> dict[str, Any]:
    loss_types = user.get("loss_type", "sigmoid")
    loss_types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    smoothing = user.get("label_smoothing", 0.0)
    # TRL only warns; its robust loss divides by 1 - 2 * label_smoothing, so 0.5 is NaN from the first step
    if "robust" in loss_types and not 0.0 <= smoothing < 0.5:
        raise ValueError(
            f"`label_smoothing` is {smoothing!r}, but the 'robust' loss needs it in [0.0, 0.5): the loss is divided "
            "by 1 - 2 * label_smoothing (0.5 gives NaN at the first step)"
        )
    return base_args(user, output_dir=output_dir, seed=seed, on_gpu=on_gpu)


steps_per_epoch = sft.steps_per_epoch  # one row (a preference pair) per batch slot, as in SFT
rows_per_step = sft.rows_per_step
rung_multiple = sft.rung_multiple


# What `DPOTrainer._prepare_dataset` reads of the run's arguments (a test reads TRL's source for these): runs that
# agree on them and share a tokenizer and data set get one tokenized copy, whatever their beta, loss or learning rate.
PREPARATION_ARGS = ("dataset_num_proc", "max_length", "truncation_mode")


def preparation_key(tokenizer: Any, args: Any, dataset: Any, prepared: PreparedData) -> str:
    """What DPOTrainer's preparation of one data set (train or eval) depends on."""
    return prepared.key("DPO", tokenizer, (dataset,), None, {name: getattr(args, name) for name in PREPARATION_ARGS})


def prepared_rows(
    tokenizer: Any, args: Any, train_dataset: Any, eval_dataset: Any, formatting_func: Any, prepared: Any
) -> int | None:
    """Always None: every DPO run's trainer is built at setup, since its constructor checks settings of the run's own
    (loss types against label smoothing, an adapter on the LM head, ...). Its data preparation is shared all the
    same (`build_trainer`)."""
    return None


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
    """The run's `DPOTrainer`. Its constructor prepares (tokenizes) each data set through the trainer's own
    `_prepare_dataset`; a data set an earlier run's trainer prepared with the same `preparation_key` is taken from
    `prepared` instead. The trainer is TRL's class itself: only the instance's preparation is routed, while it is
    built."""
    from trl import DPOTrainer

    used: list[tuple[str, Any]] = []  # kept once the trainer is built

    def prepare_once(dataset: Any, processing_class: Any, run_args: Any, dataset_name: str) -> Any:
        key = preparation_key(processing_class, run_args, dataset, prepared)
        found = prepared.get(key)
        if found is None:
            found = DPOTrainer._prepare_dataset(trainer, dataset, processing_class, run_args, dataset_name)
        used.append((key, found))
        return found

    ref_model = load_reference(model_config) if model_config.ref_model_name else None
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer._prepare_dataset = prepare_once  # an instance attribute: the class and other trainers are untouched
    try:
        with base_is_reference(model, model.active_adapter):
            trainer.__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=tokenizer,
                compute_metrics=model_config.compute_metrics,
                callbacks=list(callbacks),
            )
    finally:
        del trainer._prepare_dataset
    for key, value in used:
        prepared.put(key, value)
    return trainer
