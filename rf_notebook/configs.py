"""The `RF*Config` specs of TRL / PEFT configs and `RFModelConfig`, any of whose values may be a `List` / `Range`.

A user writes the TRL / PEFT configs they know, with `List([...])` or `Range(lo, hi)` in place of any value:

    lora = RFLoraConfig(r=List([8, 64]), lora_alpha=16, target_modules="all-linear")
    args = RFSFTConfig(learning_rate=Range(1e-5, 1e-3, log=True), max_steps=200)
    group = RFRandomSearch(RFModelConfig("Qwen/Qwen2.5-0.5B-Instruct", peft_config=lora, training_args=args),
                           trainer_type="SFT", num_runs=8, seed=0)
    group.expand()  # -> list[RunSpec], deterministic, each with a readable name such as "r=64, lr=2.1e-4"

`RFSFTConfig` and `RFLoraConfig` are specs of `trl.SFTConfig` and `peft.LoraConfig`: they check field names
against the real class when created (importing it lazily; `import rf_notebook` stays light) and build the
real object, one per run, once every `List` / `Range` has been resolved. This module imports no torch.

Where the rest lives: `List` / `Range` in `rf_notebook.space`; the searches, their expansion into `RunSpec`s and
run naming in `rf_notebook.search` (which imports this module); the trainer arguments the experiment owns and the
legacy fields in `rf_notebook.fields`. Their names stay importable from here too.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from rf_notebook.fields import (
    LEGACY_TRAINING,
    OWNED_FIELDS,
    PER_BASE_FIELDS,
    PRECISION_FIELDS,
    PROCESS_FIELDS,
    LegacyFieldWarning,
    OwnedField,
    dpo_lengths,
    grpo_prompt_length,
    owned_refusal,
    owned_value_repr,
    renamed,
)
from rf_notebook.space import List, Range, alternatives

if TYPE_CHECKING:
    from rf_notebook.search import ALIASES, RFGridSearch, RFRandomSearch, RunSpec, Search, format_value, varying_params

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
    "Search",
    "ALIASES",
    "format_value",
    "varying_params",
    "TRAINER_TYPES",
    "OWNED_FIELDS",
    "OwnedField",
    "PRECISION_FIELDS",
    "PROCESS_FIELDS",
    "PER_BASE_FIELDS",
    "owned_refusal",
    "owned_value_repr",
    "ConfigSpec",
    "TRAINING_ARGS",
    "GENERATION_OWN_KEYS",
    "check_generation_config",
    "stable_repr",
]

TRAINER_TYPES = ("SFT", "DPO", "GRPO", "RLOO")


# --------------------------------------------------------------------------------------------------------------
# Specs of TRL / PEFT configs


class ConfigSpec:
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
            for value in alternatives(kwargs.get(key)):
                why = check(value)
                if why is not None:
                    raise ValueError(f"{cls.__name__}.{key} is {value!r}, but {why}")
        for key in kwargs.keys() & cls._OWNED.keys():
            for value in alternatives(kwargs[key]):
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
            if self._LEGACY[name] is dpo_lengths:
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

    def copy(self) -> ConfigSpec:
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

    def replace(self, **kwargs: Any) -> ConfigSpec:
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
        from rf_notebook.search import has_search_space  # (rf_notebook.search imports this module)

        for key, value in kwargs.items():
            if has_search_space(value):
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


class RFLoraConfig(ConfigSpec):
    """`peft.LoraConfig` whose fields may be `List` / `Range`."""

    _target_path = "peft:LoraConfig"


class _TrainingArgs(ConfigSpec):
    """A trainer's arguments: the fields the experiment owns are refused unless their value changes nothing."""

    _OWNED = OWNED_FIELDS
    _LEGACY = LEGACY_TRAINING


class RFSFTConfig(_TrainingArgs):
    """`trl.SFTConfig` whose fields may be `List` / `Range`."""

    _target_path = "trl:SFTConfig"
    _LEGACY = {**LEGACY_TRAINING, "max_seq_length": renamed("max_seq_length", "max_length")}


class RFDPOConfig(_TrainingArgs):
    """`trl.DPOConfig` whose fields may be `List` / `Range` (e.g. `beta`, `learning_rate`, `loss_type`)."""

    _target_path = "trl:DPOConfig"
    _LEGACY = {**LEGACY_TRAINING, "max_prompt_length": dpo_lengths, "max_completion_length": dpo_lengths}
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
    _LEGACY = {**LEGACY_TRAINING, "max_prompt_length": grpo_prompt_length}


class RFRLOOConfig(_TrainingArgs):
    """`trl.RLOOConfig` whose fields may be `List` / `Range` (e.g. `num_generations`, `beta`, `learning_rate`)."""

    _target_path = "trl:RLOOConfig"


# The trainer arguments each trainer type takes. One run_fit trains one trainer type (its search's).
TRAINING_ARGS: dict[str, type[ConfigSpec]] = {
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
            return dict(self.peft_config.kwargs) if isinstance(self.peft_config, ConfigSpec) else None
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
            stable_repr(self.model_kwargs or {}),
            str(self.tokenizer or self.model_name),  # None: the model's own tokenizer
            stable_repr(self.tokenizer_kwargs or {}),
        )


# generate() arguments RapidFire reads itself rather than passing on (accepted with the same meaning).
GENERATION_OWN_KEYS = ("max_input_length", "add_generation_prompt", "truncation_side", "use_cache")


def check_generation_config(value: Any) -> None:
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


def stable_repr(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {stable_repr(v)}" for k, v in sorted(value.items(), key=str)) + "}"
    if isinstance(value, Callable):  # type: ignore[arg-type]
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    return repr(value)


# --------------------------------------------------------------------------------------------------------------
# Names whose home is rf_notebook.search, importable from here as before. rf_notebook.search imports this module,
# so they load on first use (either module may be imported first).

_FROM_SEARCH = ("RunSpec", "Search", "RFGridSearch", "RFRandomSearch", "ALIASES", "format_value", "varying_params")


def __getattr__(name: str) -> Any:
    if name in _FROM_SEARCH:
        from rf_notebook import search

        value = getattr(search, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM_SEARCH})
