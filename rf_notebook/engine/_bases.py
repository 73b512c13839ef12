"""The models the runs share: one resident base per distinct (model, kwargs), carrying every run's LoRA adapter
in one PEFT wrapper (only the active one in its module tree: `_adapters`), and the reference models DPO runs name
(other than a base). Loaded once per experiment with the user's `create_model_fn`, on the scheduler thread."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from rf_notebook.configs import stable_repr
from rf_notebook.engine import _walks
from rf_notebook.engine._adapters import Adapters
from rf_notebook.engine._slot import Patches
from rf_notebook.trainers._prepared import PreparedData, tokenizer_state

__all__ = ["Bases", "SharedBase"]


# What a trainer's constructor may set on the tokenizer it is given (TRL's SFTTrainer: eos_token, pad_token, the
# chat template of `chat_template_path`), read back and set again by name.
_TOKENIZER_FIELDS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "chat_template",
    "padding_side",
    "truncation_side",
    "model_max_length",
)


# A run's arguments that its trainer's constructor writes on the tokenizer (TRL's SFTTrainer): such a run gets a copy.
_TOKENIZER_ARGS = ("eos_token", "pad_token", "chat_template_path")


def _config_ids(model: Any) -> tuple[Any, ...]:
    """The token ids a trainer's constructor may write into the model's config and generation config."""
    text, generation = model.config.get_text_config(), getattr(model, "generation_config", None)
    ids = (getattr(text, "eos_token_id", None), getattr(text, "pad_token_id", None))
    if generation is not None:
        ids += (copy.copy(generation.eos_token_id), generation.pad_token_id)
    return ids


def _set_config_ids(model: Any, ids: tuple[Any, ...]) -> None:
    text = model.config.get_text_config()
    text.eos_token_id, text.pad_token_id = ids[:2]
    if len(ids) > 2:
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = copy.copy(ids[2]), ids[3]


class SharedBase:
    """One resident base model and the PEFT wrapper that carries every run's adapter."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        # As loaded: what each run's trainer gets, whatever a trainer built before it set on the shared tokenizer or
        # the model's config (`settle_build`).
        self._tokenizer_fields = {name: getattr(tokenizer, name, None) for name in _TOKENIZER_FIELDS}
        self._tokenizer_state = tokenizer_state(tokenizer)
        self.config_ids = _config_ids(model)
        # A base loaded in 4 or 8 bits (bitsandbytes) gets QLoRA's preparation once, for every run it carries:
        # frozen, its unquantized half-precision weights (norms, embeddings) in float32 for stable training.
        # Activation checkpointing stays each run's own setting (its trainer turns it on or off).
        self.quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
        if self.quantized:
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        self.peft: Any = None
        self.adapters: Adapters | None = None
        self.prepared = PreparedData()  # data sets its runs' trainers prepared, for the runs that would prepare alike
        # adapter -> (key of PEFT's state dict, the adapter parameter it holds), and those parameters' ids
        self._weight_keys: dict[str, tuple[list[tuple[str, Any]], set[int]]] = {}
        self.pristine: Patches | None = None
        # TRL's constructor and transformers' train() each register a hook that makes the embedding output require
        # grad (activation checkpointing with adapters), keeping no handle on the previous ones: one per call, so
        # two per run, all run at every forward. On the shared base the second call replaces the first.
        cls = type(model)
        if hasattr(cls, "enable_input_require_grads"):

            def enable_input_require_grads() -> None:
                cls.disable_input_require_grads(model)
                cls.enable_input_require_grads(model)

            model.enable_input_require_grads = enable_input_require_grads

    def tokenizer_for(self, args: Any) -> Any:
        """The tokenizer a run's trainer gets: the shared one, or a copy of its own when its arguments set what the
        constructor writes on it (eos_token, pad_token, chat_template_path), as each plain TRL trainer has its own."""
        if any(getattr(args, name, None) is not None for name in _TOKENIZER_ARGS):
            return copy.deepcopy(self.tokenizer)
        return self.tokenizer

    def settle_build(self, run: str) -> tuple[Any, ...]:
        """After a trainer was built on the shared model: the token ids its constructor wrote into the model's
        config go back to the base's (returned: `use_config_ids` puts them in place for the run's turns). A shared
        tokenizer that changed anyway (a constructor this does not know of) is set back, and the run fails: every
        trainer built on it holds it."""
        own = _config_ids(self.model)
        _set_config_ids(self.model, self.config_ids)
        if tokenizer_state(self.tokenizer) != self._tokenizer_state:
            for name, value in self._tokenizer_fields.items():
                setattr(self.tokenizer, name, value)
            raise ValueError(
                f"run {run!r}: its trainer changed the tokenizer the runs of its base share "
                f"({'set back' if tokenizer_state(self.tokenizer) == self._tokenizer_state else 'tokens added'}); "
                f"rf_notebook gives a run its own copy only when it sets {', '.join(_TOKENIZER_ARGS)}"
            )
        return own

    def current_config_ids(self) -> tuple[Any, ...]:
        return _config_ids(self.model)

    def use_config_ids(self, ids: tuple[Any, ...]) -> None:
        """Put a run's config ids (from `settle_build`) in place for its turn."""
        if ids and _config_ids(self.model) != ids:
            _set_config_ids(self.model, ids)

    @property
    def modules(self) -> list[Any]:
        return [self.peft, self.peft.base_model, self.peft.get_base_model()]

    def add_adapter(self, name: str, lora: Any, seed: int) -> None:
        """Add a freshly initialised adapter, seeded as `SFTTrainer(peft_config=...)` seeds its own."""
        from peft import get_peft_model
        from transformers import set_seed

        set_seed(seed)
        if self.peft is None:
            self.peft = get_peft_model(self.model, lora, adapter_name=name)
            _walks.install(self.peft)  # the trainers' per-step `model.train()` and `model.parameters()`, quicker
            self.adapters = Adapters(self.peft)
            self.pristine = Patches.capture(self.modules)
        else:
            self.adapters.add(name, lora)

    def use(self, name: str) -> None:
        """Make a run's adapter the active one (the only one in the module tree)."""
        self.adapters.use(name)

    def adapter_weights(self, name: str, hub_check: bool = True) -> dict[str, Any]:
        """A run's adapter weights as PEFT saves them (keys without the adapter name); it becomes the active one.

        PEFT decides whether to add the base's embedding layers by asking the Hub for the base model's config (a
        network lookup on every call). A checkpoint needs no base weights (the base is rebuilt from
        `create_model_fn`), so `hub_check=False` adds none and asks nothing: no network while training.

        PEFT's function walks the whole model (about a third of a chunk-end checkpoint's time on the demo model).
        With `hub_check=False` its answer is mapped once per adapter to the adapter's own parameters, and later calls
        read those parameters: the same keys and tensors, as long as the adapter has the same parameter objects
        (checked at every call; otherwise, and where adapters are not parked, PEFT's function is asked again)."""
        from peft.utils import get_peft_model_state_dict

        self.use(name)
        params = self.adapters.parameters(name) if not hub_check and self.adapters.parking else None
        known = self._weight_keys.get(name)
        if params is not None and known is not None and known[1] == {id(p) for p in params}:
            return {key: param.detach() for key, param in known[0]}
        embeddings: Any = "auto" if hub_check else False
        weights = get_peft_model_state_dict(self.peft, adapter_name=name, save_embedding_layers=embeddings)
        if params is not None:
            self._map_weights(name, weights, params)
        return weights

    def _map_weights(self, name: str, weights: dict[str, Any], params: list[Any]) -> None:
        """Remember which of adapter `name`'s parameters each of PEFT's keys holds (same storage, shape and
        strides), if every key holds a distinct one of them."""
        self._weight_keys.pop(name, None)

        def where(t: Any) -> tuple[Any, ...]:
            return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype

        by_place = {where(p): p for p in params}
        pairs = [(key, by_place.get(where(value))) for key, value in weights.items()]
        if pairs and all(p is not None for _, p in pairs) and len({id(p) for _, p in pairs}) == len(pairs):
            self._weight_keys[name] = pairs, {id(p) for p in params}

    def remove_adapter(self, name: str) -> None:
        """Delete a run's adapter (another one becomes active; each run sets its own before training)."""
        self._weight_keys.pop(name, None)
        self.adapters.remove(name)


