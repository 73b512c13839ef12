"""DPO runs: `trl.DPOTrainer` on one named LoRA adapter of the shared base model.

The reference model is the shared base with adapters disabled (TRL does this itself when it is given a PEFT
model and no `ref_model`): no second copy of the base is ever loaded. A model config whose `ref_model_name`
names another model gets that model (loaded once by the engine, shared by the runs that name it).

The reference is the same for every run of a base, so its log-probabilities of a batch are too: runs that see the
same batch (the same seed and batch size give the same data order) compute them once (`share_reference_forward`).
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
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
    share_reference_forward(trainer)
    return trainer


# The reference log-probabilities of the batches the runs of a base saw: {PEFT model: {batch key: (chosen, rejected)}}.
# Keyed weakly by the model, so they go with their experiment's base; at most REFERENCE_BATCHES per base.
_reference_logps: weakref.WeakKeyDictionary[Any, OrderedDict[str, tuple[Any, Any]]] = weakref.WeakKeyDictionary()
REFERENCE_BATCHES = 1 << 15


def share_reference_forward(trainer: Any) -> None:
    """Let the trainer's reference forward of a batch be one any run of its base already did, exactly.

    Where the reference is the shared base with adapters disabled, fixed (no LoRA bias trains the base's biases),
    and its forward draws no random numbers (`reference_is_deterministic`), the reference log-probabilities of a
    batch depend on the batch alone: the trainer's `compute_loss` (an instance attribute) looks them up by the
    batch's content, computes them with TRL's own `compute_ref_log_probs` when no run has, and hands them to TRL's
    loss the way precomputed ones come (TRL's `precompute_ref_log_probs` path, switched on for that call only). Runs
    that see the same batches (same seed and batch size) then do one reference forward per batch between them, in
    training, evaluation and anneal probes. A reference forward that draws random numbers all the same (a model
    applying dropout in a way the checks do not see) fails the run rather than train it on another's sample.
    """
    import torch

    if trainer.precompute_ref_logps or trainer.ref_model is not None or reference_is_deterministic(trainer) is not None:
        return
    cache = _reference_logps.setdefault(trainer.model, OrderedDict())
    compute_loss = trainer.compute_loss  # TRL's, bound to this trainer

    def compute_loss_sharing_reference(model: Any, inputs: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        key = _batch_key(inputs, model.training, trainer.ld_alpha)
        if key is None:  # a batch that cannot be named by its content: TRL's own path
            return compute_loss(model, inputs, *args, **kwargs)
        found = cache.get(key)
        if found is None:
            before = _random_states(torch)
            found = tuple(trainer.compute_ref_log_probs(model, inputs))
            if _random_states(torch) != before:
                raise RuntimeError(
                    "the reference forward drew random numbers (dropout the model applies itself?), so runs cannot "
                    "share it: set `disable_dropout=True` and no dropout in the model's config"
                )
            cache[key] = found
            if len(cache) > REFERENCE_BATCHES:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        inputs = {**inputs, "ref_chosen_logps": found[0], "ref_rejected_logps": found[1]}
        trainer.precompute_ref_logps = True
        try:
            return compute_loss(model, inputs, *args, **kwargs)
        finally:
            trainer.precompute_ref_logps = False

    trainer.compute_loss = compute_loss_sharing_reference


def reference_is_deterministic(trainer: Any) -> str | None:
    """None where the reference forward is a fixed function of the batch; else why not. TRL's `disable_dropout`
    zeroes the model's `nn.Dropout` modules, not the dropout a model applies as a function from its config (OPT's
    `dropout`, Llama's `attention_dropout`, MoE router jitter): any such config value above 0 counts as random."""
    import torch

    if not trainer.args.disable_dropout:
        return "disable_dropout=False"
    model = trainer.model
    for name, module in model.named_modules():  # the adapters' own dropout is off in the reference forward
        if isinstance(module, torch.nn.Dropout) and module.p > 0 and "lora_dropout" not in name:
            return f"the base model has dropout ({name}: p={module.p})"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    configs = [base.config]
    if hasattr(base.config, "get_text_config"):
        configs.append(base.config.get_text_config())
    for config in configs:
        for name, value in config.to_dict().items():
            if ("dropout" in name or "jitter" in name) and isinstance(value, (int, float)) and value > 0:
                return f"the base model's config sets {name}={value}"
    if any(getattr(config, "bias", "none") != "none" for config in getattr(model, "peft_config", {}).values()):
        return "a LoRA config trains the base's biases (bias != 'none'): the reference changes as runs train"
    return None


def _random_states(torch: Any) -> tuple[bytes, ...]:
    states = [torch.random.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += torch.cuda.get_rng_state_all()
    return tuple(state.numpy().tobytes() for state in states)


def _batch_key(inputs: Mapping[str, Any], training: bool, ld_alpha: Any) -> str | None:
    """Everything the reference log-probabilities of a batch depend on: every tensor of the batch (values, shape,
    dtype), the mode and the length weighting; None for a batch holding anything else than tensors and plain
    numbers or strings (nothing short would name it)."""
    import torch

    digest = hashlib.blake2b(digest_size=20)
    digest.update(repr((training, ld_alpha)).encode())
    for name in sorted(inputs):
        value = inputs[name]
        if name in ("ref_chosen_logps", "ref_rejected_logps"):
            continue
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().contiguous().cpu()
            digest.update(repr((tuple(tensor.shape), str(tensor.dtype))).encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
        elif value is None or isinstance(value, (bool, int, float, str)):
            digest.update(repr(value).encode())
        else:
            return None
    return digest.hexdigest()
