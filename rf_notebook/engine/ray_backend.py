"""Runs trained by Ray actors: `Experiment(..., cluster="ray")`.

The scheduler, the store, the IC-op service and the panel stay in the notebook's process, unchanged: `RayBackend`
is one more backend behind the engine's contract (`backend.Backend`). Each of its workers is a Ray actor on one
device (a GPU, or CPU threads where the cluster has none) that holds a `TorchBackend` of its own: one copy of each
base it needs, and the adapters, trainers and optimizers of the runs placed on it. So a run trains on a worker
exactly as it does in one process (the same code does it), and the engine's call for one run becomes a call to the
run's worker.

- Placement: a run goes to the worker holding the fewest runs; a warm clone goes to its parent's (it continues
  the parent's state), a reloaded run to the least loaded one (it is read back from its checkpoint, on the
  experiment's folder, which every worker reads and writes: one machine, or a folder shared by the cluster's nodes).
  A worker left with nothing to train in a chunk takes a queued run of a busier one, read back the same way (at
  its last chunk checkpoint, or never trained), so runs move only at chunk ends, exactly.
- Parallel training: the engine trains the runs that `fusion_partners` names together; here that is every run of
  the chunk, and `train_together` has each worker train its own in turn, all workers at once (a worker starts its
  next run when its last one returns, without waiting for the others). A worker evaluates its run at
  a chunk end and takes its checkpoint in the same call, so those run in parallel too.
- Live metrics: a worker keeps what its runs log; while waiting, the backend collects it every `POLL_S` seconds
  into the store (the panel's curves move during a chunk, not after it).
- IC ops: when a command waits, the backend asks the busy workers to hand control back at their runs' next step,
  as the one-process engine does.
- A run that fails fails alone (its worker's other runs go on). A worker that dies loses no finished chunk: its
  calls raise `WorkerDied` (a `backend.WorkerLost`), and the engine reloads each of its runs from its last chunk
  checkpoint on the remaining workers (the metrics logged after it are logged again); a finished run's adapter is
  exported from its last checkpoint. Only when no worker is left do the runs fail.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rf_notebook.engine.backend import PreparedRun, WorkerLost
from rf_notebook.engine.checkpoints import export_checkpoint, latest_checkpoint, resume_point

__all__ = ["RayBackend", "RaySlot", "connect"]

logger = logging.getLogger(__name__)

POLL_S = 0.05  # how often a waiting backend collects metrics and checks for commands
START_WORKER_S = 600  # a worker that has not started after this long (no free device in the cluster) is an error


def connect(address: str | None = None) -> Any:
    """The Ray of `address` (or `RAY_ADDRESS`), else the one already initialised in this process, else a local one
    started here, without a dashboard. Returns the `ray` module. (Ray 2.60 binds its servers to the node's address
    even for a local instance, turning 127.0.0.1 into it: see the README for the ports and how to keep them local.)"""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "cluster='ray' needs Ray: pip install 'rf_notebook[ray]' (or an existing `ray` installation)"
        ) from exc
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address and address not in ("auto", current) and address.split("://")[-1] != current:
            raise ValueError(
                f"`ray_address` is {address!r}, but this process is already connected to the Ray at {current!r}; "
                "call ray.shutdown() first, or leave ray_address unset to use that one"
            )
        return ray
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    return ray


def default_workers(ray: Any) -> tuple[int, bool]:
    """One worker per GPU of the cluster; without GPUs, two CPU workers. Returns (workers, on GPUs)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return (gpus, True) if gpus else (2, False)


def _on_worker_thread(method: Callable) -> Callable:
    """Run the method on the worker's one training thread: a run's greenlet can only be switched to from the thread
    that started it, and the actor serves its calls from a pool of threads."""

    def call(self: Worker, *args: Any) -> Any:
        return self._thread.submit(method, self, *args).result()

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


