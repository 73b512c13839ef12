"""`Experiment`: the facade a notebook talks to.

    exp = Experiment("demo")                     # ./rf_experiments/demo
    exp.run_fit(group, demo_model_fn, train, evl, num_chunks=4, seed=0)   # returns once training has started
    exp.wait(); exp.results(); exp.best_run(); exp.export(run_id, "winner/")

Everything a user can get wrong is checked here, on the caller's thread, before any training starts; the
training itself runs in the engine's background thread.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import re
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rf_notebook import _kernel, _progress
from rf_notebook.commands import Delete, Export, Resume, Stop
from rf_notebook.configs import RFModelConfig, RunSpec, _Search, _stable_repr
from rf_notebook.store import ICRecord, RunRecord, RunStatus, Store

logger = logging.getLogger(__name__)

__all__ = ["Experiment", "default_model_fn"]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

# Experiments of this process. Runs share process-wide state (random generators, Accelerate's singletons) that
# the one scheduler thread swaps per run, so only one experiment may train at a time.
_EXPERIMENTS: weakref.WeakSet[Experiment] = weakref.WeakSet()
# The Experiment object that holds each experiment directory in this process (re-running a notebook's
# `exp = Experiment("x")` cell hands the directory over to the new object).
_HOLDERS: weakref.WeakValueDictionary[Path, Experiment] = weakref.WeakValueDictionary()


@atexit.register
def _end_all() -> None:
    """A script that exits without `end()`: unwind the suspended trainers before the interpreter goes away
    (a training thread still holding suspended greenlets at exit aborts the process)."""
    for exp in list(_EXPERIMENTS):
        try:
            exp.end(wait=False)
        except Exception:  # exiting anyway; one experiment's failure must not keep the others running
            logger.exception("ending experiment %r at exit", exp.name)


def default_model_fn(model_config: RFModelConfig) -> tuple[Any, Any]:
    """Load `model_name` with `AutoModelForCausalLM` / `AutoTokenizer` (a hub id or a local folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_config.model_name, **(model_config.model_kwargs or {}))
    tokenizer = AutoTokenizer.from_pretrained(
        model_config.tokenizer or model_config.model_name, **(model_config.tokenizer_kwargs or {})
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


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
    ):
        _check_num_gpus(num_gpus)
        if mode != "fit":
            raise ValueError(
                f"`mode` is {mode!r}, but rf_notebook runs fine-tuning experiments only: use mode='fit' "
                "(RapidFire AI's 'evals' mode has no counterpart here)"
            )
        if experiment_path is not None:  # RapidFire AI's name for the folder that holds experiments
            if experiments_dir != "rf_experiments":
                raise ValueError(
                    f"both `experiments_dir` ({experiments_dir!r}) and `experiment_path` ({experiment_path!r}) are "
                    "given; they are the same setting: pass one"
                )
            experiments_dir = experiment_path
        if not isinstance(experiment_name, str) or not _SAFE_NAME.match(experiment_name) or ".." in experiment_name:
            raise ValueError(
                f"experiment name {experiment_name!r} is not a safe directory name: use 1-100 letters, digits, "
                "'.', '_' or '-', starting with a letter or digit"
            )
        if not isinstance(experiments_dir, (str, Path)):
            raise TypeError(f"`experiments_dir` is {experiments_dir!r}, but must be a path (str or pathlib.Path)")
        self.name = experiment_name
        self.path = Path(experiments_dir) / experiment_name
        self._engine: Any = None
        self._panel: Any = None
        self._device_warnings: list[str] = []
        self._device_warned = False
        key = self.path.resolve()
        holder = _HOLDERS.get(key)
        if holder is not None:
            if holder._training():
                raise RuntimeError(
                    f"experiment {experiment_name!r} is training in this process (another Experiment object): "
                    "use that object, or end() it first"
                )
            holder._release_directory()
        from rf_notebook._journal import DB_NAME

        self._store = Store.open(self.path) if (self.path / DB_NAME).exists() else Store()
        for r in self._store.runs():  # left unfinished by a process that ended: not training any more
            if r.status in (RunStatus.QUEUED, RunStatus.TRAINING):
                self._store.update_run(r.run_id, status=RunStatus.STOPPED)
        for op in self._store.ic_log():  # a policy's pending decisions wait for run_fit(resume=True) to apply them
            if op.outcome == "pending" and op.origin != "policy":
                self._store.settle_op(op.op_id, "refused", "the process ended before the op was applied")
        _HOLDERS[key] = self
        _EXPERIMENTS.add(self)

    def _release_directory(self) -> None:
        """Hand the directory to a newer Experiment object of this process (its history stays readable here)."""
        self.end(wait=False)
        self._store.close()

    # -- starting ----------------------------------------------------------------------------------------------

    def run_fit(
        self,
        param_config: _Search,
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
    ) -> None:
        """Validate, load the base model(s), build every run's trainer, start training and return.

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
        """
        if self._training():
            raise RuntimeError(
                f"experiment {self.name!r} is already running a run_fit; wait() for it or end() it first"
            )
        for other in list(_EXPERIMENTS):
            if other is not self and other._training():
                raise RuntimeError(
                    f"experiment {other.name!r} is still training in this process; one experiment trains at a "
                    "time: wait() for it or end() it first"
                )
        if _HOLDERS.get(self.path.resolve()) is not self:
            raise RuntimeError(
                f"this Experiment object no longer holds {str(self.path)!r}: a newer Experiment({self.name!r}) "
                "in this process took it over; use that one"
            )
        if not isinstance(param_config, _Search):
            raise TypeError(f"run_fit takes an RFGridSearch or RFRandomSearch, but got {type(param_config).__name__}")
        if num_shards is not None:
            if num_chunks is not None and num_chunks != num_shards:
                raise ValueError(
                    f"`num_chunks` is {num_chunks!r} and `num_shards` is {num_shards!r}: they are the same setting "
                    "(num_shards is its newer name); pass one"
                )
            num_chunks = num_shards
        num_chunks = 4 if num_chunks is None else num_chunks
        _check_num_gpus(num_gpus)
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
            raise ValueError(f"`num_chunks` is {num_chunks!r}, but must be an int >= 1")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` is {seed!r}, but must be an int")
        if create_model_fn is not None and not callable(create_model_fn):
            raise TypeError(f"`create_model_fn` is {create_model_fn!r}, but must be callable or None")
        from rf_notebook.policies import Policy

        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(
                f"`policy` is {policy!r}, but must be None or a policy such as SuccessiveHalving(), MedianOfPeers() "
                "or PBT() from rf_notebook.policies"
            )
        if display is not None and not isinstance(display, bool):
            raise TypeError(f"`display` is {display!r}, but must be True, False or None (show it in a notebook)")
        if not isinstance(resume, bool):
            raise TypeError(f"`resume` is {resume!r}, but must be True or False")
        if on_nonfinite not in ("fail", "continue"):
            raise ValueError(f"`on_nonfinite` is {on_nonfinite!r}, but must be 'fail' or 'continue'")
        if precision not in (None, "bf16", "fp16", "fp32"):
            raise ValueError(f"`precision` is {precision!r}, but must be None, 'bf16', 'fp16' or 'fp32'")
        if precision == "fp16" and not _on_gpu():
            raise ValueError(
                "`precision` is 'fp16', but this machine has no GPU (fp16 mixed precision needs one); use 'bf16' "
                "(CPU autocast) or 'fp32'"
            )
        checked = dict(num_chunks=num_chunks, seed=seed, display=display, policy=policy, resume=resume)
        self._fit(
            param_config,
            create_model_fn,
            train_dataset,
            eval_dataset,
            **checked,
            on_nonfinite=on_nonfinite,
            precision=precision,
        )

    def _fit(
        self,
        param_config: _Search,
        create_model_fn: Callable[[RFModelConfig], tuple[Any, Any]] | None,
        train_dataset: Any,
        eval_dataset: Any,
        *,
        num_chunks: int,
        seed: int,
        display: bool | None,
        policy: Any,
        resume: bool,
        on_nonfinite: str,
        precision: str | None,
    ) -> None:
        """run_fit once its arguments are checked: prepare every run (or the resumed ones) and start training."""
        from rf_notebook.engine import Engine, TorchBackend

        specs = param_config.expand()
        from rf_notebook.trainers import TRAINERS
        from rf_notebook.trainers._common import apply_formatting, check_shared_state

        trainer = TRAINERS[param_config.trainer_type]
        formatted = {}  # each distinct formatting_func is applied once, to the train and eval sets
        for formatting_func in {
            id(s.model_config.formatting_func): s.model_config.formatting_func for s in specs
        }.values():
            train, evl = train_dataset, eval_dataset
            if formatting_func is not None:
                train = apply_formatting(train_dataset, formatting_func, "train")
                evl = None if eval_dataset is None else apply_formatting(eval_dataset, formatting_func, "eval")
                formatted[id(formatting_func)] = (train, evl)
            trainer.check_dataset(train, "train", None)
            if evl is not None:
                trainer.check_dataset(evl, "eval", None)
        fit = {
            "trainer_type": param_config.trainer_type,
            "num_chunks": num_chunks,
            "seed": seed,
            "train_fingerprint": data_fingerprint(train_dataset),
            "eval_fingerprint": None if eval_dataset is None else data_fingerprint(eval_dataset),
            "precision": precision,
        }
        replay: list[Any] = []
        if resume:
            if self._engine is not None:  # an idle engine of this experiment may still be writing checkpoints
                self._engine.backend.wait_for_writes()
            prepared, points, replay, decided, refusals = self._resumable(specs, fit)
        else:
            decided, refusals = 0, []
            ids = self._store.reserve_run_ids(len(specs))
            prepared = [self._prepare(run_id, spec, seed, precision) for run_id, spec in zip(ids, specs)]
            points = {}
            self._check_num_chunks(prepared, len(train_dataset), num_chunks)
        check_shared_state(prepared)

        self._warn_device()
        if not self._store.durable:
            self._store.attach(self.path)  # StorageError (unwritable folder) before anything trains
        if self._engine is not None:
            self._engine.shutdown()
        # Accelerate holds one mixed-precision mode (and dynamo setting) per process, set by the first trainer that
        # prepares; nothing else trains in this process now (checked above), so this run_fit sets its own. (Its
        # only reset is this private one; without it a second run_fit in another precision fails in Accelerate.)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        if resume:
            for op_id, why in refusals:
                self._store.settle_op(op_id, "refused", why)
            for run in prepared:
                record = self._store.run(run.run_id)
                self._store.drop_metrics_after(run.run_id, points.get(run.run_id, (0, None))[0])
                if record.status is RunStatus.STOPPED and not self._stopped_by_op(run.run_id):
                    self._store.update_run(run.run_id, status=RunStatus.QUEUED)  # interrupted: continue
        else:
            for op in self._store.ic_log():  # left by a process that ended, and not resumed: they never apply
                if op.outcome == "pending":
                    self._store.settle_op(op.op_id, "refused", "the process ended and the experiment was not resumed")
            for run in prepared:
                self._store.add_run(run.record())
            self._store.set_meta(
                "fits", [*self._store.meta("fits", []), {**fit, "run_ids": [r.run_id for r in prepared]}]
            )
            if policy is not None:  # no rung decided yet; a resume decides every rung passed after the mark
                self._store.set_meta("policy_rung", {"fit": len(self._store.meta("fits")), "rung": 0})
        backend = TorchBackend(
            create_model_fn or default_model_fn, train_dataset, eval_dataset, num_chunks, on_nonfinite=on_nonfinite
        )
        backend.resume_points = points
        backend.formatted = formatted
        on_rung = None if policy is None else (lambda rung: self._policy_step(policy, rung))
        self._engine = Engine(
            self._store, prepared, backend, on_rung=on_rung, checkpoints=True, decided_rung=decided, replay=replay
        )
        if display if display is not None else _kernel.in_kernel():
            self.panel()
        if self._panel is not None:
            self._panel.training_started()
        try:
            self._engine.start()
        except BaseException as exc:
            for run in prepared:
                self._store.update_run(run.run_id, status=RunStatus.FAILED, error=f"setup failed: {exc!r}")
            raise
        logger.info("experiment %r: %d runs training in the background", self.name, len(prepared))

    def _resumable(
        self, specs: list[RunSpec], fit: dict[str, Any]
    ) -> tuple[list[Any], dict[int, tuple[int, str]], list[Any], int]:
        """The last run_fit's runs (and clones made from them) that can still train, rebuilt from the same
        search; where each one resumes ({run_id: (step, checkpoint folder)}); the policy's decisions that were
        logged but never applied, as commands to apply first; and the last rung the policy fully decided (a rung
        completed after it is decided again)."""
        fits = self._store.meta("fits", [])
        if not fits:
            raise ValueError(
                f"experiment {self.name!r} has no earlier run_fit to resume (nothing recorded in "
                f"{str(self.path)!r}); call run_fit without resume=True to start it"
            )
        last = fits[-1]
        for key, what in (
            ("trainer_type", "trainer_type"),
            ("num_chunks", "`num_chunks`"),
            ("seed", "`seed`"),
            ("train_fingerprint", "`train_dataset` (content fingerprint)"),
            ("eval_fingerprint", "`eval_dataset` (content fingerprint)"),
            ("precision", "`precision`"),
        ):
            if fit[key] != last.get(key):  # (experiments from before `precision` existed stored none: None)
                raise ValueError(
                    f"cannot resume experiment {self.name!r}: {what} is {fit[key]!r}, but it was started with "
                    f"{last[key]!r}; resume with the same arguments, or start a new experiment"
                )
        ids = last["run_ids"]
        if len(specs) != len(ids):
            raise ValueError(
                f"cannot resume experiment {self.name!r}: the search expands to {len(specs)} runs, but it was "
                f"started with {len(ids)} (runs {ids}); resume with the same search, or start a new experiment"
            )
        prepared: dict[int, Any] = {}
        for run_id, spec in zip(ids, specs):
            run = self._prepare(run_id, spec, fit["seed"], fit["precision"])
            changed = _config_changes(self._store.run(run_id).config, run.config)
            if changed:
                raise ValueError(
                    f"cannot resume experiment {self.name!r}: run {run_id} ({self._store.run(run_id).name!r}) was "
                    f"started with a different config ({changed}); resume with the same search, or start a new "
                    "experiment"
                )
            prepared[run_id] = run
        for op in self._store.ic_log():  # clones, in the order they were made (a clone of a clone follows)
            if op.op == "clone_modify" and op.outcome == "applied" and op.run_id in prepared:
                prepared[op.new_run_id] = self._prepare_clone(
                    prepared[op.run_id], op.new_run_id, op.args["overrides"], op.args["warm_start"], fit["seed"]
                )
        from rf_notebook.engine._torch import resume_point

        live, points = [], {}
        for run_id, run in prepared.items():
            if self._store.run(run_id).status.is_terminal:
                continue
            point = resume_point(run.args.output_dir)
            if point is not None:
                points[run_id] = point
            live.append(run)
        if not live:
            raise ValueError(
                f"experiment {self.name!r} has no unfinished run to resume (all finished, failed or deleted)"
            )
        return live, points, *self._replay(prepared, fit["seed"], len(fits))

    def _replay(
        self, prepared: dict[int, Any], seed: int, fit_number: int
    ) -> tuple[list[Any], int | None, list[tuple[int, str]]]:
        """Commands for the policy's ops that a process ended before applying, the last rung the policy fully
        decided, and the other pending ops with why they never apply (refused once run_fit starts). Ops of a rung
        whose decision was cut short are among those: that rung is decided again."""
        from rf_notebook.commands import CloneModify, Stop

        mark = self._store.meta("policy_rung") or {}
        # No mark for this run_fit (it started without a policy, or was recorded before marks existed): the rungs it
        # passed count as decided.
        decided = mark["rung"] if mark.get("fit") == fit_number else None
        commands, refused = [], []
        for op in self._store.ic_log():
            if op.outcome != "pending":
                continue
            rung = op.args.get("rung")
            if op.origin != "policy" or rung is None or decided is None or rung > decided or op.run_id not in prepared:
                refused.append(op)
            elif op.op == "stop":
                commands.append(Stop(op_id=op.op_id, run_id=op.run_id, requires=op.args.get("requires")))
            else:
                overrides, warm_start = op.args["overrides"], op.args["warm_start"]
                prepared[op.new_run_id] = self._prepare_clone(
                    prepared[op.run_id], op.new_run_id, overrides, warm_start, seed
                )
                commands.append(
                    CloneModify(
                        op_id=op.op_id,
                        run_id=op.run_id,
                        new_run_id=op.new_run_id,
                        prepared=prepared[op.new_run_id],
                        warm_start=bool(warm_start),
                        overrides=dict(overrides),
                    )
                )
        refusals = [
            (
                op.op_id,
                f"the process ended while the policy was deciding chunk {op.args['rung']}; decided again on resume"
                if op.origin == "policy" and decided is not None and op.args.get("rung", 0) > decided
                else "the process ended before the op was applied",
            )
            for op in refused
        ]
        return commands, decided, refusals

    def _stopped_by_op(self, run_id: int) -> bool:
        """Whether the run's latest applied stop/resume op is a stop (a user's or a policy's decision)."""
        ops = [op.op for op in self._store.ic_log() if op.run_id == run_id and op.outcome == "applied"]
        ops = [op for op in ops if op in ("stop", "resume")]
        return bool(ops) and ops[-1] == "stop"

    def _prepare(self, run_id: int, spec: RunSpec, seed: int, precision: str | None = None) -> Any:
        """Resolve one run's arguments and build its real TRL / PEFT configs (TRL validates values here)."""
        import torch
        from accelerate import PartialState

        from rf_notebook.engine import PreparedRun
        from rf_notebook.trainers import TRAINERS

        mc = spec.model_config
        if mc.peft_config is None:
            raise ValueError(f"run {spec.name!r} has no peft_config; rf_notebook trains LoRA adapters (RFLoraConfig)")
        on_gpu = torch.cuda.is_available()
        PartialState(cpu=not on_gpu)  # one process-wide state that every run's arguments reuse
        trainer = TRAINERS[spec.trainer_type]
        user_args, mc = self._fit_device(
            dict(mc.training_args.kwargs) if mc.training_args is not None else {}, mc, on_gpu, precision
        )
        spec = dataclasses.replace(spec, model_config=mc)
        try:
            kwargs = trainer.resolve_args(
                user_args,
                output_dir=str(self.path / "runs" / str(run_id)),
                seed=seed,
                on_gpu=on_gpu,
            )
            # Building a TRL config would otherwise reset Accelerate's process-wide state under the other runs.
            accelerator_config = {**(kwargs.get("accelerator_config") or {}), "use_configured_state": True}
            # replace(), not the constructor: these are rf_notebook's resolved values, the owned fields included
            args = trainer.CONFIG().replace(**kwargs).build(accelerator_config=accelerator_config)
            lora = mc.peft_config.build()
        except Exception as exc:
            raise ValueError(f"run {spec.name!r} has an invalid config: {exc}") from exc
        config = {
            "trainer_type": spec.trainer_type,
            "model_name": mc.model_name,
            "model_kwargs": mc.model_kwargs,
            "peft_config": dict(mc.peft_config.kwargs),
            "training_args": kwargs,
            "compute_metrics": _stable_repr(mc.compute_metrics) if mc.compute_metrics else None,
            "formatting_func": _stable_repr(mc.formatting_func) if mc.formatting_func else None,
            "generation_config": mc.generation_config,
            "ref_model": [mc.ref_model_name, mc.ref_model_kwargs] if mc.ref_model_name else None,
        }
        return PreparedRun(run_id, spec, args, lora, config)

    def _fit_device(
        self, user_args: dict[str, Any], mc: RFModelConfig, on_gpu: bool, precision: str | None = None
    ) -> tuple[dict, RFModelConfig]:
        """What a notebook written for a GPU asks that this machine cannot honour, adjusted with one warning per
        experiment, decided before anything trains: bf16 / fp16 on a CPU (the base loaded and trained in float32),
        bf16 on a GPU without bfloat16 (a T4, a V100: fp16 mixed precision and a float16 base), `device_map` (every
        run shares one device), `load_in_4bit` / `load_in_8bit` (a `BitsAndBytesConfig` where bitsandbytes and a
        GPU are there, else an unquantized base), bitsandbytes' 8-bit / paged optimizers without them (AdamW).
        run_fit's `precision` sets bf16 / fp16 for every run, over the configs."""
        changes = []
        kwargs = dict(mc.model_kwargs or {})
        quantizable = on_gpu and _has_bitsandbytes()
        unquantizable = "bitsandbytes is not installed" if on_gpu else "this machine has no GPU"
        if precision is not None:
            user_args["bf16"], user_args["fp16"] = precision == "bf16", precision == "fp16"
        elif not on_gpu:
            for flag in ("bf16", "fp16"):
                if user_args.get(flag):
                    user_args[flag] = False
                    changes.append(f"{flag}=True (this machine has no GPU: trained in float32)")
        elif not _gpu_has_bf16() and "bf16" not in user_args and not user_args.get("fp16"):
            # TRL's default is bf16 unless fp16; a T4 or V100 only emulates it (slowly, or not at all on older torch).
            # A run that asks for bf16=True gets it.
            fp16 = user_args.get("fp16") is not False  # fp16=False said: float32
            user_args["bf16"], user_args["fp16"] = False, fp16
            changes.append(
                f"bf16 (TRL's default; this GPU has no bfloat16: {'fp16 mixed precision' if fp16 else 'float32'})"
            )
        for key in ("dtype", "torch_dtype"):  # transformers 5's name, and the older one
            name = _dtype_name(kwargs.get(key))
            if key not in kwargs or name in ("float32", "None"):
                continue
            if not on_gpu:
                changes.append(f"model_kwargs {key}={name} (no GPU: the base is loaded in float32)")
                kwargs[key] = "float32"
            elif name == "bfloat16" and not _gpu_has_bf16():
                changes.append(f"model_kwargs {key}={name} (this GPU has no bfloat16: the base is loaded in float16)")
                kwargs[key] = "float16"
        for flag in ("load_in_4bit", "load_in_8bit"):  # transformers 5 takes these only in a quantization_config
            if flag not in kwargs or not kwargs.pop(flag):
                continue  # False: nothing to quantize (and transformers 5 refuses the flag itself)
            if quantizable:
                from transformers import BitsAndBytesConfig

                kwargs.setdefault("quantization_config", BitsAndBytesConfig(**{flag: True}))
            else:
                changes.append(f"model_kwargs {flag}=True ({unquantizable}: the base is loaded unquantized)")
        optim = str(user_args.get("optim", ""))
        if ("8bit" in optim or optim.startswith("paged_") or "bnb" in optim) and not quantizable:
            changes.append(f"optim={optim!r} ({unquantizable}: adamw_torch)")
            user_args["optim"] = "adamw_torch"
        if "device_map" in kwargs:
            wanted = kwargs.pop("device_map")
            if on_gpu:
                kwargs["device_map"] = {"": torch_device_index()}
            if wanted != kwargs.get("device_map"):
                changes.append(
                    f"model_kwargs device_map={wanted!r} (the base model stays whole on "
                    f"{'the GPU' if on_gpu else 'the CPU'}, shared by every run)"
                )
        if kwargs != dict(mc.model_kwargs or {}):
            mc = mc.replace(model_kwargs=kwargs)
        for change in changes:
            if change not in self._device_warnings:
                self._device_warnings.append(change)
        return user_args, mc

    def _warn_device(self) -> None:
        if self._device_warnings and not self._device_warned:
            self._device_warned = True
            warnings.warn(
                f"experiment {self.name!r}: ignoring what this machine cannot honour: "
                + "; ".join(self._device_warnings),
                RuntimeWarning,
                stacklevel=4,  # the user's run_fit call (_warn_device <- _fit <- run_fit <- the caller)
            )

    @staticmethod
    def _check_num_chunks(prepared: list[Any], num_samples: int, num_chunks: int) -> None:
        from rf_notebook.trainers import TRAINERS

        def per_epoch(run: Any) -> int:
            return TRAINERS[run.spec.trainer_type].steps_per_epoch(num_samples, run.args)

        smallest = min(prepared, key=per_epoch)
        if per_epoch(smallest) == 0:
            raise ValueError(
                f"run {smallest.spec.name!r} gets no optimizer step out of {num_samples} rows: one step needs "
                f"{TRAINERS[smallest.spec.trainer_type].rows_per_step(smallest.args):g} rows (prompts of a whole "
                "generation batch); use a larger data set or a smaller batch"
            )
        if num_chunks > per_epoch(smallest):
            raise ValueError(
                f"`num_chunks` is {num_chunks}, but run {smallest.spec.name!r} has only {per_epoch(smallest)} "
                f"optimizer steps per epoch of {num_samples} rows; use num_chunks <= {per_epoch(smallest)}"
            )
        for run in prepared:  # GRPO / RLOO: chunk ends between whole generation cycles
            cycle = TRAINERS[run.spec.trainer_type].rung_multiple(run.args)
            if num_chunks > max(per_epoch(run) // cycle, 1):
                raise ValueError(
                    f"`num_chunks` is {num_chunks}, but run {run.spec.name!r} generates completions for {cycle} "
                    f"optimizer steps at a time (steps_per_generation x num_iterations) and has only "
                    f"{per_epoch(run) // cycle} such cycles per epoch of {num_samples} rows; chunk ends fall between "
                    f"cycles: use num_chunks <= {max(per_epoch(run) // cycle, 1)}"
                )

    # -- watching ----------------------------------------------------------------------------------------------

    def wait(self, timeout: float | None = None, progress: bool | None = None) -> bool:
        """Block until no run is left to train (every run finished, failed, deleted or stopped) and every IC op
        submitted so far has been applied or refused.

        Returns False if `timeout` (seconds) ran out first. `progress`: show one live progress line (steps, chunks
        done of total, runs by status, elapsed, ETA) while waiting; by default where nothing else shows progress,
        i.e. outside a notebook with stderr a terminal.
        """
        if self._engine is None:
            return True
        engine = self._engine

        def done(runs: list[RunRecord], ops: list[ICRecord]) -> bool:
            mine = [r for r in runs if r.run_id in engine.runs]
            return not engine.alive or not (_trainable(mine) or any(op.outcome == "pending" for op in ops))

        def step(seconds: float | None) -> bool:
            return self._store.wait_until(done, seconds)

        if not _progress.wanted(progress, _kernel.in_kernel()):
            # In a kernel, the panel's buttons keep working meanwhile (Run All reaches this while training runs).
            return _kernel.wait(step, timeout)
        with _progress.ProgressLine(self._store, self.name, lambda: engine.runs) as line:
            return _kernel.wait(line.wrap(step), timeout)

    def _training(self) -> bool:
        if self._engine is None or not self._engine.alive:
            return False
        return _trainable([r for r in self._store.runs() if r.run_id in self._engine.runs])

    def runs(self) -> list[RunRecord]:
        """Every run: id, name, resolved config, status and progress (snapshots)."""
        return self._store.runs()

    def results(self):
        """A pandas DataFrame, one row per (run, step, metric).

        Columns: run_id, run_name, step, chunk, metric, value, wall_time.
        """
        import pandas as pd

        names = {r.run_id: r.name for r in self._store.runs()}
        rows = [
            {
                "run_id": m.run_id,
                "run_name": names.get(m.run_id),
                "step": m.step,
                "chunk": m.chunk,
                "metric": m.name,
                "value": m.value,
                "wall_time": m.wall_time,
            }
            for m in self._store.metrics()
        ]
        columns = ["run_id", "run_name", "step", "chunk", "metric", "value", "wall_time"]
        return pd.DataFrame(rows, columns=columns)

    def get_results(self):
        """RapidFire AI's shape of the metrics: a pandas DataFrame with one row per (run_id, step), its chunk (1, 2,
        ...) and epoch (fractional, as the trainer counts it), and one column per metric (loss, learning_rate,
        eval_loss, your compute_metrics' names, ...), sorted by run_id and step."""
        import pandas as pd

        long = self.results()
        if long.empty:
            return pd.DataFrame(columns=["run_id", "step", "chunk", "epoch"])
        wide = long.pivot_table(index=["run_id", "step"], columns="metric", values="value", aggfunc="last")
        wide.columns.name = None
        chunks = long.groupby(["run_id", "step"]).chunk.max()
        wide.insert(0, "chunk", chunks.reindex(wide.index).astype(int))
        wide = wide.reset_index()
        per_epoch = self._steps_per_epoch()
        wide.insert(3, "epoch", wide.step / wide.run_id.map(per_epoch))
        return wide.sort_values(["run_id", "step"]).reset_index(drop=True)

    def _steps_per_epoch(self) -> dict[int, float]:
        """Optimizer steps in one epoch of each run: the end of its first epoch's last chunk (a clone's from the
        run_fit of the run it was cloned from)."""
        chunks_of = {run_id: fit["num_chunks"] for fit in self._store.meta("fits", []) for run_id in fit["run_ids"]}
        parent = {op.new_run_id: op.run_id for op in self._store.ic_log() if op.op == "clone_modify" and op.new_run_id}
        steps: dict[int, float] = {}
        for r in self._store.runs():
            origin = r.run_id
            while origin not in chunks_of and origin in parent:
                origin = parent[origin]
            k = chunks_of.get(origin)
            steps[r.run_id] = float(r.rungs[k - 1]) if k and len(r.rungs) >= k else float("nan")
        return steps

    def get_runs_info(self):
        """One row per run: run_id, name, status, completed_steps, total_steps, chunks_done, chunks_total, error,
        warning (what went wrong without ending the run, e.g. a compute_metrics that raised), source ("initial", or
        the origin of the IC op that made it: "api", "panel", "policy"), cloned_from,
        warm_started_from and config (the resolved trainer, adapter and model arguments)."""
        import pandas as pd

        made_by = {op.new_run_id: op for op in self._store.ic_log() if op.op == "clone_modify" and op.new_run_id}
        rows = []
        for r in self._store.runs():
            op = made_by.get(r.run_id)
            rows.append(
                {
                    "run_id": r.run_id,
                    "name": r.name,
                    "status": r.status.value,
                    "completed_steps": r.step,
                    "total_steps": r.total_steps,
                    "chunks_done": r.chunks_done,
                    "chunks_total": r.chunks_total,
                    "error": r.error,
                    "warning": r.warning,
                    "source": "initial" if op is None else op.origin,
                    "cloned_from": None if op is None else op.run_id,
                    "warm_started_from": op.run_id if op is not None and op.args.get("warm_start") else None,
                    "config": dict(r.config),
                }
            )
        columns = ["run_id", "name", "status", "completed_steps", "total_steps", "chunks_done", "chunks_total"]
        columns += ["error", "warning", "source", "cloned_from", "warm_started_from", "config"]
        return pd.DataFrame(rows, columns=columns)

    def leaderboard(self, metric: str = "eval_loss", mode: str = "min"):
        """One row per run (its name carries the varying hyper-parameters) with its latest eval metrics, best first."""
        import pandas as pd

        runs = self._store.runs()
        metrics = self._store.metrics()
        metric = _logged_name(metric, {m.name for m in metrics})
        latest: dict[int, dict[str, float]] = {}
        for m in metrics:
            if m.name.startswith("eval_"):
                latest.setdefault(m.run_id, {})[m.name] = m.value
        rows = []
        for r in runs:
            rows.append(
                {
                    "run_id": r.run_id,
                    "run": r.name,
                    "status": r.status.value,
                    "step": r.step,
                    **latest.get(r.run_id, {}),
                }
            )
        frame = pd.DataFrame(rows)
        if metric in frame:
            frame = frame.sort_values(metric, ascending=(mode == "min"), na_position="last")
        return frame.reset_index(drop=True)

    def best_run(self, metric: str = "eval_loss", mode: str = "min") -> RunRecord:
        """The run whose latest `metric` is best (`mode` "min" or "max"), among runs that logged it."""
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` is {mode!r}, but must be 'min' or 'max'")
        metrics = self._store.metrics()
        metric = _logged_name(metric, {m.name for m in metrics})
        latest: dict[int, float] = {}
        for m in metrics:
            if m.name == metric:
                latest[m.run_id] = m.value
        if not latest:
            known = sorted({m.name for m in metrics})
            raise ValueError(f"no run has logged metric {metric!r}; logged metrics: {known}")
        pick = min if mode == "min" else max
        return self._store.run(pick(latest, key=lambda rid: latest[rid]))

    def stats(self) -> dict[str, float]:
        """Where the training thread's time went: setup_s, train_s, eval_s, switch_s, cleanup_s (freeing finished
        runs' trainers) and the number of switches.

        A switch is one run handing the model to another at a chunk end; switch_s is the scheduler's own time
        for it (activating the run's adapter and state, recording progress), not training or evaluation.
        """
        return dict(self._engine.stats) if self._engine is not None else {}

    # -- IC ops: steer the running experiment -----------------------------------------------------------------

    def stop(self, run_id: int) -> int:
        """Pause a run at its next optimizer step; it keeps its exact state. Returns the op's id in `ic_log()`."""
        return self._submit_op("stop", run_id)

    def resume(self, run_id: int) -> int:
        """Let a stopped run rejoin the schedule; it continues as though it had never stopped."""
        return self._submit_op("resume", run_id)

    def delete(self, run_id: int) -> int:
        """End a run and free its adapter, optimizer and trainer; its metrics stay (marked deleted)."""
        return self._submit_op("delete", run_id)

    def stop_all(self) -> list[int]:
        """Stop every run still queued or training (the panel's Stop all); returns the ids of the stop ops."""
        return self._stop_all(origin="api")

    def _stop_all(self, origin: str) -> list[int]:
        op_ids = []
        for run_id in self._stoppable():
            try:
                op_ids.append(self._submit_op(op="stop", run_id=run_id, origin=origin))
            except ValueError:  # it ended meanwhile; the refusal is in the log, the others still stop
                pass
        return op_ids

    def clone_modify(self, run_id: int, overrides: dict[str, Any], warm_start: bool = False) -> int:
        """Start a new run from `run_id`'s config with `overrides` (field name -> JSON value); return its id.

        From scratch by default; with `warm_start=True` the clone starts from the parent's current adapter
        weights, optimizer moments, step and data position, and the overrides apply from its next step on.
        """
        return self._clone_modify(run_id, overrides, warm_start, origin="api")[1]

    def _clone_modify(
        self,
        run_id: int,
        overrides: dict[str, Any],
        warm_start: bool,
        origin: str,
        reason: str | None = None,
        rung: int | None = None,
    ) -> tuple[int, int]:
        """Log, check and queue a clone; return (op id, the new run's id)."""
        from rf_notebook.commands import CloneModify

        new_id = self._store.reserve_run_ids(1)[0]
        args = {"overrides": overrides, "warm_start": warm_start, **({"rung": rung} if rung is not None else {})}
        op = self._store.log_op(origin, "clone_modify", run_id, args, new_run_id=new_id, reason=reason)
        try:
            self._precheck("clone_modify", run_id, warm_start)
            parent = self._engine.runs[run_id]
            prepared = self._prepare_clone(parent, new_id, overrides, warm_start, parent.args.seed)
        except (KeyError, TypeError, ValueError) as exc:
            self._store.settle_op(op.op_id, "refused", str(exc))
            raise
        self._engine.submit(
            CloneModify(
                op_id=op.op_id,
                run_id=run_id,
                new_run_id=new_id,
                prepared=prepared,
                warm_start=bool(warm_start),
                overrides=dict(overrides),
            )
        )
        return op.op_id, new_id

    def _prepare_clone(self, parent: Any, new_id: int, overrides: dict[str, Any], warm_start: bool, seed: int) -> Any:
        """Clone `new_id` of the prepared run `parent` with validated `overrides`, prepared like any run, in the
        parent's precision (not that of a later run_fit)."""
        spec = _clone_spec(parent.spec, self._split(parent, overrides, warm_start), warm_start)
        precision = "bf16" if parent.args.bf16 else "fp16" if parent.args.fp16 else "fp32"
        return self._prepare(new_id, spec, seed, precision)

    @staticmethod
    def _split(parent: Any, overrides: dict[str, Any], warm_start: bool) -> dict[str, dict[str, Any]]:
        """Validate a clone's overrides against its parent's resolved configs and sort them by config."""
        from rf_notebook.configs import TRAINING_ARGS, RFLoraConfig
        from rf_notebook.overrides import split_overrides

        return split_overrides(
            overrides,
            current={"training_args": parent.args.to_dict(), "peft_config": parent.lora.to_dict()},
            fields={
                "training_args": TRAINING_ARGS[parent.spec.trainer_type].field_names(),
                "peft_config": RFLoraConfig.field_names(),
            },
            warm_start=bool(warm_start),
        )

    def ic_log(self):
        """Every IC op as a pandas DataFrame: op_id, time, origin, op, run_id, args, outcome, reason, step,
        new_run_id. `step` is the run's optimizer step when the op took effect."""

        import pandas as pd

        columns = [f.name for f in dataclasses.fields(ICRecord)]
        return pd.DataFrame([dataclasses.asdict(r) for r in self._store.ic_log()], columns=columns)

    def _submit_op(
        self,
        op: str,
        run_id: int,
        origin: str = "api",
        reason: str | None = None,
        rung: int | None = None,
        requires: int | None = None,
    ) -> int:
        """Log op `op` on `run_id`, refuse it at once if it cannot apply, else queue it for the scheduler. A
        policy's ops carry their `rung`; a stop that `requires` another op applies only if that one did."""
        if op == "resume" and self._store.storage_error is not None:
            self._store.recover()  # the experiment paused on a failed write: the directory must work again
        args = {k: v for k, v in (("rung", rung), ("requires", requires)) if v is not None}
        record = self._store.log_op(origin, op, run_id, args, reason=reason)
        try:
            self._precheck(op, run_id)
        except ValueError as exc:
            self._store.settle_op(record.op_id, "refused", str(exc))
            raise
        extra = {"requires": requires} if requires is not None else {}
        self._engine.submit(_COMMANDS[op](op_id=record.op_id, run_id=run_id, **extra))
        return record.op_id

    def _policy_step(self, policy: Any, rung: int) -> None:
        """Ask `policy` about rung `rung` (scheduler thread) and submit its decisions as ops, origin "policy"."""
        from rf_notebook.policies import RunAtRung

        metrics = self._store.metrics()
        metric = _logged_name(policy.metric, {m.name for m in metrics})
        values: dict[int, dict[int, float]] = {}
        for m in metrics:
            if m.name == metric:
                values.setdefault(m.run_id, {})[m.chunk] = m.value
        fit = set(self._store.meta("fits")[-1]["run_ids"])  # this run_fit's runs, any status, and their clones
        for op in self._store.ic_log():
            if op.op == "clone_modify" and op.outcome == "applied" and op.run_id in fit:
                fit.add(op.new_run_id)
        runs = [
            RunAtRung(r.run_id, r.name, r.status.value, values.get(r.run_id, {}), {**_resolved(r.config), **r.params})
            for r in self._store.runs()
            if r.run_id in fit
        ]
        if not any(rung in run.values for run in runs):
            logger.warning(
                "policy %r: no run logged %r at chunk %d (logged: %s); nothing to decide",
                policy,
                policy.metric,
                rung,
                sorted({m.name for m in self._store.metrics()}),
            )
        # Each decision is logged (pending) before any is applied, then the rung is marked decided: a process that
        # ends before the mark decides the rung again on resume; one that ends after it applies the pending ops.
        for decision in policy.decide(rung, runs):
            try:
                if decision.op == "stop":
                    self._submit_op("stop", decision.run_id, origin="policy", reason=decision.reason, rung=rung)
                    continue
                clone_op = self._clone_modify(
                    decision.run_id, dict(decision.overrides), True, origin="policy", reason=decision.reason, rung=rung
                )[0]
                if decision.replaces is not None:  # stopped only if its replacement is applied: all or nothing
                    self._submit_op(
                        "stop", decision.replaces, origin="policy", reason=decision.reason, rung=rung, requires=clone_op
                    )
            except (KeyError, TypeError, ValueError) as exc:  # refused and logged as such; the others go on
                logger.warning("policy decision %s on run %d refused: %s", decision.op, decision.run_id, exc)
        self._store.set_meta("policy_rung", {"fit": len(self._store.meta("fits")), "rung": rung})

    def _stoppable(self) -> list[int]:
        return [r.run_id for r in self._store.runs() if r.status in (RunStatus.QUEUED, RunStatus.TRAINING)]

    def _precheck(self, op: str, run_id: int, warm_start: bool = False) -> None:
        """Refuse at once what cannot apply now (the scheduler checks again when it applies the op)."""
        if self._engine is None or not self._engine.alive:
            raise ValueError(f"experiment {self.name!r} is not running (not started, or end() was called)")
        reason = self._engine.refusal(op, run_id, warm_start=warm_start)
        if reason is not None:
            raise ValueError(reason)

    def panel(self) -> None:
        """Show the experiment's live panel in this cell's output (the same panel each time it is shown)."""
        from rf_notebook.widget import Panel

        if self._panel is None:
            self._panel = Panel(self)
        self._panel.show()

    # -- taking results away -----------------------------------------------------------------------------------

    def export(self, run_id: int, path: str | Path) -> Path:
        """Write run `run_id`'s adapter as a PEFT folder (for `PeftModel.from_pretrained`) plus rf_config.json.

        While the experiment holds its models this is the adapter as it is now; after `end()` or in a new
        process it is the adapter of the run's last checkpoint (its last chunk end)."""
        record = self._store.run(run_id)  # unknown ids raise KeyError naming the known ones
        info = {"run_id": record.run_id, "name": record.name, "config": record.config}
        if self._engine is not None and self._engine.alive and run_id in self._engine.runs:
            command = self._engine.submit(Export(run_id=run_id, path=str(path)))
            return Path(command.reply.result())
        from rf_notebook.engine._torch import export_checkpoint

        return export_checkpoint(record.config.get("training_args", {}).get("output_dir", ""), path, info)

    def end(self, wait: bool = True) -> None:
        """Finish the experiment and release every model, adapter and trainer.

        Runs still training are first trained to their end, as after RapidFire AI's blocking `run_fit`: one line
        says so, and the panel's buttons keep working meanwhile (its Stop all ends the wait). `end(wait=False)`
        stops them where they are instead (they can continue with `run_fit(..., resume=True)`). An interrupt while
        waiting leaves the experiment running.
        """
        if wait and self._training():
            live = sum(r.status in (RunStatus.QUEUED, RunStatus.TRAINING) for r in self._store.runs())
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
        if self._panel is not None:
            self._panel.stop_writer()


