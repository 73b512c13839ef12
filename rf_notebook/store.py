"""The experiment's single source of truth: runs, their metrics and the log of IC ops.

The scheduler thread writes; notebook cells (and later the panel) read. Thread safety: every public method
takes the one lock, and everything handed out is a frozen snapshot (`RunRecord`, `MetricRow`) or a fresh
list, so readers never see a half-written update and never block training for longer than a copy.

    store.add_run(RunRecord(run_id=1, name="r=8, lr=3e-4", ...))
    store.log_metrics(1, step=16, chunk=1, values={"eval_loss": 0.91})
    store.runs(); store.metrics(run_id=1)
    op = store.log_op("api", "stop", run_id=1); store.settle_op(op.op_id, "applied", step=17)

Durable: `Store.open(directory)` reads an experiment's SQLite database back (`_journal.Journal`) and from then
on writes every change to it in the same call. If a write fails (disk full, read-only folder), the change stays
in memory, `storage_error` says why, and nothing more is written until `recover()` rewrites the whole database
from memory in one transaction (so the database never has holes); the engine pauses training meanwhile.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from bisect import bisect_left
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RunStatus", "RunRecord", "MetricRow", "ICRecord", "Store", "LIVE_STATUSES", "TERMINAL_STATUSES"]


class RunStatus(str, enum.Enum):
    QUEUED = "queued"
    TRAINING = "training"
    STOPPED = "stopped"
    FINISHED = "finished"
    FAILED = "failed"
    DELETED = "deleted"

    @property
    def is_live(self) -> bool:
        """Queued or training: the run still has a place in the schedule."""
        return self in LIVE_STATUSES

    @property
    def is_terminal(self) -> bool:
        """Finished, failed or deleted: the run never trains again."""
        return self in TERMINAL_STATUSES


# The one definition of which statuses are live and which are final; the panel's JavaScript gets these through
# the feed's messages.
LIVE_STATUSES = frozenset({RunStatus.QUEUED, RunStatus.TRAINING})
TERMINAL_STATUSES = frozenset({RunStatus.FINISHED, RunStatus.FAILED, RunStatus.DELETED})


@dataclasses.dataclass(frozen=True)
class RunRecord:
    run_id: int
    name: str
    trainer_type: str
    config: Mapping[str, Any]  # resolved, JSON-friendly
    status: RunStatus = RunStatus.QUEUED
    step: int = 0
    total_steps: int = 0
    chunks_done: int = 0
    chunks_total: int = 0
    error: str | None = None
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # flattened values, "peft_config.r": 8
    rungs: tuple[int, ...] = ()  # the optimizer steps at which the run's chunks end
    rows_per_step: float = 0.0  # data set rows (prompts, pairs) one optimizer step consumes
    warning: str | None = None  # something that went wrong without ending the run (a compute_metrics that raised)


@dataclasses.dataclass(frozen=True)
class MetricRow:
    run_id: int
    step: int
    chunk: int  # chunks completed by the run when the value was logged
    name: str
    value: float
    wall_time: float


@dataclasses.dataclass(frozen=True)
class ICRecord:
    """One interactive-control op, human or automatic, and what became of it."""

    op_id: int
    time: float
    origin: str  # "api", "panel" or "policy"
    op: str  # "stop", "resume", "delete", "clone_modify"
    run_id: int | None
    args: Mapping[str, Any]
    outcome: str = "pending"  # then "applied" or "refused"
    reason: str | None = None
    step: int | None = None  # the run's optimizer step when the op took effect
    new_run_id: int | None = None


class Store:
    """In-memory store of runs and metrics. All methods are thread-safe; all results are snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[int, RunRecord] = {}
        self._metrics: list[MetricRow] = []
        # Metric rows by cursor: row i was the `_cursors[i]`-th logged. A cursor only grows, also past rows that
        # were dropped, so a reader's cursor names the same point before and after a drop.
        self._cursors: list[int] = []
        self._next_cursor = 0
        self._rewritten = 0  # the cursor right after the latest drop: a reader behind it shows dropped rows
        self._ops: list[ICRecord] = []
        self._meta: dict[str, Any] = {}
        self._next_id = 1
        self._changed = threading.Condition(self._lock)
        self._version = 0
        self._journal: Any = None
        self._storage_error: str | None = None
        self._notices: dict[str, str] = {}  # key -> text: trouble the panel shows that ends no run (not saved)

    @classmethod
    def open(cls, directory: str | Path) -> Store:
        """The store of the experiment in `directory`, read back from its database (created if new)."""
        from rf_notebook._journal import Journal

        journal = Journal.open(Path(directory))
        store = cls()
        runs, metrics, ops, meta = journal.load()
        for r in runs:
            record = RunRecord(**{**r, "status": RunStatus(r["status"]), "rungs": tuple(r["rungs"])})
            store._runs[record.run_id] = record
        store._metrics = [MetricRow(*row) for row in metrics]
        store._cursors = list(range(len(store._metrics)))
        store._next_cursor = len(store._metrics)
        store._ops = [ICRecord(**op) for op in ops]
        store._meta = meta
        store._next_id = max([*store._runs, *(op.new_run_id or 0 for op in store._ops), 0]) + 1
        store._journal = journal
        return store

    def attach(self, directory: str | Path) -> None:
        """Make an in-memory store durable: create the experiment's database and write everything so far."""
        from rf_notebook._journal import Journal

        journal = Journal.open(Path(directory))
        with self._lock:
            try:
                journal.rewrite(list(self._runs.values()), self._metrics, self._ops, self._meta)
            except BaseException:
                journal.close()
                raise
            self._journal = journal

    @property
    def durable(self) -> bool:
        return self._journal is not None

    @property
    def storage_error(self) -> str | None:
        """Why the last write to the experiment directory failed (None: every change is on disk)."""
        return self._storage_error

    def _persist(self, method: str, *args: Any) -> None:
        """Write one change to the database (caller holds the lock). A failure is remembered, not raised: the
        training thread must not die of it, and the engine pauses on `storage_error`."""
        if self._journal is None or self._storage_error is not None:
            return
        from rf_notebook._journal import StorageError

        try:
            getattr(self._journal, method)(*args)
        except StorageError as exc:
            self._storage_error = str(exc)
            self._version += 1
            self._changed.notify_all()

    def fail_storage(self, message: str) -> None:
        """Record a failed write elsewhere in the experiment directory (a checkpoint): the engine pauses."""
        with self._lock:
            if self._storage_error is None:
                self._storage_error = message
            self._version += 1
            self._changed.notify_all()

    def recover(self) -> None:
        """After a storage error: rewrite the database from memory (raises StorageError if it still fails)."""
        with self._lock:
            if self._storage_error is None or self._journal is None:
                self._storage_error = None
                return
            self._journal.rewrite(list(self._runs.values()), self._metrics, self._ops, self._meta)
            self._storage_error = None
            self._version += 1

    def add_notice(self, key: str, text: str) -> None:
        """Show `text` in the panel until `clear_notice(key)` (a tracker that fails while training goes on)."""
        with self._lock:
            self._notices[key] = text
            self._version += 1

    def clear_notice(self, key: str) -> None:
        with self._lock:
            if self._notices.pop(key, None) is not None:
                self._version += 1

    def notices(self) -> list[str]:
        with self._lock:
            return list(self._notices.values())

    def meta(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._meta.get(key, default)

    def set_meta(self, key: str, value: Any) -> None:
        with self._lock:
            self._meta[key] = value
            self._persist("put_meta", key, value)

    def drop_metrics_after(self, run_id: int, step: int) -> None:
        """Forget run `run_id`'s metrics logged after optimizer step `step` (a run resumed from a checkpoint
        logs them again)."""
        with self._lock:
            kept = [i for i, m in enumerate(self._metrics) if m.run_id != run_id or m.step <= step]
            if len(kept) < len(self._metrics):
                self._metrics = [self._metrics[i] for i in kept]
                self._cursors = [self._cursors[i] for i in kept]
                self._next_cursor += 1  # a cursor of its own: readers at or before it saw the rows dropped here
                self._rewritten = self._next_cursor
            self._persist("drop_metrics_after", run_id, step)
            self._version += 1

    @property
    def rewritten(self) -> int:
        """The cursor right after the latest `drop_metrics_after` that dropped rows (0: none ever did). A reader whose
        cursor is below it has seen rows that are gone: it reads everything again."""
        return self._rewritten

    def integrity(self) -> str:
        """SQLite's `PRAGMA integrity_check` ("ok"), or "memory" for a store without a database."""
        with self._lock:
            return self._journal.integrity() if self._journal is not None else "memory"

    def close(self) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None

    @property
    def version(self) -> int:
        """A counter that grows with every change (runs, metrics, ops): cheap polling for readers."""
        return self._version

    def add_run(self, record: RunRecord) -> None:
        with self._lock:
            if record.run_id in self._runs:
                raise ValueError(f"run id {record.run_id} is already in the store")
            self._runs[record.run_id] = record
            self._next_id = max(self._next_id, record.run_id + 1)
            self._persist("put_run", record)
            self._version += 1
            self._changed.notify_all()

    def update_run(self, run_id: int, **changes: Any) -> RunRecord:
        with self._lock:
            record = dataclasses.replace(self._runs[run_id], **changes)
            self._runs[run_id] = record
            self._persist("put_run", record)
            self._version += 1
            self._changed.notify_all()
            return record

    def run(self, run_id: int) -> RunRecord:
        with self._lock:
            if run_id not in self._runs:
                raise KeyError(f"no run with id {run_id!r}; known ids: {sorted(self._runs)}")
            return self._runs[run_id]

    def runs(self) -> list[RunRecord]:
        with self._lock:
            return [self._runs[k] for k in sorted(self._runs)]

    def reserve_run_ids(self, count: int) -> list[int]:
        """Fresh run ids, never handed out twice (a clone's id is known before its run is built)."""
        with self._lock:
            ids = list(range(self._next_id, self._next_id + count))
            self._next_id += count
            return ids

    def log_metrics(self, run_id: int, step: int, chunk: int, values: Mapping[str, float]) -> None:
        now = time.time()
        rows = [MetricRow(run_id, step, chunk, name, float(value), now) for name, value in values.items()]
        with self._lock:  # no notify: waiters watch run statuses, and a wake-up per step costs the trainer
            self._metrics.extend(rows)
            self._cursors.extend(range(self._next_cursor, self._next_cursor + len(rows)))
            self._next_cursor += len(rows)
            self._persist("put_metrics", rows)
            self._version += 1

    def metrics(self, run_id: int | None = None) -> list[MetricRow]:
        with self._lock:
            return [m for m in self._metrics if run_id is None or m.run_id == run_id]

    def metrics_since(self, cursor: int, until: int | None = None) -> tuple[list[MetricRow], int]:
        """The rows logged at or after `cursor` (and before `until`), and the cursor that follows them. A cursor
        counts every row ever logged, dropped ones too: it only grows."""
        with self._lock:
            end = self._next_cursor if until is None else min(until, self._next_cursor)
            first, last = bisect_left(self._cursors, cursor), bisect_left(self._cursors, end)
            return self._metrics[first:last], end

    def log_op(
        self,
        origin: str,
        op: str,
        run_id: int | None,
        args: Mapping[str, Any] | None = None,
        new_run_id: int | None = None,
        reason: str | None = None,
    ) -> ICRecord:
        """A new pending op. `reason` is why it was asked for (a policy's); a refusal's reason replaces it."""
        with self._lock:
            record = ICRecord(
                len(self._ops) + 1,
                time.time(),
                origin,
                op,
                run_id,
                dict(args or {}),
                reason=reason,
                new_run_id=new_run_id,
            )
            self._ops.append(record)
            self._persist("put_op", record)
            self._version += 1
            return record

    def settle_op(self, op_id: int, outcome: str, reason: str | None = None, step: int | None = None) -> ICRecord:
        """Record an op's outcome ("applied" or "refused"), once."""
        with self._lock:
            record = self._ops[op_id - 1]
            if record.outcome != "pending":
                raise ValueError(f"op {op_id} is already {record.outcome}")
            reason = reason if reason is not None else record.reason
            record = dataclasses.replace(record, outcome=outcome, reason=reason, step=step)
            self._ops[op_id - 1] = record
            self._persist("put_op", record)
            self._version += 1
            self._changed.notify_all()
            return record

    def op(self, op_id: int) -> ICRecord:
        with self._lock:
            if not 1 <= op_id <= len(self._ops):
                raise KeyError(f"no op with id {op_id!r}; the log has {len(self._ops)}")
            return self._ops[op_id - 1]

    def ic_log(self) -> list[ICRecord]:
        with self._lock:
            return list(self._ops)

    def wait_until(self, predicate: Any, timeout: float | None) -> bool:
        """Block until `predicate(runs, ops)` holds for the current runs and op log; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self._runs.values()), list(self._ops)):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 1.0) if remaining is not None else 1.0)
            return True

    def notify(self) -> None:
        with self._changed:
            self._changed.notify_all()
