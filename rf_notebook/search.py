"""Searches over `RFModelConfig`s: `RFGridSearch` / `RFRandomSearch`, their expansion into concrete `RunSpec`s
and the runs' readable names.

    group = RFGridSearch(RFModelConfig("m", peft_config=RFLoraConfig(r=List([8, 64])), training_args=args))
    group.expand()  # -> [RunSpec("r=8", ...), RunSpec("r=64", ...)]: deterministic, in a fixed order

`List` and `Range` (defined in `rf_notebook.space`) are importable from here. Pure: imports no torch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rf_notebook.configs import (
    TRAINER_TYPES,
    TRAINING_ARGS,
    RFLoraConfig,
    RFModelConfig,
    check_generation_config,
    stable_repr,
)
from rf_notebook.space import List, Range, alternatives
from rf_notebook.spec import ConfigSpec

__all__ = [
    "List",
    "Range",
    "RunSpec",
    "Search",
    "RFGridSearch",
    "RFRandomSearch",
    "has_search_space",
    "ALIASES",
    "format_value",
    "varying_params",
]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One concrete configuration to train, as produced by a search's `expand()`."""

    name: str
    trainer_type: str
    model_config: RFModelConfig
    params: Mapping[str, Any]  # flattened concrete values, e.g. {"peft_config.r": 8, ...}


class Search:
    """The base of `RFGridSearch` / `RFRandomSearch`: checks the configs for a trainer type; `expand()` lists runs."""

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


class RFGridSearch(Search):
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


class RFRandomSearch(Search):
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
        for value in alternatives(getattr(config, name)):
            if value is not None and not isinstance(value, expected):
                raise TypeError(
                    f"RFModelConfig.{name} is {value!r}, but a {trainer_type} run needs an {expected.__name__}"
                    + (" (one run_fit trains one trainer type)" if isinstance(value, ConfigSpec) else "")
                )
    for value in alternatives(config.reward_funcs):
        funcs = value if isinstance(value, (list, tuple)) else [value]
        if trainer_type in ("GRPO", "RLOO"):
            if value is None or not funcs or not all(callable(f) for f in funcs):
                raise TypeError(
                    f"RFModelConfig.reward_funcs is {value!r}, but a {trainer_type} run needs a reward function or "
                    "a non-empty list of them: f(prompts, completions, **columns) -> list[float]"
                )
        elif value is not None:
            raise ValueError(f"RFModelConfig.reward_funcs is set, but {trainer_type} runs take no reward functions")
    for value in alternatives(config.model_type):
        if value != "causal_lm":
            raise ValueError(f"RFModelConfig.model_type is {value!r}, but only 'causal_lm' is supported")
    for value in alternatives(config.model_name):
        if not isinstance(value, str) or not value:
            raise TypeError(f"RFModelConfig.model_name is {value!r}, but must be a non-empty string")
    for name in ("ref_model_name", "ref_model_type", "ref_model_kwargs"):
        for value in alternatives(getattr(config, name)):
            if value is not None and trainer_type != "DPO":
                raise ValueError(f"RFModelConfig.{name} is {value!r}, but only DPO runs have a reference model")
    for value in alternatives(config.ref_model_name):
        if value is not None and (not isinstance(value, str) or not value):
            raise TypeError(f"RFModelConfig.ref_model_name is {value!r}, but must be None or a non-empty string")
    for value in alternatives(config.ref_model_type):
        if value not in (None, "causal_lm"):
            raise ValueError(f"RFModelConfig.ref_model_type is {value!r}, but only 'causal_lm' is supported")
    for name in ("model_kwargs", "tokenizer_kwargs", "ref_model_kwargs"):
        for value in alternatives(getattr(config, name)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"RFModelConfig.{name} is {value!r}, but must be None or a dict of keyword arguments")
            if value is not None and name != "tokenizer_kwargs":
                _check_quantization(name, value)
    for value in alternatives(config.generation_config):
        check_generation_config(value)
    for value in alternatives(config.num_gpus):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"RFModelConfig.num_gpus is {value!r}, but must be None or an int >= 1")
        if value is not None and value > 1:
            raise ValueError(
                f"RFModelConfig.num_gpus is {value}, but rf_notebook trains every run on the process's one device "
                "(runs share one resident base model); use num_gpus=1 or leave it unset"
            )


def _check_quantization(name: str, kwargs: dict) -> None:
    """A quantized base (QLoRA) is asked for with transformers' `quantization_config`; bitsandbytes must be here."""
    config = kwargs.get("quantization_config")
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    if getattr(method, "value", method) == "bitsandbytes" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"RFModelConfig.{name}['quantization_config'] is a bitsandbytes quantization, but bitsandbytes is not "
            "installed: pip install 'rf_notebook[qlora]' (bitsandbytes >= 0.50 also trains a 4-bit base on a CPU)"
        )


# --------------------------------------------------------------------------------------------------------------
# Expansion


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


def has_search_space(value: Any) -> bool:
    return any(isinstance(v, (List, Range)) for _, v in _walk(value, ""))


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every node under `value` with a dotted path, descending into specs, Lists, dicts and sequences."""
    yield path, value
    if isinstance(value, List):
        for v in value.values:
            yield from _walk(v, path)
    elif isinstance(value, (RFModelConfig, ConfigSpec)):
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
    elif isinstance(value, (RFModelConfig, ConfigSpec)):
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
    if isinstance(value, (RFModelConfig, ConfigSpec)):
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
        if isinstance(value, ConfigSpec):
            for k, v in value.kwargs.items():
                flat[f"{name}.{k}"] = v
        elif value is not None:
            flat[name] = value
    return flat


# --------------------------------------------------------------------------------------------------------------
# Run names

ALIASES = {
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
    return [k for k in keys if len({stable_repr(flat.get(k)) for flat in flats}) > 1]


def _run_names(flats: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = varying_params(flats)
    short = {k: ALIASES.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1]) for k in keys}
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
