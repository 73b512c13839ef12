"""Feeding the trackers from the store: one thread per tracker, never the training thread.

The training thread only writes the store (as it always does); each tracker's thread wakes every `interval`
seconds, takes the metric rows logged since its cursor, the runs and the IC-op log, and hands the tracker one batch
per run. A slow or unreachable tracker therefore delays only its own thread: training and the other trackers go
on. A failing call is reported once (the log and a notice in the panel) and retried from the same cursor with a
growing back-off, so nothing is lost while it recovers; per run, the last step each tracker already holds is
remembered, so a retry or a restart never logs a point twice.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rf_notebook.store import ICRecord, RunRecord, Store
from rf_notebook.tracking import Point, Sink, TrackedRun

logger = logging.getLogger(__name__)

__all__ = ["Tracking", "run_tags", "experiment_uid"]

MAX_BACKOFF_S = 30.0
# Between passes a tracker's thread takes at most this share of one core: a pass that cost c CPU seconds (besides
# opening the tracker and starting runs, paid once) is followed by a wait of at least c / DUTY, up to MAX_THROTTLE_S.
# A tracker with a high cost per call logs less often instead of slowing training; one whose cost is per point gains
# nothing from waiting longer, and the backlog a flush (wait(), end()) writes grows with the wait: hence the cap.
DUTY = 0.005
MAX_THROTTLE_S = 10.0
FAILING_GRACE_S = 1.0  # how long close() waits for the last try of a tracker that is failing
SLOW_S = 5.0  # a pass taking longer is not waited for by wait() / end(): the tracker is not answering


def experiment_uid(store: Store) -> str:
    """A stable id for the experiment (kept in its database): tracker runs are found again by it after a restart,
    and another experiment of the same name never takes them over."""
    uid = store.meta("uid")
    if uid is None:
        uid = uuid.uuid4().hex[:12]
        store.set_meta("uid", uid)
    return uid


def run_tags(record: RunRecord, experiment: str, made_by: ICRecord | None, ops: Sequence[ICRecord]) -> dict[str, str]:
    """What a tracker shows about a run besides its config and metrics: its experiment, trainer type, status,
    lineage and the policy decisions that touched it (`ops`: the IC ops about this run)."""
    tags = {
        "rf_notebook.experiment": experiment,
        "rf_notebook.run_id": str(record.run_id),
        "rf_notebook.trainer_type": record.trainer_type,
        # "running" while the run has a place in the schedule (queued and training alternate at every chunk: not
        # news for a tracker), then stopped, finished, failed or deleted.
        "rf_notebook.status": "running" if record.status.is_live else record.status.value,
        "rf_notebook.source": "initial" if made_by is None else made_by.origin,
    }
    if made_by is not None:
        tags["rf_notebook.cloned_from"] = str(made_by.run_id)
        if made_by.args.get("warm_start"):
            tags["rf_notebook.warm_started_from"] = str(made_by.run_id)
    if record.error:
        tags["rf_notebook.error"] = record.error[:1000]
    decisions = [
        f"{op.op}{'' if op.step is None else f' at step {op.step}'}{f': {op.reason}' if op.reason else ''}"
        for op in ops
        if op.origin == "policy" and op.outcome == "applied"
    ]
    if made_by is not None and made_by.origin == "policy":
        decisions.insert(0, f"made by clone_modify of run {made_by.run_id}: {made_by.reason or ''}".rstrip(": "))
    if decisions:
        tags["rf_notebook.policy"] = "; ".join(decisions)[:5000]
    return tags


@dataclasses.dataclass
class _RunState:
    run: TrackedRun
    last: dict[str, int]  # metric -> last step the tracker holds
    tags: dict[str, str]  # the tags it holds


class _Worker:
    """One tracker fed from the store by one thread."""

    def __init__(self, tracking: Tracking, sink: Sink):
        self.tracking, self.sink = tracking, sink
        self.cursor = 0
        self.runs: dict[int, _RunState] = {}
        self.opened = False
        self.error: str | None = None
        self.started = 0  # passes begun (failed ones too), numbered from 1
        self.passes = 0  # passes completed
        self.running_since: float | None = None  # when the pass in progress began (monotonic)
        self.synced_version = -1  # the store's version the last successful pass read
        self.synced_signature: tuple = ()  # the `_signature` of what the last successful pass wrote
        self.busy_s = 0.0  # CPU time of this tracker's thread in its passes
        self.setup_s = 0.0  # the part of it spent opening the tracker and starting runs
        self.cond = threading.Condition()
        self.wanted = 0  # a flush asks for the pass with this number (one begun after it asked)
        self.closing = False
        self.thread: threading.Thread | None = None

    # -- the thread ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name=f"rf_notebook-{self.sink.kind}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        wait = self.tracking.interval  # until the next look at the store
        throttled_until = 0.0  # before then (monotonic), only news about runs makes a pass, not new metric values
        while True:
            with self.cond:
                deadline = time.monotonic() + wait
                while not self.closing and self.wanted <= self.started:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self.cond.wait(remaining)
                closing, asked = self.closing, self.wanted > self.started
            # Nothing new in the store: no pass (it would rebuild every tag).
            changed = self.error is not None or self.tracking.store.version != self.synced_version
            due = changed and (time.monotonic() >= throttled_until or self._signature() != self.synced_signature)
            if closing or asked or due:
                cpu = self.busy_s - self.setup_s
                ok = self.attempt()
                if ok:
                    wait = self.tracking.interval
                    cost = self.busy_s - self.setup_s - cpu
                    throttled_until = time.monotonic() + min(cost / DUTY, MAX_THROTTLE_S)
                else:
                    wait = min(max(wait, 1.0) * 2, MAX_BACKOFF_S)
            if closing:
                self._close()
                return

    def _signature(self) -> tuple:
        return _signature(self.tracking.store.runs(), self.tracking.store.ic_log())

    def attempt(self) -> bool:
        """One pass; a failure is reported once (until the tracker works again) and retried later."""
        started = time.thread_time()
        with self.cond:
            self.started += 1
            self.running_since = time.monotonic()
        version = self.tracking.store.version  # read before the store is: a change meanwhile makes another pass
        try:
            self.sync()
        except Exception as exc:  # a tracker's failure never reaches training
            message = f"{self.sink.kind} tracking failed (training goes on; retrying): {type(exc).__name__}: {exc}"
            if self.error is None:
                logger.warning("experiment %r: %s", self.tracking.experiment, message)
                self.tracking.store.add_notice(f"tracking:{self.sink.kind}", message)
            self.error = message
            ok = False
        else:
            if self.error is not None:
                logger.info("experiment %r: %s tracking works again", self.tracking.experiment, self.sink.kind)
                self.tracking.store.clear_notice(f"tracking:{self.sink.kind}")
            self.error = None
            self.synced_version = version
            ok = True
        with self.cond:
            self.passes += 1
            self.running_since = None
            self.busy_s += time.thread_time() - started
            self.cond.notify_all()
        return ok

    def _close(self) -> None:
        try:
            self.sink.close()
        except Exception as exc:
            logger.warning("experiment %r: closing %s tracking failed: %s", self.tracking.experiment, self.sink, exc)
        if self.error is not None:
            logger.warning(
                "experiment %r: %s tracking stopped while failing; what it missed can be written with "
                "exp.export_tracking(...) or the next run_fit with this tracker",
                self.tracking.experiment,
                self.sink.kind,
            )
        self.tracking.store.clear_notice(f"tracking:{self.sink.kind}")  # nothing retries any more

    def _stuck(self) -> bool:
        """A pass has been running for more than SLOW_S seconds (an unreachable server's retries)."""
        return self.running_since is not None and time.monotonic() - self.running_since > SLOW_S

    def flush(self, deadline: float) -> bool:
        """Ask for a pass that begins after this call and wait (until `deadline`, a monotonic time, and no longer
        than a stuck pass allows) for it to end; True if it succeeded."""
        with self.cond:
            target = self.started + 1
            self.wanted = max(self.wanted, target)
            self.cond.notify_all()
            while self.passes < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.thread is None or not self.thread.is_alive() or self._stuck():
                    return False
                self.cond.wait(min(remaining, 0.5))
        return self.error is None

    def close(self, deadline: float) -> None:
        """Ask for a last pass, then wait (until `deadline`, and not for a stuck tracker) for the thread to end."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        while self.thread is not None and self.thread.is_alive():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stuck():
                return
            self.thread.join(min(remaining, 0.5))

    # -- one pass --------------------------------------------------------------------------------------------

    def sync(self) -> None:
        """Bring the tracker up to date with the store: new runs, new metric points, changed tags."""
        tracking = self.tracking
        if not self.opened:
            started = time.thread_time()
            self.sink.open(tracking.experiment, tracking.directory)
            self.opened = True
            self.setup_s += time.thread_time() - started
        rows, cursor = tracking.store.metrics_since(self.cursor)
        records = tracking.store.runs()  # read after the rows: every row's run is among them
        ops = tracking.store.ic_log()
        signature = _signature(records, ops)
        made_by = {op.new_run_id: op for op in ops if op.op == "clone_modify" and op.new_run_id}
        about: dict[int, list[ICRecord]] = {}
        for op in ops:
            if op.run_id is not None:
                about.setdefault(op.run_id, []).append(op)
        tags = {
            r.run_id: run_tags(r, tracking.experiment, made_by.get(r.run_id), about.get(r.run_id, [])) for r in records
        }
        for record in records:
            if record.run_id not in self.runs:
                self._start(record, tags[record.run_id], made_by.get(record.run_id))
        by_run: dict[int, list[Any]] = {}
        for m in rows:
            by_run.setdefault(m.run_id, []).append(m)
        for record in records:  # one call per run with news: its new points and changed tags together
            state = self.runs[record.run_id]
            points = _new_points(by_run.get(record.run_id, []), state.last, record.rows_per_step, self.sink.metric_key)
            changed = tags[record.run_id] if tags[record.run_id] != state.tags else None
            if type(self.sink).update is Sink.update:  # two calls: what the first did is recorded before the second
                if points:
                    self.sink.log(state.run, points)
                    self._logged(state, points)
                if changed is not None:
                    self.sink.set_tags(state.run, changed)
                    state.tags = changed
            elif points or changed is not None:  # one call, all or nothing
                self.sink.update(state.run, points, changed)
                self._logged(state, points)
                state.tags = changed if changed is not None else state.tags
        self.cursor, self.synced_signature = cursor, signature

    def _logged(self, state: _RunState, points: Sequence[Point]) -> None:
        for p in points:
            name = self.sink.metric_key(p.name)
            state.last[name] = max(state.last.get(name, p.step), p.step)

    def _start(self, record: RunRecord, tags: dict[str, str], made_by: ICRecord | None) -> None:
        tracking = self.tracking
        parent = None if made_by is None else f"{tracking.uid}-{made_by.run_id}"
        run = TrackedRun(
            key=f"{tracking.uid}-{record.run_id}",
            run_id=record.run_id,
            name=record.name,
            experiment=tracking.experiment,
            params=dict(record.params),
            tags=tags,
            parent_key=parent,
        )
        started = time.thread_time()
        last = dict(self.sink.start_run(run))
        self.runs[record.run_id] = _RunState(run, last, tags)
        self.setup_s += time.thread_time() - started


def _signature(records: Sequence[RunRecord], ops: Sequence[ICRecord]) -> tuple:
    """What a tracker shows besides metric values (the runs, their statuses as `run_tags` shows them, errors, the IC
    ops and their outcomes): when it changes, a pass is due however recent the last one."""
    runs = tuple((r.run_id, "running" if r.status.is_live else r.status.value, r.error) for r in records)
    return runs, tuple((op.op_id, op.outcome) for op in ops)


def _new_points(
    rows: Sequence[Any], last: Mapping[str, int], rows_per_step: float, key: Callable[[str], str]
) -> list[Point]:
    """The rows a tracker does not hold yet (step past its last for that metric, `last` keyed by `key(name)`),
    plus `samples` (data set rows seen) at every new step."""
    points = [Point(m.step, m.name, m.value, m.wall_time) for m in rows if m.step > last.get(key(m.name), -1)]
    if rows_per_step > 0:
        seen = last.get(key("samples"), -1)
        steps: dict[int, float] = {}
        for m in rows:
            if m.step > seen and m.step not in steps:
                steps[m.step] = m.wall_time
        points += [Point(step, "samples", step * rows_per_step, wall) for step, wall in steps.items()]
    return points


class Tracking:
    """The experiment's trackers, each fed from `store` by its own thread (`start`); `flush` waits until they
    hold everything logged so far, `close` flushes and releases them."""

    def __init__(self, store: Store, experiment: str, directory: Path, sinks: Sequence[Sink], interval: float = 2.0):
        self.store, self.experiment, self.directory, self.interval = store, experiment, Path(directory), interval
        self.uid = experiment_uid(store)
        # Each Tracking works on its own copy of a sink: a user's sink object given to several run_fits (or
        # experiments) never has one tracking's state replaced under another's thread.
        self.workers = [_Worker(self, sink.fresh()) for sink in sinks]

    @property
    def sinks(self) -> list[Sink]:
        return [w.sink for w in self.workers]

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every tracker holds what the store holds now (True), or `timeout` seconds ran out or a
        tracker failed (False; it keeps retrying in the background). A tracker already failing, or not answering
        for SLOW_S seconds, is not waited for: an unreachable server must not hold up every `wait()`."""
        deadline = time.monotonic() + timeout
        return all([w.error is None and w.flush(deadline) for w in self.workers])

    def close(self, timeout: float = 30.0) -> None:
        """Last pass, then release every tracker (joins each healthy tracker's thread for at most `timeout`
        seconds in all, a failing one for FAILING_GRACE_S; what is not done by then, a stuck one's last try say, ends in
        the background, on its own sink copy)."""
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            # A failing tracker gets a moment for its last try (a full disk answers at once; a server that does not
            # answer is left to it).
            worker.close(deadline if worker.error is None else min(deadline, time.monotonic() + FAILING_GRACE_S))

    def busy(self) -> dict[str, float]:
        """Each tracker's thread's CPU seconds so far (what tracking took from the machine)."""
        return {w.sink.kind: w.busy_s for w in self.workers}

    def errors(self) -> dict[str, str]:
        """Each failing tracker's last error."""
        return {w.sink.kind: w.error for w in self.workers if w.error is not None}

    def replay(self) -> None:
        """Write everything in the store to the trackers now, on this thread; a tracker's error is raised."""
        for worker in self.workers:
            try:
                worker.sync()
            finally:
                worker._close()
