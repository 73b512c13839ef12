"""The store: snapshots out, safe under concurrent writers and readers."""

from __future__ import annotations

import dataclasses
import threading

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


def test_concurrent_metric_writers_lose_nothing():
    store = Store()

    def write(run_id):
        for step in range(500):
            store.log_metrics(run_id, step, 1, {"loss": float(step), "lr": 0.1})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        store.metrics()  # readers never see a torn list
    for t in threads:
        t.join()
    assert len(store.metrics()) == 4 * 500 * 2
    assert len(store.metrics(run_id=2)) == 1000


def test_wait_until_wakes_on_update():
    store = Store()
    store.add_run(RunRecord(1, "a", "SFT", {}))
    timer = threading.Timer(0.05, lambda: store.update_run(1, status=RunStatus.FINISHED))
    timer.start()
    assert store.wait_until(lambda runs, ops: all(r.status.is_terminal for r in runs), timeout=5)
    assert not store.wait_until(lambda runs, ops: False, timeout=0.05)
