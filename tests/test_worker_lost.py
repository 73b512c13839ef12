"""A run whose worker is lost (`backend.WorkerLost`: a Ray actor killed) continues from its last chunk checkpoint
on another worker: the steps after that checkpoint are trained and logged again, once each in the store, and the
panel's feed sends its views everything again instead of a delta that would leave the dropped points on the
curve. With no worker left, the run fails and says both why it stopped and why it could not continue. (The real
Ray actors are in test_ray.py; this is the engine's side, with test_engine_ops' counting backend.)"""

from __future__ import annotations

from test_engine_ops import FakeBackend, FakeRun, FakeSlot

from rf_notebook._feed import Feed
from rf_notebook.engine import Engine
from rf_notebook.engine.backend import WorkerLost
from rf_notebook.store import RunStatus, Store


class LosingSlot(FakeSlot):
    def advance(self, pause_at: int) -> None:
        lose_at = self.backend.lose_at.get(self.run_id)
        if lose_at is not None and self.step < lose_at <= pause_at:
            super().advance(lose_at)  # trains (and logs) up to the step its worker dies at
            del self.backend.lose_at[self.run_id]
            raise WorkerLost(f"worker of run {self.run_id} died")
        super().advance(pause_at)


class LosingBackend(FakeBackend):
    """Run `r` loses its worker at step `lose_at[r]` (once); `reload` fails while `spare` is False."""

    def __init__(self, store: Store, lose_at: dict[int, int], spare: bool = True):
        super().__init__(store)
        self.lose_at, self.spare, self.reloads = dict(lose_at), spare, []

    def setup(self, runs, unloaded=()):
        return {run.run_id: LosingSlot(run, self) for run in runs}

    def reload(self, run):
        if not self.spare:
            raise WorkerLost("every worker is gone")
        self.reloads.append((run.run_id, self.checkpoints.get(run.run_id, 0)))
        return LosingSlot(run, self, start_step=self.checkpoints.get(run.run_id, 0))


def _engine(lose_at: dict[int, int], spare: bool = True) -> tuple[Store, LosingBackend, Engine]:
    store = Store()
    runs = [FakeRun(run_id, total_steps=12, num_chunks=3) for run_id in store.reserve_run_ids(2)]
    for run in runs:
        store.add_run(run.record())
    backend = LosingBackend(store, lose_at, spare)
    return store, backend, Engine(store, runs, backend, checkpoints=True)


def _run(store: Store, engine: Engine) -> dict:
    engine.start()
    assert store.wait_until(lambda runs, ops: all(r.status.is_terminal for r in runs), timeout=30)
    engine.shutdown(timeout=30)
    return {r.run_id: r for r in store.runs()}


def test_a_run_whose_worker_is_lost_continues_from_its_last_checkpoint_and_logs_each_step_once():
    store, backend, engine = _engine({1: 6})  # chunk ends at 4, 8, 12: dies 2 steps after its first checkpoint
    feed = Feed(store, "lost")
    seen = feed.delta(since=0)["to"]  # a view before the loss
    runs = _run(store, engine)
    assert runs[1].status is RunStatus.FINISHED and runs[2].status is RunStatus.FINISHED, runs
    assert backend.reloads == [(1, 4)] and engine.stats["runs_moved"] == 1
    assert "worker of run 1 died" in runs[1].warning and "step 4" in runs[1].warning
    steps = [s for r, s, _ in backend.trained if r == 1]
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10, 11, 12]  # 5 and 6 again, from the checkpoint at 4
    losses = [m.step for m in store.metrics(1) if m.name == "loss"]
    assert losses == list(range(1, 13))  # each step once: what it logged after step 4 before dying is gone
    evals = [m.step for m in store.metrics(1) if m.name == "eval_loss"]
    assert evals == [4, 8, 12]
    assert feed.stale(seen) and not feed.stale(feed.snapshot()["cursor"])  # the old view needs everything again


def test_with_no_worker_left_the_run_fails_with_both_reasons_and_the_others_finish():
    store, backend, engine = _engine({1: 6}, spare=False)
    runs = _run(store, engine)
    assert runs[1].status is RunStatus.FAILED and runs[2].status is RunStatus.FINISHED
    assert "worker of run 1 died" in runs[1].error and "every worker is gone" in runs[1].error


def test_metric_cursors_only_grow_across_a_drop():
    store = Store()
    store.log_metrics(1, 1, 1, {"loss": 1.0})
    store.log_metrics(2, 1, 1, {"loss": 2.0})
    store.log_metrics(1, 2, 1, {"loss": 0.5})
    _, cursor = store.metrics_since(0)
    assert cursor == 3 and store.rewritten == 0
    store.drop_metrics_after(1, 1)
    rows, after = store.metrics_since(0)
    assert [(m.run_id, m.step) for m in rows] == [(1, 1), (2, 1)] and after == 4 == store.rewritten
    store.log_metrics(1, 2, 1, {"loss": 0.25})
    rows, end = store.metrics_since(after)
    assert [(m.run_id, m.step, m.value) for m in rows] == [(1, 2, 0.25)] and end == 5
    assert [m.step for m in store.metrics_since(0, until=after)[0]] == [1, 1]
    store.drop_metrics_after(2, 5)  # nothing to drop: no reader has to start over
    assert store.rewritten == 4
