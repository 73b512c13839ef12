"""DPO runs: `trl.DPOTrainer` on one named LoRA adapter of the shared base model.

The reference model is the shared base with adapters disabled (TRL does this itself when it is given a PEFT
model and no `ref_model`): no second copy of the base is ever loaded. A model config whose `ref_model_name`
names another model gets that model (loaded once by the engine, shared by the runs that name it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from rf_notebook.configs import RFDPOConfig, RFModelConfig
from rf_notebook.trainers import sft
from rf_notebook.trainers._common import MODULE_SURFACE, base_args, base_is_reference, check_columns

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


def prepared_rows(
    tokenizer: Any, args: Any, train_dataset: Any, eval_dataset: Any, formatting_func: Any, prepared: Any
) -> int | None:
    """Each DPO run prepares its own data set (tokenized pairs): only building the trainer tells."""
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
    prepared: MutableMapping[Any, Any],
) -> Any:
    from trl import DPOTrainer

    ref_model = load_reference(model_config) if model_config.ref_model_name else None
    with base_is_reference(model, model.active_adapter):
        return DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            compute_metrics=model_config.compute_metrics,
            callbacks=list(callbacks),
        )
