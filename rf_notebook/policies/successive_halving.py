"""Synchronous successive halving at chunk rungs: at rungs min_chunks, min_chunks*eta, min_chunks*eta^2, ...
keep the best 1/eta of the runs still training and stop the others. By default (`probe_steps="auto"`) runs are
ranked by an anneal probe from rung 2 on where that is possible (SFT / DPO runs with an eval set; see `Policy`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rf_notebook.policies._base import Decision, Policy, RunAtRung, fmt, live

__all__ = ["SuccessiveHalving"]


class SuccessiveHalving(Policy):
    def __init__(
        self,
        metric: str = "eval_loss",
        mode: str = "min",
        eta: int = 3,
        min_chunks: int = 1,
        probe_steps: int | str = "auto",
        probe_from: int = 2,
    ):
        super().__init__(metric, mode, probe_steps, probe_from)
        if isinstance(eta, bool) or not isinstance(eta, int) or not 2 <= eta <= 4:
            raise ValueError(f"`eta` is {eta!r}, but must be 2, 3 or 4 (keep the best 1/eta at each rung)")
        if isinstance(min_chunks, bool) or not isinstance(min_chunks, int) or min_chunks < 1:
            raise ValueError(f"`min_chunks` is {min_chunks!r}, but must be an int >= 1")
        self.eta, self.min_chunks = eta, min_chunks

    def is_rung(self, rung: int) -> bool:
        if rung < self.min_chunks or rung % self.min_chunks:
            return False
        ratio = rung // self.min_chunks
        return ratio == self.eta ** round(math.log(ratio, self.eta))

    def decides_at(self, rung: int) -> bool:
        return self.is_rung(rung)

    def decide(self, rung: int, runs: Sequence[RunAtRung]) -> list[Decision]:
        if not self.is_rung(rung):
            return []
        ranked = self.better_first(live(runs), rung)
        if len(ranked) <= 1:
            return []
        keep = math.ceil(len(ranked) / self.eta)
        return [self._stop(r, i, ranked, rung, f" at chunk {rung}") for i, r in enumerate(ranked, start=1) if i > keep]

    def judge(self, rung: int, run: RunAtRung, runs: Sequence[RunAtRung]) -> list[Decision]:
        """A run that reached `rung` late is kept if it ranks in the best 1/eta of every run that reached `rung`
        (stopped ones included), as asynchronous successive halving does."""
        if not self.is_rung(rung) or run.value(rung) is None:
            return []
        ranked = self.better_first(runs, rung)
        place = next(i for i, r in enumerate(ranked, start=1) if r.run_id == run.run_id)
        if len(ranked) <= 1 or place <= math.ceil(len(ranked) / self.eta):
            return []
        return [self._stop(run, place, ranked, rung, f" of the runs that reached chunk {rung},")]

    def _stop(self, run: RunAtRung, place: int, ranked: list[RunAtRung], rung: int, where: str) -> Decision:
        keep = math.ceil(len(ranked) / self.eta)
        cut = ranked[keep - 1].value(rung)
        return Decision(
            "stop",
            run.run_id,
            f"rank {place}/{len(ranked)}{where} on {self.ranked_by(rung)} {fmt(run.value(rung))} "
            f"{'>' if self.mode == 'min' else '<'} cut {fmt(cut)} (keeping the best {keep})",
        )
