"""The engine's torch side: shared base models, one LoRA adapter and one TRL trainer per run.

`TorchBackend` does what the scheduler loop (`_engine.Engine`) asks, always on the scheduler thread: build a
run (adapter + trainer, or a warm-started clone of another run), put back a run's state before it trains,
evaluate it, discard it, export its adapter. The loop itself knows nothing of torch.
"""

from __future__ import annotations

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

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from rf_notebook.chunking import chunk_plan
from rf_notebook.configs import RunSpec
from rf_notebook.engine import _checkpoints, _process_state
from rf_notebook.engine._checkpoints import GENERATION_BUFFER as _GENERATION_BUFFER
from rf_notebook.engine._checkpoints import CheckpointWriter, Snapshot, to_host
from rf_notebook.engine._slot import Patches, RunSlot
from rf_notebook.store import RunRecord
from rf_notebook.trainers import TRAINERS

logger = logging.getLogger(__name__)

# TRL 1.16 reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecates: nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)

__all__ = ["PreparedRun", "TorchBackend"]


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

    def record(self) -> RunRecord:
        """The store's first record of this run (queued)."""
        return RunRecord(
            self.run_id,
            self.spec.name,
            self.spec.trainer_type,
            self.config,
            params=dict(self.spec.params),
            rows_per_step=float(TRAINERS[self.spec.trainer_type].rows_per_step(self.args)),
        )


class _Base:
    """One resident base model and the PEFT wrapper that carries every run's adapter."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.peft: Any = None
        self.pristine: Patches | None = None
        # TRL's constructor and transformers' train() each register a hook that makes the embedding output require
        # grad (activation checkpointing with adapters), keeping no handle on the previous ones: one per call, so
        # two per run, all run at every forward. On the shared base the second call replaces the first.
        cls = type(model)
        if hasattr(cls, "enable_input_require_grads"):

            def enable_input_require_grads() -> None:
                cls.disable_input_require_grads(model)
                cls.enable_input_require_grads(model)

            model.enable_input_require_grads = enable_input_require_grads

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

    def remove_adapter(self, name: str) -> None:
        """Delete a run's adapter (another one becomes active first; each run sets its own before training)."""
        others = [other for other in self.peft.peft_config if other != name]
        if others and name in self.peft.active_adapters:
            self.peft.set_adapter(others[0])
        self.peft.delete_adapter(name)


class _ApplyOverrides(TrainerCallback):
    """For a warm start: once the parent's optimizer and LR schedule are loaded, put the clone's own learning
    rate and weight decay in them, so that they apply from the next step on."""

    def __init__(self, learning_rate: float | None, weight_decay: float | None):
        self.learning_rate, self.weight_decay = learning_rate, weight_decay

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        groups = optimizer.param_groups
        if self.weight_decay is not None:
            for group in groups:
                if group.get("weight_decay", 0.0) != 0.0:
                    group["weight_decay"] = self.weight_decay
        if self.learning_rate is None:
            return
        for group in groups:
            group["initial_lr"] = self.learning_rate
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # Accelerate wraps it
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [self.learning_rate] * len(groups)
        if hasattr(scheduler, "lr_lambdas"):  # the schedules transformers builds: lr = base_lr x factor(step)
            for group, factor in zip(groups, scheduler.lr_lambdas):
                group["lr"] = self.learning_rate * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in groups]
        else:
            for group in groups:
                group["lr"] = self.learning_rate


# TRL trainer attributes that transformers' checkpoints do not keep: tokens seen (the `num_tokens` metric) and
# GRPO / RLOO's micro-step counter (which buffered generation batch a step uses).
_TRAINER_COUNTERS = ("_total_train_tokens", "_step")
# GRPO / RLOO's generations still to be trained on (steps_per_generation > 1 or num_iterations > 1) are kept with a
# state written in the middle of a generation cycle (a warm start, or a run unloaded where it was stopped):
# _checkpoints.GENERATION_BUFFER.
WARM_START = "warm-start"  # a warm clone's starting state, in its run folder


