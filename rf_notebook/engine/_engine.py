"""The scheduler thread: owns every base model, adapter and trainer, and trains runs chunk by chunk.

    engine = Engine(store, prepared_runs, create_model_fn, train, eval, num_chunks)
    engine.start()        # returns once every base is loaded and every trainer built (or raises why not)
    engine.submit(Export(run_id=1, path="out"))  # any thread; the scheduler thread acts on it
    engine.shutdown()

Loop: drain commands -> pick the least-advanced runnable run -> put back its adapter, forward patch and
random state -> let its trainer run to the next rung -> evaluate -> record. A run that raises is marked
failed and the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from transformers.trainer_callback import PrinterCallback, ProgressCallback

from rf_notebook import scheduler
from rf_notebook.chunking import chunk_plan
from rf_notebook.commands import Command, CommandQueue, Export, Shutdown
from rf_notebook.configs import RunSpec
from rf_notebook.engine import _process_state
from rf_notebook.engine._slot import Patches, RunSlot
from rf_notebook.store import RunStatus, Store
from rf_notebook.trainers import TRAINERS

logger = logging.getLogger(__name__)

__all__ = ["Engine", "PreparedRun"]


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    """A run validated on the caller's thread: its spec and real TRL / PEFT config objects."""

    run_id: int
    spec: RunSpec
    args: Any  # trl.SFTConfig
    lora: Any  # peft.LoraConfig
    config: Mapping[str, Any]  # JSON-friendly resolved config, as stored

    @property
    def adapter(self) -> str:
        return f"run{self.run_id}"


