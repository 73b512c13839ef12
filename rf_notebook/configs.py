"""Search spaces over fine-tuning configs: `List`, `Range`, the `RF*Config` specs and grid / random expansion.

A user writes the TRL / PEFT configs they know, with `List([...])` or `Range(lo, hi)` in place of any value:

    lora = RFLoraConfig(r=List([8, 64]), lora_alpha=16, target_modules="all-linear")
    args = RFSFTConfig(learning_rate=Range(1e-5, 1e-3, log=True), max_steps=200)
    group = RFRandomSearch(RFModelConfig("Qwen/Qwen2.5-0.5B-Instruct", peft_config=lora, training_args=args),
                           trainer_type="SFT", num_runs=8, seed=0)
    group.expand()  # -> list[RunSpec], deterministic, each with a readable name such as "r=64, lr=2.1e-4"

`RFSFTConfig` and `RFLoraConfig` are specs of `trl.SFTConfig` and `peft.LoraConfig`: they check field names
against the real class when created (importing it lazily; `import rf_notebook` stays light) and build the
real object, one per run, once every `List` / `Range` has been resolved. This module imports no torch.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import math
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

__all__ = [
    "List",
    "Range",
    "RFModelConfig",
    "RFLoraConfig",
    "RFSFTConfig",
    "RFDPOConfig",
    "RFGRPOConfig",
    "RFRLOOConfig",
    "RFGridSearch",
    "RFRandomSearch",
    "RunSpec",
    "TRAINER_TYPES",
    "OWNED_FIELDS",
    "OwnedField",
    "PRECISION_FIELDS",
    "PROCESS_FIELDS",
    "PER_BASE_FIELDS",
    "owned_refusal",
    "owned_value_repr",
]

TRAINER_TYPES = ("SFT", "DPO", "GRPO", "RLOO")


class List:
    """A set of alternatives: a grid search tries each value, a random search picks one uniformly."""

    def __init__(self, values: Sequence[Any]):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"List() takes a list of values, but got {values!r}")
        if len(values) == 0:
            raise ValueError("List([]) is empty, but must hold at least one value")
        self.values = list(values)

    def __repr__(self) -> str:
        return f"List({self.values!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, List) and other.values == self.values

    __hash__ = None  # type: ignore[assignment]


class Range:
    """A continuous or integer interval for random search: uniform, or log-uniform with `log=True`.

    `dtype` is "float" or "int"; left out, it is "int" when both ends are ints. Int ranges include `end`.
    `step` (as in RapidFire AI) keeps samples on the grid start, start + step, ... (within [start, end]).
    """

    def __init__(
        self, start: float, end: float, *, dtype: str | None = None, log: bool = False, step: float | None = None
    ):
        for name, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"Range {name} is {value!r}, but must be a finite number")
        if dtype is None:
            dtype = "int" if isinstance(start, int) and isinstance(end, int) else "float"
        if dtype not in ("float", "int"):
            raise ValueError(f"Range dtype is {dtype!r}, but must be 'float' or 'int'")
        if not start < end:
            raise ValueError(f"Range({start!r}, {end!r}) is empty: start must be < end")
        if log and start <= 0:
            raise ValueError(f"Range({start!r}, {end!r}, log=True) needs start > 0")
        if step is not None and (
            isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= end - start
        ):
            raise ValueError(f"Range step is {step!r}, but must be a number in (0, end - start]")
        self.start, self.end, self.dtype, self.log, self.step = start, end, dtype, log, step

    def sample(self, rng: random.Random) -> float | int:
        value = self._draw(rng)
        if self.step is None:
            return value
        k = min(round((value - self.start) / self.step), math.floor((self.end - self.start) / self.step + 1e-9))
        snapped = self.start + k * self.step
        return int(round(snapped)) if self.dtype == "int" else snapped

    def _draw(self, rng: random.Random) -> float | int:
        if self.dtype == "int":
            if self.log:  # log-uniform over [start, end + 1), floored: each int gets its share of the log axis
                draw = math.exp(rng.uniform(math.log(self.start), math.log(self.end + 1)))
                return min(int(draw), int(self.end))
            return rng.randint(int(math.ceil(self.start)), int(math.floor(self.end)))
        if self.log:
            return math.exp(rng.uniform(math.log(self.start), math.log(self.end)))
        return rng.uniform(self.start, self.end)

    def __repr__(self) -> str:
        step = "" if self.step is None else f", step={self.step!r}"
        return f"Range({self.start!r}, {self.end!r}, dtype={self.dtype!r}, log={self.log}{step})"


# --------------------------------------------------------------------------------------------------------------
# Trainer arguments the experiment owns


class LegacyFieldWarning(UserWarning):
    """A field of the TRL / transformers versions RapidFire AI pins, taken as today's equivalent (old -> new)."""


