"""Turning a run's spec into a `PreparedRun`, on the caller's thread, before anything trains: its resolved trainer
arguments and real TRL / PEFT config objects (TRL validates the values), fitted to this machine's device, and a
clone's spec from its parent's with validated overrides."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

from rf_notebook.configs import TRAINING_ARGS, RFLoraConfig, RFModelConfig, stable_repr
from rf_notebook.engine.backend import PreparedRun
from rf_notebook.overrides import split_overrides
from rf_notebook.search import ALIASES, RunSpec, format_value
from rf_notebook.trainers import TRAINERS

__all__ = [
    "Preparer",
    "check_num_chunks",
    "clone_spec",
    "default_model_fn",
    "format_datasets",
    "gpu_has_bf16",
    "on_gpu",
    "torch_device_index",
]


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


class Preparer:
    """Prepares the runs of one experiment (folder `path`), collecting what this machine cannot honour."""

    def __init__(self, path: Path):
        self.path = path
        self.device_changes: list[str] = []  # said once per experiment, in one warning

    def prepare(self, run_id: int, spec: RunSpec, seed: int, precision: str | None = None) -> PreparedRun:
        """Resolve one run's arguments and build its real TRL / PEFT configs (TRL validates values here)."""
        from accelerate import PartialState

        mc = spec.model_config
        if mc.peft_config is None:
            raise ValueError(f"run {spec.name!r} has no peft_config; rf_notebook trains LoRA adapters (RFLoraConfig)")
        gpu = on_gpu()
        PartialState(cpu=not gpu)  # one process-wide state that every run's arguments reuse
        trainer = TRAINERS[spec.trainer_type]
        user_args, mc = self.fit_device(
            dict(mc.training_args.kwargs) if mc.training_args is not None else {}, mc, gpu, precision
        )
        spec = dataclasses.replace(spec, model_config=mc)
        try:
            kwargs = trainer.resolve_args(
                user_args, output_dir=str(self.path / "runs" / str(run_id)), seed=seed, on_gpu=gpu
            )
            # Building a TRL config would otherwise reset Accelerate's process-wide state under the other runs.
            accelerator_config = {**(kwargs.get("accelerator_config") or {}), "use_configured_state": True}
            # replace(), not the constructor: these are rf_notebook's resolved values, the owned fields included
            args = trainer.CONFIG().replace(**kwargs).build(accelerator_config=accelerator_config)
            lora = mc.peft_config.build()
        except Exception as exc:
            raise ValueError(f"run {spec.name!r} has an invalid config: {exc}") from exc
        template = getattr(args, "chat_template_path", None)
        if template is not None and not (os.path.isfile(template) and template.endswith((".jinja", ".j2"))):
            raise ValueError(
                f"run {spec.name!r}: `chat_template_path` is {template!r}, but must be a .jinja / .j2 file here: "
                "TRL copies a model's template by adding its tokens to the base and resizing its embeddings, and "
                "every run shares the base"
            )
        config = {
            "trainer_type": spec.trainer_type,
            "model_name": mc.model_name,
            "model_kwargs": mc.model_kwargs,
            "peft_config": dict(mc.peft_config.kwargs),
            "training_args": kwargs,
            "compute_metrics": stable_repr(mc.compute_metrics) if mc.compute_metrics else None,
            "formatting_func": stable_repr(mc.formatting_func) if mc.formatting_func else None,
            "generation_config": mc.generation_config,
            "ref_model": [mc.ref_model_name, mc.ref_model_kwargs] if mc.ref_model_name else None,
        }
        return PreparedRun(run_id, spec, args, lora, config)

    def prepare_clone(
        self,
        parent: PreparedRun,
        new_id: int,
        overrides: dict[str, Any],
        warm_start: bool,
        seed: int,
        name: str | None = None,
    ) -> PreparedRun:
        """Clone `new_id` of the prepared run `parent` with validated `overrides`, prepared like any run, in the
        parent's precision (not that of a later run_fit); `name` (default: the parent's and what changed)."""
        split = split_overrides(
            overrides,
            current={"training_args": _resolved_args(parent.args), "peft_config": parent.lora.to_dict()},
            fields={
                "training_args": TRAINING_ARGS[parent.spec.trainer_type].field_names(),
                "peft_config": RFLoraConfig.field_names(),
            },
            warm_start=bool(warm_start),
        )
        spec = clone_spec(parent.spec, split, warm_start, name)
        precision = "bf16" if parent.args.bf16 else "fp16" if parent.args.fp16 else "fp32"
        return self.prepare(new_id, spec, seed, precision)

    def fit_device(
        self, user_args: dict[str, Any], mc: RFModelConfig, on_gpu: bool, precision: str | None = None
    ) -> tuple[dict, RFModelConfig]:
        """What a notebook written for a GPU asks that this machine cannot honour, adjusted (and noted in
        `device_changes`) before anything trains: bf16 / fp16 on a CPU (the base loaded and trained in float32),
        bf16 on a GPU without bfloat16 (a T4, a V100: fp16 mixed precision and a float16 base), `device_map` (every
        run shares one device), `load_in_4bit` / `load_in_8bit` (a `BitsAndBytesConfig` where bitsandbytes and a
        GPU are there, else an unquantized base), bitsandbytes' 8-bit / paged optimizers without them (AdamW).
        run_fit's `precision` sets bf16 / fp16 for every run, over the configs."""
        changes = []
        kwargs = dict(mc.model_kwargs or {})
        quantizable = on_gpu and importlib.util.find_spec("bitsandbytes") is not None
        unquantizable = "bitsandbytes is not installed" if on_gpu else "this machine has no GPU"
        if precision is not None:
            user_args["bf16"], user_args["fp16"] = precision == "bf16", precision == "fp16"
        elif not on_gpu:
            for flag in ("bf16", "fp16"):
                if user_args.get(flag):
                    user_args[flag] = False
                    changes.append(f"{flag}=True (this machine has no GPU: trained in float32)")
        elif not gpu_has_bf16() and "bf16" not in user_args and not user_args.get("fp16"):
            # TRL's default is bf16 unless fp16; a T4 or V100 only emulates it (slowly, or not at all on older torch).
            # A run that asks for bf16=True gets it.
            fp16 = user_args.get("fp16") is not False  # fp16=False said: float32
            user_args["bf16"], user_args["fp16"] = False, fp16
            changes.append(
                f"bf16 (TRL's default; this GPU has no bfloat16: {'fp16 mixed precision' if fp16 else 'float32'})"
            )
        for key in ("dtype", "torch_dtype"):  # transformers 5's name, and the older one
            name = str(kwargs.get(key)).removeprefix("torch.")
            if key not in kwargs or name in ("float32", "None"):
                continue
            if not on_gpu:
                changes.append(f"model_kwargs {key}={name} (no GPU: the base is loaded in float32)")
                kwargs[key] = "float32"
            elif name == "bfloat16" and not gpu_has_bf16():
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
            if change not in self.device_changes:
                self.device_changes.append(change)
        return user_args, mc


