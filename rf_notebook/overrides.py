"""Validation of Clone-Modify overrides: JSON-compatible values for real fields, checked before anything runs.

    train, lora = split_overrides({"learning_rate": 1e-4, "r": 16}, current, sft_fields, lora_fields, warm_start)

A key names a field of the run's training arguments or LoRA config, bare (`"learning_rate"`) or dotted
(`"training_args.learning_rate"`, `"peft_config.r"`). Values must be JSON data (numbers, strings, booleans,
lists, dicts, null): nothing a user types is evaluated. The fields the experiment owns (`fields.OWNED_FIELDS`:
the run's folder, checkpoints, trackers, pushes) and a precision other than the running runs' are refused.
Each error names the field and what was expected. Pure.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from rf_notebook.fields import PER_BASE_FIELDS, PROCESS_FIELDS, owned_refusal, owned_value_repr

__all__ = ["split_overrides", "SHAPE_FIELDS", "DATA_POSITION_FIELDS"]

SECTIONS = ("training_args", "peft_config")
# A warm start continues the parent's adapter and data position, so it cannot change these.
SHAPE_FIELDS = frozenset(
    {
        "r",
        "target_modules",
        "use_dora",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "exclude_modules",
        "bias",
        "use_rslora",
    }
)
DATA_POSITION_FIELDS = frozenset(
    {
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "dataloader_drop_last",
        "data_seed",
        "seed",
        # GRPO / RLOO: how prompts are grouped into generation batches
        "num_generations",
        "generation_batch_size",
        "steps_per_generation",
        "num_iterations",
    }
)

_POSITIVE = {
    "learning_rate",
    "r",
    "lora_alpha",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "per_device_eval_batch_size",
    "num_generations",
    "max_completion_length",
}
_NON_NEGATIVE = {"weight_decay", "warmup_steps", "warmup_ratio", "max_grad_norm", "adam_epsilon", "beta"}
_UNIT_INTERVAL = {"lora_dropout", "adam_beta1", "adam_beta2"}


def split_overrides(
    overrides: Any,
    current: Mapping[str, Mapping[str, Any]],
    fields: Mapping[str, Sequence[str]],
    warm_start: bool,
) -> dict[str, dict[str, Any]]:
    """Overrides by section ({"training_args": {...}, "peft_config": {...}}), validated.

    `current` holds the parent's resolved values per section, `fields` the config classes' field names.
    """
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides is a {type(overrides).__name__}, but must be a dict of field name -> value")
    out: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise TypeError(f"override key {key!r} is not a string; expected a field name")
        section, name = _resolve(key, fields)
        parent = current.get(section, {}).get(name)
        why = owned_refusal(name, value) if section == "training_args" else None
        if why is not None:
            raise ValueError(f"override {key!r} is {owned_value_repr(name, value)}, but {why}")
        _check_json(key, value)
        _check_type(key, value, parent)
        _check_range(key, name, value)
        if section == "training_args" and name in PROCESS_FIELDS + PER_BASE_FIELDS and value != parent:
            shared = "process (one Accelerate mixed-precision mode, one TF32 / determinism switch)"
            if name in PER_BASE_FIELDS:
                shared = "base model the runs share (activation checkpointing is switched on the model itself)"
            raise ValueError(
                f"override {key!r} is {value!r}, but the run trains with {name}={parent!r} and that is one setting "
                f"for the whole {shared}; start another run_fit for {name}={value!r}"
            )
        if warm_start and name in SHAPE_FIELDS:
            raise ValueError(
                f"warm start cannot change {key!r}: it changes the adapter's shape; clone without "
                "warm_start to train a new shape from scratch"
            )
        if warm_start and name in DATA_POSITION_FIELDS:
            raise ValueError(f"warm start cannot change {key!r}: the clone continues the parent's data position")
        out[section][name] = value
    return out


def _resolve(key: str, fields: Mapping[str, Sequence[str]]) -> tuple[str, str]:
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ValueError(f"override {key!r} names section {section!r}; expected one of {list(SECTIONS)}")
        if name not in fields[section]:
            raise ValueError(f"override {key!r}: {name!r} is not a field of {section}{_hint(name, fields[section])}")
        return section, name
    owners = [section for section in SECTIONS if key in fields[section]]
    if not owners:
        every = [f for section in SECTIONS for f in fields[section]]
        raise ValueError(
            f"override {key!r} is not a field of the training arguments or the LoRA config{_hint(key, every)}"
        )
    if len(owners) > 1:
        raise ValueError(
            f"override {key!r} is a field of both {owners}; write 'training_args.{key}' or 'peft_config.{key}'"
        )
    return owners[0], key


def _hint(name: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _check_json(key: str, value: Any) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"override {key!r} is {value!r}, but must be a finite number")
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_json(key, item)
        return
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                raise TypeError(f"override {key!r} has a non-string key {k!r}; values must be JSON data")
            _check_json(key, item)
        return
    raise TypeError(
        f"override {key!r} is a {type(value).__name__}, but values must be JSON data "
        "(numbers, strings, booleans, lists, dicts or null)"
    )


def _check_type(key: str, value: Any, current: Any) -> None:
    if current is None or value is None:
        return
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(current, str):
        ok = isinstance(value, str) or (isinstance(value, list) and key.endswith("target_modules"))
    elif isinstance(current, (list, tuple)):
        ok = isinstance(value, (list, tuple)) or isinstance(value, str)
    elif isinstance(current, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise TypeError(
            f"override {key!r} is {value!r} ({type(value).__name__}), but the run's value is "
            f"{current!r} ({type(current).__name__})"
        )


def _check_range(key: str, name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if name in _POSITIVE and not value > 0:
        raise ValueError(f"override {key!r} is {value!r}, but must be > 0")
    if name in _NON_NEGATIVE and not value >= 0:
        raise ValueError(f"override {key!r} is {value!r}, but must be >= 0")
    if name in _UNIT_INTERVAL and not 0 <= value < 1:
        raise ValueError(f"override {key!r} is {value!r}, but must be in [0, 1)")
    if name == "max_steps" and not (value == -1 or value >= 1):
        raise ValueError(f"override {key!r} is {value!r}, but must be -1 (use epochs) or >= 1")
