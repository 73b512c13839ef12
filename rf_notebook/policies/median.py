"""Median-of-peers: after `warmup_chunks`, at every rung stop a run whose metric is worse than the median of
every run's value at that same rung (stopped and finished runs count as peers: they ran that far)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from rf_notebook.policies._base import Decision, Policy, RunAtRung, fmt, live

__all__ = ["MedianOfPeers"]


class MedianOfPeers(Policy):
    def __init__(self, metric: str = "eval_loss", mode: str = "min", warmup_chunks: int = 1):
        super().__init__(metric, mode)
        if isinstance(warmup_chunks, bool) or not isinstance(warmup_chunks, int) or warmup_chunks < 0:
            raise ValueError(f"`warmup_chunks` is {warmup_chunks!r}, but must be an int >= 0")
        self.warmup_chunks = warmup_chunks

    def decide(self, rung: int, runs: Sequence[RunAtRung]) -> list[Decision]:
        if rung <= self.warmup_chunks:
            return []
        peers = [r.value(rung) for r in runs if r.value(rung) is not None]
        if len(peers) < 2:
            return []
        median = statistics.median(peers)
        relation = ">" if self.mode == "min" else "<"
        return [
            Decision(
                "stop",
                r.run_id,
                f"{self.metric} {fmt(r.value(rung))} at chunk {rung} {relation} median {fmt(median)} "
                f"of {len(peers)} runs",
            )
            for r in live(runs)
            if r.value(rung) is not None and self.worse(r.value(rung), median)
        ]