class Bases:
    """Every shared base and reference model of one experiment, each loaded once."""

    def __init__(self, create_model_fn: Callable[[Any], tuple[Any, Any]]):
        self.create_model_fn = create_model_fn
        self._bases: dict[tuple[str, ...], SharedBase] = {}
        self._references: dict[tuple[str, str], Any] = {}  # DPO reference models other than a base

    def get(self, model_config: Any) -> SharedBase:
        """The base of `model_config`, loaded on first use."""
        key = model_config.base_key()
        if key not in self._bases:
            self._bases[key] = SharedBase(*self._load(model_config))
        return self._bases[key]

    def loaded(self, model_config: Any) -> SharedBase:
        """The base of `model_config`, which must be loaded already (KeyError if not: nothing is loaded here)."""
        return self._bases[model_config.base_key()]

    def _load(self, model_config: Any) -> tuple[Any, Any]:
        """Call `create_model_fn` once for a distinct base and check that it returned (model, tokenizer)."""
        loaded = self.create_model_fn(model_config)
        if not (isinstance(loaded, tuple) and len(loaded) == 2):
            raise TypeError(
                f"create_model_fn returned {type(loaded).__name__}, but must return a (model, tokenizer) tuple"
            )
        model, tokenizer = loaded
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"create_model_fn returned a {type(model).__name__} as the model, but must return a "
                "transformers PreTrainedModel (e.g. from AutoModelForCausalLM.from_pretrained)"
            )
        if not callable(tokenizer) or not hasattr(tokenizer, "pad_token_id"):
            raise TypeError(
                f"create_model_fn returned a {type(tokenizer).__name__} as the tokenizer, but must return a "
                "transformers tokenizer (e.g. from AutoTokenizer.from_pretrained)"
            )
        if getattr(model, "peft_config", None):
            raise TypeError("create_model_fn returned a model with PEFT adapters; return the plain base model")
        if getattr(tokenizer, "pad_token", "") is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token  # batches need padding; as RapidFire AI and TRL's examples do
        return model, tokenizer

    def reference(self, model_config: Any) -> Any:
        """A DPO reference model named by `ref_model_name`: the shared base itself (adapters disabled) when it
        names the same model, else loaded once with `create_model_fn` and frozen (None: use the base)."""
        key = (str(model_config.ref_model_name), stable_repr(model_config.ref_model_kwargs or {}))
        if key == (str(model_config.model_name), stable_repr(model_config.model_kwargs or {})):
            return None
        if key not in self._references:
            reference = model_config.replace(
                model_name=model_config.ref_model_name,
                model_type=model_config.ref_model_type or "causal_lm",
                model_kwargs=dict(model_config.ref_model_kwargs or {}),
            )
            model = self._load(reference)[0]
            model.requires_grad_(False)
            model.eval()
            self._references[key] = model
        return self._references[key]

    def clear(self) -> None:
        self._bases.clear()
        self._references.clear()
