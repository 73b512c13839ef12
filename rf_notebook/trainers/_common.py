"""What every trainer type shares: the argument defaults rf_notebook sets, the data set column check, the one
precision per run_fit, and how preference / RL trainers are told that the shared base is their reference model."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from rf_notebook.fields import OWNED_FIELDS, PER_BASE_FIELDS, PROCESS_FIELDS

__all__ = ["MODULE_SURFACE", "base_args", "check_columns", "check_shared_state", "base_is_reference"]

# How the fingerprint of a data set formatted by a user's function starts (`apply_formatting`): it names no content.
UNSHARED_FINGERPRINT = "rf-formatted-"

# What every trainer module (sft, dpo, grpo, rloo) defines: its whole surface, the same names for each type.
MODULE_SURFACE = (
    "CONFIG",
    "check_dataset",
    "resolve_args",
    "steps_per_epoch",
    "rows_per_step",
    "rung_multiple",
    "prepared_rows",
    "build_trainer",
)


def base_args(user: Mapping[str, Any], *, output_dir: str, seed: int, on_gpu: bool) -> dict[str, Any]:
    """A run's trainer keyword arguments: the user's values over rf_notebook's defaults, and the fields the
    experiment owns (`fields.OWNED_FIELDS`) set by rf_notebook alone, after the user's.

    Defaults: the experiment's seed (also as `data_seed`, so the sample order is the seed's whatever else
    happened in the process), a loss logged at every step and logged as it is (a NaN loss shows as NaN, not
    as the mean of the steps before: transformers' `logging_nan_inf_filter`), no activation checkpointing unless
    asked for (TRL turns it on by default: every step would run its forward twice, to save memory the runs of a
    sweep rarely need; it is also one switch on the shared base, see `check_shared_state`), and on CPU no bf16.
    Owned: the run's own folder `output_dir`, no checkpoints written by the trainer
    (the engine keeps per-run state itself), no reporting integrations, no pushes. A user's value of an owned
    field never reaches the trainer (the configs refuse those that would change anything): two runs never share
    a folder, whatever their configs say.
    """
    args: dict[str, Any] = {
        "seed": seed,
        "logging_steps": 1,
        "logging_nan_inf_filter": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "activation_checkpointing": False,
    }
    if not on_gpu:
        args.update(bf16=False, fp16=False, use_cpu=True)
    args.update({key: value for key, value in user.items() if key not in OWNED_FIELDS})
    args.update(output_dir=output_dir, save_strategy="no", report_to="none")  # the rest keep TRL's defaults
    args.setdefault("data_seed", args["seed"])
    return args


def check_shared_state(runs: Sequence[Any]) -> None:
    """Refuse, before anything is loaded, runs of one run_fit that differ in what they cannot each have their own of.

    `PROCESS_FIELDS` set process-wide state (Accelerate holds one mixed-precision mode per process; TF32, full
    determinism, torch.compile and the full-eval casts are process- or model-wide): one value for every run.
    `PER_BASE_FIELDS` (activation checkpointing) switch the shared base model itself: one value for the runs that
    share a base. `runs` are prepared runs: `.args` is the real trainer config, `.spec.name` the run's name.
    """

    def compare(group: Sequence[Any], names: Sequence[str], why: str) -> None:
        (first, want), *others = [(run.spec.name, {n: getattr(run.args, n, None) for n in names}) for run in group]
        for other, got in others:
            differ = [name for name in names if got[name] != want[name]]
            if differ:
                raise ValueError(
                    f"run {first!r} trains with {', '.join(f'{n}={want[n]!r}' for n in differ)} but run {other!r} "
                    f"with {', '.join(f'{n}={got[n]!r}' for n in differ)}: {why}"
                )

    if not runs:
        return
    compare(
        runs,
        PROCESS_FIELDS,
        "these are one setting for the whole process (Accelerate holds one mixed-precision mode, torch one TF32 and "
        "determinism switch), so every run of one run_fit takes the same value; split the sweep into two run_fit "
        "calls",
    )
    by_base: dict[Any, list[Any]] = {}
    for run in runs:
        by_base.setdefault(run.spec.model_config.base_key(), []).append(run)
    for group in by_base.values():
        compare(
            group,
            PER_BASE_FIELDS,
            "activation checkpointing is switched on the base model the runs share, so runs on one base take one "
            "value; give them the same, or a second base (another model_kwargs) for the other value",
        )


def check_columns(
    dataset: Any,
    role: str,
    trainer_type: str,
    formats: Sequence[Sequence[str]],
    formatting_func: Callable | None = None,
) -> None:
    """Raise a clear error unless `dataset` is a non-empty `datasets.Dataset` with one of `formats`' columns."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise TypeError(f"the {role} data set is a {type(dataset).__name__}, but must be a datasets.Dataset")
    if len(dataset) == 0:
        raise ValueError(f"the {role} data set is empty, but must have at least one row")
    if formatting_func is not None:
        return
    if not any(all(c in columns for c in fmt) for fmt in formats):
        expected = " or ".join("+".join(fmt) for fmt in formats)
        hint = " (or a formatting_func in RFModelConfig)" if trainer_type == "SFT" else ""
        raise ValueError(f"the {role} data set has columns {list(columns)}, but {trainer_type} needs {expected}{hint}")


@contextlib.contextmanager
def base_is_reference(model: Any, adapter: str) -> Iterator[None]:
    """While a DPO / GRPO / RLOO trainer is built on the shared PEFT model: make it use the base as reference.

    Given a model that already is a `PeftModel`, TRL assumes a pretrained adapter named "default" and freezes a
    copy of it as a "ref" adapter. A run's adapter is freshly initialised (LoRA B is zero, so it computes exactly
    the base), and its reference is the base with adapters disabled: what TRL itself does when it is handed a
    `peft_config` instead, and what a plain TRL run of the same config computes. So the copy is skipped: no extra
    adapter, no extra random draws, and `"ref" not in model.peft_config` sends TRL to `disable_adapter()`.
    """
    configs = model.peft_config
    aliased = "default" not in configs
    if aliased:
        configs["default"] = configs[adapter]

    def add_adapter(name: str, *args: Any, **kwargs: Any) -> None:
        if name != "ref":
            raise RuntimeError(f"unexpected adapter {name!r} added while building a trainer")

    model.add_adapter = add_adapter  # an instance attribute shadows PeftModel.add_adapter
    try:
        yield
    finally:
        del model.add_adapter
        if aliased:
            del configs["default"]


def apply_formatting(dataset: Any, formatting_func: Any, role: str) -> Any:
    """`dataset` put through `formatting_func(row)` (RapidFire AI's shape): a dict adds or replaces columns
    (e.g. {"prompt": [...messages], "completion": [...]}); a string becomes the row's only column, "text"."""
    import datasets

    name = getattr(formatting_func, "__qualname__", repr(formatting_func))
    if len(dataset) == 0:
        return dataset
    try:
        first = formatting_func(dataset[0])
    except Exception as exc:
        raise ValueError(f"formatting_func {name} failed on the first {role} row: {exc!r}") from exc
    # Its own fingerprint, never one derived from hashing the function: a function's code hashes the same when
    # what it reads has changed, and prepared data found by fingerprint would then be another call's.
    fingerprint = f"{UNSHARED_FINGERPRINT}{uuid.uuid4().hex}"
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bar()
    try:
        if isinstance(first, str):
            return dataset.map(
                lambda row: {"text": formatting_func(row)},
                remove_columns=dataset.column_names,
                new_fingerprint=fingerprint,
            )
        if isinstance(first, Mapping):
            return dataset.map(lambda row: dict(formatting_func(row)), new_fingerprint=fingerprint)
    finally:
        if bars:
            datasets.enable_progress_bar()
    raise TypeError(
        f"formatting_func {name} returned a {type(first).__name__} for the first {role} row, but must return a dict "
        "such as {'prompt': [...], 'completion': [...]} or a string"
    )
