"""Data sets a trainer prepared (tokenized, truncated, labelled), kept for the runs that would prepare the same.

A key names everything a preparation depends on: the tokenizer, the data sets, the formatting function and the
arguments that reach the preparation. Where each of those has a content identity the key is made of those: the
tokenizer's `datasets` hash, taken the first time it is seen; an in-memory `datasets.Dataset`'s rows (hashed), a
file-backed one's fingerprint (what `datasets` caches by); no formatting function (rf_notebook applies a run's
`formatting_func` first: its output is a data set of its own, named by its rows). The entry then also goes to a
small process-wide cache: a later `run_fit` on the same data and tokenizer (a new `Experiment`, a new tokenizer
object from the same files, another base with the same tokenizer) skips the preparation. Otherwise the key holds
object identities, and the entry lives only as long as its `PreparedData`, which holds those objects so that the ids
stay theirs. So does an entry prepared while the tokenizer was not as first seen (another run's trainer set its
`eos_token` or chat template), or whose arguments name an object by its address.

One `PreparedData` belongs to one shared base of one experiment. What its own runs' trainers were built with
(`put`) tells which runs can be built later (`get(shared=False)`): a trainer's constructor checks the model as well,
so the first run of each base is always built whole.

The process-wide cache keeps the most recently used entries up to `SHARED_ENTRIES` and `SHARED_BYTES` of Arrow
data; an entry larger than that stays with its `PreparedData` alone. `clear_shared()` empties it.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from rf_notebook.trainers._common import UNSHARED_FINGERPRINT

__all__ = ["PreparedData", "clear_shared"]

SHARED_ENTRIES = 8
SHARED_BYTES = 1 << 30

_shared: OrderedDict[str, tuple[Any, int]] = OrderedDict()  # key -> (value, Arrow bytes), most recent last
_shared_lock = threading.Lock()  # experiments in other threads may share the process


def clear_shared() -> None:
    """Forget what earlier experiments prepared (their memory goes once no experiment holds it)."""
    with _shared_lock:
        _shared.clear()


class PreparedData:
    """The prepared data sets of one shared base's runs in one experiment, by `key`; see the module docstring."""

    def __init__(self) -> None:
        self._entries: dict[str, Any] = {}
        self._held: dict[str, tuple[Any, ...]] = {}  # identity-keyed entries: the objects their ids name
        self._tokenizers: dict[int, tuple[Any, str | None, str]] = {}  # id -> (tokenizer, hash, state) first seen
        self._datasets: dict[int, tuple[Any, str | None]] = {}  # id -> (data set, its content identity)
        self._local: set[str] = set()  # content keys that must not leave this experiment (see `key`)

    def key(self, kind: str, tokenizer: Any, data: tuple[Any, ...], formatting_func: Any, args: Mapping) -> str:
        """The key of preparing `data` (data sets or None) with `tokenizer` (and `formatting_func`) under `args`
        (the arguments that reach the preparation) for a `kind` of trainer."""
        sources = (tokenizer, *data, formatting_func)
        names = [self._tokenizer_hash(tokenizer), *(self._identity(dataset) for dataset in data)]
        if formatting_func is not None or None in names:
            names, content = [id(source) for source in sources], False
        else:
            content = True
        key = json.dumps([kind, content, names, dict(args)], sort_keys=True, default=repr)
        if not content:
            self._held.setdefault(key, sources)
        elif " at 0x" in key or tokenizer_state(tokenizer) != self._tokenizers[id(tokenizer)][2]:
            # An argument named by its address (another object could have it later), or a tokenizer another run's
            # trainer has changed since (its eos_token, chat template): what is prepared now stays here.
            self._local.add(key)
        return key

    def get(self, key: str, *, shared: bool = True) -> Any | None:
        """What was prepared under `key`: by a trainer built here, else (`shared`) by one of an earlier experiment
        or another base."""
        if key in self._entries or not shared:
            return self._entries.get(key)
        with _shared_lock:
            found = _shared.get(key)
            if found is not None:
                _shared.move_to_end(key)
        return None if found is None else found[0]

    def put(self, key: str, value: Any) -> None:
        """A trainer was built here with `value` (a data set, or a tuple of them) prepared under `key`: keep it, and
        in the process-wide cache too when its key is made of content identities."""
        self._entries.setdefault(key, value)
        if key in self._held or key in self._local:
            return
        size = _arrow_bytes(value)
        if size is None or size > SHARED_BYTES:
            return
        with _shared_lock:
            _shared[key] = (value, size)
            _shared.move_to_end(key)
            while len(_shared) > SHARED_ENTRIES or sum(size for _, size in _shared.values()) > SHARED_BYTES:
                _shared.popitem(last=False)

    def _tokenizer_hash(self, tokenizer: Any) -> str | None:
        """The tokenizer's content hash as it was when this experiment first saw it: a trainer's constructor may
        set its pad token, and the runs after it must find what the first one prepared."""
        seen = self._tokenizers.get(id(tokenizer))
        if seen is None:
            try:
                from datasets.fingerprint import Hasher

                digest = Hasher.hash(tokenizer)
            except Exception:  # noqa: BLE001 - one that cannot be hashed is named by identity
                digest = None
            seen = self._tokenizers[id(tokenizer)] = (tokenizer, digest, tokenizer_state(tokenizer))
        return seen[1]

    def _identity(self, dataset: Any) -> str | None:
        """A data set's content identity ("none" for no data set; None where it has none), once per object."""
        if dataset is None:
            return "none"
        seen = self._datasets.get(id(dataset))
        if seen is None:
            seen = self._datasets[id(dataset)] = (dataset, _content_identity(dataset))
        return seen[1]


def _content_identity(dataset: Any) -> str | None:
    """An in-memory `datasets.Dataset`: a hash of its rows (its fingerprint may come from hashing the code of a
    function that made it, which hashes the same after what the function reads has changed). One backed by files:
    its fingerprint (their paths and the transforms since; what `datasets` itself caches by). Anything else: None."""
    from datasets import Dataset

    from rf_notebook.control.resume import data_fingerprint

    if not isinstance(dataset, Dataset):
        return None
    if not dataset.cache_files:
        return f"rows {data_fingerprint(dataset, metadata=False)}"
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not isinstance(fingerprint, str) or fingerprint.startswith(UNSHARED_FINGERPRINT):
        return None
    return fingerprint


def tokenizer_state(tokenizer: Any) -> str:
    """What a trainer's constructor may change on a tokenizer (special tokens, chat template, sides, size): cheap
    to take for every run, unlike its hash."""
    fields = ("special_tokens_map", "chat_template", "padding_side", "truncation_side", "model_max_length")
    state = [repr(getattr(tokenizer, name, None)) for name in fields]
    try:
        state.append(str(len(tokenizer)))
    except TypeError:
        pass
    return "\n".join(state)


def _arrow_bytes(value: Any) -> int | None:
    """The Arrow bytes the data sets in `value` hold; None if one is not an in-memory `datasets.Dataset`."""
    from datasets import Dataset

    total = 0
    for dataset in value if isinstance(value, tuple) else (value,):
        if dataset is None:
            continue
        if not isinstance(dataset, Dataset):
            return None
        total += dataset.data.nbytes
    return total
