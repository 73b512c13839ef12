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
legacy fields in `rf_notebook.fields`; the generic `ConfigSpec` these specs build on in `rf_notebook.spec`. Their
names stay importable from here too.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from rf_notebook.fields import (
    LEGACY_TRAINING,
    OWNED_FIELDS,
    PER_BASE_FIELDS,
    PRECISION_FIELDS,
    PROCESS_FIELDS,
    LegacyFieldWarning,  # noqa: F401  (importable from here, as before)
    OwnedField,
    dpo_lengths,
    grpo_prompt_length,
    owned_refusal,
    owned_value_repr,
    renamed,
)
from rf_notebook.space import List, Range
from rf_notebook.spec import ConfigSpec

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
