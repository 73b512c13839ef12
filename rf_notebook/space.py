"""The values a search space is written with: `List` (alternatives) and `Range` (an interval to sample).

Any field of a config may be one (`RFLoraConfig(r=List([8, 64]))`); `rf_notebook.search` expands them into
concrete runs. Pure: imports nothing of rf_notebook, torch or TRL.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

__all__ = ["List", "Range", "alternatives"]


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


def alternatives(value: Any) -> list[Any]:
    """The values of a `List`, or `[value]` for any other value."""
    return list(value.values) if isinstance(value, List) else [value]
