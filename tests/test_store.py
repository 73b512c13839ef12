"""The store: snapshots out, safe under concurrent writers and readers."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time

import pytest

from rf_notebook.store import RunRecord, RunStatus, Store


def test_runs_are_frozen_snapshots():
    store = Store()
    store.add_run(RunRecord(1, "a", "SFT", {"x": 1}))
    before = store.run(1)
    store.update_run(1, status=RunStatus.TRAINING, step=3)
    assert before.status is RunStatus.QUEUED and store.run(1).step == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.step = 5  # type: ignore[misc]
    with pytest.raises(ValueError, match="already in the store"):
        store.add_run(RunRecord(1, "b", "SFT", {}))
    with pytest.raises(KeyError, match=r"no run with id 9; known ids: \[1\]"):
        store.run(9)


def _assert_whole_calls(rows):
    """Every run's rows are whole log_metrics calls: steps 0, 1, ... in order, each with its loss then its lr."""
    by_run = {}
    for m in rows:
        by_run.setdefault(m.run_id, []).append((m.step, m.name, m.value))
    for run_id, got in by_run.items():
        want = [row for step in range((len(got) + 1) // 2) for row in ((step, "loss", float(step)), (step, "lr", 0.1))]
        assert got == want, f"run {run_id}: {len(got)} rows that are not whole log_metrics calls"


def _assert_not_torn(rows, runs):
    """Cheap enough to run between two writes: each of `runs` runs' newest row is the last metric of its call."""
    newest = {}
    for m in reversed(rows):
        if len(newest) == runs:
            break
        newest.setdefault(m.run_id, m)
    torn = {run_id: m for run_id, m in newest.items() if m.name != "lr"}
    assert not torn, f"a snapshot of {len(rows)} rows holds half a log_metrics call: {torn}"


@pytest.fixture
def eager_thread_switches():
    """Switch threads as often as CPython allows, so that a window for a torn read is hit, not slept through."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def test_concurrent_metric_writers_lose_nothing(eager_thread_switches):
    store = Store()

    def write(run_id):
        for step in range(500):
            store.log_metrics(run_id, step, 1, {"loss": float(step), "lr": 0.1})
            time.sleep(0)  # let the reader in between calls, or it may never read before the writers are done

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]  # runs 0-3
    for t in threads:
        t.start()
    reads = 0
    while any(t.is_alive() for t in threads):
        _assert_not_torn(store.metrics(), runs=4)  # readers never see half a call
        _assert_not_torn(store.metrics(run_id=2), runs=1)
        reads += 1
    for t in threads:
        t.join()
    assert reads > 0
    _assert_whole_calls(store.metrics())
    assert len(store.metrics()) == 4 * 500 * 2
    assert len(store.metrics(run_id=2)) == 1000


def test_wait_until_wakes_on_update():
    store = Store()
    store.add_run(RunRecord(1, "a", "SFT", {}))
    timer = threading.Timer(0.05, lambda: store.update_run(1, status=RunStatus.FINISHED))
    timer.start()
    assert store.wait_until(lambda runs, ops: all(r.status.is_terminal for r in runs), timeout=5)
    assert not store.wait_until(lambda runs, ops: False, timeout=0.05)
