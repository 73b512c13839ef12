"""The anneal probe: where would a run end if its learning rate annealed now?

Early in a sweep, a run with a high learning rate often looks worse than one with a low rate and ends better, once
its rate has come down. At a rung, the probe trains a throwaway copy of the run for a few optimizer steps with the
learning rate taken down the rest of the run's own schedule (compressed into those steps), evaluates it, and puts
everything back: adapter weights, gradients, optimizer state (the copy has its own optimizer), random streams,
Accelerate's gradient state, the module's train / eval mode and the trainer's metric buffers. The run goes on
bit for bit as if never probed (tested).

    loss = anneal_probe(trainer, params, steps=4, rows=probe_rows(len(data), 4 * 8, seed, rung))

The probe's batches are the same rows for every run at a rung (drawn with the experiment's seed and the rung), so
runs are compared on equal data. Runs trained by reward (GRPO, RLOO) have no data loss to anneal on: refused
before training (`rf_notebook._args.resolve_probe`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from rf_notebook.engine import _process_state
from rf_notebook.engine.backend import RunStateLost

__all__ = ["anneal_probe", "eval_loss", "probe_lrs", "probe_rows"]

# What a trainer's `compute_loss` / `prediction_step` add to the metrics of the run's next log (TRL keeps
# running buffers): saved before the probe and put back after, so the run logs what it would have.
_TRAINER_BUFFERS = ("_metrics", "_stored_metrics", "_total_train_tokens", "_textual_logs")


def probe_rows(num_rows: int, count: int, seed: int, rung: int) -> list[int]:
    """`count` row indices of a `num_rows` data set (with repeats only if it is smaller), the same for every run at
    `rung` of an experiment seeded `seed`."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + rung)
    order: list[int] = []
    while len(order) < count:
        order += torch.randperm(num_rows, generator=generator).tolist()
    return order[:count]


def probe_lrs(scheduler: Any, optimizer: Any, step: int, total: int, steps: int) -> list[list[float]]:
    """Each probe step's learning rate per param group: the run's own schedule from `step` to its end `total`,
    sampled at `steps` evenly spaced points, the last one at `total - 1` (the run's own last step). A schedule
    that is not a `LambdaLR` (whose rate at any step can be read) decays linearly from the current rate to 0."""
    remaining = max(total - step, 1)
    at = [step + math.ceil((i + 1) * remaining / steps) - 1 for i in range(steps)]
    lambdas = getattr(getattr(scheduler, "scheduler", scheduler), "lr_lambdas", None)  # Accelerate may wrap it
    groups = optimizer.param_groups
    if lambdas is not None and len(lambdas) == len(groups) and all("initial_lr" in g for g in groups):
        return [[g["initial_lr"] * fn(t) for g, fn in zip(groups, lambdas)] for t in at]
    return [[g["lr"] * (steps - i) / (steps + 1) for g in groups] for i in range(steps)]


def _batches(trainer: Any, rows: Sequence[int], size: int) -> list[Any]:
    """The rows, as the trainer's own data loader would hand them to `compute_loss`, `size` per batch."""
    import datasets

    data = trainer.train_dataset
    collate = trainer.data_collator
    if isinstance(data, datasets.Dataset):
        data = trainer._remove_unused_columns(data.select(rows), description="training")
        features = [data[i] for i in range(len(data))]
    else:
        collate = trainer._get_collator_with_removed_columns(collate, description="training")
        features = [data[i] for i in rows]
    return [trainer._prepare_inputs(collate(features[i : i + size])) for i in range(0, len(features), size)]


def _optimizer_copy(optimizer: Any) -> Any:
    """A new optimizer of the run's kind over the same parameters, holding a deep copy of its state."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps the torch optimizer
    clone = type(inner)([dict(group) for group in inner.param_groups])
    clone.load_state_dict(copy.deepcopy(inner.state_dict()))
    return clone


def eval_loss(trainer: Any) -> float:
    """The trainer's eval loss as `evaluate()` reports it (the mean over rows), without its callbacks and logs."""
    model, total, rows = trainer.model, 0.0, 0
    model.eval()
    for inputs in trainer.get_eval_dataloader():
        loss, _, _ = trainer.prediction_step(model, inputs, prediction_loss_only=True)
        count = _rows_in(inputs)
        total += float(loss) * count
        rows += count
    return total / rows


def _rows_in(inputs: Any) -> int:
    for value in inputs.values():
        if hasattr(value, "shape") and len(value.shape) > 0:
            return int(value.shape[0])
    return 1


def _put_back(params: list[Any], weights: list[Any], grads: list[Any]) -> None:
    import torch

    with torch.no_grad():
        for p, saved, grad in zip(params, weights, grads):
            p.copy_(saved)
            p.grad = grad


def anneal_probe(trainer: Any, params: list[Any], steps: int, rows: Sequence[int]) -> float:
    """Train a copy of the run `steps` optimizer steps on `rows` with its learning rate annealed, evaluate it, and
    restore the run exactly. `params` are the run's trainable parameters (its adapter). Returns the eval loss."""
    import torch

    model = trainer.model
    args = trainer.args
    saved = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    buffers = {k: copy.deepcopy(trainer.__dict__[k]) for k in _TRAINER_BUFFERS if k in trainer.__dict__}
    state, training = _process_state.capture(), model.training
    loaders = getattr(trainer.accelerator, "_dataloaders", None)
    prepared = None if loaders is None else len(loaders)  # each data loader made is kept there: let ours go
    try:
        if steps:
            optimizer = _optimizer_copy(trainer.optimizer)
            state_now = trainer.state
            schedule = probe_lrs(trainer.lr_scheduler, optimizer, state_now.global_step, state_now.max_steps, steps)
            micro = args.per_device_train_batch_size
            accumulation = args.gradient_accumulation_steps
            batches = _batches(trainer, rows, micro)
            model.train()
            for lrs, first in zip(schedule, range(0, len(batches), accumulation)):
                for group, lr in zip(optimizer.param_groups, lrs):
                    group["lr"] = lr
                for p in params:
                    p.grad = None
                micro_batches = batches[first : first + accumulation]
                for inputs in micro_batches:
                    with trainer.compute_loss_context_manager():
                        loss = trainer.compute_loss(model, inputs)
                    (loss / len(micro_batches)).backward()
                if args.max_grad_norm is not None and args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
            del optimizer
        with torch.no_grad():
            return eval_loss(trainer)
    finally:
        try:
            _put_back(params, saved, grads)
            trainer.__dict__.update(buffers)
            if prepared is not None:
                del loaders[prepared:]
            model.train(training)
            _process_state.restore(state)
        except Exception as exc:  # the run is not what it was: it must fail, not train on
            raise RunStateLost(f"putting the run back after its anneal probe failed: {exc!r}") from exc
