"""The trainer arguments the experiment owns, those that set state shared by runs, and older fields' meanings.

- `OWNED_FIELDS`: arguments whose job rf_notebook does itself for every run (its folder, checkpoints, pushes,
  trackers, patches of the shared base): a user's value is refused unless it changes nothing
  (`owned_refusal`).
- `PRECISION_FIELDS`, `PROCESS_FIELDS`: process-wide state, one value for every run of a run_fit;
  `PER_BASE_FIELDS`: set on the shared base model, one value per base.
- `LEGACY_TRAINING` (and `renamed`, `dpo_lengths`, `grpo_prompt_length`): fields of the TRL / transformers
  versions RapidFire AI pins, rewritten into today's with a `LegacyFieldWarning`.

The `RF*Config` specs of `rf_notebook.configs` apply these; Clone-Modify overrides (`rf_notebook.overrides`) and
the trainers (`rf_notebook.trainers._common`) read them too. Pure: imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from rf_notebook.space import Range, alternatives

__all__ = [
    "LegacyFieldWarning",
    "LEGACY_TRAINING",
    "renamed",
    "dpo_lengths",
    "grpo_prompt_length",
    "OwnedField",
    "OWNED_FIELDS",
    "PRECISION_FIELDS",
    "PROCESS_FIELDS",
    "PER_BASE_FIELDS",
    "owned_refusal",
    "owned_value_repr",
]


class LegacyFieldWarning(UserWarning):
    """A field of the TRL / transformers versions RapidFire AI pins, taken as today's equivalent (old -> new)."""


def _ratios(value: Any) -> list[Any]:
    return [value.start, value.end] if isinstance(value, Range) else alternatives(value)


def _warmup_ratio(kwargs: dict[str, Any]) -> str:
    ratio = kwargs.pop("warmup_ratio")
    if kwargs.get("warmup_steps") not in (None, 0):
        raise ValueError(
            f"warmup_ratio={ratio!r} and warmup_steps={kwargs['warmup_steps']!r} are both set; transformers >= 5 has "
            "only warmup_steps (a value below 1 is the ratio of the total steps): set that one"
        )
    for value in _ratios(ratio):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(
                f"warmup_ratio is {value!r}, but transformers >= 5 takes a warmup ratio as warmup_steps below 1: "
                "use a ratio in [0, 1), or warmup_steps=<number of steps>"
            )
    kwargs["warmup_steps"] = ratio
    return f"warmup_ratio={ratio!r} -> warmup_steps={ratio!r} (transformers >= 5: a value below 1 is the ratio)"


def renamed(old: str, new: str) -> Callable[[dict[str, Any]], str]:
    def rename(kwargs: dict[str, Any]) -> str:
        value = kwargs.pop(old)
        if kwargs.get(new) is not None:
            both = f"{old}={value!r} and {new}={kwargs[new]!r}"
            raise ValueError(f"{both} are both set; {old} is now {new}: set that one")
        kwargs[new] = value
        return f"{old}={value!r} -> {new}={value!r}"

    return rename


def dpo_lengths(kwargs: dict[str, Any]) -> str:
    """TRL 0.x cut a DPO prompt to max_prompt_length (keeping its end) and each completion to
    max_completion_length; TRL >= 1 has only max_length over both together (`truncation_mode`)."""
    prompt, completion = kwargs.pop("max_prompt_length", None), kwargs.pop("max_completion_length", None)
    named = (("max_prompt_length", prompt), ("max_completion_length", completion))
    old = ", ".join(f"{k}={v!r}" for k, v in named if v is not None)
    concrete = all(isinstance(v, int) and not isinstance(v, bool) for v in (prompt, completion))
    if kwargs.get("max_length") is None and concrete:
        kwargs["max_length"] = prompt + completion
        return (
            f"{old} -> max_length={prompt + completion} (TRL >= 1 caps prompt and completion together; pre-truncate "
            "long prompts in the data for the old split)"
        )
    kept = f"max_length={kwargs['max_length']!r}" if kwargs.get("max_length") is not None else "TRL's max_length"
    return f"{old} -> dropped: {kept} caps prompt and completion together in TRL >= 1"


def grpo_prompt_length(kwargs: dict[str, Any]) -> str:
    value = kwargs.pop("max_prompt_length")
    return f"max_prompt_length={value!r} -> dropped: TRL >= 1 never truncates GRPO prompts (pre-truncate the data)"


