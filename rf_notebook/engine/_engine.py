"""The scheduler thread: owns every base model, adapter and trainer, trains runs chunk by chunk, applies IC ops.

    engine = Engine(store, prepared_runs, backend)
    engine.start()                                  # returns once the runs are built (or raises why not)
    engine.submit(Stop(op_id=..., run_id=1))        # any thread; acted on between two optimizer steps
    engine.shutdown()

Loop: drain commands -> pick a run (an interrupted one first, else least progress) -> the backend puts back its
adapter, forward patches and process state -> its trainer runs to the next rung, or until a command waits ->
evaluate at a rung -> record. A run that raises is marked failed and the others go on; an op that cannot apply is
recorded as refused, never raised in this thread, and a run's status changes only once the work behind an op
succeeded. With checkpoints on, a run that stays stopped (two rungs passed since its stop, or nothing else left to
train) is written to its checkpoint and unloaded: its adapter, trainer and optimizer are freed, and a Resume (or a
warm clone of it) rebuilds it exactly from there. The backend (`backend.Backend`; `torch_backend.TorchBackend`)
does all the torch work; this module knows nothing of torch, so tests drive it with a fake backend.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from rf_notebook import scheduler
from rf_notebook.commands import CloneModify, Command, CommandQueue, Delete, Export, ICOp, Resume, Shutdown, Stop
from rf_notebook.engine.backend import Backend, RunStateLost, Slot, WorkerLost
from rf_notebook.store import RunStatus, Store

logger = logging.getLogger(__name__)

__all__ = ["Engine"]


class Engine:
    """Runs an experiment's training in one background thread. See the module docstring."""

    def __init__(
        self,
        store: Store,
        runs: list[Any],
        backend: Backend,
        on_rung: Callable[[int], None] | None = None,
        checkpoints: bool = False,
        decided_rung: int | None = None,
        replay: Sequence[Command] = (),
        owner: Any = None,
        probe: Callable[[int], int] | None = None,
        on_idle: Callable[[], int] | None = None,
        on_late: Callable[[int, int], None] | None = None,
    ):
        self.store, self.backend = store, backend
        # Kept alive as long as this engine (its thread): the Experiment, whose process-wide checks (one experiment
        # trains at a time, one object per directory) and clean-up at exit hold it weakly.
        self.owner = owner
        self.checkpoints = checkpoints  # write each run's state at every rung (a durable experiment)
        # Called on this thread when every live run has finished chunk k (a synchronous rung), once per k, for
        # every k after `decided_rung` (None: every rung the runs have already passed counts as decided).
        self.on_rung = on_rung
        self._decided_rung = decided_rung
        # Anneal probes at rungs (a policy that ranks by them): chunk number -> probe steps there (0: none).
        self.probe = probe
        # Called on this thread when nothing is left to train (a search that fills freed slots): the number of runs
        # it submitted. Runs submitted there start a new round of rungs (rung 1 is theirs to pass).
        self.on_idle = on_idle
        # Called on this thread when a run reaches chunk k after the rung k was decided for the others (a run that
        # joined late): on_late(run_id, k).
        self.on_late = on_late
        self._settled = threading.Event()  # idle, and on_idle had nothing to add
        self._rung = 0
        backend.connect(should_yield=self.pending, record=self.record, warn=self.warn)
        self.runs = {r.run_id: r for r in runs}
        self.commands: CommandQueue = CommandQueue()
        for command in replay:  # ops a previous process logged but never applied: applied before anything trains
            self.commands.put(command)
        self._slots: dict[int, Slot] = {}
        self._unloaded: set[int] = set()  # stopped runs written to their checkpoint, nothing in memory
        self._stopped_at: dict[int, int] = {}  # stopped run -> the rung the experiment was at when it stopped
        self._current: int | None = None  # a run interrupted in the middle of a chunk
        self._ready = threading.Event()
        self._setup_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Where the scheduler thread's time went: setup (loading the bases, building the runs, also a trainer built
        # at its run's first turn), training, evaluation, switching between runs (activating a run's adapter,
        # patches and process state; recording its progress) and freeing finished runs.
        self.stats = {
            "setup_s": 0.0,
            "train_s": 0.0,
            "eval_s": 0.0,
            "switch_s": 0.0,
            "cleanup_s": 0.0,
            "checkpoint_s": 0.0,
            "probe_s": 0.0,
            "probes": 0,
            "probe_steps": 0,  # optimizer steps the probes trained (their compute, next to the runs')
            "switches": 0,
            "fused_groups": 0,  # times runs trained together in fused steps
            "runs_moved": 0,  # runs that continued from their checkpoint elsewhere after their worker was lost
        }

    # -- any thread --------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread; return once setup is done, re-raising any setup error here. Idempotent."""
        if self._thread is None:
            self.caller_idle()
            self._thread = threading.Thread(target=self._main, name="rf_notebook-scheduler", daemon=True)
            self._thread.start()
        self._ready.wait()
        if self._setup_error is not None:
            self._thread.join()
            raise self._setup_error

    def submit(self, command: Command) -> Command:
        if not self.alive:
            command.reply.set_exception(RuntimeError("the experiment's scheduler thread is not running"))
            if isinstance(command, ICOp):
                self.store.settle_op(command.op_id, "refused", "the experiment is not running")
        else:
            self.commands.put(command)
        return command

    def caller_idle(self) -> None:
        """The calling thread leaves the CPU to training (it starts the engine, or waits for it to finish)."""
        self.backend.caller_idle()

    def wait_for_writes(self) -> None:
        """Wait for the checkpoints the backend is writing (any thread), before reading them."""
        self.backend.wait_for_writes()

    def pending(self) -> bool:
        """Whether commands wait (or storage failed); a training run checks this before each optimizer step."""
        return not self.commands.empty() or self.store.storage_error is not None

    def shutdown(self, timeout: float | None = None) -> None:
        if self.alive:
            self.submit(Shutdown())
            self._thread.join(timeout)

    def refusal(self, op: str, run_id: int, warm_start: bool = False) -> str | None:
        """Why `op` cannot apply to run `run_id` now (None: it can). Any thread; the scheduler thread asks again
        when it applies the op."""
        try:
            status = self.store.run(run_id).status
        except KeyError:
            status = None
        reason = scheduler.refusal(op, run_id, status, warm_start=warm_start)
        if reason is None and run_id not in self.runs:
            reason = (
                f"run {run_id} is not part of the current run_fit (its trainer and data are not loaded); ops apply "
                f"to {_id_list(list(self.runs))}"
            )
        if reason is None and warm_start and run_id not in self._slots and run_id not in self._unloaded:
            reason = f"run {run_id} has no live training state to warm-start from"
        return reason

    @property
    def settled(self) -> bool:
        """Whether nothing more happens without a new command: always, without `on_idle`; with it, once the thread
        is idle and `on_idle` had nothing to add (a search between two rounds of runs is not settled)."""
        return self.on_idle is None or self._settled.is_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- scheduler thread --------------------------------------------------------------------------------------

    def _main(self) -> None:
        start = time.perf_counter()
        try:
            if self.checkpoints:  # a resumed experiment's stopped runs stay on disk until they are resumed
                stopped = {r.run_id for r in self.store.runs() if r.status is RunStatus.STOPPED}
                self._unloaded = {run_id for run_id in self.runs if run_id in stopped}
            self._slots = self.backend.setup(
                [r for r in self.runs.values() if r.run_id not in self._unloaded],
                unloaded=[self.runs[run_id] for run_id in sorted(self._unloaded)],
            )
            self.stats["setup_s"] = time.perf_counter() - start
            for run_id, slot in self._slots.items():
                self._progress(run_id, slot)
            self._rung = self._completed_rung() if self._decided_rung is None else self._decided_rung
        except BaseException as exc:  # reported to the caller of start()
            self._setup_error = exc
            self._release()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        except BaseException as exc:  # a bug in the loop itself: no run may be left looking alive
            logger.exception("the scheduler thread failed")
            for record in self.store.runs():
                if record.run_id in self.runs and not record.status.is_terminal:
                    self.store.update_run(record.run_id, status=RunStatus.FAILED, error=_describe(exc))
        finally:
            self._release()

    def _loop(self) -> None:
        self._drain(block=False)  # replayed ops first, then rungs completed but never decided (a restart)
        self._rungs()
        while not self._stopping:
            if self.store.storage_error is not None:
                self._pause_all(self.store.storage_error)
            idle = self._pick() is None
            if idle and self.commands.empty():
                self._unload_stopped(idle=True)
                if self._idle():
                    continue
                self._settled.set()
                self.store.notify()
            self._drain(block=idle)
            self._settled.clear()
            run_id = None if self._stopping else self._pick()
            if run_id is not None:
                group = self._fusion_group(run_id)
                if len(group) > 1:
                    self._train_together(group)
                else:
                    self._train(self._slots[run_id])

    def _idle(self) -> bool:
        """Ask `on_idle` for more runs; whether it submitted any (their ops wait in the queue)."""
        if self.on_idle is None:
            return False
        try:  # the runs' last checkpoints on disk before anything new is logged (as before a rung's decisions)
            self.backend.flush()
        except OSError as exc:
            self.store.fail_storage(f"cannot write a checkpoint: {exc}")
            return False
        try:
            submitted = self.on_idle()
        except Exception:  # a broken search must not take the experiment down
            logger.exception("the search failed to fill the freed slots")
            return False
        if submitted:
            self._rung = 0  # nothing is live: the new runs pass rung 1, 2, ... as a new round
        return bool(submitted)

    def _fusion_group(self, run_id: int) -> list[Slot]:
        """The runs that train together with `run_id` in fused steps: live runs in the same chunk that the backend
        can fuse with it (a backend without fused steps: just this run)."""
        slot = self._slots[run_id]
        partners = getattr(self.backend, "fusion_partners", None)
        if partners is None or not getattr(self.backend, "fuse", False):  # nothing to look up: runs take turns
            return [slot]
        chunk = self.store.run(run_id).chunks_done
        candidates = [
            self._slots[r.run_id]
            for r in self.store.runs()
            if r.run_id != run_id and r.run_id in self._slots and r.status.is_live and r.chunks_done == chunk
        ]
        return partners(slot, [c for c in candidates if not c.finished])

    def _pick(self) -> int | None:
        runnable = {r.run_id: r.chunks_done for r in self.store.runs() if r.status.is_live and r.run_id in self._slots}
        return scheduler.pick_next(runnable, self._current)

    def _train(self, slot: Slot) -> None:
        """Train `slot` to its next rung (or until a command waits), then evaluate at a rung and record."""
        t0 = time.perf_counter()
        rung = slot.plan.next_rung(slot.step)
        self.store.update_run(slot.run_id, status=RunStatus.TRAINING)
        try:
            t_build = time.perf_counter()
            self.backend.materialize(slot)  # a trainer whose build waited for the run's first turn
            built = time.perf_counter() - t_build
            self.backend.activate(slot)
            t1 = time.perf_counter()
            slot.advance(rung.step)
            t2 = time.perf_counter()
            self.backend.suspended(slot)
        except Exception as exc:
            self._failed(slot, exc)
            return
        self.stats["train_s"] += t2 - t1
        self.stats["setup_s"] += built
        self.stats["switch_s"] += t1 - t0 - built
        self._trained(slot, rung.step)

    def _train_together(self, slots: list[Slot]) -> None:
        """Train runs that share their steps (fused) to each one's next rung, then handle each as `_train` does."""
        pause_at = {slot.run_id: slot.plan.next_rung(slot.step).step for slot in slots}
        for slot in slots:
            self.store.update_run(slot.run_id, status=RunStatus.TRAINING)
        t1 = time.perf_counter()
        try:
            failed = self.backend.train_together(slots, pause_at)
        except Exception as exc:  # the group's driver itself: its runs fail, the others go on
            failed = {slot.run_id: exc for slot in slots}
        self.stats["train_s"] += time.perf_counter() - t1
        self.stats["fused_groups"] += 1
        for slot in slots:
            if slot.run_id not in failed:
                try:  # its adapter and state back before it is evaluated or checkpointed (others trained last)
                    self.backend.activate(slot)
                except Exception as exc:
                    failed[slot.run_id] = exc
            if slot.run_id in failed:
                self._failed(slot, failed[slot.run_id])
            else:
                self._trained(slot, pause_at[slot.run_id])

    def _trained(self, slot: Slot, pause_at: int) -> None:
        """After a run handed control back: evaluate and checkpoint at a rung, record, free a finished run."""
        t2 = time.perf_counter()
        try:
            at_rung = slot.finished or slot.step >= pause_at
            if at_rung:
                self.backend.evaluate(slot)
            t_eval = time.perf_counter()
            if at_rung:
                self._probe(slot)  # its time goes to probe_s
            t3 = time.perf_counter()
            if at_rung and self.checkpoints:
                self._checkpoint(slot)
            t3_ckpt = time.perf_counter()
        except Exception as exc:
            self._failed(slot, exc)
            return
        self._current = None if at_rung else slot.run_id
        self._progress(slot.run_id, slot)
        if at_rung:
            self._late(slot)
            self._rungs()
        t4 = time.perf_counter()
        if slot.finished:
            self.backend.discard(slot, keep_adapter=True)  # frees trainer and optimizer; the adapter stays
        self.stats["switches"] += 1
        self.stats["eval_s"] += t_eval - t2
        self.stats["checkpoint_s"] += t3_ckpt - t3
        self.stats["switch_s"] += t4 - t3_ckpt
        self.stats["cleanup_s"] += time.perf_counter() - t4

    def _probe(self, slot: Slot) -> None:
        """At a rung where the policy ranks by anneal probes: log the run's probe result as "probe_eval_loss". A
        finished run has annealed already: its probe is the eval loss it just logged. A probe that fails leaves the
        run unranked (said on its record; the policy then ranks that rung by its metric), never failed, unless the
        backend could not put the run back as it was (`RunStateLost`): then the run fails."""
        rung = slot.plan.rungs_done(slot.step)
        try:  # the policy's own code: a broken one must not take the runs down
            steps = self.probe(rung) if self.probe is not None else 0
        except Exception:
            logger.exception("the policy failed to say whether to probe at chunk %d", rung)
            steps = 0
        if not steps:
            return
        t0 = time.perf_counter()
        value = None
        if slot.finished:
            logged = [m.value for m in self.store.metrics(slot.run_id) if m.step == slot.step and m.name == "eval_loss"]
            value, steps = (logged[-1] if logged else None), 0
        if value is None:
            try:
                value = self.backend.probe(slot, steps, rung)
            except (RunStateLost, WorkerLost):  # the run fails, or continues elsewhere
                raise
            except Exception as exc:
                logger.exception("the anneal probe of run %d at chunk %d failed", slot.run_id, rung)
                self.warn(slot, f"its anneal probe at chunk {rung} failed ({type(exc).__name__}: {exc})")
        if value is not None:
            self.record(slot, slot.step, {"probe_eval_loss": value})
        self.stats["probes"] += 1
        self.stats["probe_steps"] += steps
        self.stats["probe_s"] += time.perf_counter() - t0

    def _failed(self, slot: Slot, exc: BaseException) -> None:
        """A run raised: it is marked failed and freed (its adapter stays for export); the others go on. A run
        whose worker was lost (`WorkerLost`) continues from its last checkpoint on another one instead, if it can."""
        if isinstance(exc, WorkerLost) and self._move(slot, exc):
            return
        error = _describe(exc)
        # The traceback's frames hold the run's trainer, optimizer and activations: let them go now (a log
        # handler keeping the exception, as pytest's does, would otherwise keep all of it alive).
        traceback.clear_frames(exc.__traceback__)
        del exc
        logger.error("run %d failed:\n%s", slot.run_id, error)
        if self._current == slot.run_id:
            self._current = None
        self.store.update_run(slot.run_id, status=RunStatus.FAILED, error=error)
        if self._slots.pop(slot.run_id, None) is not None:  # (a run that could not move was freed already)
            self.backend.discard(slot, keep_adapter=True)
        self._rungs()  # the others may have been waiting for this run at a rung

    def _move(self, slot: Slot, lost: WorkerLost) -> bool:
        """The process holding `slot` is gone, its run is not: rebuild it elsewhere from its last checkpoint (what
        it logged after that step is dropped: it logs it again, the same). Whether it could."""
        run_id = slot.run_id
        if self._current == run_id:
            self._current = None
        try:
            self.backend.discard(self._slots.pop(run_id), keep_adapter=False)
        except Exception:  # what its lost worker held is gone anyway
            logger.debug("discarding run %d of a lost worker", run_id, exc_info=True)
        try:
            new = self.backend.reload(self.runs[run_id])
        except Exception as exc:  # no worker left, or the rebuild failed: the run fails, with both reasons
            lost.add_note(f"continuing run {run_id} from its last checkpoint failed: {type(exc).__name__}: {exc}")
            return False
        self._slots[run_id] = new
        self.stats["runs_moved"] += 1
        self.store.drop_metrics_after(run_id, new.step)
        self._progress(run_id, new)
        self.warn(new, f"{lost}; it continued from its last checkpoint (step {new.step}) on another worker")
        logger.warning("run %d: %s; continued from its checkpoint at step %d", run_id, lost, new.step)
        return True

    def _checkpoint(self, slot: Slot) -> None:
        """Write the run's state at this rung; a failed write (disk full) pauses the experiment, never the run."""
        try:
            self.backend.checkpoint(slot)
        except OSError as exc:
            self.store.fail_storage(f"cannot write run {slot.run_id}'s checkpoint: {exc}")

    def _pause_all(self, why: str) -> None:
        """The experiment directory cannot be written: stop every live run where it is (nothing is lost; each
        keeps its exact state) until the user resumes it."""
        paused = [r.run_id for r in self.store.runs() if r.run_id in self._slots and r.status.is_live]
        for run_id in paused:
            self.store.update_run(run_id, status=RunStatus.STOPPED)
        if paused:
            logger.error("experiment paused: %s. Free space or fix the folder, then resume the runs %s", why, paused)

    def _completed_rung(self) -> int:
        """The highest k such that every live run of this engine has finished chunk k (0 if none is live)."""
        done = [r.chunks_done for r in self.store.runs() if r.run_id in self._slots and r.status.is_live]
        return min(done, default=0)

    def _late(self, slot: Slot) -> None:
        """A run that joined late (a clone) reached a rung the others passed already: `on_late` judges it alone."""
        rung = slot.plan.rungs_done(slot.step)
        if self.on_late is None or slot.finished or rung > self._rung:
            return
        try:
            self.backend.flush()
        except OSError as exc:
            self.store.fail_storage(f"cannot write a checkpoint: {exc}")
            return
        try:
            self.on_late(slot.run_id, rung)
        except Exception:  # a broken policy must not take the runs down
            logger.exception("the policy failed to judge run %d at rung %d", slot.run_id, rung)

    def _rungs(self) -> None:
        """Hand each newly completed synchronous rung to `on_rung` (a policy); its ops wait in the queue and are
        applied before anything trains further."""
        completed = self._completed_rung()
        while self._rung < completed:
            self._rung += 1
            if self.on_rung is None:
                continue
            try:  # a decision at a rung is replayed after a crash from the runs' checkpoints at that rung
                self.backend.flush()
            except OSError as exc:  # decided once the experiment can be written again
                self.store.fail_storage(f"cannot write a checkpoint: {exc}")
                self._rung -= 1
                break
            try:
                self.on_rung(self._rung)
            except Exception:  # a broken policy must not take the runs down
                logger.exception("the policy failed at rung %d", self._rung)
        self._unload_stopped(idle=False)

    def _unload_stopped(self, idle: bool) -> None:
        """Write each run that stays stopped to its checkpoint and free it: two rungs have passed since it stopped,
        or nothing else is left to train. A run whose checkpoint cannot be written stays in memory."""
        if not self.checkpoints or self.store.storage_error is not None:
            return
        unloaded: list[int] = []
        try:
            self._unload_due(idle, unloaded)
        finally:
            if unloaded:
                self.backend.collect()  # once for every run unloaded now, not once each

    def _unload_due(self, idle: bool, unloaded: list[int]) -> None:
        for run_id, since in list(self._stopped_at.items()):
            if run_id not in self._stopped_at:  # (a run failed meanwhile handled it)
                continue
            if run_id not in self._slots or self.store.run(run_id).status is not RunStatus.STOPPED:
                del self._stopped_at[run_id]
            elif idle or self._rung >= since + 2:
                slot = self._slots[run_id]
                try:
                    self.backend.unload(slot)
                except OSError as exc:  # it stays in memory, as it was, and is tried again after a recovery
                    self.store.fail_storage(f"cannot write run {run_id}'s checkpoint: {exc}")
                    return
                except WorkerLost as exc:  # moved from its last checkpoint (still stopped); unloaded next time
                    self._failed(slot, exc)
                    continue
                except Exception:  # it stays in memory; the others go on
                    logger.exception("unloading stopped run %d", run_id)
                    self._stopped_at.pop(run_id, None)
                    continue
                unloaded.append(run_id)
                self._unloaded.add(run_id)  # before it leaves _slots: another thread's refusal() sees one of them
                del self._slots[run_id]
                self._stopped_at.pop(run_id, None)
                if self._current == run_id:
                    self._current = None
                logger.info("run %d stays stopped: checkpointed at step %d and unloaded", run_id, slot.step)

    def _progress(self, run_id: int, slot: Slot) -> None:
        status = self.store.run(run_id).status
        if slot.finished:
            status = RunStatus.FINISHED
        elif status is RunStatus.TRAINING:
            status = RunStatus.QUEUED
        self.store.update_run(
            run_id,
            status=status,
            step=slot.step,
            total_steps=slot.plan.total_steps,
            chunks_done=slot.plan.rungs_done(slot.step),
            chunks_total=len(slot.plan.rungs),
            rungs=tuple(r.step for r in slot.plan.rungs),
        )

    def warn(self, slot: Slot, message: str) -> None:
        """Something a run's user code got wrong without ending the run; kept on its record (the panel shows it)."""
        self.store.update_run(slot.run_id, warning=message)

    def record(self, slot: Slot, step: int, values: dict[str, float]) -> None:
        """Metrics from a run's trainer (called on the scheduler thread, from inside the run)."""
        chunk = slot.plan.rungs_done(step - 1) + 1 if slot.plan is not None else 0
        self.store.log_metrics(slot.run_id, step, chunk, values)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                command = self.commands.get(block=block)
            except queue.Empty:
                return
            block = False
            self._settled.clear()  # before the command's effect shows: wait() must not see a settled engine then
            try:
                command.reply.set_result(self._handle(command))
            except Exception as exc:
                if isinstance(command, ICOp):  # never raised here: recorded as refused
                    logger.exception("op %d failed", command.op_id)
                    self._settle(command, "refused", f"{type(exc).__name__}: {exc}")
                command.reply.set_exception(exc)

    def _handle(self, command: Command) -> Any:
        if isinstance(command, Shutdown):
            self._stopping = True
            return None
        if isinstance(command, Export):
            record = self.store.run(command.run_id)
            info = {"run_id": record.run_id, "name": record.name, "config": record.config}
            return self.backend.export(command.run_id, command.path, info)
        if isinstance(command, ICOp):
            return self._apply(command)
        raise TypeError(f"unknown command {command!r}")

    def _apply(self, op: ICOp) -> str:
        """Apply an IC op if the run's current state allows it; record the outcome either way. The run's status
        changes only after the work behind the op succeeded (an exception here leaves it as it was, refused)."""
        reason = self._refusal(op)
        if reason is not None:
            return self._settle(op, "refused", reason)
        warm = isinstance(op, CloneModify) and op.warm_start
        if op.run_id in self._unloaded and (isinstance(op, Resume) or warm):
            self._slots[op.run_id] = self.backend.reload(self.runs[op.run_id])
            self._unloaded.discard(op.run_id)
            self._progress(op.run_id, self._slots[op.run_id])  # the step it really continues from
            self._stopped_at[op.run_id] = self._rung  # a warm clone's parent stays stopped
        slot = self._slots.get(op.run_id)
        step = slot.step if slot is not None else self.store.run(op.run_id).step
        if isinstance(op, Stop):
            self.store.update_run(op.run_id, status=RunStatus.STOPPED)
            self._stopped_at[op.run_id] = self._rung
        elif isinstance(op, Resume):
            self.store.update_run(op.run_id, status=RunStatus.QUEUED)
        elif isinstance(op, Delete):
            if slot is not None:
                self.backend.discard(slot, keep_adapter=False)
                del self._slots[op.run_id]
            self.backend.forget(op.run_id)
            self._unloaded.discard(op.run_id)
            self.store.update_run(op.run_id, status=RunStatus.DELETED)
        elif isinstance(op, CloneModify):
            run = op.prepared
            new = self.backend.build(run, warm_from=slot if warm else None)
            self.runs[run.run_id] = run
            self.store.add_run(run.record())
            self._slots[run.run_id] = new
            self._progress(run.run_id, new)
        if self._current == op.run_id and isinstance(op, (Stop, Delete)):
            self._current = None
        outcome = self._settle(op, "applied", step=step)
        if isinstance(op, (Stop, Delete)):
            self._rungs()  # the run that held a rung back is out of the schedule
        return outcome

    def _refusal(self, op: ICOp) -> str | None:
        if isinstance(op, CloneModify) and not op.warm_start and op.run_id not in self.runs:
            # A cold clone carries its prepared run: its parent is only its lineage, and may have ended before a
            # restart (a search's proposal replayed on resume).
            try:
                status = self.store.run(op.run_id).status
            except KeyError:
                status = None
            return scheduler.refusal(op.name, op.run_id, status)
        reason = self.refusal(op.name, op.run_id, warm_start=isinstance(op, CloneModify) and op.warm_start)
        if reason is None and isinstance(op, Stop) and op.requires is not None:
            required = self.store.op(op.requires)
            if required.outcome != "applied":
                reason = f"its replacement (op {op.requires}) was {required.outcome}: {required.reason}"
        return reason

    def _settle(self, op: ICOp, outcome: str, reason: str | None = None, step: int | None = None) -> str:
        self.store.settle_op(op.op_id, outcome, reason, step)
        return outcome

    def _release(self) -> None:
        try:  # the last chunk ends' checkpoints on disk before the runs' state leaves memory
            self.backend.flush()
        except OSError as exc:
            self.store.fail_storage(f"cannot write a checkpoint: {exc}")
        for slot in self._slots.values():
            try:
                slot.close()
            except Exception:  # unwinding a broken trainer must not hide the real error
                logger.exception("closing run %d", slot.run_id)
        self._slots.clear()
        try:
            self.backend.release()  # finishes the checkpoints being written
        except OSError as exc:
            self.store.fail_storage(f"cannot write a checkpoint: {exc}")
        self.store.notify()


def _id_list(ids: Any) -> str:
    ids = sorted(ids)
    return f"runs {ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2 else f"runs {ids}"


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
