"""`Experiment`: the facade a notebook talks to.

    exp = Experiment("demo")                     # ./rf_experiments/demo
    exp.run_fit(group, demo_model_fn, train, evl, num_chunks=4, seed=0)   # returns once training has started
    exp.wait(); exp.results(); exp.best_run(); exp.export(run_id, "winner/")

Everything a user can get wrong is checked on the caller's thread before any training starts (`_args`); runs are
prepared by `control.prepare`, resumed by `control.resume`, steered by the IC-op service `control.ops.Control`
(shared with the panel and the policies) and read back as tables by `control.results`. Training runs in the
engine's background thread.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rf_notebook import _args, _kernel, _progress, _registry, tracking
from rf_notebook._journal import DB_NAME
from rf_notebook.commands import Export
from rf_notebook.configs import RFModelConfig
from rf_notebook.control import results as tables
from rf_notebook.control.ops import Control
from rf_notebook.control.prepare import Preparer, default_model_fn
from rf_notebook.control.resume import begin, close_interrupted, plan_fit
from rf_notebook.control.study import Study
from rf_notebook.engine import Engine
from rf_notebook.engine.checkpoints import export_checkpoint
from rf_notebook.optuna_search import RFOptunaSearch
from rf_notebook.search import Search
from rf_notebook.store import RunRecord, RunStatus, Store

logger = logging.getLogger(__name__)

__all__ = ["Experiment", "default_model_fn"]


class Experiment:
    """A named set of runs, their metrics and the background thread that trains them.

    Everything is kept in the experiment directory (`<experiments_dir>/<experiment_name>`): an SQLite database of
    runs, metrics and IC ops, and each run's latest checkpoint. `Experiment(name)` on an existing directory reads
    its history back (results, leaderboard, panel); `run_fit(..., resume=True)` continues its unfinished runs.
    """

    def __init__(
        self,
        experiment_name: str,
        mode: str = "fit",
        experiments_dir: str | Path = "rf_experiments",
        experiment_path: str | Path | None = None,
        num_gpus: int | None = None,
        trackers: Any = None,
        cluster: str | None = None,
        workers: int | None = None,
        ray_address: str | None = None,
    ):
        """`trackers`: where every run_fit of this experiment also logs its runs (unless run_fit names its own):
        a list of "mlflow", "tensorboard", "trackio" (stores inside the experiment folder; Trackio: its local
        store) or configured sinks such as `rf_notebook.tracking.MLflow("http://127.0.0.1:5000")`.

        `cluster="ray"`: the runs train on Ray actors, `workers` of them (default: one per GPU of the cluster, or
        two CPU workers where it has none), each holding the bases and runs placed on it; the scheduler, the store
        and the panel stay here. The cluster is `ray_address` (or `RAY_ADDRESS`), else the Ray already initialised
        in this process, else a local one started without a dashboard. Needs `rf_notebook[ray]`."""
        experiments_dir = _args.check_experiment(experiment_name, mode, experiments_dir, experiment_path, num_gpus)
        _args.check_cluster(cluster, workers, ray_address)
        self._cluster = (cluster, workers, ray_address)
        tracking.resolve(trackers)  # checked now: names, and that each tracker's package is installed
        self._trackers = trackers
        self._tracking: Any = None
        self.name = experiment_name
        self.path = Path(experiments_dir) / experiment_name
        self._panel: Any = None
        self._device_warned = False
        _registry.take_over(self.path, self.name)
        self._store = Store.open(self.path) if (self.path / DB_NAME).exists() else Store()
        close_interrupted(self._store)
        self._preparer = Preparer(self.path)
        self._control = Control(self.name, self._store, self._preparer)
        _registry.register(self)

    @property
    def store(self) -> Store:
        """The experiment's records (runs, metrics, IC ops), for reading: what the panel and the tables read. The
        engine and the IC-op service write them; write through the API, never here."""
        return self._store

    @property
    def _engine(self) -> Engine | None:
        return self._control.engine

    # -- starting ----------------------------------------------------------------------------------------------

    def run_fit(
        self,
        param_config: Search,
        create_model_fn: Callable[[RFModelConfig], tuple[Any, Any]] | None,
        train_dataset: Any,
        eval_dataset: Any = None,
        num_chunks: int | None = None,
        seed: int = 42,
        display: bool | None = None,
        policy: Any = None,
        resume: bool = False,
        on_nonfinite: str = "fail",
        num_shards: int | None = None,
        num_gpus: int | None = None,
        precision: str | None = None,
        fuse: bool | str = "auto",
        trackers: Any = None,
    ) -> None:
        """Validate, load the base model(s), build the runs, start training and return (a run that shares its
        prepared data set with an earlier one gets its trainer when it first trains: the first run starts sooner).

        Training continues in a background thread; use `wait()` to block until every run has ended. In a
        notebook the live panel appears in the cell's output (`display=False` keeps it hidden; `exp.panel()`
        shows it anywhere later). `policy` (e.g. `SuccessiveHalving()`) stops, or clones, runs at chunk ends; its
        decisions are IC ops with origin "policy".

        Every run's state is checkpointed in the experiment directory at each chunk end. After a kernel restart,
        run the same cells again with `resume=True`: the last run_fit's unfinished runs (and the clones made from
        them) continue from their last checkpoints, exactly as if never interrupted. The search, data sets,
        `num_chunks` and `seed` must be the ones it started with (checked; the data sets by content fingerprint).

        `on_nonfinite`: what a NaN / inf training loss does to its run: "fail" (marked failed, the others go on)
        or "continue".

        `num_chunks` (default 4) is also spelled `num_shards`; `num_gpus` (RapidFire AI's devices per run) may be
        None or 1: every run trains on this process's one device.

        `precision`: None (each run's own `bf16` / `fp16`, TRL's default bf16 on a GPU; float32 on a CPU, and fp16
        on a GPU without bfloat16 such as a T4, each said in one warning), or "bf16", "fp16" or "fp32" for every
        run, over their configs. "bf16" works on a CPU too (Accelerate's CPU autocast); "fp16" needs a GPU.

        `fuse`: whether SFT and DPO runs on one base share each optimizer step's forward and backward pass through
        the base (fused steps; each run keeps its own data order, loss, optimizer and schedule). "auto" (default):
        where it was measured to pay and to stay within the exactness contract: float32 runs on float32 weights on
        a CPU, in groups of 3 or more (the others take turns). True: every run that can be fused; False: runs take
        turns, each bit-for-bit what plain TRL gives. `stats()["fusion"]` says for each run whether it fused, or why
        it takes turns.

        `trackers`: also log every run, live, to MLflow, TensorBoard and / or Trackio: ["mlflow", "tensorboard",
        "trackio"] (stores inside the experiment folder; Trackio: its local store) or configured sinks from
        `rf_notebook.tracking`. None (default): the Experiment's `trackers`; [] none. One tracker run per run,
        named as in the panel, with its config, status, lineage and every metric by step (and `samples`); a tracker
        that fails is reported in the panel and the log while training goes on.
        """
        _registry.check_can_train(self)
        fit = _args.check_fit(
            param_config,
            create_model_fn,
            num_chunks=num_chunks,
            num_shards=num_shards,
            num_gpus=num_gpus,
            seed=seed,
            policy=policy,
            display=display,
            resume=resume,
            on_nonfinite=on_nonfinite,
            precision=precision,
            fuse=fuse,
        )
        if self._cluster[0] is not None and fit.fuse:  # "auto": runs take turns on each worker
            if fuse is True:
                raise ValueError(
                    f"`fuse` is {fuse!r}, but fused steps are not available with cluster={self._cluster[0]!r}"
                )
            fit = dataclasses.replace(fit, fuse=False)
        fit = dataclasses.replace(fit, policy=_args.resolve_probe(fit.policy, param_config.trainer_type, eval_dataset))
        _args.check_study(param_config, eval_dataset, fit.policy)
        sinks = tracking.resolve(self._trackers if trackers is None else trackers)
        self._fit(param_config, create_model_fn or default_model_fn, train_dataset, eval_dataset, fit, sinks)

    def _fit(self, search: Search, model_fn: Callable, train: Any, evl: Any, fit: _args.Fit, sinks: list[Any]) -> None:
        """run_fit once its arguments are checked: prepare every run (or the resumed ones) -> start training."""
        from rf_notebook.engine.torch_backend import TorchBackend

        if fit.resume and self._engine is not None:  # an idle engine of this experiment may still be writing
            self._engine.wait_for_writes()
        plan = plan_fit(
            self._store,
            self._preparer,
            search,
            train,
            evl,
            num_chunks=fit.num_chunks,
            seed=fit.seed,
            precision=fit.precision,
            resume=fit.resume,
            name=self.name,
        )
        self._warn_device()
        if not self._store.durable:
            self._store.attach(self.path)  # StorageError (unwritable folder) before anything trains
        if self._engine is not None:
            self._engine.shutdown()
        self._close_tracking()
        # Accelerate holds one mixed-precision mode (and dynamo setting) per process, set by the first trainer that
        # prepares; nothing else trains in this process now (checked above), so this run_fit sets its own. (Its
        # only reset is this private one; without it a second run_fit in another precision fails in Accelerate.)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        searching = isinstance(search, RFOptunaSearch)
        begin(self._store, plan, with_policy=fit.policy is not None or searching)
        study = None
        if searching:  # the sampler proposes a config for each slot a run frees
            fits = self._store.meta("fits")
            study = Study(search, self._store, self._control, len(fits), fits[-1]["run_ids"], fit.resume)
        cluster, workers, ray_address = self._cluster
        if cluster == "ray":
            from rf_notebook.engine.ray_backend import RayBackend

            try:
                backend = RayBackend(
                    model_fn,
                    train,
                    evl,
                    fit.num_chunks,
                    workers=workers,
                    address=ray_address,
                    on_nonfinite=fit.on_nonfinite,
                    formatted=plan.formatted,
                    resume_points=plan.points,
                    seed=fit.seed,
                )
            except BaseException as exc:  # no worker: no run of this run_fit trains
                for run in plan.runs:
                    self._store.update_run(run.run_id, status=RunStatus.FAILED, error=f"setup failed: {exc!r}")
                raise
        else:
            backend = TorchBackend(
                model_fn,
                train,
                evl,
                fit.num_chunks,
                on_nonfinite=fit.on_nonfinite,
                formatted=plan.formatted,
                resume_points=plan.points,
                fuse=fit.fuse,
                seed=fit.seed,
            )
        engine = Engine(
            self._store,
            plan.runs,
            backend,
            on_rung=self._control.policy_hook(fit.policy, study),
            checkpoints=True,
            decided_rung=plan.decided,
            replay=plan.replay,
            owner=self,
            probe=self._control.probe_plan(fit.policy),
            on_idle=self._control.idle_hook(study),
            on_late=self._control.late_hook(fit.policy, study),
        )
        self._control.engine = engine
        if sinks:  # each tracker's own thread reads the store: training never waits on a tracker
            self._tracking = tracking.Tracking(self._store, self.name, self.path, sinks)
            self._tracking.start()
        if fit.display if fit.display is not None else _kernel.in_kernel():
            self.panel()
        if self._panel is not None:
            self._panel.training_started()
        try:
            engine.start()
        except BaseException as exc:
            for run in plan.runs:
                self._store.update_run(run.run_id, status=RunStatus.FAILED, error=f"setup failed: {exc!r}")
            raise
        logger.info("experiment %r: %d runs training in the background", self.name, len(plan.runs))

    def _warn_device(self) -> None:
        changes = self._preparer.device_changes
        if changes and not self._device_warned:
            self._device_warned = True
            warnings.warn(
                f"experiment {self.name!r}: ignoring what this machine cannot honour: " + "; ".join(changes),
                RuntimeWarning,
                stacklevel=4,  # the user's run_fit call (_warn_device <- _fit <- run_fit <- the caller)
            )

    # -- watching ----------------------------------------------------------------------------------------------

    def wait(self, timeout: float | None = None, progress: bool | None = None) -> bool:
        """Block until no run is left to train (every run finished, failed, deleted or stopped) and every IC op
        submitted so far has been applied or refused.

        Returns False if `timeout` (seconds) ran out first. `progress`: show one live progress line (steps, chunks
        done of total, runs by status, elapsed, ETA) while waiting; by default where nothing else shows progress,
        i.e. outside a notebook with stderr a terminal.
        """
        engine = self._engine
        if engine is None:
            return True
        engine.caller_idle()  # this thread only waits from here on: it keeps nothing that slows training down

        def done(runs: list[RunRecord], ops: list[Any]) -> bool:
            mine = [r for r in runs if r.run_id in engine.runs]
            busy = _trainable(mine) or any(op.outcome == "pending" for op in ops) or not engine.settled
            return not engine.alive or not busy

        def step(seconds: float | None) -> bool:
            return self._store.wait_until(done, seconds)

        if not _progress.wanted(progress, _kernel.in_kernel()):
            # In a kernel, the panel's buttons keep working meanwhile (Run All reaches this while training runs).
            ended = _kernel.wait(step, timeout)
        else:
            with _progress.ProgressLine(self._store, self.name, lambda: engine.runs) as line:
                ended = _kernel.wait(line.wrap(step), timeout)
        if ended and self._tracking is not None:
            self._tracking.flush(TRACKING_FLUSH_S)  # the trackers hold every value too (a failing one keeps trying)
        return ended

    @property
    def training(self) -> bool:
        """Whether this experiment's run_fit is training now (a run queued or training, and its engine running)."""
        engine = self._engine
        if engine is None or not engine.alive:
            return False
        return _trainable([r for r in self._store.runs() if r.run_id in engine.runs]) or not engine.settled

    def runs(self) -> list[RunRecord]:
        """Every run: id, name, resolved config, status and progress (snapshots)."""
        return self._store.runs()

    def run(self, run_id: int) -> RunRecord:
        """One run's record (a snapshot); a KeyError names the known ids."""
        return self._store.run(run_id)

    def results(self):
        """A pandas DataFrame, one row per (run, step, metric).

        Columns: run_id, run_name, step, chunk, metric, value, wall_time.
        """
        return tables.results(self._store)

    def get_results(self):
        """RapidFire AI's shape of the metrics: a pandas DataFrame with one row per (run_id, step), its chunk (1, 2,
        ...) and epoch (fractional, as the trainer counts it), and one column per metric (loss, learning_rate,
        eval_loss, your compute_metrics' names, ...), sorted by run_id and step."""
        return tables.get_results(self._store)

    def get_runs_info(self):
        """One row per run: run_id, name, status, completed_steps, total_steps, chunks_done, chunks_total, error,
        warning (what went wrong without ending the run, e.g. a compute_metrics that raised), source ("initial", or
        the origin of the IC op that made it: "api", "panel", "policy"), cloned_from,
        warm_started_from and config (the resolved trainer, adapter and model arguments)."""
        return tables.runs_info(self._store)

    def leaderboard(self, metric: str = "eval_loss", mode: str = "min"):
        """One row per run (its name carries the varying hyper-parameters) with its latest eval metrics, best first."""
        return tables.leaderboard(self._store, metric, mode)

    def best_run(self, metric: str = "eval_loss", mode: str = "min") -> RunRecord:
        """The run whose latest `metric` is best (`mode` "min" or "max"), among runs that logged it."""
        return tables.best_run(self._store, metric, mode)

    def ic_log(self):
        """Every IC op as a pandas DataFrame: op_id, time, origin, op, run_id, args, outcome, reason, step,
        new_run_id. `step` is the run's optimizer step when the op took effect."""
        return tables.ic_log(self._store)

    def stats(self) -> dict[str, float]:
        """Where the training thread's time went: setup_s (loading the base, building the runs, including a trainer
        built at its run's first turn; a build for a warm clone's parent counts nowhere), train_s, eval_s,
        switch_s, cleanup_s (freeing finished runs' trainers) and the number of switches. With fused steps:
        fused_groups, fused_forwards, memory_splits (fused passes cut short to keep the activations within the
        memory available) and `fusion` (run id -> "fused", or why it takes turns). With cluster="ray":
        parallel_groups (times the workers trained at once), workers, workers_lost; runs_moved counts runs that
        continued from their checkpoint on another worker after theirs died.

        A switch is one run handing the model to another at a chunk end; switch_s is the scheduler's own time
        for it (activating the run's adapter and state, recording progress), not training or evaluation.
        """
        if self._engine is None:
            return {}
        stats = dict(self._engine.stats)
        report = getattr(self._engine.backend, "report", None)
        if report is not None:  # the backend's own figures (fused steps; Ray workers)
            stats = report(stats)
        if self._tracking is not None:  # CPU seconds each tracker's thread used
            stats["tracking_s"] = self._tracking.busy()
        return stats

    # -- IC ops: steer the running experiment -----------------------------------------------------------------

    def stop(self, run_id: int) -> int:
        """Pause a run at its next optimizer step; it keeps its exact state. Returns the op's id in `ic_log()`."""
        return self._control.submit("stop", run_id, origin="api")

    def resume(self, run_id: int) -> int:
        """Let a stopped run rejoin the schedule; it continues as though it had never stopped."""
        return self._control.submit("resume", run_id, origin="api")

    def delete(self, run_id: int) -> int:
        """End a run and free its adapter, optimizer and trainer; its metrics stay (marked deleted)."""
        return self._control.submit("delete", run_id, origin="api")

    def stop_all(self) -> list[int]:
        """Stop every run still queued or training (the panel's Stop all); returns the ids of the stop ops."""
        return self._control.stop_all(origin="api")

    def clone_modify(self, run_id: int, overrides: dict[str, Any], warm_start: bool = False) -> int:
        """Start a new run from `run_id`'s config with `overrides` (field name -> JSON value); return its id.

        From scratch by default; with `warm_start=True` the clone starts from the parent's current adapter
        weights, optimizer moments, step and data position, and the overrides apply from its next step on.
        """
        return self._control.clone_modify(run_id, overrides, warm_start, origin="api")[1]

    def panel(self) -> None:
        """Show the experiment's live panel in this cell's output (the same panel each time it is shown)."""
        from rf_notebook.widget import Panel

        if self._panel is None:
            self._panel = Panel(self._control)
        self._panel.show()

    # -- taking results away -----------------------------------------------------------------------------------

    def export(self, run_id: int, path: str | Path) -> Path:
        """Write run `run_id`'s adapter as a PEFT folder (for `PeftModel.from_pretrained`) plus rf_config.json.

        While the experiment holds its models this is the adapter as it is now; after `end()` or in a new
        process it is the adapter of the run's last checkpoint (its last chunk end)."""
        record = self._store.run(run_id)  # unknown ids raise KeyError naming the known ones
        info = {"run_id": record.run_id, "name": record.name, "config": record.config}
        engine = self._engine
        if engine is not None and engine.alive and run_id in engine.runs:
            command = engine.submit(Export(run_id=run_id, path=str(path)))
            return Path(command.reply.result())
        return export_checkpoint(record.config.get("training_args", {}).get("output_dir", ""), path, info)

    def end(self, wait: bool = True) -> None:
        """Finish the experiment and release every model, adapter and trainer.

        Runs still training are first trained to their end, as after RapidFire AI's blocking `run_fit`: one line
        says so, and the panel's buttons keep working meanwhile (its Stop all ends the wait). `end(wait=False)`
        stops them where they are instead (they can continue with `run_fit(..., resume=True)`). An interrupt while
        waiting leaves the experiment running.
        """
        if wait and self.training:
            live = len(self._control.live_runs())
            print(
                f"{self.name}: waiting for {live} run{'s' if live != 1 else ''} to finish training before ending "
                "(stop them with the panel's Stop all, exp.stop_all(), or end(wait=False))",
                flush=True,
            )
            self.wait()
        if self._engine is not None:
            self._engine.shutdown()
            for r in self._store.runs():
                if not r.status.is_terminal:
                    self._store.update_run(r.run_id, status=RunStatus.STOPPED)
        self._close_tracking()
        if self._panel is not None:
            self._panel.stop_writer()

    # -- trackers ------------------------------------------------------------------------------------------------

    def _close_tracking(self) -> None:
        if self._tracking is not None:
            self._tracking.close(TRACKING_FLUSH_S)
            self._tracking = None

    def flush_tracking(self, timeout: float = 30.0) -> bool:
        """Wait until the run_fit's trackers hold every value logged so far; False if one failed (it keeps
        retrying in the background; `tracking_errors()` says why) or `timeout` seconds ran out. `wait()` does this
        when training ends."""
        return True if self._tracking is None else self._tracking.flush(timeout)

    def tracking_errors(self) -> dict[str, str]:
        """Each failing tracker's last error ({} when every tracker is up to date or none is used)."""
        return {} if self._tracking is None else self._tracking.errors()

    def export_tracking(self, tracker: Any, uri: str | Path | None = None) -> None:
        """Replay the experiment's history (every run, its config, tags and metrics) into a tracker, e.g. after the
        fact: `export_tracking("mlflow", uri="sqlite:///mlflow.db")`. `uri` is MLflow's tracking URI,
        TensorBoard's log folder or Trackio's project (default: each one's default, as for `trackers=`); `tracker`
        may also be a configured sink. Runs already there are continued, not duplicated."""
        if self.training:
            raise RuntimeError(
                f"experiment {self.name!r} is training: export_tracking replays a finished history; wait() or end() "
                "first, or pass trackers= to run_fit to log live"
            )
        if isinstance(tracker, str) and uri is not None:
            kind = tracker.lower()
            if kind not in tracking.KINDS:
                raise ValueError(f"export_tracking: unknown tracker {tracker!r}; expected one of {[*tracking.KINDS]}")
            option = {"mlflow": "tracking_uri", "tensorboard": "log_dir", "trackio": "project"}[kind]
            tracker = tracking.KINDS[kind](**{option: str(uri)})
        elif uri is not None:
            raise ValueError(f"export_tracking: uri={uri!r} goes with a tracker name, not with {tracker!r}")
        sinks = tracking.resolve([tracker])
        if not self._store.durable:
            self._store.attach(self.path)  # the experiment's uid is kept with its history
        tracking.Tracking(self._store, self.name, self.path, sinks).replay()


# How long wait() and end() give the trackers to catch up with the store.
TRACKING_FLUSH_S = 30.0


def _trainable(runs: list[RunRecord]) -> bool:
    return any(r.status.is_live for r in runs)