def _ratios(value: Any) -> list[Any]:
    return [value.low, value.high] if isinstance(value, Range) else _alternatives(value)


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


def _renamed(old: str, new: str) -> Callable[[dict[str, Any]], str]:
    def rename(kwargs: dict[str, Any]) -> str:
        value = kwargs.pop(old)
        if kwargs.get(new) is not None:
            both = f"{old}={value!r} and {new}={kwargs[new]!r}"
            raise ValueError(f"{both} are both set; {old} is now {new}: set that one")
        kwargs[new] = value
        return f"{old}={value!r} -> {new}={value!r}"

    return rename


def _dpo_lengths(kwargs: dict[str, Any]) -> str:
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


def _grpo_prompt_length(kwargs: dict[str, Any]) -> str:
    value = kwargs.pop("max_prompt_length")
    return f"max_prompt_length={value!r} -> dropped: TRL >= 1 never truncates GRPO prompts (pre-truncate the data)"


# Fields every trainer's arguments had in transformers 4.x / TRL 0.x (RapidFire AI's pins) -> today's.
_LEGACY_TRAINING = {
    "warmup_ratio": _warmup_ratio,
    # transformers 5 keeps these as deprecated aliases, but a default of the new name would silently win over them
    "gradient_checkpointing": _renamed("gradient_checkpointing", "activation_checkpointing"),
    "gradient_checkpointing_kwargs": _renamed("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
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
        "rf_notebook logs every run itself (exp.results(), the panel); TRL's trackers (wandb, mlflow, tensorboard, "
        "trackio) assume one run per process and would mix the interleaved runs into one",
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


# --------------------------------------------------------------------------------------------------------------
# Specs of TRL / PEFT configs


class _ConfigSpec:
    """Keyword arguments for a TRL / PEFT config class, any of which may be a `List` or `Range`."""

    _target_path: ClassVar[str]  # "module:Class"
    # Fields RapidFire AI's configs take that the pinned TRL no longer has: accepted with their meaning here and
    # not passed on. Each maps to a check returning why a value cannot be honoured (None: it can).
    _COMPAT: ClassVar[dict[str, Callable[[Any], str | None]]] = {}
    # Fields the experiment owns (trainer arguments only): refused unless the value changes nothing.
    _OWNED: ClassVar[Mapping[str, OwnedField]] = {}
    # Fields of older TRL / transformers versions: each rewrites the arguments into today's fields (or drops
    # itself) and says what it did, once, as a LegacyFieldWarning.
    _LEGACY: ClassVar[Mapping[str, Callable[[dict[str, Any]], str]]] = {}

    def __init__(self, **kwargs: Any):
        object.__setattr__(self, "kwargs", self._checked(kwargs))

    @classmethod
    def _unknown(cls, key: str) -> str | None:
        known = cls.field_names()
        if key in known or key in cls._OWNED or key in cls._LEGACY:
            return None
        hint = difflib.get_close_matches(key, known, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        return (
            f"{cls.__name__} got an unknown field {key!r}{did_you_mean}; "
            f"expected a field of {cls._target_path.replace(':', '.')}"
        )

    @classmethod
    def _checked(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`kwargs` if every field is known and every value can be honoured; else the error naming the first that
        cannot."""
        for key in kwargs:
            why = cls._unknown(key)
            if why is not None:
                raise TypeError(why)
        kwargs = dict(kwargs)
        for key, translate in cls._LEGACY.items():
            if key in kwargs:  # (one function may handle several keys: the first takes them all)
                try:
                    done = translate(kwargs)
                except ValueError as exc:
                    raise ValueError(f"{cls.__name__}: {exc}") from None
                warnings.warn(f"{cls.__name__}: {done}", LegacyFieldWarning, stacklevel=3)
        for key, check in cls._COMPAT.items():
            for value in _alternatives(kwargs.get(key)):
                why = check(value)
                if why is not None:
                    raise ValueError(f"{cls.__name__}.{key} is {value!r}, but {why}")
        for key in kwargs.keys() & cls._OWNED.keys():
            for value in _alternatives(kwargs[key]):
                why = owned_refusal(key, value)
                if why is not None:
                    raise ValueError(f"{cls.__name__}.{key} is {owned_value_repr(key, value)}, but {why}")
        return dict(kwargs)

    # RapidFire AI's configs are the TRL / PEFT classes themselves, so its tutorials read and set fields as
    # attributes (`lora.r = 16` on a `copy()`): both work here, an assignment checked as the constructor checks.
    def __getattr__(self, name: str) -> Any:
        kwargs = self.__dict__.get("kwargs")
        if name.startswith("_") or kwargs is None:
            raise AttributeError(name)
        if name in kwargs:
            return kwargs[name]
        for f in dataclasses.fields(self.target()):
            if f.name == name and f.init:
                if f.default is not dataclasses.MISSING:
                    return f.default
                if f.default_factory is not dataclasses.MISSING:  # read-only: changing it here would change nothing
                    return _read_only(f.default_factory())
        if name in self._COMPAT or name in self._OWNED:
            return None
        raise AttributeError(self._unknown(name) or f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "kwargs":
            value = self._checked(dict(value))
        elif self._unknown(name) is not None:
            raise AttributeError(self._unknown(name))
        elif name in self._LEGACY:  # today's fields for it, replacing what an earlier value was taken as
            if self._LEGACY[name] is _dpo_lengths:
                raise AttributeError(
                    f"{type(self).__name__}.{name} cannot be changed on its own: TRL >= 1 has only max_length (prompt "
                    f"and completion together); set max_length instead (it is {self.kwargs.get('max_length')!r})"
                )
            value = self._checked({**self.kwargs, **self._checked({name: value})})
        else:
            value = self._checked({**self.kwargs, name: value})
        object.__setattr__(self, "kwargs", value)

    def __delattr__(self, name: str) -> None:
        if name not in self.kwargs:
            raise AttributeError(f"{type(self).__name__} has no value set for {name!r}")
        object.__setattr__(self, "kwargs", {k: v for k, v in self.kwargs.items() if k != name})

    def copy(self) -> _ConfigSpec:
        """An independent copy (its values deep-copied, functions shared); change it by attribute assignment."""
        return copy.deepcopy(self)

    @classmethod
    def target(cls) -> type:
        import importlib

        module, name = cls._target_path.split(":")
        return getattr(importlib.import_module(module), name)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.target()) if f.init] + list(cls._COMPAT)

    def replace(self, **kwargs: Any) -> _ConfigSpec:
        new = object.__new__(type(self))
        object.__setattr__(new, "kwargs", {**self.kwargs, **kwargs})
        return new

    def build(self, **extra: Any) -> Any:
        """The real config object. Every value must be concrete (no `List` / `Range` left)."""
        fields = {f.name for f in dataclasses.fields(self.target())}
        kwargs = {
            k: v
            for k, v in {**self.kwargs, **extra}.items()
            if k not in self._COMPAT and (k in fields or k not in self._OWNED)  # e.g. logging_dir=None: no field
        }
        for key, value in kwargs.items():
            if _has_search_space(value):
                raise ValueError(f"{type(self).__name__}.{key} is still a search space ({value!r}); expand it first")
        if kwargs.get("save_strategy") == "chunk":  # RapidFire AI's value: a checkpoint at every chunk end, which
            kwargs["save_strategy"] = "no"  # the engine writes itself; the trainer writes none
        return self.target()(**kwargs)

    def _children(self) -> dict[str, Any]:
        return self.kwargs

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.kwargs == self.kwargs  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]


class RFLoraConfig(_ConfigSpec):
    """`peft.LoraConfig` whose fields may be `List` / `Range`."""

    _target_path = "peft:LoraConfig"


class _TrainingArgs(_ConfigSpec):
    """A trainer's arguments: the fields the experiment owns are refused unless their value changes nothing."""

    _OWNED = OWNED_FIELDS
    _LEGACY = _LEGACY_TRAINING


class RFSFTConfig(_TrainingArgs):
    """`trl.SFTConfig` whose fields may be `List` / `Range`."""

    _target_path = "trl:SFTConfig"
    _LEGACY = {**_LEGACY_TRAINING, "max_seq_length": _renamed("max_seq_length", "max_length")}


class RFDPOConfig(_TrainingArgs):
    """`trl.DPOConfig` whose fields may be `List` / `Range` (e.g. `beta`, `learning_rate`, `loss_type`)."""

    _target_path = "trl:DPOConfig"
    _LEGACY = {**_LEGACY_TRAINING, "max_prompt_length": _dpo_lengths, "max_completion_length": _dpo_lengths}
    _COMPAT: ClassVar[dict[str, Callable[[Any], str | None]]] = {
        # Each run's adapter is named by rf_notebook; the reference is the base with the adapter disabled.
        "model_adapter_name": lambda v: None if v is None or isinstance(v, str) else "must be a string or None",
        "ref_adapter_name": lambda v: None if v is None or isinstance(v, str) else "must be a string or None",
        "force_use_ref_model": lambda v: None
        if not v
        else "a separate reference model is named with RFModelConfig(ref_model_name=...) here",
    }


class RFGRPOConfig(_TrainingArgs):
    """`trl.GRPOConfig` whose fields may be `List` / `Range` (e.g. `num_generations`, `beta`, `learning_rate`)."""

    _target_path = "trl:GRPOConfig"
    _LEGACY = {**_LEGACY_TRAINING, "max_prompt_length": _grpo_prompt_length}


class RFRLOOConfig(_TrainingArgs):
    """`trl.RLOOConfig` whose fields may be `List` / `Range` (e.g. `num_generations`, `beta`, `learning_rate`)."""

    _target_path = "trl:RLOOConfig"


# The trainer arguments each trainer type takes. One run_fit trains one trainer type (its search's).
TRAINING_ARGS: dict[str, type[_ConfigSpec]] = {
    "SFT": RFSFTConfig,
    "DPO": RFDPOConfig,
    "GRPO": RFGRPOConfig,
    "RLOO": RFRLOOConfig,
}


@dataclasses.dataclass(eq=True)
class RFModelConfig:
    """One model to fine-tune: the base, its adapter config and the trainer's arguments.

    Any field may be a `List` (or `Range` for numbers) to search over.
    """

    model_name: Any = dataclasses.field(metadata={"help": "Hub id or local path of the base causal LM."})
    peft_config: Any = dataclasses.field(default=None, metadata={"help": "An `RFLoraConfig` (LoRA adapter)."})
    training_args: Any = dataclasses.field(
        default=None, metadata={"help": "Trainer arguments: RFSFTConfig, RFDPOConfig, RFGRPOConfig or RFRLOOConfig."}
    )
    model_type: Any = dataclasses.field(default="causal_lm", metadata={"help": "Only 'causal_lm'."})
    model_kwargs: Any = dataclasses.field(
        default=None, metadata={"help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained`."}
    )
    tokenizer: Any = dataclasses.field(default=None, metadata={"help": "Tokenizer id or path; default model_name."})
    tokenizer_kwargs: Any = dataclasses.field(
        default=None, metadata={"help": "Keyword arguments for `AutoTokenizer.from_pretrained`."}
    )
    compute_metrics: Any = dataclasses.field(
        default=None, metadata={"help": "`compute_metrics(EvalPrediction) -> dict` run at every evaluation."}
    )
    formatting_func: Any = dataclasses.field(
        default=None, metadata={"help": "Maps a raw row to TRL's format; passed to the trainer."}
    )
    reward_funcs: Any = dataclasses.field(
        default=None,
        metadata={
            "help": "GRPO / RLOO: a reward function or a list of them, with TRL's signature "
            "`f(prompts, completions, **columns) -> list[float]`; weight them with the config's `reward_weights`."
        },
    )
    ref_model_name: Any = dataclasses.field(
        default=None,
        metadata={"help": "DPO: the reference model, if not the base itself (loaded once, by create_model_fn)."},
    )
    ref_model_type: Any = dataclasses.field(default=None, metadata={"help": "DPO: 'causal_lm' (the default)."})
    ref_model_kwargs: Any = dataclasses.field(
        default=None, metadata={"help": "DPO: keyword arguments for loading the reference model."}
    )
    generation_config: Any = dataclasses.field(
        default=None,
        metadata={
            "help": "A dict of `generate()` arguments (max_new_tokens, do_sample, ...). With compute_metrics, each "
            "evaluation generates answers for the eval prompts and calls compute_metrics((predictions, references))."
        },
    )
    num_gpus: Any = dataclasses.field(
        default=None, metadata={"help": "Devices per run: None or 1 (every run trains on the process's one device)."}
    )

    # What `create_model_fn(model_config)` may read with RapidFire's item access besides the fields: loading
    # kwargs default to {} (so `**model_config["model_kwargs"]` works when unset), and the reference model's part.
    _KWARGS = ("model_kwargs", "tokenizer_kwargs", "ref_model_kwargs")

    def __getitem__(self, key: str) -> Any:
        if key == "ref_model_config":
            return {
                "model_name": self.ref_model_name,
                "model_type": self.ref_model_type or "causal_lm",
                "model_kwargs": dict(self.ref_model_kwargs or {}),
            }
        if key == "peft_params":
            return dict(self.peft_config.kwargs) if isinstance(self.peft_config, _ConfigSpec) else None
        if key not in self._field_names():
            raise KeyError(
                f"RFModelConfig has no {key!r}; known: {self._field_names() + ['ref_model_config', 'peft_params']}"
            )
        value = getattr(self, key)
        return dict(value or {}) if key in self._KWARGS else value

    def get(self, key: str, default: Any = None) -> Any:
        try:
            value = self[key]
        except KeyError:
            return default
        return default if value is None else value

    def keys(self) -> list[str]:
        return self._field_names()

    def __contains__(self, key: object) -> bool:
        return key in self._field_names() or key in ("ref_model_config", "peft_params")

    @classmethod
    def _field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **kwargs: Any) -> RFModelConfig:
        return dataclasses.replace(self, **kwargs)

    def copy(self) -> RFModelConfig:
        """An independent copy (nested configs and values deep-copied, functions shared)."""
        return copy.deepcopy(self)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._field_names():
            hint = difflib.get_close_matches(name, self._field_names(), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise AttributeError(f"RFModelConfig has no field {name!r}{did_you_mean}; known: {self._field_names()}")
        object.__setattr__(self, name, value)

    def _children(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._field_names()}

    def base_key(self) -> tuple[str, str, str, str]:
        """What identifies a distinct base, loaded once by `create_model_fn`: the model's name and loading kwargs,
        and the tokenizer's (a run with another tokenizer must not train with the first run's)."""
        return (
            str(self.model_name),
            _stable_repr(self.model_kwargs or {}),
            str(self.tokenizer or self.model_name),  # None: the model's own tokenizer
            _stable_repr(self.tokenizer_kwargs or {}),
        )


# --------------------------------------------------------------------------------------------------------------
# Expansion


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One concrete configuration to train, as produced by a search's `expand()`."""

    name: str
    trainer_type: str
    model_config: RFModelConfig
    params: Mapping[str, Any]  # flattened concrete values, e.g. {"peft_config.r": 8, ...}


class _Search:
    def __init__(self, configs: Any, trainer_type: str):
        if trainer_type not in TRAINER_TYPES:
            raise ValueError(f"`trainer_type` is {trainer_type!r}, but must be one of {list(TRAINER_TYPES)}")
        self.trainer_type = trainer_type
        self.configs = configs
        for config in _model_configs(configs):
            _check_model_config(config, trainer_type)

    def _concrete(self) -> list[RFModelConfig]:
        raise NotImplementedError

    def expand(self) -> list[RunSpec]:
        concrete = self._concrete()
        flats = [_flatten(c) for c in concrete]
        names = _run_names(flats)
        return [RunSpec(n, self.trainer_type, c, f) for n, c, f in zip(names, concrete, flats)]


class RFGridSearch(_Search):
    """Every combination of every `List`, at any depth, in a fixed order. `Range` is refused."""

    def __init__(self, configs: Any, trainer_type: str = "SFT"):
        super().__init__(configs, trainer_type)
        for path, value in _walk(configs, ""):
            if isinstance(value, Range):
                raise ValueError(
                    f"RFGridSearch cannot enumerate {path or 'configs'}={value!r}: a grid needs List values; "
                    "use RFRandomSearch to sample a Range"
                )

    def _concrete(self) -> list[RFModelConfig]:
        return list(_grid(self.configs))


class RFRandomSearch(_Search):
    """`num_runs` configs sampled from every `List` (uniformly) and `Range`, reproducible by `seed`."""

    def __init__(self, configs: Any, trainer_type: str = "SFT", num_runs: int = 4, seed: int = 42):
        super().__init__(configs, trainer_type)
        if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
            raise ValueError(f"`num_runs` is {num_runs!r}, but must be an int >= 1")
        self.num_runs, self.seed = num_runs, seed

    def _concrete(self) -> list[RFModelConfig]:
        rng = random.Random(self.seed)
        return [_sample(self.configs, rng) for _ in range(self.num_runs)]


def _check_model_config(config: Any, trainer_type: str) -> None:
    if not isinstance(config, RFModelConfig):
        raise TypeError(f"a search takes RFModelConfig objects (or a List of them), but got {config!r}")
    for name, expected in (("peft_config", RFLoraConfig), ("training_args", TRAINING_ARGS[trainer_type])):
        for value in _alternatives(getattr(config, name)):
            if value is not None and not isinstance(value, expected):
                raise TypeError(
                    f"RFModelConfig.{name} is {value!r}, but a {trainer_type} run needs an {expected.__name__}"
                    + (" (one run_fit trains one trainer type)" if isinstance(value, _ConfigSpec) else "")
                )
    for value in _alternatives(config.reward_funcs):
        funcs = value if isinstance(value, (list, tuple)) else [value]
        if trainer_type in ("GRPO", "RLOO"):
            if value is None or not funcs or not all(callable(f) for f in funcs):
                raise TypeError(
                    f"RFModelConfig.reward_funcs is {value!r}, but a {trainer_type} run needs a reward function or "
                    "a non-empty list of them: f(prompts, completions, **columns) -> list[float]"
                )
        elif value is not None:
            raise ValueError(f"RFModelConfig.reward_funcs is set, but {trainer_type} runs take no reward functions")
    for value in _alternatives(config.model_type):
        if value != "causal_lm":
            raise ValueError(f"RFModelConfig.model_type is {value!r}, but only 'causal_lm' is supported")
    for value in _alternatives(config.model_name):
        if not isinstance(value, str) or not value:
            raise TypeError(f"RFModelConfig.model_name is {value!r}, but must be a non-empty string")
    for name in ("ref_model_name", "ref_model_type", "ref_model_kwargs"):
        for value in _alternatives(getattr(config, name)):
            if value is not None and trainer_type != "DPO":
                raise ValueError(f"RFModelConfig.{name} is {value!r}, but only DPO runs have a reference model")
    for value in _alternatives(config.ref_model_name):
        if value is not None and (not isinstance(value, str) or not value):
            raise TypeError(f"RFModelConfig.ref_model_name is {value!r}, but must be None or a non-empty string")
    for value in _alternatives(config.ref_model_type):
        if value not in (None, "causal_lm"):
            raise ValueError(f"RFModelConfig.ref_model_type is {value!r}, but only 'causal_lm' is supported")
    for name in ("model_kwargs", "tokenizer_kwargs", "ref_model_kwargs"):
        for value in _alternatives(getattr(config, name)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"RFModelConfig.{name} is {value!r}, but must be None or a dict of keyword arguments")
    for value in _alternatives(config.generation_config):
        _check_generation_config(value)
    for value in _alternatives(config.num_gpus):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"RFModelConfig.num_gpus is {value!r}, but must be None or an int >= 1")
        if value is not None and value > 1:
            raise ValueError(
                f"RFModelConfig.num_gpus is {value}, but rf_notebook trains every run on the process's one device "
                "(runs share one resident base model); use num_gpus=1 or leave it unset"
            )


# generate() arguments RapidFire reads itself rather than passing on (accepted with the same meaning).
GENERATION_OWN_KEYS = ("max_input_length", "add_generation_prompt", "truncation_side", "use_cache")


def _check_generation_config(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise TypeError(
            f"RFModelConfig.generation_config is {value!r}, but must be None or a dict of generate() arguments "
            "such as {'max_new_tokens': 32, 'do_sample': False}"
        )
    from transformers import GenerationConfig

    known = set(GenerationConfig().to_dict()) | set(GENERATION_OWN_KEYS)
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"RFModelConfig.generation_config has {key!r}, which is not a generate() argument{hint}")
    if value.get("truncation_side", "left") not in ("left", "right"):
        raise ValueError(
            f"generation_config['truncation_side'] is {value['truncation_side']!r}, but must be 'left' or 'right'"
        )


def _read_only(value: Any) -> Any:
    """A default list / dict / set as a read-only view (assign the field to change it)."""
    import types

    if isinstance(value, dict):
        return types.MappingProxyType(value)
    if isinstance(value, (list, set)):
        return tuple(value) if isinstance(value, list) else frozenset(value)
    return value


def _alternatives(value: Any) -> list[Any]:
    return list(value.values) if isinstance(value, List) else [value]


def _model_configs(configs: Any) -> Iterator[Any]:
    """The model configs of a search: one, a list of them, or a List of them."""
    if isinstance(configs, List):
        for v in configs.values:
            yield from _model_configs(v)
    elif isinstance(configs, (list, tuple)):
        if not configs:
            raise ValueError("a search needs at least one RFModelConfig, but got an empty list")
        for v in configs:
            yield from _model_configs(v)
    else:
        yield configs


def _has_search_space(value: Any) -> bool:
    return any(isinstance(v, (List, Range)) for _, v in _walk(value, ""))


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every node under `value` with a dotted path, descending into specs, Lists, dicts and sequences."""
    yield path, value
    if isinstance(value, List):
        for v in value.values:
            yield from _walk(v, path)
    elif isinstance(value, (RFModelConfig, _ConfigSpec)):
        for k, v in value._children().items():
            yield from _walk(v, f"{path}.{k}" if path else k)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _walk(v, path)


def _grid(value: Any) -> Iterator[Any]:
    if isinstance(value, List):
        for v in value.values:
            yield from _grid(v)
    elif isinstance(value, (RFModelConfig, _ConfigSpec)):
        children = value._children()
        for combo in itertools.product(*(list(_grid(v)) for v in children.values())):
            yield value.replace(**dict(zip(children, combo)))
    elif isinstance(value, dict):
        for combo in itertools.product(*(list(_grid(v)) for v in value.values())):
            yield dict(zip(value, combo))
    elif isinstance(value, (list, tuple)):
        for combo in itertools.product(*(list(_grid(v)) for v in value)):
            yield type(value)(combo)
    else:
        yield value


def _sample(value: Any, rng: random.Random) -> Any:
    if isinstance(value, List):
        return _sample(rng.choice(value.values), rng)
    if isinstance(value, Range):
        return value.sample(rng)
    if isinstance(value, (RFModelConfig, _ConfigSpec)):
        return value.replace(**{k: _sample(v, rng) for k, v in value._children().items()})
    if isinstance(value, dict):
        return {k: _sample(v, rng) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_sample(v, rng) for v in value)
    return value


def _flatten(config: RFModelConfig) -> dict[str, Any]:
    """Concrete values by dotted path, e.g. {"peft_config.r": 8, "training_args.learning_rate": 3e-4}."""
    flat: dict[str, Any] = {}
    for name, value in config._children().items():
        if isinstance(value, _ConfigSpec):
            for k, v in value.kwargs.items():
                flat[f"{name}.{k}"] = v
        elif value is not None:
            flat[name] = value
    return flat


_ALIASES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "bs",
    "gradient_accumulation_steps": "ga",
    "lr_scheduler_type": "sched",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "num_train_epochs": "epochs",
    "weight_decay": "wd",
    "warmup_ratio": "warmup",
    "model_name": "model",
    "target_modules": "targets",
}


def format_value(value: Any) -> str:
    """Short, readable rendering of a hyper-parameter value: 3e-4, 0.1, 16, cosine, f."""
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            mantissa, exponent = f"{value:.2e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:.3g}"
    if callable(value):
        return getattr(value, "__name__", type(value).__name__)
    return str(value)


def varying_params(flats: Sequence[Mapping[str, Any]]) -> list[str]:
    """The dotted keys whose values differ between runs, in first-seen order."""
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    return [k for k in keys if len({_stable_repr(flat.get(k)) for flat in flats}) > 1]


def _run_names(flats: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = varying_params(flats)
    short = {k: _ALIASES.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1]) for k in keys}
    if len(set(short.values())) < len(short):  # two paths end the same: keep them apart
        short = {k: k for k in keys}
    names = []
    for i, flat in enumerate(flats):
        name = ", ".join(f"{short[k]}={format_value(flat[k])}" for k in keys if flat.get(k) is not None)
        name = name or f"run {i + 1}"
        names.append(name)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # random search may draw the same config twice
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name} #{seen[name]}"
    return names


def _stable_repr(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_stable_repr(v)}" for k, v in sorted(value.items(), key=str)) + "}"
    if isinstance(value, Callable):  # type: ignore[arg-type]
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    return repr(value)