# Fields every trainer's arguments had in transformers 4.x / TRL 0.x (RapidFire AI's pins) -> today's.
LEGACY_TRAINING = {
    "warmup_ratio": _warmup_ratio,
    # transformers 5 keeps these as deprecated aliases, but a default of the new name would silently win over them
    "gradient_checkpointing": renamed("gradient_checkpointing", "activation_checkpointing"),
    "gradient_checkpointing_kwargs": renamed("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
}


@dataclasses.dataclass(frozen=True)
class OwnedField:
    """A trainer argument whose job rf_notebook does itself, for every run apart from every other run.

    A user's value is refused unless it asks for nothing beyond what rf_notebook does anyway (`accepts`: TRL's
    default and the values that change nothing, so migrated notebooks keep working); either way the trainer gets
    rf_notebook's value, never the user's (`trainers._common.base_args`).
    """

    why: str  # completes "<field> is <value>, but ..."
    accepts: Callable[[Any], bool]
    secret: bool = False  # never echo the value (a token)


_FOLDER = (
    "the experiment owns each run's folder: a run's files live in <experiments_dir>/<experiment_name>/runs/<run_id>, "
    "shared with no other run; export a run's adapter with exp.export(run_id, path)"
)
_CHECKPOINTS = (
    "the experiment owns checkpoints: it writes each run's own checkpoint at every chunk end (every epoch end is "
    "one) and keeps the latest, and the trainer writes none (its checkpoints would hold every run's adapter of the "
    "shared base); set how often with run_fit(num_chunks=...)"
)
_HUB = (
    "the experiment does not push from inside training (the trainer would push mid-run, from a process and a base "
    "model other runs share); export the run's adapter with exp.export(run_id, path), then push that folder "
    "(e.g. huggingface_hub.upload_folder)"
)


_SHARED_BASE = (
    "it patches the base model every run shares for the whole of one run's training, so the interleaved runs "
    "would train under each other's patches; not supported with runs sharing a base: train that config with plain "
    "TRL"
)


def _is_none(value: Any) -> bool:
    return value is None


def _is_false(value: Any) -> bool:
    return value is None or value is False


# The fields, why each is the experiment's, and the values accepted as changing nothing. The TRL defaults are
# written out (tests check them against the pinned TRL, so an upgrade that changes one fails loudly).
OWNED_FIELDS: dict[str, OwnedField] = {
    "output_dir": OwnedField(_FOLDER, _is_none),
    "logging_dir": OwnedField(  # gone from transformers 5; RapidFire AI's notebooks for older versions may set it
        "the experiment records every run's metrics in its own folder; read them with exp.results()", _is_none
    ),
    # "epoch": every epoch end is a chunk end, where the run is checkpointed anyway. "steps" is TRL's default.
    "save_strategy": OwnedField(_CHECKPOINTS, lambda v: v in ("no", "chunk", "epoch", "steps")),
    # How often the trainer would save: it saves nothing, so any valid interval changes nothing.
    "save_steps": OwnedField(_CHECKPOINTS, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0),
    "load_best_model_at_end": OwnedField(
        _CHECKPOINTS + "; pick the best run and its adapter with exp.best_run() and exp.export(run_id, path)",
        _is_false,
    ),
    # Only the latest checkpoint of a run is kept, which is within any limit.
    "save_total_limit": OwnedField(
        _CHECKPOINTS, lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
    ),
    "save_only_model": OwnedField(
        _CHECKPOINTS + " (with the optimizer and schedule, so that a run resumes exactly)", _is_false
    ),
    "save_on_each_node": OwnedField(_CHECKPOINTS, lambda v: isinstance(v, bool)),  # one process, one node
    "resume_from_checkpoint": OwnedField(
        "a run resumes from the experiment's own checkpoints: run_fit(..., resume=True) continues every unfinished "
        "run after a restart, and exp.clone_modify(run_id, {...}, warm_start=True) continues from a run's state",
        lambda v: v is None or v is False or v == "",
    ),
    "push_to_hub": OwnedField(_HUB, _is_false),
    "hub_model_id": OwnedField(_HUB, _is_none),
    "hub_token": OwnedField(_HUB, _is_none, secret=True),
    "hub_private_repo": OwnedField(_HUB, _is_none),
    "hub_strategy": OwnedField(_HUB, lambda v: v == "every_save"),
    "hub_always_push": OwnedField(_HUB, _is_false),
    "hub_revision": OwnedField(_HUB, _is_none),
    "log_completions_hub_repo": OwnedField(_HUB, _is_none),  # GRPO: pushes sampled completions
    # What a trainer patches onto the model for the length of its train(): on the base every run shares, the
    # interleaved runs would each train under the others' patches (NEFTune's noise hook on the embedding, stacked
    # once per run; Liger's kernels; GRPO's float32 lm_head forward).
    "neftune_noise_alpha": OwnedField(_SHARED_BASE, _is_none),
    "use_liger_kernel": OwnedField(_SHARED_BASE, _is_false),
    "cast_lm_head_to_fp32": OwnedField(_SHARED_BASE, _is_false),
    "report_to": OwnedField(
        "rf_notebook logs every run itself (exp.results(), the panel, and run_fit(trackers=['mlflow', 'tensorboard', "
        "'trackio'])); TRL's trackers assume one run per process and would mix the interleaved runs into one",
        lambda v: v is None or v in ("none", "no") or (isinstance(v, (list, tuple)) and all(x == "none" for x in v)),
    ),
}

# Mixed precision: Accelerate's state holds one mode per process, so every run of a run_fit shares it.
PRECISION_FIELDS = ("bf16", "fp16")
# Trainer arguments that set process-wide state (Accelerate's mixed precision and dynamo plugin, torch's TF32 and
# deterministic-algorithm switches, the whole model cast for evaluation): one value for every run of a run_fit.
PROCESS_FIELDS = (
    *PRECISION_FIELDS,
    "tf32",
    "full_determinism",
    "bf16_full_eval",
    "fp16_full_eval",
    "torch_compile",
    "torch_compile_mode",
    "torch_compile_backend",
)
# Set on the shared base model itself (its layers' checkpointing switch, the embedding hook): one value per base.
PER_BASE_FIELDS = (
    "activation_checkpointing",
    "activation_checkpointing_kwargs",
    "gradient_checkpointing",  # transformers 5's deprecated aliases (a Clone-Modify override may use them)
    "gradient_checkpointing_kwargs",
)


def owned_refusal(name: str, value: Any) -> str | None:
    """Why `value` cannot be honoured for the experiment-owned trainer argument `name` (None: it changes nothing,
    or `name` is not owned). The text completes "<name> is <value>, but ..."."""
    owned = OWNED_FIELDS.get(name)
    return None if owned is None or owned.accepts(value) else owned.why


def owned_value_repr(name: str, value: Any) -> str:
    """`value` as an error message may show it: a token is hidden."""
    owned = OWNED_FIELDS.get(name)
    return "<hidden>" if owned is not None and owned.secret and value is not None else repr(value)