def _logged_name(metric: str, logged: set[str]) -> str:
    """`metric` as it was logged: an evaluation metric is stored with the trainer's `eval_` prefix, and its name as
    `compute_metrics` returned it (RapidFire AI's, e.g. "rougeL") names it too."""
    return f"eval_{metric}" if metric not in logged and f"eval_{metric}" in logged else metric


def _resolved(config: Any) -> dict[str, Any]:
    """A run's resolved trainer and adapter arguments as flat params ("training_args.learning_rate": ...)."""
    flat: dict[str, Any] = {}
    for section in ("training_args", "peft_config"):
        for key, value in (config.get(section) or {}).items() if isinstance(config, dict) else ():
            flat[f"{section}.{key}"] = value
    return flat


_COMMANDS = {"stop": Stop, "resume": Resume, "delete": Delete}


def _trainable(runs: list[RunRecord]) -> bool:
    return any(r.status in (RunStatus.QUEUED, RunStatus.TRAINING) for r in runs)


def _check_num_gpus(num_gpus: Any) -> None:
    """RapidFire AI's devices per run: here every run shares the process's one device."""
    if num_gpus is not None and (isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus != 1):
        raise ValueError(
            f"`num_gpus` is {num_gpus!r}, but rf_notebook trains every run on the process's one device: use "
            "num_gpus=1 or leave it unset"
        )


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _dtype_name(value: Any) -> str:
    """ "bfloat16" for torch.bfloat16 or "bfloat16"; "auto" stays "auto"."""
    return str(value).removeprefix("torch.")


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_has_bf16() -> bool:
    """Whether this GPU computes in bfloat16 natively (Ampere and later); a T4 or V100 only emulates it."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def torch_device_index() -> int:
    """The GPU every run trains on: the trainers' (Accelerate's) device, not whatever device the calling thread has
    current (`torch.cuda.set_device` in the notebook), so the base model and the trainers never disagree."""
    from accelerate import PartialState

    return PartialState().device.index or 0


def data_fingerprint(dataset: Any) -> str:
    """A content hash of a data set (datasets.Dataset: its Arrow table; else its rows as JSON)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    table = getattr(dataset, "data", None)
    table = getattr(table, "table", table)  # datasets wraps the pyarrow table
    if hasattr(dataset, "_indices") and getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()  # a selected / shuffled view: hash the rows it shows
        table = dataset.data.table
    if hasattr(table, "to_batches"):
        import pyarrow as pa

        digest.update(repr(table.schema).encode())
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=65536):
                writer.write_batch(batch)
        digest.update(sink.getvalue())
    else:
        for row in dataset:
            digest.update(json.dumps(row, sort_keys=True, default=repr).encode())
    return f"{len(dataset)} rows, {digest.hexdigest()}"


