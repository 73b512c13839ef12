"""Chunk plans: where each run pauses so that all runs can be compared at the same data position.

Every epoch of the training set (in the trainer's own sample order for the seed) is cut into `num_chunks`
contiguous pieces at the same *sample* positions for every run, `k * num_samples / num_chunks`, each rounded
to the run's optimizer-step size (batch size x gradient accumulation). Runs with different batch sizes thus
pause after (almost) the same examples. A chunk's end is a "rung": an (epoch, chunk) pair plus the global
optimizer step where it falls. Pure: no torch.

    plan = chunk_plan(num_samples=1024, batch_size=16, num_chunks=4, max_steps=64)
    [r.step for r in plan.rungs]  # [16, 32, 48, 64]
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["Rung", "ChunkPlan", "chunk_plan", "steps_per_epoch"]


@dataclasses.dataclass(frozen=True, order=True)
class Rung:
    epoch: int  # 0-based
    chunk: int  # 1-based, within the epoch
    step: int  # global optimizer step at the rung


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    num_chunks: int
    steps_per_epoch: int
    total_steps: int
    rungs: tuple[Rung, ...]  # increasing; the last one is at total_steps

    def next_rung(self, step: int) -> Rung | None:
        """The first rung strictly after optimizer step `step`, or None when training is over."""
        for rung in self.rungs:
            if rung.step > step:
                return rung
        return None

    def rungs_done(self, step: int) -> int:
        return sum(rung.step <= step for rung in self.rungs)


def steps_per_epoch(num_samples: int, batch_size: int, grad_accum: int = 1, drop_last: bool = False) -> int:
    """Optimizer steps in one epoch, as `transformers.Trainer` counts them."""
    batches = num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)
    return max(math.ceil(batches / grad_accum), 1)


def chunk_plan(
    num_samples: int,
    batch_size: int,
    num_chunks: int,
    *,
    grad_accum: int = 1,
    max_steps: int = -1,
    num_train_epochs: float = 1.0,
    drop_last: bool = False,
    per_epoch: int | None = None,
    rows_per_step: float | None = None,
    align: int = 1,
) -> ChunkPlan:
    """The rungs of one run. `max_steps > 0` wins over `num_train_epochs`, as in `transformers`.

    `per_epoch` and `rows_per_step` replace what batch size, accumulation and drop_last imply, for trainers
    whose optimizer step is not a plain batch of rows (GRPO / RLOO: groups of completions per prompt). Chunk ends
    inside an epoch fall on multiples of `align` optimizer steps (GRPO / RLOO: a whole generation cycle).
    """
    if num_samples < 1:
        raise ValueError(f"the training set has {num_samples} rows, but must have at least 1")
    if num_chunks < 1:
        raise ValueError(f"`num_chunks` is {num_chunks}, but must be >= 1")
    if per_epoch is None:
        per_epoch = steps_per_epoch(num_samples, batch_size, grad_accum, drop_last)
    if align < 1:
        raise ValueError(f"`align` is {align}, but must be >= 1")
    if num_chunks > per_epoch:
        raise ValueError(
            f"`num_chunks` is {num_chunks}, but a run with batch size {batch_size} x {grad_accum} accumulation "
            f"has only {per_epoch} optimizer steps per epoch of {num_samples} rows; use num_chunks <= {per_epoch}"
        )
    if num_chunks > max(per_epoch // align, 1):
        raise ValueError(
            f"`num_chunks` is {num_chunks}, but a run whose generation cycle is {align} optimizer steps has only "
            f"{per_epoch // align} whole cycles per epoch of {num_samples} rows; chunk ends fall between cycles: "
            f"use num_chunks <= {max(per_epoch // align, 1)}"
        )
    total = max_steps if max_steps > 0 else math.ceil(num_train_epochs * per_epoch)
    samples_per_step = rows_per_step if rows_per_step is not None else batch_size * grad_accum
    within: list[int] = []  # step offsets of the chunk ends inside one epoch
    for k in range(1, num_chunks + 1):
        if k == num_chunks:
            within.append(per_epoch)
            break
        step = k * num_samples / num_chunks / samples_per_step
        step = align * math.floor(step / align + 0.5)
        low = within[-1] + align if within else align
        high = align * (per_epoch // align) - (num_chunks - k) * align
        within.append(min(max(step, low), high))
    rungs: list[Rung] = []
    epoch = 0
    while not rungs or rungs[-1].step < total:
        for k, offset in enumerate(within, start=1):
            step = epoch * per_epoch + offset
            if step >= total:
                rungs.append(Rung(epoch, k, total))
                break
            rungs.append(Rung(epoch, k, step))
        epoch += 1
    return ChunkPlan(num_chunks, per_epoch, total, tuple(rungs))
