"""PBT-style exploit and explore at rungs: every `interval` chunks, each run in the bottom `quantile` of the
live runs is replaced by a warm-start clone of a run from the top `quantile` (stopped once the clone is
accepted), with the clone's hyper-parameters in `perturb` multiplied by one of the given factors. The choice of
factor is a pure function of (seed, rung, run), so a restarted experiment makes the same decisions."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from rf_notebook.policies._base import Decision, Policy, RunAtRung, fmt, live

__all__ = ["PBT"]


class PBT(Policy):
    def __init__(
        self,
        metric: str = "eval_loss",
        mode: str = "min",
        quantile: float = 0.25,
        perturb: Mapping[str, Sequence[float]] | None = None,
        interval: int = 1,
        seed: int = 0,
    ):
        super().__init__(metric, mode)
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 < quantile <= 0.5:
            raise ValueError(f"`quantile` is {quantile!r}, but must be in (0, 0.5]")
        perturb = {"learning_rate": (0.8, 1.25)} if perturb is None else dict(perturb)
        for name, factors in perturb.items():
            if (
                not isinstance(name, str)
                or not factors
                or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors)
            ):
                raise ValueError(f"`perturb[{name!r}]` is {factors!r}, but must be a non-empty tuple of factors > 0")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"`interval` is {interval!r}, but must be an int >= 1")
        self.quantile, self.perturb, self.interval, self.seed = quantile, perturb, interval, seed

    def decide(self, rung: int, runs: Sequence[RunAtRung]) -> list[Decision]:
        if rung % self.interval:
            return []
        ranked = self.better_first(live(runs), rung)
        n = math.floor(len(ranked) * self.quantile)
        if n < 1:
            return []
        top, bottom = ranked[:n], ranked[-n:]
        decisions = []
        for i, loser in enumerate(bottom):
            winner = top[i % n]
            rng = random.Random(f"{self.seed}:{rung}:{loser.run_id}")
            overrides, changes = {}, []
            for name, factors in self.perturb.items():
                current = _param(winner.params, name)
                if isinstance(current, float):  # continuous hyper-parameters (learning rate, beta, weight decay)
                    factor = rng.choice(list(factors))
                    overrides[name] = current * factor
                    changes.append(f"{name} x{factor:g}")
            rank = f"rank {len(ranked) - n + i + 1}/{len(ranked)}"
            decisions.append(
                Decision(
                    "clone",
                    winner.run_id,
                    f"exploit at chunk {rung}: run {loser.run_id} ({rank} on {self.metric} "
                    f"{fmt(loser.value(rung))}) replaced by a warm clone of run {winner.run_id} "
                    f"({fmt(winner.value(rung))})" + (f", {', '.join(changes)}" if changes else ""),
                    overrides,
                    replaces=loser.run_id,
                )
            )
        return decisions


def _param(params: Mapping[str, object], name: str) -> object:
    """A flat run parameter by field name ("learning_rate" matches "training_args.learning_rate")."""
    for key, value in params.items():
        if key == name or key.endswith(f".{name}"):
            return value
    return None
