"""What the live panel shows, as JSON: snapshots and deltas of an experiment's store (pure; no widget, no torch).

The panel's protocol is written down in js/README.md. `Feed` reads the store, never writes it:

    feed = Feed(store, "demo")
    feed.snapshot()            # the whole state, every curve downsampled to at most `max_points` points
    feed.delta(since=cursor)   # runs, header and ops in full; only the metric points logged after `cursor`
    feed.stale(cursor)         # rows a view at `cursor` shows were dropped since (a run continued from a
                               # checkpoint): it needs a snapshot, not a delta
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from rf_notebook._panel_spec import LIVE, MAX_OPS, PALETTE, SNAPSHOT_MAX_POINTS, downsample, run_color
from rf_notebook.configs import format_value, varying_params
from rf_notebook.store import MetricRow, RunRecord, Store

# PALETTE, downsample and run_color are defined in _panel_spec (shared with the static HTML); re-exported here.
__all__ = ["Feed", "PALETTE", "downsample", "run_color"]


def _json_value(value: Any) -> Any:
    """A hyper-parameter value as JSON: numbers, strings, booleans, None and lists of them; others as text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return format_value(value)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN; the curve shows a gap


class Feed:
    """Builds the panel's state from `store`; remembers when training started, so it can tell elapsed time."""

    def __init__(self, store: Store, experiment: str, max_points: int = SNAPSHOT_MAX_POINTS):
        self.store, self.experiment, self.max_points = store, experiment, max_points
        self.started = time.time()
        self._ended: float | None = None
        self._lock = threading.Lock()  # the writer thread and the kernel's message handler both read
        self._latest: dict[int, dict[str, float]] = {}  # run id -> metric -> latest value
        self._latest_cursor = 0

    def restart_clock(self) -> None:
        self.started, self._ended = time.time(), None

    def snapshot(self, until: int | None = None) -> dict[str, Any]:
        """The whole state; its points are the first `until` metric rows (all of them by default)."""
        rows, cursor = self.store.metrics_since(0, until)
        series = _series(rows)
        for curves in series.values():
            for name, points in curves.items():
                curves[name] = downsample(points, self.max_points)
        return {"v": 1, "experiment": self.experiment, "cursor": cursor, **self._common(), "series": series}

    def delta(self, since: int) -> dict[str, Any]:
        rows, cursor = self.store.metrics_since(since)
        return {"type": "delta", "from": since, "to": cursor, **self._common(), "series": _series(rows)}

    def stale(self, cursor: int) -> bool:
        """Whether a view whose state covers the rows before `cursor` shows rows that have been dropped since."""
        return cursor < self.store.rewritten

    def done(self) -> bool:
        """Nothing left to train and no IC op pending: the experiment has ended or is paused."""
        runs = self.store.runs()
        return bool(runs) and not any(r.status.is_live for r in runs) and not self._pending_ops()

    def _pending_ops(self) -> bool:
        return any(op.outcome == "pending" for op in self.store.ic_log())

    def _common(self) -> dict[str, Any]:
        runs = self.store.runs()
        latest = self._update_latest()
        return {
            "header": self._header(runs),
            "params": varying_params([r.params for r in runs]),
            "runs": [self._run(r, latest.get(r.run_id, {})) for r in runs],
            "boundaries": {str(r.run_id): [s for s in r.rungs if s <= r.step] for r in runs},
            "ops": [_op(op) for op in self.store.ic_log()[-MAX_OPS:]],
            "live_statuses": list(LIVE),  # which runs the panel may stop (and counts as still training)
        }

    def _update_latest(self) -> dict[int, dict[str, float]]:
        with self._lock:
            rows, cursor = self.store.metrics_since(self._latest_cursor)
            if self.stale(self._latest_cursor):  # a run's latest values may be among the rows dropped
                self._latest = {}
                rows, cursor = self.store.metrics_since(0)
            self._latest_cursor = cursor
            for m in rows:
                self._latest.setdefault(m.run_id, {})[m.name] = m.value
            return {run_id: dict(values) for run_id, values in self._latest.items()}

    def _header(self, runs: list[RunRecord]) -> dict[str, Any]:
        done = self.done()
        now = time.time()
        if done and self._ended is None:
            self._ended = now
        elif not done:
            self._ended = None
        elapsed = (self._ended or now) - self.started
        # Work still planned: a stopped, failed or deleted run counts for what it did, not for what it skipped.
        planned = [r.total_steps if r.status.is_live else r.step for r in runs]
        total = sum(planned)
        progress = sum(min(r.step, p) for r, p in zip(runs, planned)) / total if total else 0.0
        eta = elapsed * (1 - progress) / progress if 0 < progress < 1 and not done else None
        counts = Counter(r.status.value for r in runs)
        return {
            "elapsed_s": elapsed,
            "eta_s": eta,
            "progress": progress,
            "done": done,
            "counts": dict(counts),
            "storage_error": self.store.storage_error,  # the experiment is paused until the runs are resumed
            "notices": self.store.notices(),  # trouble that ends no run (a failing tracker)
        }

    @staticmethod
    def _run(record: RunRecord, latest: Mapping[str, float]) -> dict[str, Any]:
        return {
            "id": record.run_id,
            "name": record.name,
            "status": record.status.value,
            "trainer_type": record.trainer_type,
            "step": record.step,
            "total_steps": record.total_steps,
            "chunks_done": record.chunks_done,
            "chunks_total": record.chunks_total,
            "error": record.error,
            "warning": record.warning,
            "params": {k: _json_value(v) for k, v in record.params.items()},
            "samples_per_step": record.rows_per_step or 1,
            "latest": {k: _finite(v) for k, v in latest.items()},
            "color": run_color(record.run_id),
        }


def _series(rows: Iterable[MetricRow]) -> dict[str, dict[str, list[list[float]]]]:
    series: dict[str, dict[str, list[list[float]]]] = {}
    for m in rows:
        series.setdefault(str(m.run_id), {}).setdefault(m.name, []).append([m.step, _finite(m.value)])
    return series


def _op(op: Any) -> dict[str, Any]:
    return {
        "op_id": op.op_id,
        "time": op.time,
        "origin": op.origin,
        "op": op.op,
        "run_id": op.run_id,
        "args": {k: _json_value(v) if not isinstance(v, Mapping) else dict(v) for k, v in op.args.items()},
        "outcome": op.outcome,
        "reason": op.reason,
        "step": op.step,
        "new_run_id": op.new_run_id,
    }
