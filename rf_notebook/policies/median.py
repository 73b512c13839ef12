"""Median-of-peers: after `warmup_chunks`, at every rung stop a live run whose metric is worse than the median
of its peers: every run's value at that rung, or, for a run that stopped earlier, its last value (so the pruned
runs keep counting, and the survivors are not halved again at every rung). A diverged run (NaN) is stopped."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from rf_notebook.policies._base import Decision, Policy, RunAtRung, fmt, live

__all__ = ["MedianOfPeers"]


class MedianOfPeers(Policy):
    def __init__(
        self,
        metric: str = "eval_loss",
        mode: str = "min",
        warmup_chunks: int = 1,
        probe_steps: int | str = 0,
        probe_from: int = 2,
    ):
        super().__init__(metric, mode, probe_steps, probe_from)
        if isinstance(warmup_chunks, bool) or not isinstance(warmup_chunks, int) or warmup_chunks < 0:
            raise ValueError(f"`warmup_chunks` is {warmup_chunks!r}, but must be an int >= 0")
        self.warmup_chunks = warmup_chunks
        if probe_steps and probe_from > warmup_chunks + 1:
            raise ValueError(
                f"`probe_from` is {probe_from} with warmup_chunks={warmup_chunks}: the median compares every run's "
                "latest value, so every rung it decides at must use the same metric; use probe_from <= "
                f"{warmup_chunks + 1}"
            )

    def decides_at(self, rung: int) -> bool:
        return rung > self.warmup_chunks

    def decide(self, rung: int, runs: Sequence[RunAtRung]) -> list[Decision]:
        if rung <= self.warmup_chunks:
            return []
        peers = [v for r in runs if (v := r.last_value(rung)) is not None and math.isfinite(v)]
        if len(peers) < 2:
            return []
        median = statistics.median(peers)
        relation = ">" if self.mode == "min" else "<"
        return [
            Decision(
                "stop",
                r.run_id,
                f"{self.ranked_by(rung)} {fmt(r.value(rung))} at chunk {rung} {relation} median {fmt(median)} "
                f"of {len(peers)} runs",
            )
            for r in live(runs)
            if r.value(rung) is not None and self.worse(r.value(rung), median)
        ]

    def judge(self, rung: int, run: RunAtRung, runs: Sequence[RunAtRung]) -> list[Decision]:
        """A run that reached `rung` late meets the same median of every run's value there."""
        return [d for d in self.decide(rung, runs) if d.run_id == run.run_id]