def _mid_generation(trainer: Any) -> bool:
    """Whether the trainer's next micro-step reuses buffered generations (TRL regenerates every
    steps_per_generation x num_iterations micro-steps, or when the buffer is empty)."""
    buffered = getattr(trainer, "_buffered_inputs", None)
    if buffered is None:
        return False
    every = trainer.args.steps_per_generation * getattr(trainer, "num_iterations", 1)
    return trainer._step % every != 0


class NonFiniteLoss(FloatingPointError):
    """A run's training loss became NaN or infinite."""


class _FailOnNonFinite(TrainerCallback):
    """Ends the run (marked failed by the engine) once its logged training loss or gradient norm is NaN or
    infinite: the weights are then no longer numbers either."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NonFiniteLoss(
                    f"the training {key.replace('_', ' ')} is {value} at step {state.global_step} "
                    "(on_nonfinite='fail'; a lower learning rate usually helps)"
                )


class _TolerantMetrics:
    """A user's `compute_metrics` that raises (an offline `evaluate.load`, a bug): its traceback logged once per
    run and kept on the run's record for the panel, that evaluation's user metrics skipped, and training goes on
    (RapidFire AI's behaviour). A reward function that raises still fails its GRPO run: it cannot go on without."""

    def __init__(self, fn: Callable[[Any], Any], report: Callable[[str], None], run_name: str):
        self.fn, self.report, self.run_name = fn, report, run_name
        self.seen: set[str] = set()  # exception types already logged for this run

    def __call__(self, eval_pred: Any) -> Any:
        try:
            return self.fn(eval_pred)
        except Exception as exc:
            kind = type(exc).__name__
            if kind not in self.seen:  # once per run (and per kind of failure, should it change)
                name = getattr(self.fn, "__name__", "compute_metrics")
                logger.warning(
                    "run %r: %s raised; its metrics are skipped, training goes on", self.run_name, name, exc_info=True
                )
                if not self.seen:
                    self.report(f"{name} raised {kind}: {exc} (its metrics are skipped)")
                self.seen.add(kind)
            return {}


class GenerationMetrics(TrainerCallback):
    """Generation-based evaluation (RapidFire AI's): after each evaluation of the run, its adapter generates an
    answer for every eval prompt with the model config's `generation_config`, and
    `compute_metrics((predictions, references))` gets the decoded texts; its values are logged as eval_<name>.

    Prompts: a chat `prompt` (through the chat template, with the generation prompt) or a text `prompt`;
    references: the `completion` (its last message's content for chat). Random state is forked, so sampling here
    never changes the training that follows.
    """

    def __init__(self, slot: RunSlot, tokenizer: Any, dataset: Any, model_config: Any, args: Any, sink: Any):
        from rf_notebook.configs import GENERATION_OWN_KEYS

        self.slot, self.tokenizer, self.sink = slot, tokenizer, sink
        self.compute_metrics = model_config.compute_metrics
        config = dict(model_config.generation_config)
        own = {k: config.pop(k) for k in GENERATION_OWN_KEYS if k in config}
        self.generate_kwargs = config
        self.max_input_length = own.get("max_input_length")
        self.add_generation_prompt = own.get("add_generation_prompt", True)
        self.truncation_side = own.get("truncation_side", "left")
        self.use_cache = own.get("use_cache", True)
        self.batch_size = args.per_device_eval_batch_size
        self.prompts, self.references = self._pairs(dataset) if dataset is not None else ([], [])

    def _pairs(self, dataset: Any) -> tuple[list[str], list[str]]:
        if "prompt" not in dataset.column_names or "completion" not in dataset.column_names:
            raise ValueError(
                f"generation-based evaluation needs eval rows with 'prompt' and 'completion' (after formatting_func), "
                f"but the eval data set has columns {dataset.column_names}"
            )
        prompts, references = [], []
        for row in dataset:
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, list):  # chat messages
                prompt = self.tokenizer.apply_chat_template(
                    prompt, tokenize=False, add_generation_prompt=self.add_generation_prompt
                )
            if isinstance(completion, list):
                completion = completion[-1]["content"]
            prompts.append(prompt)
            references.append(completion)
        return prompts, references

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        import torch

        if not self.prompts:
            return
        tokenizer = self.tokenizer
        sides = tokenizer.padding_side, tokenizer.truncation_side
        tokenizer.padding_side, tokenizer.truncation_side = "left", self.truncation_side
        was_training = model.training
        model.eval()
        predictions = []
        devices = [model.device] if model.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                for i in range(0, len(self.prompts), self.batch_size):
                    batch = tokenizer(
                        self.prompts[i : i + self.batch_size],
                        return_tensors="pt",
                        padding=True,
                        truncation=self.max_input_length is not None,
                        max_length=self.max_input_length,
                        add_special_tokens=False,
                    ).to(model.device)
                    out = model.generate(
                        **batch, pad_token_id=tokenizer.pad_token_id, use_cache=self.use_cache, **self.generate_kwargs
                    )
                    new = out[:, batch["input_ids"].shape[1] :]
                    predictions += tokenizer.batch_decode(new, skip_special_tokens=True)
        finally:
            tokenizer.padding_side, tokenizer.truncation_side = sides
            model.train(was_training)
        values = self.compute_metrics((predictions, list(self.references)))
        if not isinstance(values, Mapping):
            raise TypeError(f"compute_metrics returned {values!r}, but must return a dict of metric name -> number")
        self.sink(self.slot, state.global_step, {f"eval_{k}": float(v) for k, v in values.items()})


