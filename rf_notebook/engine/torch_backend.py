"""The engine's torch side: shared base models, one LoRA adapter and one TRL trainer per run.

`TorchBackend` implements `backend.Backend` for the scheduler loop (`_engine.Engine`), always on the scheduler
thread: build a run (adapter + trainer, or a warm-started clone of another run), put back a run's state before it
trains, evaluate it, checkpoint, unload and reload it, discard it, export its adapter. The shared models are in
`_bases`, the callbacks it adds to each trainer in `_callbacks`, the checkpoint layout in `checkpoints`; what
differs between SFT, DPO, GRPO and RLOO is behind the trainer contract (`rf_notebook.trainers`).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from transformers.trainer_callback import PrinterCallback, ProgressCallback

from rf_notebook import _versions
from rf_notebook.chunking import ChunkPlan, chunk_plan
from rf_notebook.configs import RFModelConfig
from rf_notebook.engine import _fused, _openmp, _probe, _process_state, checkpoints
from rf_notebook.engine._bases import Bases, SharedBase
from rf_notebook.engine._callbacks import ApplyOverrides, FailOnNonFinite, GenerationMetrics, TolerantMetrics
from rf_notebook.engine._slot import Patches, RunSlot
from rf_notebook.engine.backend import PreparedRun
from rf_notebook.engine.checkpoints import (
    TRAINER_COUNTERS,
    WARM_START,
    CheckpointWriter,
    Snapshot,
    checkpoints_of,
    export_checkpoint,
    resume_point,
    rng_payload,
    to_host,
)
from rf_notebook.trainers import TRAINERS

logger = logging.getLogger(__name__)

_versions.check()  # the TRL / transformers internals this backend relies on are those of the supported versions

# TRL 1.16 reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecates: nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)

__all__ = ["TorchBackend"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _mid_generation(trainer: Any) -> bool:
    """Whether the trainer's next micro-step reuses buffered generations (TRL regenerates every
    steps_per_generation x num_iterations micro-steps, or when the buffer is empty)."""
    buffered = getattr(trainer, "_buffered_inputs", None)
    if buffered is None:
        return False
    every = trainer.args.steps_per_generation * getattr(trainer, "num_iterations", 1)
    return trainer._step % every != 0


class _NoCollection:
    """Stands in for the `gc` module where Accelerate frees memory: `collect` does nothing."""

    @staticmethod
    def collect(*args: Any) -> int:
        return 0


def _skip_collection(accelerator: Any) -> None:
    """transformers' `train()` begins with `accelerator.free_memory()`, which runs a full `gc.collect()`: ~0.3 s per
    run here, walking every live run's trainer, so its cost per run grew with the number of runs (and it made a
    step at 64 runs 6.5% slower than at 4). The engine collects itself when memory is wanted (`discard`); this
    trainer's call keeps everything else it does (dropping the accelerator's references, emptying the device
    cache) without the collection."""
    from accelerate.utils import memory

    free = accelerator.free_memory

    def free_memory(*objects: Any) -> Any:
        collector, memory.gc = memory.gc, _NoCollection
        try:
            return free(*objects)
        finally:
            memory.gc = collector

    if getattr(memory, "gc", None) is gc:  # an Accelerate that frees memory some other way is left alone
        accelerator.free_memory = free_memory


def _count_parameters_once(trainer: Any, base: SharedBase) -> None:
    """transformers' FLOP estimate counts the model's parameters at every step, a walk of the whole module tree (~5%
    of a demo-model step). While a run trains, the tree holds the base and that run's adapter alone (the others are
    parked), so the count is the same at every step of that run: counted at its first step, then reused. Where
    adapters are not parked, a trainer class that estimates its own way, or a model without `num_parameters`, it is
    transformers' own as before."""
    from transformers import Trainer

    if not base.adapters.parking or type(trainer).floating_point_ops is not Trainer.floating_point_ops:
        return
    count: list[int] = []

    def floating_point_ops(inputs: Any) -> int:
        model = trainer.model
        main_input = getattr(model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(model, "num_parameters") or not base.adapters.parking:
            return Trainer.floating_point_ops(trainer, inputs)  # (a later run's wrappers may stop the parking)
        if not count:
            count.append(model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * count[0]

    trainer.floating_point_ops = floating_point_ops  # an instance attribute: the class and other trainers untouched


class TorchBackend:
    """Builds and drives the runs of one experiment; every method runs on the scheduler thread."""

    def __init__(
        self,
        create_model_fn: Callable[[Any], tuple[Any, Any]],
        train_dataset: Any,
        eval_dataset: Any,
        num_chunks: int,
        on_nonfinite: str = "fail",
        formatted: Mapping[int, tuple[Any, Any]] | None = None,
        resume_points: Mapping[int, tuple[int, str]] | None = None,
        fuse: bool | str = False,
        seed: int = 0,
    ):
        self.on_nonfinite = on_nonfinite
        self.seed = seed  # the experiment's: which rows the anneal probes train on at each rung
        self.fuse = fuse  # runs on one base share their forward and backward passes (`_fused`); "auto": where it pays
        self.fused_forwards = 0  # forwards over more than one run's rows
        self.memory_splits = 0  # fused passes cut short to keep a group's activations within `_fused.MEMORY_SHARE`
        self._token_bytes: dict[SharedBase, tuple[float, int]] = {}  # a base's activations per token (`_fused`)
        self.fusion: dict[int, str] = {}  # run id -> "fused", or why it takes turns
        self._fusable: set[int] = set()  # runs that may train in fused steps
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        # Data sets already put through each distinct formatting_func (once, not once per run), by function.
        self.formatted = dict(formatted or {})
        self.num_chunks = num_chunks
        self.should_yield: Callable[[], bool] = lambda: False
        self.record: Callable[[RunSlot, int, dict[str, float]], None] = lambda slot, step, values: None
        self.warn: Callable[[RunSlot, str], None] = lambda slot, message: None
        self._bases = Bases(create_model_fn)
        self._runs: dict[int, PreparedRun] = {}
        self._unloaded: dict[int, PreparedRun] = {}  # runs whose adapter is no longer on the model
        self.resume_points = dict(resume_points or {})  # run id -> (step, checkpoint) for a resumed experiment
        self._writer = CheckpointWriter()  # chunk-end checkpoints are written off the training thread
        self._garbage = False  # a discarded trainer waits for a garbage collection (see `discard`)
        self._deferred: set[int] = set()  # runs whose trainer is built at their first turn (`materialize`)

    def connect(
        self,
        should_yield: Callable[[], bool],
        record: Callable[[RunSlot, int, dict], None],
        warn: Callable[[RunSlot, str], None],
    ) -> None:
        """Called by the engine: how a training run asks whether to yield, where its metrics go, and where what
        went wrong without ending it goes."""
        self.should_yield, self.record, self.warn = should_yield, record, warn

    # -- building ----------------------------------------------------------------------------------------------

    def setup(self, runs: list[PreparedRun], unloaded: list[PreparedRun] = ()) -> dict[int, RunSlot]:
        """Load each distinct base once, then build every run of `runs`; a run whose data set an earlier run's
        trainer prepared in the same way (SFT runs that differ only in optimization arguments) gets its adapter and
        chunk plan now and its trainer at its first turn (`build(defer=True)`). What a trainer's constructor refuses
        is raised here, before anything trains: a deferred run's constructor sees the arguments of one already
        built, but for those that only shape optimization. The `unloaded` ones (stopped, on disk) are only
        remembered, for a later `reload` or `export`."""
        self._unloaded.update({run.run_id: run for run in unloaded})
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bar()  # one set of bars per run's data preparation is noise
        try:
            peers = collections.Counter(self._bases.get(run.spec.model_config) for run in runs)
            return {
                run.run_id: self.build(
                    run,
                    resume_from=self.resume_points.get(run.run_id),
                    defer=True,
                    peers=peers[self._bases.get(run.spec.model_config)],
                )
                for run in runs
            }
        finally:
            if bars:
                datasets.enable_progress_bar()

    def base_of(self, run_id: int) -> SharedBase:
        return self._bases.loaded(self._runs[run_id].spec.model_config)

    def build(
        self,
        run: PreparedRun,
        warm_from: RunSlot | None = None,
        resume_from: tuple[int, str] | None = None,
        defer: bool = False,
        peers: int = 0,
    ) -> RunSlot:
        """Add the run's adapter and build its trainer. With `warm_from`, the run continues that run's state; with
        `resume_from` (step, checkpoint folder), the state written there (a resumed experiment). With `defer`, a run
        starting from scratch whose data set is already prepared (so its chunk plan is known) gets its trainer at
        its first turn (`materialize`): the first run trains sooner, and a run stopped before its turn never builds
        one. Its adapter is added now, so that it can be exported, cloned or deleted like any run. Runs that may fuse
        are built now (a deferred run joins fused steps once built), unless `peers` (the runs set up on its base,
        itself included) are too few to fuse under fuse="auto"."""
        if warm_from is not None:
            self.materialize(warm_from)  # a warm clone continues its parent's state as built
        self._collect()  # discarded trainers first: this run's memory comes next
        base = self._bases.get(run.spec.model_config)
        unloaded = self._unloaded.pop(run.run_id, None)
        self._runs[run.run_id] = run
        added = False
        try:
            base.add_adapter(run.adapter, run.lora, seed=run.args.seed)
            added = True
            turns = "fuse=False" if not self.fuse else None  # known before its trainer is built
            if self.fuse == "auto":
                turns = _fused.auto_reason(run.args, base.model)
                if turns is None and peers and peers < _fused.AUTO_MIN_GROUP:  # too few runs on its base to fuse
                    turns = _fused.AUTO_WAITING
            if defer and warm_from is None and resume_from is None and turns is not None:
                rows = self._prepared_rows(run, base)
                if rows is not None:  # known without building: the trainer waits for the run's first turn
                    slot = RunSlot(run.run_id, run.adapter, should_yield=self.should_yield)
                    slot.plan = self._plan(run, rows)
                    self._fusable.discard(run.run_id)
                    self.fusion = {**self.fusion, run.run_id: turns}
                    self._deferred.add(run.run_id)
                    return slot
            return self._build_slot(run, base, warm_from, resume_from)
        except BaseException:  # nothing half-built stays: an export must never find a fresh, untrained adapter
            if added:
                base.remove_adapter(run.adapter)
            del self._runs[run.run_id]
            if unloaded is not None:
                self._unloaded[run.run_id] = unloaded
            raise

    def materialize(self, slot: RunSlot) -> None:
        """Build the trainer of a run whose build deferred it (`build(defer=True)`), into its slot; nothing for a run
        already built. Its chunk plan, known since it was built, must come out the same."""
        if slot.run_id not in self._deferred:
            return
        self._collect()
        planned = slot.plan
        try:
            self._build_slot(self._runs[slot.run_id], self.base_of(slot.run_id), None, None, slot)
            if slot.plan != planned:  # a bug: the rungs the engine scheduled by would not be the trainer's
                raise RuntimeError(
                    f"run {slot.run_id}'s chunk plan changed when its trainer was built: {planned} vs {slot.plan}"
                )
        except BaseException:  # left unbuilt, as it was: its own turn builds it again (and fails the run if it must)
            slot.close()
            slot.plan, slot.patches, slot.state = planned, None, None
            raise
        self._deferred.discard(slot.run_id)

    def _data(self, run: PreparedRun) -> tuple[Any, Any, RFModelConfig]:
        """The run's train and eval sets, already put through its formatting_func (then its config has none)."""
        model_config = run.spec.model_config
        train, evl = self.train_dataset, self.eval_dataset
        if model_config.formatting_func is not None and id(model_config.formatting_func) in self.formatted:
            train, evl = self.formatted[id(model_config.formatting_func)]
            model_config = model_config.replace(formatting_func=None)
        return train, evl, model_config

    def _prepared_rows(self, run: PreparedRun, base: SharedBase) -> int | None:
        train, evl, model_config = self._data(run)
        return TRAINERS[run.spec.trainer_type].prepared_rows(
            base.tokenizer, run.args, train, evl, model_config.formatting_func, base.prepared
        )

    def _plan(self, run: PreparedRun, rows: int) -> ChunkPlan:
        trainer, args = TRAINERS[run.spec.trainer_type], run.args
        return chunk_plan(
            rows,
            args.per_device_train_batch_size,
            self.num_chunks,
            max_steps=args.max_steps,
            num_train_epochs=args.num_train_epochs,
            per_epoch=trainer.steps_per_epoch(rows, args),
            rows_per_step=trainer.rows_per_step(args),
            align=trainer.rung_multiple(args),
        )

    def _build_slot(
        self,
        run: PreparedRun,
        base: SharedBase,
        warm_from: RunSlot | None,
        resume_from: tuple[int, str] | None,
        slot: RunSlot | None = None,
    ) -> RunSlot:
        base.pristine.apply(base.modules)  # each trainer patches the pristine model, never another's patch
        # Its constructor sees the run's own adapter as the active one, as right after it was added (TRL casts the
        # trainable parameters of a quantized base's adapter to bfloat16): also when the trainer is built later.
        base.use(run.adapter)
        if slot is None:
            slot = RunSlot(run.run_id, run.adapter, should_yield=self.should_yield)
        callbacks = slot.callbacks(self.record)
        if self.on_nonfinite == "fail":
            callbacks.append(FailOnNonFinite())
        # A warm clone starts from its parent's optimizer and LR schedule, also when it resumes from its warm start
        # (a restart or a reload before its first chunk end): its own learning rate and weight decay go in on top.
        if warm_from is not None or (resume_from is not None and Path(resume_from[1]).name == WARM_START):
            callbacks.append(ApplyOverrides(run.args.learning_rate, run.args.weight_decay))
        trainer = TRAINERS[run.spec.trainer_type]
        tokenizer = base.tokenizer_for(run.args)
        train, evl, model_config = self._data(run)
        if model_config.compute_metrics is not None:  # one that raises costs its metrics, not the run
            metrics = TolerantMetrics(model_config.compute_metrics, lambda text: self.warn(slot, text), run.spec.name)
            model_config = model_config.replace(compute_metrics=metrics)
        if model_config.generation_config is not None and model_config.compute_metrics is not None:
            callbacks.append(GenerationMetrics(slot, tokenizer, evl, model_config, run.args, self.record))
            model_config = model_config.replace(compute_metrics=None)  # not the trainer's logits-based one
        try:
            slot.trainer = trainer.build_trainer(
                base.peft,
                tokenizer,
                run.args,
                train,
                evl,
                model_config,
                callbacks,
                load_reference=self._bases.reference,
                prepared=base.prepared,
            )
        finally:  # what its constructor set on the shared tokenizer and model config is its own
            slot.config_ids = base.settle_build(run.spec.name)
        for noisy in (PrinterCallback, ProgressCallback):  # they print from the background thread into any cell
            slot.trainer.remove_callback(noisy)
        _skip_collection(slot.trainer.accelerator)
        _count_parameters_once(slot.trainer, base)
        reason = _fused.fusable_reason(slot.trainer, base, slot.adapter) if self.fuse else "fuse=False"
        if reason is None and self.fuse == "auto":
            reason = _fused.auto_reason(slot.trainer.args, base.model)
        if reason is None:
            self._fusable.add(run.run_id)
            _fused.install_backward(slot, slot.trainer.accelerator)
        else:
            self._fusable.discard(run.run_id)
        # what stats() reports ("fused" once it has: under "auto" a fusable run may take turns until then); the dict is
        # replaced, never changed, so any thread may read it
        waiting = _fused.AUTO_WAITING if self.fuse == "auto" and self.fusion.get(run.run_id) != "fused" else "fused"
        self.fusion = {**self.fusion, run.run_id: reason or waiting}
        slot.patches = Patches.capture(base.modules)
        slot.state = _process_state.capture()  # what a lone trainer would hold when its train() starts
        slot.plan = self._plan(run, len(slot.trainer.train_dataset))
        if warm_from is not None:
            slot.resume_from = self._checkpoint(warm_from, run)
            slot.state = warm_from.state
            slot.step = warm_from.step
        elif resume_from is not None:  # its random state is read back from the folder when train() starts
            slot.step, slot.resume_from = resume_from[0], os.fspath(resume_from[1])
        if slot.resume_from is not None:
            checkpoints.restore_counters(slot.trainer, slot.resume_from)
        return slot

    def _checkpoint(self, parent: RunSlot, run: PreparedRun) -> str | None:
        """The parent's state where the clone's `train(resume_from_checkpoint=...)` reads it. A parent that has not
        trained since it was built is still the state it was built from: a copy of that (None: from scratch)."""
        path = Path(run.args.output_dir) / WARM_START
        if not parent.started:
            if parent.resume_from is None:
                return None
            self.wait_for_writes()  # its checkpoint may still be being written
            shutil.copytree(parent.resume_from, path, dirs_exist_ok=True)
            return os.fspath(path)
        self._write_state(parent, path)
        return os.fspath(path)

    def _snapshot(self, slot: RunSlot) -> Snapshot:
        """The run's whole state now (adapter, optimizer, LR schedule, trainer state, random state, loss scale,
        buffered generations), copied off the live run: what its checkpoint holds."""
        import copy

        if slot.run_id not in self._runs:
            raise ValueError(f"run {slot.run_id} has no adapter any more (deleted)")
        run, base, trainer = self._runs[slot.run_id], self.base_of(slot.run_id), slot.trainer
        config = dataclasses.replace(base.peft.peft_config[run.adapter])
        config.base_model_name_or_path = str(run.spec.model_config.model_name)
        scaler = getattr(trainer.accelerator, "scaler", None)
        tensors = to_host(
            {
                "adapter": base.adapter_weights(run.adapter, hub_check=False),
                "optimizer": trainer.optimizer.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
                "buffer": trainer._buffered_inputs if _mid_generation(trainer) else None,
            }
        )
        return Snapshot(
            adapter=tensors["adapter"],
            adapter_config=config,
            optimizer=tensors["optimizer"],
            scheduler=copy.deepcopy(trainer.lr_scheduler.state_dict()),
            trainer_state=json.dumps(dataclasses.asdict(trainer.state), indent=2, sort_keys=True) + "\n",
            rng=rng_payload(slot.resume_state(), trainer.args),
            scaler=tensors["scaler"],
            counters={k: getattr(trainer, k) for k in TRAINER_COUNTERS if hasattr(trainer, k)},
            generation_buffer=tensors["buffer"],
        )

    def _write_state(self, slot: RunSlot, path: Path) -> None:
        """Write a run's state now, on this thread, in transformers' checkpoint layout (a warm start)."""
        checkpoints.write_snapshot(checkpoints.encode(self._snapshot(slot)), path)

    def checkpoint(self, slot: RunSlot, wait: bool = False) -> Path:
        """Checkpoint `slot` at its current step as `<output_dir>/checkpoints/step-<N>` (complete or absent; the
        run's older checkpoints are removed). The training thread takes the snapshot and serializes it; the
        checkpoint writer thread writes the files, unless `wait` (a run about to leave memory): then they are on
        disk when this returns. A failed earlier write is raised here (OSError)."""
        folder, step = checkpoints_of(slot.trainer.args.output_dir), slot.step
        try:  # here, not on the writer thread (see `encode`)
            snapshot = checkpoints.encode(self._snapshot(slot))
        except OSError:
            raise
        except Exception as exc:  # out of memory, a bug: reported like a failed write (the experiment pauses)
            logger.exception("serializing run %s's checkpoint failed", slot.run_id)
            raise OSError(f"serializing the checkpoint failed: {exc!r}") from exc
        if wait:
            self._writer.flush()
            return checkpoints.replace_checkpoint(snapshot, folder, step)
        self._writer.submit(lambda: checkpoints.replace_checkpoint(snapshot, folder, step))
        return folder / f"step-{step}"

    def flush(self) -> None:
        """Wait for the checkpoints being written; raise a failed write (the engine pauses the experiment)."""
        self._writer.flush()

    def wait_for_writes(self) -> None:
        """Wait for the checkpoints being written, before reading them (from any thread); a failed write is left
        for the training thread to raise."""
        self._writer.wait()

    def caller_idle(self) -> None:
        """Free the calling thread's idle OpenMP pool: while it exists, the scheduler thread's team sleeps between ops
        instead of spinning (see `_openmp`)."""
        _openmp.release_thread_pool()

    # -- driving -----------------------------------------------------------------------------------------------

    def activate(self, slot: RunSlot) -> None:
        """Put back what this run's trainer expects of the shared model and the process (building its trainer first,
        if that waited for this turn)."""
        self.materialize(slot)
        base = self.base_of(slot.run_id)
        base.use(slot.adapter)
        base.use_config_ids(slot.config_ids)
        slot.patches.apply(base.modules)
        _process_state.restore(slot.state)

    def report(self, stats: dict[str, Any]) -> dict[str, Any]:
        """`Experiment.stats()`: the engine's `stats`, and how many forwards were shared, which runs took part."""
        return {
            **stats,
            "fused_forwards": self.fused_forwards,
            "memory_splits": self.memory_splits,
            "fusion": dict(self.fusion),
        }

    def fusion_partners(self, slot: RunSlot, candidates: list[RunSlot]) -> list[RunSlot]:
        """`slot` and the runs of `candidates` that train in fused steps with it (same base, all fusable). More than
        `MAX_GROUP` such runs are split into groups of even size (9: 5 and 4, not 8 and one alone)."""
        if slot.run_id not in self._fusable:
            return [slot]
        base = self.base_of(slot.run_id)
        partners = [c for c in candidates if c.run_id in self._fusable and self.base_of(c.run_id) is base]
        fusable = 1 + len(partners)
        size = math.ceil(fusable / math.ceil(fusable / _fused.MAX_GROUP))
        group = [slot, *partners[: size - 1]]
        if self.fuse == "auto" and len(group) < _fused.AUTO_MIN_GROUP:  # too few to gain: they take turns
            return [slot]
        return group

    def train_together(self, slots: list[RunSlot], pause_at: Mapping[int, int]) -> dict[int, BaseException]:
        """Train `slots` in fused steps, each until its step `pause_at[run_id]` (or a command, or its end).
        Returns the runs that failed, with why; the others are suspended as after `advance`."""
        group = _fused.FusedGroup(self.base_of(slots[0].run_id), slots, self._switch, self._token_bytes)
        first: dict[RunSlot, Any] = {}
        with group:
            for slot in slots:
                try:
                    self.activate(slot)
                    try:
                        first[slot] = slot.advance(pause_at[slot.run_id])
                    finally:
                        self.suspended(slot)
                except Exception as exc:
                    group.failed[slot.run_id] = exc
            group.run(first)
        self.fused_forwards += group.fused_forwards
        self.memory_splits += group.memory_splits
        if any(self.fusion.get(run_id) != "fused" for run_id in group.fused_runs):  # under "auto": waiting until now
            self.fusion = {**self.fusion, **{run_id: "fused" for run_id in group.fused_runs}}
        return group.failed

    def _switch(self, slot: RunSlot, value: Any, after_forward: bool = False) -> Any:
        if after_forward:  # from its backbone's output to its backward: TRL's LM head and loss, no walk of the tree
            base = self.base_of(slot.run_id)
            base.use_config_ids(slot.config_ids)
            slot.patches.apply(base.modules)
            _process_state.restore(slot.state)
        else:
            self.activate(slot)
        try:
            return slot.resume(value)
        finally:
            self.suspended(slot)

    def suspended(self, slot: RunSlot) -> None:
        """After the run hands back control: keep the forward patches its train() may have installed
        (Accelerate's autocast wrapper under mixed precision), and the token ids in the model's config (transformers'
        train() aligns them with the run's tokenizer)."""
        base = self.base_of(slot.run_id)
        slot.patches = Patches.capture(base.modules)
        slot.config_ids = base.current_config_ids()

    def evaluate(self, slot: RunSlot) -> None:
        """Evaluate at a rung, unless the trainer's own `eval_strategy` just did at this very step."""
        if self.eval_dataset is not None and slot.trainer is not None and slot.evaluated_at != slot.step:
            slot.trainer.evaluate()

    def probe(self, slot: RunSlot, steps: int, rung: int) -> float | None:
        """The run's eval loss after an anneal probe of `steps` optimizer steps (`_probe`), the run left exactly as
        it was; None without an eval data set. The caller has activated the run."""
        if self.eval_dataset is None or slot.trainer is None:
            return None
        trainer, args = slot.trainer, slot.trainer.args
        params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
        count = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
        rows = _probe.probe_rows(len(trainer.train_dataset), count, self.seed, rung)
        return _probe.anneal_probe(trainer, params, steps, rows)

    def unload(self, slot: RunSlot) -> None:
        """Write a stopped run to its checkpoint and free everything it holds (adapter, trainer, optimizer); the run
        stays known, and `reload` rebuilds it exactly from there. A run that has not trained since it was built is
        still exactly what it was built from (its checkpoint, its warm start, or nothing): nothing is written."""
        if slot.started:
            self.checkpoint(slot, wait=True)  # on disk before the run leaves memory
        self._discard(slot, keep_adapter=False)  # collected by `collect()`, once for every run unloaded together

    def reload(self, run: PreparedRun) -> RunSlot:
        """Rebuild an unloaded run from its newest checkpoint, else the warm start it was cloned with, else from
        scratch (it stopped before its first chunk end)."""
        self.wait_for_writes()
        return self.build(run, resume_from=resume_point(run.args.output_dir))

    def forget(self, run_id: int) -> None:
        """A deleted run: nothing of it stays in memory (its last checkpoint stays on disk)."""
        self._unloaded.pop(run_id, None)

    def discard(self, slot: RunSlot, keep_adapter: bool) -> None:
        """Unwind the run's trainer (freeing its optimizer); with `keep_adapter=False` remove its adapter too.

        The trainer's reference cycles need a full garbage collection (~0.3 s with a loaded model in the process).
        A deleted run, or any run on a GPU, is collected at once; a finished or failed run's trainer on a CPU waits
        until memory is wanted next (a run built) or the experiment ends, so that the runs finishing in the same
        last chunk cost one collection, not one each. Runs unloaded together (`unload`) are collected together,
        by the engine's `collect()` after the last of them (the policy stopping 10 of 16 runs cost 10 collections,
        3 s of a 17 s sweep)."""
        self._discard(slot, keep_adapter)
        if not keep_adapter or _cuda():
            self._collect()

    def _discard(self, slot: RunSlot, keep_adapter: bool) -> None:
        slot.close()
        self._deferred.discard(slot.run_id)  # never built: nothing to unwind
        if not keep_adapter:
            self.base_of(slot.run_id).remove_adapter(slot.adapter)
            self._unloaded[slot.run_id] = self._runs.pop(slot.run_id)
        self._garbage = True

    def collect(self) -> None:
        """Free the memory of the runs unloaded since the last collection now (one garbage collection)."""
        self._collect()

    def _collect(self) -> None:
        if self._garbage:
            self._garbage = False
            gc.collect()
            if _cuda():
                import torch

                torch.cuda.empty_cache()

    # -- taking results away -----------------------------------------------------------------------------------

    def export(self, run_id: int, path: str, record: Mapping[str, Any]) -> str:
        if run_id in self._unloaded:  # written to its checkpoint when it was unloaded or deleted
            self.wait_for_writes()
            return os.fspath(export_checkpoint(self._unloaded[run_id].args.output_dir, path, record))
        out = Path(path)
        self._write_adapter(run_id, out)
        (out / "rf_config.json").write_text(json.dumps(record, indent=2, default=str))
        return os.fspath(out)

    def _write_adapter(self, run_id: int, out: Path) -> None:
        from safetensors.torch import save_file

        if run_id not in self._runs:
            raise ValueError(f"run {run_id} has no adapter any more (deleted)")
        run, base = self._runs[run_id], self.base_of(run_id)
        out.mkdir(parents=True, exist_ok=True)
        weights = base.adapter_weights(run.adapter)
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        save_file(tensors, os.fspath(out / "adapter_model.safetensors"))
        config = dataclasses.replace(base.peft.peft_config[run.adapter])
        config.base_model_name_or_path = str(run.spec.model_config.model_name)
        config.save_pretrained(os.fspath(out))

    def release(self) -> None:
        """Free every model, adapter and trainer; the checkpoints being written are finished first (a failed one
        is raised, after everything is freed)."""
        try:
            self._writer.close()
        finally:
            self._release_models()

    def _release_models(self) -> None:
        self._bases.clear()
        self._runs.clear()
        self._unloaded.clear()
        self._deferred.clear()
        self._token_bytes.clear()
        gc.collect()
