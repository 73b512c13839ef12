"""A run's live training state: its trainer, suspended mid-`train()` inside a greenlet between chunks.

Each run's `trainer.train()` is called exactly once, inside its own greenlet, with the full data set and step
budget, so TRL's LR schedule, global step, gradient accumulation and logging are its own. A callback switches
back to the scheduler at the start of the optimizer step where the next rung falls; `advance()` switches in
again. All greenlets live in the scheduler thread. What the trainer shares with other runs (active adapter,
the forward patch its constructor installed, random state) is put back before it resumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import greenlet
from transformers import TrainerCallback

from rf_notebook.chunking import ChunkPlan
from rf_notebook.engine import _process_state

__all__ = ["RunSlot"]


class _Suspend(TrainerCallback):
    """Switches to the scheduler when the run reaches its pause step, or when commands wait for the scheduler
    (so that IC ops take effect between two optimizer steps, not at the end of a chunk)."""

    def __init__(self, slot: RunSlot):
        self.slot = slot

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.slot.pause_at or self.slot.should_yield():
            self.slot.suspend()


class _EpochStart(TrainerCallback):
    """Keeps the process state at the start of each epoch: a run resumed from a checkpoint at an epoch boundary
    gets its random state back at exactly that point (transformers reloads it before the new epoch's data
    loader starts, while a suspension at that rung happens after)."""

    def __init__(self, slot: RunSlot):
        self.slot = slot

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.slot.epoch_start = (state.global_step, _process_state.capture())


class _Record(TrainerCallback):
    """Forwards the trainer's logs (train loss, eval metrics, ...) to the engine."""

    # Aggregates over a whole `train()` call mean nothing when runs are interleaved.
    SKIP = frozenset(
        {"epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"}
    )

    def __init__(self, slot: RunSlot, sink: Any):
        self.slot, self.sink = slot, sink

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {
            k: float(v)
            for k, v in (logs or {}).items()
            if k not in self.SKIP and not k.endswith(("_runtime", "_per_second")) and isinstance(v, (int, float))
        }
        if values:
            self.sink(self.slot, state.global_step, values)

    def on_evaluate(self, args, state, control, **kwargs):
        self.slot.evaluated_at = state.global_step


@dataclasses.dataclass
class Patches:
    """Instance-level `forward` overrides on the shared model's modules, as one trainer left them."""

    forwards: dict[int, Any]

    @staticmethod
    def capture(modules: list[Any]) -> Patches:
        return Patches({i: m.__dict__.get("forward") for i, m in enumerate(modules)})

    def apply(self, modules: list[Any]) -> None:
        for i, module in enumerate(modules):
            forward = self.forwards.get(i)
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward


class RunSlot:
    """One run's trainer, greenlet, random state and chunk plan. Used only from the scheduler thread."""

    def __init__(self, run_id: int, adapter: str, should_yield: Callable[[], bool] = lambda: False):
        self.run_id, self.adapter, self.should_yield = run_id, adapter, should_yield
        self.resume_from: str | None = None  # a checkpoint folder to start train() from (warm start)
        self.plan: ChunkPlan | None = None  # known once the trainer has prepared its data set
        self.trainer: Any = None
        self.patches: Patches | None = None
        self.state: _process_state.ProcessState | None = None
        self.epoch_start: tuple[int, _process_state.ProcessState] | None = None  # (step, state) of the last epoch
        self.evaluated_at: int | None = None  # the step of the trainer's last evaluation
        self.pause_at = 0
        self.step = 0  # optimizer steps done, as of the last suspension
        self.finished = False  # train() has returned
        self._greenlet: greenlet.greenlet | None = None

    def callbacks(self, sink: Any) -> list[TrainerCallback]:
        return [_Suspend(self), _Record(self, sink), _EpochStart(self)]

    @property
    def started(self) -> bool:
        """Whether its `train()` has begun (its optimizer exists)."""
        return self._greenlet is not None

    def resume_state(self) -> _process_state.ProcessState:
        """The random state a checkpoint of this run at its current step must carry."""
        if self.epoch_start is not None and self.epoch_start[0] == self.step:
            return self.epoch_start[1]
        return self.state

    def advance(self, pause_at: int) -> None:
        """Train until optimizer step `pause_at` (or the end). The caller has activated this run's state."""
        self.pause_at = pause_at
        if self._greenlet is None:
            self._greenlet = greenlet.greenlet(lambda: self.trainer.train(resume_from_checkpoint=self.resume_from))
        try:
            self._greenlet.switch()
        finally:
            self.state = _process_state.capture()
            self.step = self.trainer.state.global_step
            self.finished = self._greenlet.dead

    def suspend(self) -> None:
        """Called inside the run's greenlet: hand control back to the scheduler until `advance` is called."""
        self._greenlet.parent.switch()

    def close(self) -> None:
        """Drop the trainer and unwind its suspended `train()` so that its memory can be freed."""
        if self._greenlet is not None and not self._greenlet.dead:
            self._greenlet.throw(greenlet.GreenletExit)
        self._greenlet = None
        self.trainer = None