class TorchBackend:
    """Builds and drives the runs of one experiment; every method runs on the scheduler thread."""

    def __init__(
        self,
        create_model_fn: Callable[[Any], tuple[Any, Any]],
        train_dataset: Any,
        eval_dataset: Any,
        num_chunks: int,
        on_nonfinite: str = "fail",
    ):
        self.create_model_fn = create_model_fn
        self.on_nonfinite = on_nonfinite
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        # Data sets already put through each distinct formatting_func (once, not once per run), by function.
        self.formatted: dict[int, tuple[Any, Any]] = {}
        self.num_chunks = num_chunks
        self.should_yield: Callable[[], bool] = lambda: False
        self.record: Callable[[RunSlot, int, dict[str, float]], None] = lambda slot, step, values: None
        self.warn: Callable[[RunSlot, str], None] = lambda slot, message: None
        self._bases: dict[tuple[str, ...], _Base] = {}
        self._runs: dict[int, PreparedRun] = {}
        self._unloaded: dict[int, PreparedRun] = {}  # runs whose adapter is no longer on the model
        self._references: dict[tuple[str, str], Any] = {}  # DPO reference models other than a base
        self.resume_points: dict[int, tuple[int, str]] = {}  # run id -> (step, checkpoint) for a resumed experiment
        self._writer = CheckpointWriter()  # chunk-end checkpoints are written off the training thread

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
        """Load each distinct base once, then build every run of `runs`; the `unloaded` ones (stopped, on disk)
        are only remembered, for a later `reload` or `export`."""
        self._unloaded.update({run.run_id: run for run in unloaded})
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bar()  # one set of bars per run's data preparation is noise
        try:
            for run in runs:
                key = run.spec.model_config.base_key()
                if key not in self._bases:
                    self._bases[key] = self._load_base(run.spec.model_config)
            return {run.run_id: self.build(run, resume_from=self.resume_points.get(run.run_id)) for run in runs}
        finally:
            if bars:
                datasets.enable_progress_bar()

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
        if getattr(tokenizer, "pad_token", "") is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token  # batches need padding; as RapidFire AI and TRL's examples do
        return _Base(model, tokenizer)

    def _reference(self, model_config: Any) -> Any:
        """A DPO reference model named by `ref_model_name`: the shared base itself (adapters disabled) when it
        names the same model, else loaded once with `create_model_fn` and frozen (None: use the base)."""
        from rf_notebook.configs import _stable_repr

        key = (str(model_config.ref_model_name), _stable_repr(model_config.ref_model_kwargs or {}))
        if key == (str(model_config.model_name), _stable_repr(model_config.model_kwargs or {})):
            return None
        if key not in self._references:
            reference = model_config.replace(
                model_name=model_config.ref_model_name,
                model_type=model_config.ref_model_type or "causal_lm",
                model_kwargs=dict(model_config.ref_model_kwargs or {}),
            )
            model = self._load_base(reference).model
            model.requires_grad_(False)
            model.eval()
            self._references[key] = model
        return self._references[key]

    def base_of(self, run_id: int) -> _Base:
        return self._bases[self._runs[run_id].spec.model_config.base_key()]

    def build(
        self, run: PreparedRun, warm_from: RunSlot | None = None, resume_from: tuple[int, str] | None = None
    ) -> RunSlot:
        """Add the run's adapter and build its trainer. With `warm_from`, the run continues that run's state; with
        `resume_from` (step, checkpoint folder), the state written there (a resumed experiment)."""
        key = run.spec.model_config.base_key()
        if key not in self._bases:
            self._bases[key] = self._load_base(run.spec.model_config)
        base = self._bases[key]
        unloaded = self._unloaded.pop(run.run_id, None)
        self._runs[run.run_id] = run
        base.add_adapter(run.adapter, run.lora, seed=run.args.seed)
        try:
            return self._build_slot(run, base, warm_from, resume_from)
        except BaseException:  # nothing half-built stays: an export must never find a fresh, untrained adapter
            base.remove_adapter(run.adapter)
            del self._runs[run.run_id]
            if unloaded is not None:
                self._unloaded[run.run_id] = unloaded
            raise

    def _build_slot(
        self, run: PreparedRun, base: _Base, warm_from: RunSlot | None, resume_from: tuple[int, str] | None
    ) -> RunSlot:
        base.pristine.apply(base.modules)  # each trainer patches the pristine model, never another's patch
        slot = RunSlot(run.run_id, run.adapter, should_yield=self.should_yield)
        callbacks = slot.callbacks(self.record)
        if self.on_nonfinite == "fail":
            callbacks.append(_FailOnNonFinite())
        # A warm clone starts from its parent's optimizer and LR schedule, also when it resumes from its warm start
        # (a restart or a reload before its first chunk end): its own learning rate and weight decay go in on top.
        if warm_from is not None or (resume_from is not None and Path(resume_from[1]).name == WARM_START):
            callbacks.append(_ApplyOverrides(run.args.learning_rate, run.args.weight_decay))
        trainer = TRAINERS[run.spec.trainer_type]
        model_config = run.spec.model_config
        train, evl = self.train_dataset, self.eval_dataset
        if model_config.formatting_func is not None and id(model_config.formatting_func) in self.formatted:
            train, evl = self.formatted[id(model_config.formatting_func)]
            model_config = model_config.replace(formatting_func=None)
        if model_config.compute_metrics is not None:  # one that raises costs its metrics, not the run
            metrics = _TolerantMetrics(model_config.compute_metrics, lambda text: self.warn(slot, text), run.spec.name)
            model_config = model_config.replace(compute_metrics=metrics)
        if model_config.generation_config is not None and model_config.compute_metrics is not None:
            callbacks.append(GenerationMetrics(slot, base.tokenizer, evl, model_config, run.args, self.record))
            model_config = model_config.replace(compute_metrics=None)  # not the trainer's logits-based one
        extra = {}
        if run.spec.trainer_type == "DPO" and model_config.ref_model_name:
            extra["ref_model"] = self._reference(model_config)
        slot.trainer = trainer.build_trainer(
            base.peft, base.tokenizer, run.args, train, evl, model_config, callbacks, **extra
        )
        for noisy in (PrinterCallback, ProgressCallback):  # they print from the background thread into any cell
            slot.trainer.remove_callback(noisy)
        slot.patches = Patches.capture(base.modules)
        slot.state = _process_state.capture()  # what a lone trainer would hold when its train() starts
        args, rows = run.args, len(slot.trainer.train_dataset)
        slot.plan = chunk_plan(
            rows,
            args.per_device_train_batch_size,
            self.num_chunks,
            max_steps=args.max_steps,
            num_train_epochs=args.num_train_epochs,
            per_epoch=trainer.steps_per_epoch(rows, args),
            rows_per_step=trainer.rows_per_step(args),
            align=trainer.rung_multiple(args),
        )
        if warm_from is not None:
            slot.resume_from = self._checkpoint(warm_from, run)
            slot.state = warm_from.state
            slot.step = warm_from.step
        elif resume_from is not None:  # its random state is read back from the folder when train() starts
            slot.step, slot.resume_from = resume_from[0], os.fspath(resume_from[1])
        if slot.resume_from is not None:
            counters = Path(slot.resume_from) / "rf_trainer_counters.json"
            for key, value in (json.loads(counters.read_text()) if counters.is_file() else {}).items():
                if key in _TRAINER_COUNTERS:
                    setattr(slot.trainer, key, value)
            buffer = Path(slot.resume_from) / _GENERATION_BUFFER
            if buffer.is_file():
                import torch

                slot.trainer._buffered_inputs = torch.load(
                    buffer, weights_only=True, map_location=slot.trainer.args.device
                )
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

        from peft.utils import get_peft_model_state_dict

        if slot.run_id not in self._runs:
            raise ValueError(f"run {slot.run_id} has no adapter any more (deleted)")
        run, base, trainer = self._runs[slot.run_id], self.base_of(slot.run_id), slot.trainer
        config = dataclasses.replace(base.peft.peft_config[run.adapter])
        config.base_model_name_or_path = str(run.spec.model_config.model_name)
        scaler = getattr(trainer.accelerator, "scaler", None)
        tensors = to_host(
            {
                "adapter": get_peft_model_state_dict(base.peft, adapter_name=run.adapter),
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
            counters={k: getattr(trainer, k) for k in _TRAINER_COUNTERS if hasattr(trainer, k)},
            generation_buffer=tensors["buffer"],
        )

    def _write_state(self, slot: RunSlot, path: Path) -> None:
        """Write a run's state now, on this thread, in transformers' checkpoint layout (a warm start)."""
        _checkpoints.write_snapshot(self._snapshot(slot), path)

    def checkpoint(self, slot: RunSlot, wait: bool = False) -> Path:
        """Checkpoint `slot` at its current step as `<output_dir>/checkpoints/step-<N>` (complete or absent; the
        run's older checkpoints are removed). The training thread only takes the snapshot; the checkpoint writer
        thread writes it, unless `wait` (a run about to leave memory): then it is on disk when this returns. A
        failed earlier write is raised here (OSError)."""
        folder, step = Path(slot.trainer.args.output_dir) / "checkpoints", slot.step
        snapshot = self._snapshot(slot)
        if wait:
            self._writer.flush()
            return _checkpoints.replace_checkpoint(snapshot, folder, step)
        self._writer.submit(lambda: _checkpoints.replace_checkpoint(snapshot, folder, step))
        return folder / f"step-{step}"

    def flush(self) -> None:
        """Wait for the checkpoints being written; raise a failed write (the engine pauses the experiment)."""
        self._writer.flush()

    def wait_for_writes(self) -> None:
        """Wait for the checkpoints being written, before reading them (from any thread); a failed write is left
        for the training thread to raise."""
        self._writer.wait()

    # -- driving -----------------------------------------------------------------------------------------------

    def activate(self, slot: RunSlot) -> None:
        """Put back what this run's trainer expects of the shared model and the process."""
        base = self.base_of(slot.run_id)
        base.peft.set_adapter(slot.adapter)
        slot.patches.apply(base.modules)
        _process_state.restore(slot.state)

    def suspended(self, slot: RunSlot) -> None:
        """After the run hands back control: keep the forward patches its train() may have installed
        (Accelerate's autocast wrapper under mixed precision)."""
        slot.patches = Patches.capture(self.base_of(slot.run_id).modules)

    def evaluate(self, slot: RunSlot) -> None:
        """Evaluate at a rung, unless the trainer's own `eval_strategy` just did at this very step."""
        if self.eval_dataset is not None and slot.trainer is not None and slot.evaluated_at != slot.step:
            slot.trainer.evaluate()

    def unload(self, slot: RunSlot) -> None:
        """Write a stopped run to its checkpoint and free everything it holds (adapter, trainer, optimizer); the run
        stays known, and `reload` rebuilds it exactly from there. A run that has not trained since it was built is
        still exactly what it was built from (its checkpoint, its warm start, or nothing): nothing is written."""
        if slot.started:
            self.checkpoint(slot, wait=True)  # on disk before the run leaves memory
        self.discard(slot, keep_adapter=False)

    def reload(self, run: PreparedRun) -> RunSlot:
        """Rebuild an unloaded run from its newest checkpoint, else the warm start it was cloned with, else from
        scratch (it stopped before its first chunk end)."""
        self.wait_for_writes()
        return self.build(run, resume_from=resume_point(run.args.output_dir))

    def forget(self, run_id: int) -> None:
        """A deleted run: nothing of it stays in memory (its last checkpoint stays on disk)."""
        self._unloaded.pop(run_id, None)

    def discard(self, slot: RunSlot, keep_adapter: bool) -> None:
        """Unwind the run's trainer (freeing its optimizer); with `keep_adapter=False` remove its adapter too."""
        slot.close()
        if not keep_adapter:
            self.base_of(slot.run_id).remove_adapter(slot.adapter)
            self._unloaded[slot.run_id] = self._runs.pop(slot.run_id)
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

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
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if run_id not in self._runs:
            raise ValueError(f"run {run_id} has no adapter any more (deleted)")
        run, base = self._runs[run_id], self.base_of(run_id)
        out.mkdir(parents=True, exist_ok=True)
        weights = get_peft_model_state_dict(base.peft, adapter_name=run.adapter)
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
        self._references.clear()
        self._runs.clear()
        self._unloaded.clear()
        gc.collect()


def rng_payload(state: _process_state.ProcessState, args: Any) -> dict[str, Any]:
    """A run's random state in transformers' `rng_state.pth` layout, which `train(resume_from_checkpoint=...)`
    reads: on one GPU the CUDA state of the trainer's device alone (a per-device list is the multi-GPU layout,
    and one GPU's loader cannot set it back: transformers logs "Didn't manage to set back the RNG states")."""
    rng = {"python": state.python, "numpy": state.numpy, "cpu": state.torch_cpu}
    if state.torch_cuda is not None:
        from transformers.training_args import ParallelMode

        if args.parallel_mode == ParallelMode.DISTRIBUTED:
            rng["cuda"] = state.torch_cuda
        else:
            rng["cuda"] = state.torch_cuda[args.device.index or 0]
    return rng


def latest_checkpoint(output_dir: str | Path) -> tuple[int, Path] | None:
    """A run's newest complete checkpoint (step, folder), or None. Unfinished temporary folders are ignored."""
    folder = Path(output_dir) / "checkpoints"
    found = []
    for path in folder.glob("step-*") if folder.is_dir() else ():
        suffix = path.name.removeprefix("step-")
        if suffix.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(suffix), path))
    return max(found) if found else None


def resume_point(output_dir: str | Path) -> tuple[int, str] | None:
    """Where a run that is not in memory continues: (step, folder) of its newest checkpoint, else of the warm
    start it was cloned with (a warm clone before its first chunk end), else None (from scratch)."""
    point = latest_checkpoint(output_dir)
    warm = Path(output_dir) / WARM_START
    if point is None and (warm / "trainer_state.json").is_file():
        point = (json.loads((warm / "trainer_state.json").read_text())["global_step"], warm)
    return None if point is None else (point[0], os.fspath(point[1]))


def export_checkpoint(output_dir: str | Path, path: str | Path, record: Mapping[str, Any]) -> Path:
    """Copy the adapter of a run's newest checkpoint to `path` as a PEFT folder, with rf_config.json."""
    point = latest_checkpoint(output_dir)
    if point is None:
        raise RuntimeError(
            f"run {record['run_id']} has no checkpoint in {str(output_dir)!r} (it never finished a chunk), and no "
            "live model to export from"
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copyfile(point[1] / name, out / name)
    (out / "rf_config.json").write_text(json.dumps(dict(record), indent=2, default=str))
    return out