def clone_spec(
    parent: RunSpec, overrides: dict[str, dict[str, Any]], warm_start: bool, name: str | None = None
) -> RunSpec:
    """The parent's spec with (validated, split) overrides applied, named `name` or after the parent and what
    changed."""
    mc = parent.model_config
    training_args = (mc.training_args or TRAINING_ARGS[parent.trainer_type]()).replace(**overrides["training_args"])
    peft_config = mc.peft_config.replace(**overrides["peft_config"])
    changes = {**overrides["peft_config"], **overrides["training_args"]}
    label = ", ".join(f"{ALIASES.get(k, k)}={format_value(v)}" for k, v in changes.items()) or "same config"
    name = name or f"{parent.name} > {label}{' (warm)' if warm_start else ''}"
    params = {
        **parent.params,
        **{f"training_args.{k}": v for k, v in overrides["training_args"].items()},
        **{f"peft_config.{k}": v for k, v in overrides["peft_config"].items()},
    }
    model_config = mc.replace(training_args=training_args, peft_config=peft_config)
    return RunSpec(name, parent.trainer_type, model_config, params)


def format_datasets(trainer_type: str, specs: list[RunSpec], train: Any, evl: Any) -> dict[int, tuple[Any, Any]]:
    """Each distinct `formatting_func` of the runs applied once to the train and eval sets ({id(func): (train,
    eval)}), and every data set the runs will see checked for the trainer's columns, before anything is loaded."""
    from rf_notebook.trainers._common import apply_formatting

    trainer = TRAINERS[trainer_type]
    formatted = {}
    for formatting_func in {id(s.model_config.formatting_func): s.model_config.formatting_func for s in specs}.values():
        run_train, run_eval = train, evl
        if formatting_func is not None:
            run_train = apply_formatting(train, formatting_func, "train")
            run_eval = None if evl is None else apply_formatting(evl, formatting_func, "eval")
            formatted[id(formatting_func)] = (run_train, run_eval)
        trainer.check_dataset(run_train, "train", None)
        if run_eval is not None:
            trainer.check_dataset(run_eval, "eval", None)
    return formatted


def check_num_chunks(prepared: list[PreparedRun], num_samples: int, num_chunks: int) -> None:
    """Refuse a `num_chunks` that some run cannot cut its epoch into (a chunk ends on an optimizer step, and for
    GRPO / RLOO between whole generation cycles)."""

    def per_epoch(run: PreparedRun) -> int:
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


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_has_bf16() -> bool:
    """Whether this GPU computes in bfloat16 natively (Ampere and later); a T4 or V100 only emulates it."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def torch_device_index() -> int:
    """The GPU every run trains on: the trainers' (Accelerate's) device, not whatever device the calling thread has
    current (`torch.cuda.set_device` in the notebook), so the base model and the trainers never disagree."""
    from accelerate import PartialState

    return PartialState().device.index or 0


def _resolved_args(args: Any) -> dict[str, Any]:
    """A TRL config's values as `to_dict()` gives them (enums as their values), except the `*_token` fields, which
    it writes as placeholders ("<EOS_TOKEN>"): their own values."""
    values = args.to_dict()
    for name in values:
        if name.endswith("_token"):
            values[name] = getattr(args, name)
    return values
