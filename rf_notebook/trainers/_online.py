"""What GRPO and RLOO share: prompts in, `num_generations` sampled completions per prompt, rewards from the
run's `reward_funcs`. The reference model (beta > 0) is the shared base with adapters disabled, as TRL does for a
PEFT model: no second copy is loaded. Sampling draws from the run's own random stream, which the engine saves and
restores at every switch, so an interleaved run generates exactly what it would generate alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rf_notebook.configs import RFModelConfig
from rf_notebook.trainers._common import base_args, base_is_reference, check_columns
from rf_notebook.trainers._prepared import PreparedData

DATASET_FORMATS: tuple[tuple[str, ...], ...] = (("prompt",),)


def check_dataset(dataset: Any, role: str, formatting_func: Callable | None, *, trainer_type: str) -> None:
    check_columns(dataset, role, trainer_type, DATASET_FORMATS)


def resolve_args(user: Mapping[str, Any], *, spec: Any, output_dir: str, seed: int, on_gpu: bool) -> dict[str, Any]:
    """The base defaults, an eval batch that holds whole groups, and the group-size rule checked in plain words."""
    args = base_args(user, output_dir=output_dir, seed=seed, on_gpu=on_gpu)
    defaults = {f.name: f.default for f in dataclasses.fields(spec.target()) if f.init}
    value = {name: args.get(name, defaults.get(name)) for name in defaults}
    groups = value["num_generations"]
    if isinstance(groups, int) and groups >= 2:
        per_step = value["per_device_train_batch_size"] * (
            value["steps_per_generation"] or value["gradient_accumulation_steps"]
        )
        per_generation = value["generation_batch_size"] or per_step
        if per_generation % groups:
            raise ValueError(
                f"`per_device_train_batch_size` x `gradient_accumulation_steps` = {per_generation} completions per "
                f"generation batch, but that must be a multiple of `num_generations` = {groups}: every prompt's "
                f"{groups} completions are scored and trained together (e.g. per_device_train_batch_size="
                f"{groups * math.ceil(value['per_device_train_batch_size'] / groups)})"
            )
        if "per_device_eval_batch_size" not in user:  # evaluation generates whole groups too
            eval_groups = value.get("num_generations_eval") or groups
            eval_batch = value["per_device_eval_batch_size"]
            args["per_device_eval_batch_size"] = eval_groups * math.ceil(eval_batch / eval_groups)
    return args


def _geometry(args: Any) -> tuple[int, int]:
    """(prompts per generation batch, micro-batches per generation batch including its reuses)."""
    prompts = args.generation_batch_size // args.num_generations
    return prompts, args.steps_per_generation * args.num_iterations


def steps_per_epoch(num_rows: int, args: Any) -> int:
    """Optimizer steps per pass over the prompts, as the trainer counts them (TRL's RepeatSampler drops a last,
    incomplete generation batch)."""
    prompts, micro_batches = _geometry(args)
    return math.ceil((num_rows // prompts) * micro_batches / args.gradient_accumulation_steps)  # 0: too few rows


def rows_per_step(args: Any) -> float:
    prompts, micro_batches = _geometry(args)
    return prompts * args.gradient_accumulation_steps / micro_batches


def rung_multiple(args: Any) -> int:
    """Optimizer steps per generation cycle: TRL generates for steps_per_generation x num_iterations micro-batches
    at once and trains on the buffered completions in between, so chunk ends fall where that buffer is used up
    (every run is then compared after the same prompts, and a chunk end carries no buffered generations)."""
    _, micro_batches = _geometry(args)
    accumulation = args.gradient_accumulation_steps
    return micro_batches * accumulation // math.gcd(micro_batches, accumulation) // accumulation


def prepared_rows(
    tokenizer: Any, args: Any, train_dataset: Any, eval_dataset: Any, formatting_func: Any, prepared: PreparedData
) -> int | None:
    """None: every GRPO / RLOO run's trainer is built before anything trains, since its constructor checks
    settings that differ between runs (generation, rewards) and what it refuses must be raised by `run_fit`."""
    return None


def build_trainer(
    trainer_name: str,
    model: Any,
    tokenizer: Any,
    args: Any,
    train_dataset: Any,
    eval_dataset: Any,
    model_config: RFModelConfig,
    callbacks: Sequence[Any],
    *,
    load_reference: Callable[[Any], Any],
    prepared: PreparedData,
) -> Any:
    import trl

    funcs = model_config.reward_funcs
    with base_is_reference(model, model.active_adapter):
        return getattr(trl, trainer_name)(
            model=model,
            reward_funcs=list(funcs) if isinstance(funcs, (list, tuple)) else [funcs],
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )
