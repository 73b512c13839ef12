"""The scheduler loop and IC ops under random sequences of ops (hypothesis stateful testing), with a fake
backend whose runs "train" by counting steps: no torch, so hundreds of sequences run in seconds.

Invariants: no run trains a step twice; a deleted run trains nothing after the op; a stopped run trains
nothing while stopped; a warm clone starts at its parent's step; run and clone ids are unique; every op gets
exactly one outcome; and once every stopped run is resumed, every live run finishes.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from types import SimpleNamespace

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rf_notebook.chunking import chunk_plan
from rf_notebook.commands import CloneModify, Delete, Resume, Stop
from rf_notebook.engine import Backend, Engine
from rf_notebook.store import RunRecord, RunStatus, Store


@dataclasses.dataclass
class FakeRun:
    run_id: int
    total_steps: int
    num_chunks: int

    @property
    def spec(self):
        return SimpleNamespace(name=f"run {self.run_id}", trainer_type="SFT")

    @property
    def config(self):
        return {"total_steps": self.total_steps}

    def record(self):
        return RunRecord(self.run_id, self.spec.name, "SFT", self.config)


class FakeSlot:
    """Trains one step at a time, checking before each step whether the scheduler wants control back."""

    def __init__(self, run: FakeRun, backend: FakeBackend, start_step: int = 0):
        self.run_id, self.backend = run.run_id, backend
        self.plan = chunk_plan(run.total_steps, 1, run.num_chunks, max_steps=run.total_steps)
        self.step, self.finished, self.closed = start_step, False, False

    def advance(self, pause_at: int) -> None:
        assert not self.closed, f"run {self.run_id} trained after being closed"
        while self.step < pause_at:
            if self.backend.should_yield():
                return
            self.step += 1
            self.backend.trained.append((self.run_id, self.step, self.backend.store.run(self.run_id).status))
            self.backend.record(self, self.step, {"loss": 1.0 / self.step})
            time.sleep(0.0002)
        self.finished = self.step >= self.plan.total_steps

    def close(self) -> None:
        self.closed = True


class FakeBackend(Backend):
    """The engine's `Backend` contract, every method; runs count steps. Checkpoints are off in these tests, so
    `checkpoint` / `unload` / `reload` keep the run's step in memory as its "checkpoint"."""

    def __init__(self, store: Store):
        self.store = store
        self.trained: list[tuple[int, int, RunStatus]] = []
        self.warm_starts: dict[int, int] = {}  # clone id -> the parent's step it started from
        self.checkpoints: dict[int, int] = {}  # run id -> step written

    def connect(self, should_yield, record, warn):
        self.should_yield, self.record, self.warn = should_yield, record, warn

    def setup(self, runs, unloaded=()):
        return {run.run_id: FakeSlot(run, self) for run in runs}

    def build(self, run, warm_from=None):
        start = warm_from.step if warm_from is not None else 0
        if warm_from is not None:
            self.warm_starts[run.run_id] = start
        return FakeSlot(run, self, start_step=start)

    def activate(self, slot):
        assert not slot.closed

    def caller_idle(self):
        pass

    def suspended(self, slot):
        pass

    def evaluate(self, slot):
        self.record(slot, slot.step, {"eval_loss": 1.0})

    def discard(self, slot, keep_adapter):
        slot.close()

    def forget(self, run_id):
        pass

    def export(self, run_id, path, record):
        return path

    def release(self):
        pass

    def flush(self):
        pass

    def wait_for_writes(self):
        pass

    def checkpoint(self, slot):
        self.checkpoints[slot.run_id] = slot.step

    def unload(self, slot):
        self.checkpoint(slot)
        slot.close()

    def collect(self):
        pass

    def reload(self, run):
        return FakeSlot(run, self, start_step=self.checkpoints[run.run_id])


class EngineMachine(RuleBasedStateMachine):
    @initialize(sizes=st.lists(st.tuples(st.integers(4, 40), st.integers(1, 4)), min_size=1, max_size=4))
    def start(self, sizes):
        self.store = Store()
        ids = self.store.reserve_run_ids(len(sizes))
        runs = [FakeRun(i, steps, min(chunks, steps)) for i, (steps, chunks) in zip(ids, sizes)]
        for run in runs:
            self.store.add_run(RunRecord(run.run_id, run.spec.name, "SFT", run.config))
        self.backend = FakeBackend(self.store)
        self.engine = Engine(self.store, runs, self.backend)
        self.engine.start()
        self.ops_sent = 0
        self.initial_ids = ids
        self.clone_ids: list[int] = []
        self.total_steps = {run.run_id: run.total_steps for run in runs}

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        try:
            self.settle()
            for record in self.store.runs():  # resume every stopped run: all live runs must finish
                if record.status is RunStatus.STOPPED:
                    self.send(Resume, record.run_id)
            self.settle()
            assert self.store.wait_until(lambda runs, ops: all(r.status.is_terminal for r in runs), timeout=30)
            for record in self.store.runs():
                assert record.status in (RunStatus.FINISHED, RunStatus.DELETED), record
                steps = [s for r, s, _ in self.backend.trained if r == record.run_id]
                start = self.backend.warm_starts.get(record.run_id, 0)
                if record.status is RunStatus.FINISHED:
                    assert steps == list(range(start + 1, record.total_steps + 1))
                    assert record.chunks_done == record.chunks_total
            self.check_log()
        finally:
            self.engine.shutdown(timeout=10)
            assert not self.engine.alive

    # -- helpers -----------------------------------------------------------------------------------------------

    def send(self, kind, run_id, **extra):
        """Log the op as the facade does (a clone with its new run's id and warm_start), then submit it."""
        args = {"warm_start": extra["warm_start"]} if "warm_start" in extra else {}
        op = self.store.log_op("test", kind.__name__.lower(), run_id, args, new_run_id=extra.get("new_run_id"))
        self.engine.submit(kind(op_id=op.op_id, run_id=run_id, **extra))
        self.ops_sent += 1

    def settle(self):
        assert self.store.wait_until(lambda runs, ops: all(op.outcome != "pending" for op in ops), timeout=30)

    def check_log(self):
        log = self.store.ic_log()
        assert len(log) == self.ops_sent
        assert all(op.outcome in ("applied", "refused") for op in log)
        assert all(op.reason for op in log if op.outcome == "refused")

    def known_ids(self):
        """Ids to aim ops at, from what this machine sent (not from the engine's timing): initial runs, clones
        (applied or not) and one that never exists."""
        return [*self.initial_ids, *self.clone_ids, 999]

    # -- rules -------------------------------------------------------------------------------------------------

    @rule(data=st.data())
    def stop(self, data):
        self.send(Stop, data.draw(st.sampled_from(self.known_ids())))

    @rule(data=st.data())
    def resume(self, data):
        self.send(Resume, data.draw(st.sampled_from(self.known_ids())))

    @rule(data=st.data())
    def delete(self, data):
        self.send(Delete, data.draw(st.sampled_from(self.known_ids())))

    @precondition(lambda self: len(self.clone_ids) < 4)
    @rule(data=st.data(), warm=st.booleans(), steps=st.integers(4, 30))
    def clone(self, data, warm, steps):
        parent = data.draw(st.sampled_from(self.known_ids()))
        (new_id,) = self.store.reserve_run_ids(1)
        total = self.total_steps.get(parent, steps) if warm else steps  # a warm clone keeps the parent's budget
        run = FakeRun(new_id, total, 2)
        self.clone_ids.append(new_id)
        self.total_steps[new_id] = total
        self.send(CloneModify, parent, new_run_id=new_id, prepared=run, warm_start=warm)

    @rule(seconds=st.sampled_from([0.0, 0.001, 0.005]))
    def let_time_pass(self, seconds):
        time.sleep(seconds)

    # -- invariants --------------------------------------------------------------------------------------------

    @invariant()
    def no_step_trained_twice(self):
        seen = [(r, s) for r, s, _ in self.backend.trained]
        assert len(seen) == len(set(seen))

    @invariant()
    def nothing_trains_while_stopped_or_deleted(self):
        assert all(status is RunStatus.TRAINING for _, _, status in self.backend.trained)
        for op in self.store.ic_log():
            if op.op == "delete" and op.outcome == "applied":
                steps = [s for r, s, _ in self.backend.trained if r == op.run_id]
                assert max(steps, default=0) <= op.step

    @invariant()
    def ids_are_unique(self):
        ids = [r.run_id for r in self.store.runs()]
        assert len(ids) == len(set(ids)) and len(self.clone_ids) == len(set(self.clone_ids))

    @invariant()
    def warm_clones_start_at_their_parents_step(self):
        for op in self.store.ic_log():
            if op.op == "clonemodify" and op.outcome == "applied":
                if op.args["warm_start"]:
                    assert self.backend.warm_starts.get(op.new_run_id) == op.step, (op, self.backend.warm_starts)
                else:
                    assert op.new_run_id not in self.backend.warm_starts, (op, self.backend.warm_starts)


EngineMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=12, deadline=None)
TestEngineOps = EngineMachine.TestCase


def test_the_scheduler_thread_leaves_no_thread_behind():
    assert not any(t.name == "rf_notebook-scheduler" for t in threading.enumerate())
