"""One job: the generic keyword-argument spec that `RFLoraConfig` / `RF*Config` build on.

`ConfigSpec` holds the keyword arguments of a TRL / PEFT config class, any of which may be a `List` / `Range`:
it validates them against the real class (imported lazily, so this module imports no torch), applies the legacy
renames, gives `replace()`, `build()`s the real PEFT / TRL object once every value is concrete, and lists the
field names. The concrete specs live in `rf_notebook.configs`, which re-exports `ConfigSpec`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from rf_notebook.fields import LegacyFieldWarning, OwnedField, dpo_lengths, owned_refusal, owned_value_repr
from rf_notebook.space import alternatives

__all__ = ["ConfigSpec"]


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


def _read_only(value: Any) -> Any:
    """A default list / dict / set as a read-only view (assign the field to change it)."""
    import types

    if isinstance(value, dict):
        return types.MappingProxyType(value)
    if isinstance(value, (list, set)):
        return tuple(value) if isinstance(value, list) else frozenset(value)
    return value