class _Base:
    """One resident base model and the PEFT wrapper that carries every run's adapter."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.peft: Any = None
        self.pristine: Patches | None = None

    @property
    def modules(self) -> list[Any]:
        return [self.peft, self.peft.base_model, self.peft.get_base_model()]

    def add_adapter(self, name: str, lora: Any, seed: int) -> None:
        """Add a freshly initialised adapter, seeded as `SFTTrainer(peft_config=...)` seeds its own."""
        from peft import get_peft_model
        from transformers import set_seed

        set_seed(seed)
        if self.peft is None:
            self.peft = get_peft_model(self.model, lora, adapter_name=name)
            self.pristine = Patches.capture(self.modules)
        else:
            self.peft.add_adapter(name, lora)
        self.peft.set_adapter(name)


class Engine:
    """Runs an experiment's training in one background thread. See the module docstring."""

    def __init__(
        self,
        store: Store,
        runs: list[PreparedRun],
        create_model_fn: Callable[[Any], tuple[Any, Any]],
        train_dataset: Any,
        eval_dataset: Any,
        num_chunks: int,
    ):
        self.store, self.runs = store, {r.run_id: r for r in runs}
        self.create_model_fn = create_model_fn
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.num_chunks = num_chunks
        self.commands: CommandQueue = CommandQueue()
        self._slots: dict[int, RunSlot] = {}
        self._bases: dict[tuple[str, str], _Base] = {}
        self._ready = threading.Event()
        self._setup_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Where the scheduler thread's time went: setup, training, evaluation, and switching between runs
        # (activating a run's adapter, patches and process state; recording its progress).
        self.stats = {"setup_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "switch_s": 0.0, "switches": 0}

    # -- any thread --------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread; return once setup is done, re-raising any setup error here. Idempotent."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="rf_notebook-scheduler", daemon=True)
            self._thread.start()
        self._ready.wait()
        if self._setup_error is not None:
            self._thread.join()
            raise self._setup_error

    def submit(self, command: Command) -> Command:
        if not self.alive:
            command.reply.set_exception(RuntimeError("the experiment's scheduler thread is not running"))
        else:
            self.commands.put(command)
        return command

    def shutdown(self, timeout: float | None = None) -> None:
        if self.alive:
            self.submit(Shutdown())
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- scheduler thread --------------------------------------------------------------------------------------

    def _main(self) -> None:
        start = time.perf_counter()
        try:
            self._setup()
            self.stats["setup_s"] = time.perf_counter() - start
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

    def _setup(self) -> None:
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bar()  # one set of bars per run's data preparation is noise
        try:
            self._build_all()
        finally:
            if bars:
                datasets.enable_progress_bar()

    def _build_all(self) -> None:
        for run in self.runs.values():
            key = run.spec.model_config.base_key()
            if key not in self._bases:
                self._bases[key] = self._load_base(run.spec.model_config)
        for run in self.runs.values():
            self._slots[run.run_id] = self._build_slot(run)

    def _load_base(self, model_config: Any) -> _Base:
        """Call `create_model_fn` once for a distinct base and check that it returned (model, tokenizer)."""
        loaded = self.create_model_fn(model_config)
        if not (isinstance(loaded, tuple) and len(loaded) == 2):
            raise TypeError(
                f"create_model_fn returned {type(loaded).__name__}, but must return a (model, tokenizer) tuple"
            )
        model, tokenizer = loaded
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"create_model_fn returned a {type(model).__name__} as the model, but must return a "
                "transformers PreTrainedModel (e.g. from AutoModelForCausalLM.from_pretrained)"
            )
        if not callable(tokenizer) or not hasattr(tokenizer, "pad_token_id"):
            raise TypeError(
                f"create_model_fn returned a {type(tokenizer).__name__} as the tokenizer, but must return a "
                "transformers tokenizer (e.g. from AutoTokenizer.from_pretrained)"
            )
        if getattr(model, "peft_config", None):
            raise TypeError("create_model_fn returned a model with PEFT adapters; return the plain base model")
        return _Base(model, tokenizer)

    def _build_slot(self, run: PreparedRun) -> RunSlot:
        base = self._bases[run.spec.model_config.base_key()]
        base.add_adapter(run.adapter, run.lora, seed=run.args.seed)
        base.pristine.apply(base.modules)  # each trainer patches the pristine model, never another's patch
        mc = run.spec.model_config
        slot = RunSlot(run.run_id, run.adapter)
        slot.trainer = TRAINERS[run.spec.trainer_type].build_trainer(
            base.peft,
            base.tokenizer,
            run.args,
            self.train_dataset,
            self.eval_dataset,
            mc.compute_metrics,
            mc.formatting_func,
            slot.callbacks(self._record),
        )
        for noisy in (PrinterCallback, ProgressCallback):  # they print from the background thread into any cell
            slot.trainer.remove_callback(noisy)
        slot.patches = Patches.capture(base.modules)
        slot.state = _process_state.capture()  # what a lone trainer would hold when its train() starts
        args = run.args
        slot.plan = chunk_plan(
            len(slot.trainer.train_dataset),
            args.per_device_train_batch_size,
            self.num_chunks,
            grad_accum=args.gradient_accumulation_steps,
            max_steps=args.max_steps,
            num_train_epochs=args.num_train_epochs,
            drop_last=args.dataloader_drop_last,
        )
        self.store.update_run(run.run_id, total_steps=slot.plan.total_steps, chunks_total=len(slot.plan.rungs))
        return slot

    def _activate(self, slot: RunSlot) -> _Base:
        """Put back what this run's trainer expects of the shared model and the process; return its base."""
        base = self._bases[self.runs[slot.run_id].spec.model_config.base_key()]
        base.peft.set_adapter(slot.adapter)
        slot.patches.apply(base.modules)
        _process_state.restore(slot.state)
        return base

    def _loop(self) -> None:
        while not self._stopping:
            runnable = {rid: s.plan.rungs_done(s.step) for rid, s in self._slots.items() if self._runnable(rid)}
            self._drain(block=not runnable)
            if self._stopping:
                break
            run_id = scheduler.least_progress_first(
                {rid: done for rid, done in runnable.items() if self._runnable(rid)}
            )
            if run_id is not None:
                self._train_chunk(self._slots[run_id])

    def _runnable(self, run_id: int) -> bool:
        return not self.store.run(run_id).status.is_terminal and self._slots[run_id].trainer is not None

    def _train_chunk(self, slot: RunSlot) -> None:
        t0 = time.perf_counter()
        rung = slot.plan.next_rung(slot.step)
        self.store.update_run(slot.run_id, status=RunStatus.TRAINING)
        try:
            base = self._activate(slot)
            t1 = time.perf_counter()
            slot.advance(rung.step)
            t2 = time.perf_counter()
            # train() may patch forwards itself (Accelerate's autocast wrapper under mixed precision): keep them
            slot.patches = Patches.capture(base.modules)
            if self.eval_dataset is not None:
                slot.trainer.evaluate()
            t3 = time.perf_counter()
        except Exception as exc:
            logger.exception("run %d failed", slot.run_id)
            self.store.update_run(slot.run_id, status=RunStatus.FAILED, error=_describe(exc))
            slot.close()
            return
        self.store.update_run(
            slot.run_id,
            step=slot.step,
            chunks_done=slot.plan.rungs_done(slot.step),
            status=RunStatus.FINISHED if slot.finished else RunStatus.QUEUED,
        )
        if slot.finished:
            slot.close()  # frees the trainer and its optimizer; the adapter stays on the base for export
        self.stats["switches"] += 1
        self.stats["train_s"] += t2 - t1
        self.stats["eval_s"] += t3 - t2
        self.stats["switch_s"] += (t1 - t0) + (time.perf_counter() - t3)

    def _record(self, slot: RunSlot, step: int, values: dict[str, float]) -> None:
        chunk = slot.plan.rungs_done(step - 1) + 1 if slot.plan is not None else 0
        self.store.log_metrics(slot.run_id, step, chunk, values)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                command = self.commands.get(block=block, timeout=None)
            except queue.Empty:
                return
            block = False
            try:
                command.reply.set_result(self._handle(command))
            except Exception as exc:
                command.reply.set_exception(exc)

    def _handle(self, command: Command) -> Any:
        if isinstance(command, Shutdown):
            self._stopping = True
            return None
        if isinstance(command, Export):
            return self._export(command.run_id, command.path)
        raise TypeError(f"unknown command {command!r}")

    def _export(self, run_id: int, path: str) -> str:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        run = self.runs[run_id]
        base = self._bases[run.spec.model_config.base_key()]
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        weights = get_peft_model_state_dict(base.peft, adapter_name=run.adapter)
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        save_file(tensors, os.fspath(out / "adapter_model.safetensors"))
        config = base.peft.peft_config[run.adapter]
        config.base_model_name_or_path = str(run.spec.model_config.model_name)
        config.save_pretrained(os.fspath(out))
        record = self.store.run(run_id)
        (out / "rf_config.json").write_text(
            json.dumps({"run_id": run_id, "name": record.name, "config": record.config}, indent=2, default=str)
        )
        return os.fspath(out)

    def _release(self) -> None:
        for slot in self._slots.values():
            try:
                slot.close()
            except Exception:  # unwinding a broken trainer must not hide the real error
                logger.exception("closing run %d", slot.run_id)
        self._slots.clear()
        self._bases.clear()
        self.store.notify()


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
