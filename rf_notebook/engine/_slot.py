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
    """What one trainer set on the shared model's module objects, as it left them: the instance-level `forward`
    (Accelerate's autocast wrapper under mixed precision), the forward it wrapped, and Accelerate's prepared mark.

    The mark matters as much as the wrapper: Accelerate's `prepare_model` returns early, installing no autocast, for
    a model object it has marked. Each run carries its own three, so every run trains under exactly the wrapper
    its own `prepare` installed, as a lone trainer would."""

    ATTRIBUTES = ("forward", "_original_forward", "_is_accelerate_prepared")

    attributes: dict[int, dict[str, Any]]

    @staticmethod
    def capture(modules: list[Any]) -> Patches:
        return Patches(
            {i: {k: m.__dict__[k] for k in Patches.ATTRIBUTES if k in m.__dict__} for i, m in enumerate(modules)}
        )

    def apply(self, modules: list[Any]) -> None:
        for i, module in enumerate(modules):
            own = self.attributes.get(i, {})
            for key in self.ATTRIBUTES:
                if key in own:
                    module.__dict__[key] = own[key]
                else:
                    module.__dict__.pop(key, None)


def _check_neutral(when: str) -> None:
    """Raise unless grad mode is on, autocast off and no saved-tensor hooks are installed on this thread. The run
    then fails, and closing it unwinds its train() and with it the contexts that set them."""
    import torch

    problems = [] if torch.is_grad_enabled() else ["grad mode is off"]
    problems += [f"{device} autocast is on" for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)]
    if torch._C._autograd._top_saved_tensors_default_hooks(True) is not None:
        problems.append("saved-tensor hooks are installed")
    if problems:
        raise RuntimeError(f"{when}: {', '.join(problems)}; it would leak into the other runs' training")


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _take_autocast() -> tuple | None:
    """The thread's autocast (a run parked inside its forward under mixed precision, `_fused`), taken off the
    thread so that the others run without it: (nesting, cache enabled, {device: (enabled, dtype)}); None if off."""
    import torch

    nesting = torch.autocast_increment_nesting() - 1  # the only way to read it
    torch.autocast_decrement_nesting()
    devices = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES}
    if not nesting and not any(enabled for enabled, _ in devices.values()):
        return None
    state = (nesting, torch.is_autocast_cache_enabled(), devices)
    for _ in range(nesting):
        torch.autocast_decrement_nesting()
    for device in devices:
        torch.set_autocast_enabled(device, False)
    return state


def _give_autocast(state: tuple | None) -> None:
    """Put back what `_take_autocast` took, before the run that parked with it goes on."""
    import torch

    if state is None:
        return
    nesting, cache, devices = state
    for _ in range(nesting):
        torch.autocast_increment_nesting()
    torch.set_autocast_cache_enabled(cache)
    for device, (enabled, dtype) in devices.items():
        torch.set_autocast_enabled(device, enabled)
        torch.set_autocast_dtype(device, dtype)


class RunSlot:
    """One run's trainer, greenlet, random state and chunk plan. Used only from the scheduler thread."""

    def __init__(self, run_id: int, adapter: str, should_yield: Callable[[], bool] = lambda: False):
        self.run_id, self.adapter, self.should_yield = run_id, adapter, should_yield
        self.resume_from: str | None = None  # a checkpoint folder to start train() from (warm start)
        self.plan: ChunkPlan | None = None  # known once its data set is prepared (by its trainer, or another's)
        self.trainer: Any = None
        self.patches: Patches | None = None
        self.config_ids: tuple = ()  # the token ids its trainer's constructor left in the model's config (`_bases`)
        self.state: _process_state.ProcessState | None = None
        self.epoch_start: tuple[int, _process_state.ProcessState] | None = None  # (step, state) of the last epoch
        self.evaluated_at: int | None = None  # the step of the trainer's last evaluation
        self.pause_at = 0
        self.step = 0  # optimizer steps done, as of the last suspension
        self.finished = False  # train() has returned
        self.fused_group: Any = None  # the fused group it trains in now (`_fused`), if any
        self._greenlet: greenlet.greenlet | None = None
        self._autocast: tuple | None = None  # the autocast it parked under (mixed precision, fused), kept off-thread

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

    @property
    def greenlet(self) -> greenlet.greenlet | None:
        return self._greenlet

    def advance(self, pause_at: int) -> Any:
        """Train until optimizer step `pause_at` (or the end). The caller has activated this run's state.

        Grad mode, autocast and saved-tensor hooks are the thread's, so every greenlet of the scheduler thread
        shares them: a run must hand control back with them as it found them (it suspends between optimizer
        steps, outside any forward), or the next run would train under them. Checked at every switch.
        Returns None, or in a fused group what the run parked with (`_fused`)."""
        self.pause_at = pause_at
        if self._greenlet is None:
            self._greenlet = greenlet.greenlet(lambda: self.trainer.train(resume_from_checkpoint=self.resume_from))
            return self._switch()
        return self._switch(None)

    def resume(self, value: Any) -> Any:
        """Hand a parked run (in a fused group) its answer and train on until it parks or suspends again."""
        return self._switch(value)

    def _switch(self, *value: Any) -> Any:
        _check_neutral(f"before run {self.run_id} resumes")
        _give_autocast(self._autocast)
        self._autocast = None
        parked = None
        try:
            parked = self._greenlet.switch(*value)
        finally:
            self.state = _process_state.capture()
            self.step = self.trainer.state.global_step
            self.finished = self._greenlet.dead
            if parked is not None and parked != () and not self.finished:  # parked mid-forward (fused): may be
                self._autocast = _take_autocast()  # inside its autocast, which the others must not train under
        _check_neutral(f"after run {self.run_id} suspended")
        return None if self.finished or parked == () else parked

    def suspend(self) -> None:
        """Called inside the run's greenlet: hand control back to the scheduler until `advance` is called."""
        self._greenlet.parent.switch(None)

    def close(self) -> None:
        """Drop the trainer and unwind its suspended `train()` so that its memory can be freed."""
        if self._greenlet is not None and not self._greenlet.dead:
            _give_autocast(self._autocast)  # parked inside its autocast: unwinding it exits those contexts
            self._autocast = None
            self._greenlet.throw(greenlet.GreenletExit)
        self._greenlet = None
        self.trainer = None