def _config_changes(stored: Any, new: Any) -> str:
    """What differs between a stored resolved config and a rebuilt one ("" if nothing); the fields the experiment
    owns (the run's folder, checkpoints, trackers: values rf_notebook sets, not the user) are ignored."""
    from rf_notebook.configs import OWNED_FIELDS

    a, b = json.loads(json.dumps(stored, default=str)), json.loads(json.dumps(new, default=str))
    # Activation checkpointing recomputes exactly what it dropped (random state included): it changes memory and
    # time, never the result (and experiments written before it defaulted off here have no value stored).
    ignored = (*OWNED_FIELDS, "activation_checkpointing", "activation_checkpointing_kwargs")
    for config in (a, b):
        for name in ignored:
            config.get("training_args", {}).pop(name, None)
    changes = []
    for section in sorted(set(a) | set(b)):
        x, y = a.get(section), b.get(section)
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y)):
                if x.get(key) != y.get(key):
                    changes.append(f"{section}.{key}: {x.get(key)!r} -> {y.get(key)!r}")
        elif x != y:
            changes.append(f"{section}: {x!r} -> {y!r}")
    return "; ".join(changes)


def _clone_spec(parent: RunSpec, overrides: dict[str, dict[str, Any]], warm_start: bool) -> RunSpec:
    """The parent's spec with overrides applied, named after the parent and what changed."""
    from rf_notebook.configs import _ALIASES, TRAINING_ARGS, format_value

    mc = parent.model_config
    training_args = (mc.training_args or TRAINING_ARGS[parent.trainer_type]()).replace(**overrides["training_args"])
    peft_config = mc.peft_config.replace(**overrides["peft_config"])
    changes = {**overrides["peft_config"], **overrides["training_args"]}
    label = ", ".join(f"{_ALIASES.get(k, k)}={format_value(v)}" for k, v in changes.items()) or "same config"
    name = f"{parent.name} > {label}{' (warm)' if warm_start else ''}"
    params = {
        **parent.params,
        **{f"training_args.{k}": v for k, v in overrides["training_args"].items()},
        **{f"peft_config.{k}": v for k, v in overrides["peft_config"].items()},
    }
    model_config = mc.replace(training_args=training_args, peft_config=peft_config)
    return RunSpec(name, parent.trainer_type, model_config, params)