class Worker:
    """A Ray actor's state: one `TorchBackend` and the runs placed on it. Every method that trains or touches a
    run runs on the worker's one training thread, in the order the backend calls them; `events` and
    `request_yield` answer meanwhile, from the actor's other threads."""

    def __init__(self, index: int, backend_kwargs: dict[str, Any], formatted: Mapping[int, Any], threads: int):
        if threads:
            import torch

            torch.set_num_threads(threads)
        from concurrent.futures import ThreadPoolExecutor

        from rf_notebook.engine.torch_backend import TorchBackend

        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rf-worker")  # one thread, for good
        self.index = index
        self.formatted = dict(formatted)  # formatting token -> (train, eval), put through that function
        self.backend = TorchBackend(**backend_kwargs)
        self.slots: dict[int, Any] = {}
        self._functions: list[Any] = []
        self._events: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
        self._yield_token = -1
        self._token = 0
        self.backend.connect(should_yield=self._should_yield, record=self._record, warn=self._warn)

    # -- what runs log, and when they hand control back -----------------------------------------------------

    def _should_yield(self) -> bool:
        return self._yield_token == self._token

    def _record(self, slot: Any, step: int, values: dict[str, float]) -> None:
        with self._lock:
            self._events.append(("metrics", slot.run_id, step, dict(values)))

    def _warn(self, slot: Any, message: str) -> None:
        with self._lock:
            self._events.append(("warning", slot.run_id, message))

    def events(self) -> list[tuple[Any, ...]]:
        """What the runs logged since the last call, in order."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def request_yield(self, token: int) -> None:
        """Hand control back at the next step of the `train` call numbered `token` (a later call is not affected)."""
        self._yield_token = token

    # -- runs ------------------------------------------------------------------------------------------------

    def _adopt(self, run: PreparedRun, token: int | None) -> PreparedRun:
        """Register the formatted data sets of the run's formatting function under this copy's identity."""
        if token is not None:
            func = run.spec.model_config.formatting_func
            self._functions.append(func)  # alive as long as the worker: its id names its data sets
            self.backend.formatted[id(func)] = self.formatted[token]
        return run

    @staticmethod
    def _state(slot: Any) -> tuple[int, Any, bool]:
        return slot.step, slot.plan, slot.finished

    @_on_worker_thread
    def setup(self, runs: Sequence[tuple[PreparedRun, int | None]], unloaded: Sequence[tuple[PreparedRun, int | None]]):
        prepared = [self._adopt(run, token) for run, token in runs]
        remembered = [self._adopt(run, token) for run, token in unloaded]
        slots = self.backend.setup(prepared, remembered)
        self.slots.update(slots)
        return {run_id: self._state(slot) for run_id, slot in slots.items()}

    @_on_worker_thread
    def build(self, run: PreparedRun, token: int | None, warm_from: int | None) -> tuple[int, Any, bool]:
        parent = None if warm_from is None else self.slots[warm_from]
        slot = self.slots[run.run_id] = self.backend.build(self._adopt(run, token), warm_from=parent)
        return self._state(slot)

    @_on_worker_thread
    def reload(self, run: PreparedRun, token: int | None) -> tuple[int, Any, bool]:
        slot = self.backend.reload(self._adopt(run, token))
        self.slots[run.run_id] = slot
        return self._state(slot)

    @_on_worker_thread
    def train(self, run_id: int, pause_at: int, token: int, evaluate: bool) -> tuple[Any, ...]:
        """Train the run to step `pause_at` (or its end, or a yield request for `token`); at a chunk end, evaluate
        it and take its checkpoint there too (what the engine asks next, done while the other workers train).
        Returns its state, whether it was evaluated, and its checkpoint: the folder, or the OSError of a write."""
        self._token = token
        slot, backend = self.slots[run_id], self.backend
        backend.materialize(slot)
        backend.activate(slot)
        try:
            slot.advance(pause_at)
        finally:
            backend.suspended(slot)
        at_rung = slot.finished or slot.step >= pause_at
        evaluated = evaluate and at_rung
        if evaluated:
            backend.evaluate(slot)
        checkpoint: str | OSError | None = None
        if at_rung:
            try:
                checkpoint = os.fspath(backend.checkpoint(slot))
            except OSError as exc:  # the engine reports it as a storage failure when it asks for this checkpoint
                checkpoint = exc
        return self._state(slot), evaluated, checkpoint

    @_on_worker_thread
    def call(self, method: str, run_id: int, *args: Any) -> Any:
        """`method` of the backend on the run, activated first where it needs the model as the run left it."""
        slot = self.slots[run_id]
        if method in ("evaluate", "probe"):
            self.backend.activate(slot)
            try:
                return getattr(self.backend, method)(slot, *args)
            finally:
                self.backend.suspended(slot)
        result = getattr(self.backend, method)(slot, *args)
        if method == "unload" or (method == "discard" and not args[0]):  # a finished run's stays, as the engine's
            del self.slots[run_id]
        return os.fspath(result) if method == "checkpoint" else result

    def drop(self, run_id: int) -> None:
        """The run was read back on another worker: free this copy (nothing of it is used here again), on the
        training thread after its current call; this call returns at once (it holds none of the actor's threads,
        which `events` and `request_yield` need meanwhile)."""

        def free() -> None:
            slot = self.slots.pop(run_id, None)
            if slot is not None:
                try:
                    self.backend.discard(slot, keep_adapter=False)
                except Exception:  # its memory may stay; the run itself lives on the other worker
                    logger.exception("freeing the copy of run %d that moved to another worker", run_id)

        self._thread.submit(free)

    @_on_worker_thread
    def close(self, run_id: int) -> None:
        slot = self.slots.pop(run_id, None)
        if slot is not None:
            slot.close()

    @_on_worker_thread
    def forget(self, run_id: int) -> None:
        self.backend.forget(run_id)

    @_on_worker_thread
    def export(self, run_id: int, path: str, record: Mapping[str, Any]) -> str:
        return self.backend.export(run_id, path, record)

    @_on_worker_thread
    def each(self, method: str) -> None:
        """`flush`, `wait_for_writes`, `collect` or `release` of the backend."""
        getattr(self.backend, method)()

    def pid(self) -> int:
        return os.getpid()


class RaySlot:
    """One run as the engine sees it: where it is (its worker) and how far it trained. `advance` trains it there."""

    def __init__(self, backend: RayBackend, run_id: int, worker: int, state: tuple[int, Any, bool]):
        self.backend, self.run_id, self.worker = backend, run_id, worker
        self.step, self.plan, self.finished = state
        self.evaluated_at: int | None = None  # the step its worker evaluated it at, in the training call
        self.checkpointed: tuple[int, str | OSError] | None = None  # (step, folder or failed write), from that call
        self.live = True  # False once discarded (finished, failed): it no longer weighs on its worker

    def update(self, state: tuple[int, Any, bool]) -> None:
        self.step, self.plan, self.finished = state

    def advance(self, pause_at: int) -> None:
        failed = self.backend.train_together([self], {self.run_id: pause_at})
        if self.run_id in failed:
            raise failed[self.run_id]

    def close(self) -> None:
        self.backend._close(self)


class WorkerDied(WorkerLost):
    """The Ray actor holding a run is gone (killed, out of memory, its node lost)."""


class RayBackend:
    """See the module docstring. Every method runs on the scheduler thread, except `wait_for_writes` and
    `caller_idle` (any thread)."""

    fuse = True  # the engine asks `fusion_partners` for the runs that train together: every worker's at once

    def __init__(
        self,
        create_model_fn: Callable[[Any], tuple[Any, Any]],
        train_dataset: Any,
        eval_dataset: Any,
        num_chunks: int,
        *,
        workers: int | None = None,
        address: str | None = None,
        threads_per_worker: int | None = None,
        on_nonfinite: str = "fail",
        formatted: Mapping[int, tuple[Any, Any]] | None = None,
        resume_points: Mapping[int, tuple[int, str]] | None = None,
        seed: int = 0,
    ):
        ray = self.ray = connect(address)
        count, on_gpu = default_workers(ray)
        if on_gpu and workers is not None and workers > count:
            raise ValueError(f"`workers` is {workers}, but the Ray cluster has {count} GPUs (one worker per GPU)")
        count = workers or count
        self.eval_dataset = eval_dataset
        self.should_yield: Callable[[], bool] = lambda: False
        self.record: Callable[[Any, int, dict[str, float]], None] = lambda slot, step, values: None
        self.warn: Callable[[Any, str], None] = lambda slot, message: None
        # Each distinct formatting function by a token: a worker's copy of a run has its own copy of the function.
        formatted = dict(formatted or {})
        self._tokens = {func_id: token for token, func_id in enumerate(formatted)}
        backend_kwargs = dict(
            create_model_fn=create_model_fn,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            num_chunks=num_chunks,
            on_nonfinite=on_nonfinite,
            resume_points=dict(resume_points or {}),
            fuse=False,
            seed=seed,
        )
        by_token = {self._tokens[func_id]: datasets for func_id, datasets in formatted.items()}
        actor = ray.remote(num_cpus=0 if on_gpu else (threads_per_worker or 1), num_gpus=1 if on_gpu else 0)(Worker)
        actor = actor.options(max_concurrency=4)
        kwargs_ref, formatted_ref = ray.put(backend_kwargs), ray.put(by_token)
        threads = 0 if on_gpu else (threads_per_worker or 1)
        self.workers = [actor.remote(i, kwargs_ref, formatted_ref, threads) for i in range(count)]
        self.dead: dict[int, str] = {}  # worker -> why it is gone
        self.home: dict[int, int] = {}  # run id -> its worker (also for unloaded runs: where its record lives)
        self.runs: dict[int, PreparedRun] = {}  # every run placed: to read it back elsewhere from its checkpoint
        self.rebalanced = 0  # runs moved at a chunk end to a worker that had nothing left to train
        self.slots: dict[int, RaySlot] = {}
        self._tokens_counter = itertools.count()
        self._releasing = False
        try:  # started, or an error now (and none left behind)
            ray.get([w.pid.remote() for w in self.workers], timeout=START_WORKER_S)
        except BaseException as exc:
            for worker in self.workers:
                ray.kill(worker)
            if isinstance(exc, ray.exceptions.GetTimeoutError):
                raise RuntimeError(
                    f"{count} Ray workers (each {'1 GPU' if on_gpu else f'{threads} CPU'}) did not start within "
                    f"{START_WORKER_S} s: the cluster has {ray.cluster_resources()}"
                ) from exc
            raise

    def connect(self, should_yield, record, warn) -> None:
        self.should_yield, self.record, self.warn = should_yield, record, warn

    # -- placement ---------------------------------------------------------------------------------------------

    def _token(self, run: PreparedRun) -> int | None:
        func = run.spec.model_config.formatting_func
        return None if func is None else self._tokens.get(id(func))

    def _least_loaded(self) -> int:
        load = {i: 0 for i in range(len(self.workers)) if i not in self.dead}
        if not load:
            raise WorkerDied(f"every Ray worker is gone: {self.dead}")
        for slot in self.slots.values():
            if slot.live and slot.worker in load:
                load[slot.worker] += 1
        return min(load, key=lambda i: (load[i], i))

    def _get(self, worker: int, ref: Any) -> Any:
        """The result of a call to `worker`; a dead worker's calls raise `WorkerDied`; a failing call its cause."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self.dead.setdefault(worker, f"{type(exc).__name__}: {exc}".splitlines()[0])
            raise WorkerDied(f"Ray worker {worker} died: {self.dead[worker]}") from exc
        except ray.exceptions.RayTaskError as exc:
            raise _cause(exc) from None

    def _gone(self) -> bool:
        """Whether Ray itself was shut down (at the interpreter's exit, or by the user): every worker with it. (A
        call after that would start a new, empty Ray.)"""
        if not self.ray.is_initialized():
            for i in range(len(self.workers)):
                self.dead.setdefault(i, "Ray was shut down")
            return True
        return False

    def _call(self, worker: int, method: str, *args: Any) -> Any:
        if worker in self.dead or self._gone():
            raise WorkerDied(f"Ray worker {worker} died: {self.dead[worker]}")
        return self._get(worker, getattr(self.workers[worker], method).remote(*args))

    # -- building ----------------------------------------------------------------------------------------------

    def setup(self, runs: list[PreparedRun], unloaded: list[PreparedRun] = ()) -> dict[int, RaySlot]:
        """Place each run on the least loaded worker, then let every worker build its runs, all at once (each loads
        the bases its runs need). An unloaded run is remembered by the worker that will export or reload it."""
        for run in [*runs, *unloaded]:
            self.runs[run.run_id] = run
        placed: dict[int, list[PreparedRun]] = {i: [] for i in range(len(self.workers))}
        for n, run in enumerate(runs):
            placed[n % len(self.workers)].append(run)
        remembered: dict[int, list[PreparedRun]] = {i: [] for i in range(len(self.workers))}
        for n, run in enumerate(unloaded):
            remembered[n % len(self.workers)].append(run)
            self.home[run.run_id] = n % len(self.workers)
        calls = {
            i: self.workers[i].setup.remote(
                [(run, self._token(run)) for run in placed[i]], [(run, self._token(run)) for run in remembered[i]]
            )
            for i in placed
            if placed[i] or remembered[i]
        }
        slots = {}
        for i, ref in calls.items():
            for run_id, state in self._get(i, ref).items():
                slots[run_id] = self.slots[run_id] = RaySlot(self, run_id, i, state)
                self.home[run_id] = i
        return slots

    def build(self, run: PreparedRun, warm_from: RaySlot | None = None) -> RaySlot:
        worker = warm_from.worker if warm_from is not None else self._least_loaded()
        state = self._call(worker, "build", run, self._token(run), None if warm_from is None else warm_from.run_id)
        slot = self.slots[run.run_id] = RaySlot(self, run.run_id, worker, state)
        self.home[run.run_id], self.runs[run.run_id] = worker, run
        return slot

    def materialize(self, slot: RaySlot) -> None:
        """Nothing here: the worker builds a deferred trainer when it first trains the run."""

    def activate(self, slot: RaySlot) -> None:
        """Nothing here: the worker activates the run for each call that needs it."""

    def suspended(self, slot: RaySlot) -> None:
        """Nothing here (see `activate`)."""

    # -- training ----------------------------------------------------------------------------------------------

    def fusion_partners(self, slot: RaySlot, candidates: list[RaySlot]) -> list[RaySlot]:
        """`slot` and every candidate on a live worker: each worker trains its runs of the group one after another,
        and the workers at the same time (`train_together`)."""
        return [slot, *(c for c in candidates if c.worker not in self.dead)]

    def report(self, stats: dict[str, Any]) -> dict[str, Any]:
        """`Experiment.stats()`: the engine's `stats`, its groups named for what they are here (the workers training
        at once; no step is fused), and the workers. Time a worker spent evaluating and checkpointing in its
        training call counts in train_s."""
        stats = dict(stats)
        stats["parallel_groups"] = stats.pop("fused_groups", 0)
        return {
            **stats,
            "workers": len(self.workers),
            "workers_lost": len(self.dead),
            "runs_rebalanced": self.rebalanced,
        }

    def train_together(self, slots: list[RaySlot], pause_at: Mapping[int, int]) -> dict[int, BaseException]:
        """Train the slots to their pause steps, every worker its own runs in turn, all workers at once: a worker
        starts its next run as soon as its last one returns (none waits for another worker's before the group's
        end). A worker left with nothing to train takes a queued run from a worker with two or more still queued
        (`_take`). Collects metrics and passes on yield requests meanwhile; once a command waits, no further run
        starts (those left return untrained). Returns the runs that failed, with why."""
        ray, token = self.ray, next(self._tokens_counter)
        evaluate = self.eval_dataset is not None
        queued: dict[int, collections.deque[RaySlot]] = collections.defaultdict(collections.deque)
        pending: dict[Any, tuple[RaySlot, int | None]] = {}  # call -> its run, and the worker a move reads it on
        failed: dict[int, BaseException] = {}
        tried: set[tuple[int, int]] = set()  # (run, worker) moves that failed: not tried again in this call
        asked = False

        def busy(worker: int) -> bool:
            return any((slot.worker if to is None else to) == worker for slot, to in pending.values())

        def start(worker: int) -> None:
            if worker in self.dead:  # its runs move on (the engine reloads them elsewhere)
                for slot in queued.pop(worker, ()):
                    failed[slot.run_id] = WorkerDied(f"Ray worker {worker} died: {self.dead[worker]}")
            elif asked or busy(worker):
                return
            elif queued[worker]:
                slot = queued[worker].popleft()
                ref = self.workers[worker].train.remote(slot.run_id, pause_at[slot.run_id], token, evaluate)
                pending[ref] = (slot, None)
            else:
                slot = self._take(worker, queued, tried)
                if slot is not None:
                    tried.add((slot.run_id, worker))
                    run = self.runs[slot.run_id]
                    pending[self.workers[worker].reload.remote(run, self._token(run))] = (slot, worker)

        self._gone()
        for slot in slots:
            queued[slot.worker].append(slot)
        for worker in range(len(self.workers)):  # one with no run of its own here may take one
            start(worker)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
            self._collect_events({slot.worker for slot, to in pending.values() if to is None})
            if not asked and self.should_yield():
                asked = True
                for slot, to in pending.values():
                    if to is None:
                        self.workers[slot.worker].request_yield.remote(token)
            for ref in done:
                slot, to = pending.pop(ref)
                if to is not None:  # a move: the run trains on `to` next, or stays where it was
                    donor = slot.worker
                    queued[to if self._moved(slot, to, ref) else donor].appendleft(slot)
                    start(to)
                    start(donor)
                    continue
                try:
                    state, evaluated, checkpoint = self._get(slot.worker, ref)
                except Exception as exc:  # noqa: BLE001 - this run fails; the others go on
                    failed[slot.run_id] = exc
                else:
                    slot.update(state)
                    slot.evaluated_at = slot.step if evaluated else None
                    slot.checkpointed = None if checkpoint is None else (slot.step, checkpoint)
                    self._collect_events({slot.worker})  # what it logged last, before the engine records its rung
                start(slot.worker)
        for worker, left in queued.items():  # asked to hand back, or a move came back when all else was done
            for slot in left:
                if worker in self.dead:
                    failed[slot.run_id] = WorkerDied(f"Ray worker {worker} died: {self.dead[worker]}")
        return failed

    def _take(
        self, worker: int, queued: Mapping[int, collections.deque[RaySlot]], tried: set[tuple[int, int]]
    ) -> RaySlot | None:
        """A queued run of the worker with the most still queued (two or more), which `worker` (idle) can read back
        exactly: at its last chunk checkpoint, complete on disk, or never trained. Taken off that queue."""
        donors = [w for w, runs in queued.items() if w != worker and w not in self.dead and len(runs) >= 2]
        if not donors:
            return None
        donor = max(donors, key=lambda w: (len(queued[w]), -w))
        held = {self._base(run_id) for run_id, w in self.home.items() if w == worker}
        for slot in reversed(queued[donor]):
            if (slot.run_id, worker) in tried or (held and self._base(slot.run_id) not in held):
                continue  # (a second base on a device sized for one is not worth a chunk of waiting)
            point = resume_point(self.runs[slot.run_id].args.output_dir)
            if (point is None and slot.step == 0) or (point is not None and point[0] == slot.step):
                queued[donor].remove(slot)
                return slot
        return None

    def _base(self, run_id: int) -> Any:
        return self.runs[run_id].spec.model_config.base_key()

    def _moved(self, slot: RaySlot, to: int, ref: Any) -> bool:
        """Whether worker `to` read `slot`'s run back (from `_take`): then the run lives there, and its old worker
        frees its copy after its current call. If not, the run stays where it was, as it was."""
        try:
            state = self._get(to, ref)
        except Exception as exc:  # noqa: BLE001 - the run is still whole on its own worker
            if not isinstance(exc, WorkerDied):
                logger.warning(
                    "run %d could not move to Ray worker %d (%r); it stays on %d", slot.run_id, to, exc, slot.worker
                )
            return False
        donor, slot.worker = slot.worker, to
        slot.update(state)
        slot.evaluated_at = slot.checkpointed = None
        self.home[slot.run_id] = to
        self.rebalanced += 1
        if donor not in self.dead:
            self.workers[donor].drop.remote(slot.run_id)
        return True

    def _collect_events(self, workers: set[int]) -> None:
        if self._gone():
            return
        refs = {i: self.workers[i].events.remote() for i in workers if i not in self.dead}
        for i, ref in refs.items():
            try:
                events = self._get(i, ref)
            except WorkerDied:
                continue
            for event in events:
                slot = self.slots.get(event[1])
                if slot is None:
                    continue
                if event[0] == "metrics":
                    self.record(slot, event[2], event[3])
                else:
                    self.warn(slot, event[2])

    def evaluate(self, slot: RaySlot) -> None:
        """Evaluate at a rung, unless its worker did in the training call that reached it."""
        if self.eval_dataset is None or slot.evaluated_at == slot.step:
            return
        self._call(slot.worker, "call", "evaluate", slot.run_id)
        self._collect_events({slot.worker})

    def probe(self, slot: RaySlot, steps: int, rung: int) -> float | None:
        value = self._call(slot.worker, "call", "probe", slot.run_id, steps, rung)
        self._collect_events({slot.worker})
        return value

    def checkpoint(self, slot: RaySlot) -> str:
        """The run's checkpoint at its step: the one its worker took at the end of the training call that reached
        it (a failed write raised here, as the engine expects), else one taken now."""
        if slot.checkpointed is not None and slot.checkpointed[0] == slot.step:
            done = slot.checkpointed[1]
            if isinstance(done, OSError):
                raise done
            return done
        return self._call(slot.worker, "call", "checkpoint", slot.run_id)

    def flush(self) -> None:
        self._each("flush")

    def wait_for_writes(self) -> None:
        self._each("wait_for_writes", quiet=True)

    def caller_idle(self) -> None:
        """Nothing: this process trains nothing."""

    def _each(self, method: str, quiet: bool = False) -> None:
        self._gone()
        refs = {i: w.each.remote(method) for i, w in enumerate(self.workers) if i not in self.dead}
        errors = []
        for i, ref in refs.items():
            try:
                self._get(i, ref)
            except WorkerDied:
                continue
            except Exception as exc:  # noqa: BLE001 - every worker is waited for; the first failure is raised
                errors.append(exc)
        if errors and not quiet:
            raise errors[0]

    # -- leaving memory ----------------------------------------------------------------------------------------

    def unload(self, slot: RaySlot) -> None:
        self._call(slot.worker, "call", "unload", slot.run_id)
        del self.slots[slot.run_id]

    def collect(self) -> None:
        self._each("collect")

    def reload(self, run: PreparedRun) -> RaySlot:
        """Rebuild an unloaded run (or one whose worker died) from its checkpoint, on the least loaded worker that
        is alive (its record moves there)."""
        old = self.home.get(run.run_id)
        while True:  # a worker found dead now is passed over; none left: WorkerDied
            worker = self._least_loaded()
            try:
                state = self._call(worker, "reload", run, self._token(run))
                break
            except WorkerDied:
                continue
        slot = self.slots[run.run_id] = RaySlot(self, run.run_id, worker, state)
        self.home[run.run_id], self.runs[run.run_id] = worker, run
        if old is not None and old != worker and old not in self.dead:
            self._call(old, "forget", run.run_id)  # its record of the unloaded run lives on the new worker now
        return slot

    def discard(self, slot: RaySlot, keep_adapter: bool) -> None:
        slot.live = False
        try:
            self._call(slot.worker, "call", "discard", slot.run_id, keep_adapter)
        except WorkerDied:  # gone with its worker: nothing left to free
            pass
        if not keep_adapter:
            self.slots.pop(slot.run_id, None)

    def forget(self, run_id: int) -> None:
        worker = self.home.pop(run_id, None)
        if worker is not None and worker not in self.dead:
            self._call(worker, "forget", run_id)

    def _close(self, slot: RaySlot) -> None:
        if not self._releasing:
            try:
                self._call(slot.worker, "close", slot.run_id)
            except WorkerDied:
                pass

    def export(self, run_id: int, path: str, record: Mapping[str, Any]) -> str:
        """The run's adapter, from its worker; from its last checkpoint when that worker is gone."""
        worker = self.home.get(run_id)
        if worker is None:
            raise ValueError(f"run {run_id} has no adapter any more (deleted)")
        try:
            return self._call(worker, "export", run_id, os.fspath(path), dict(record))
        except WorkerDied:
            folder = self.runs[run_id].args.output_dir
            point, slot = latest_checkpoint(folder), self.slots.get(run_id)
            if slot is not None and (point is None or point[0] < slot.step):
                raise RuntimeError(
                    f"run {run_id}'s worker died before its checkpoint at step {slot.step} was written; the newest "
                    f"in {folder!r} is {'none' if point is None else f'at step {point[0]}'}: its adapter of step "
                    f"{slot.step} is lost"
                ) from None
            return os.fspath(export_checkpoint(folder, path, record))

    def release(self) -> None:
        """Finish the checkpoints being written, free every worker and end it."""
        self._releasing = True
        try:
            self._each("release")
        finally:
            if not self._gone():
                for i, worker in enumerate(self.workers):
                    if i not in self.dead:
                        self.ray.kill(worker)


def _cause(exc: Any) -> BaseException:
    """The exception a Ray task raised, as itself where Ray can give it back."""
    try:
        cause = exc.as_instanceof_cause()
    except Exception:  # noqa: BLE001 - Ray could not rebuild it: its own error, which names it
        return exc
    return cause
