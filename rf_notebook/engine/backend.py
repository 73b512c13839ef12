"""The contract between the scheduler loop and whatever trains the runs: `Backend`, `Slot` and `PreparedRun`.

The loop (`_engine.Engine`) decides which run trains, when and for how long, and applies IC ops; a backend does the
work: `TorchBackend` (`rf_notebook.engine.torch_backend`) with shared base models, LoRA adapters and TRL trainers
on this process's device, and the stateful tests' fake backend, whose runs count steps. Every method of a backend
is called on the scheduler thread, except `wait_for_writes` and `caller_idle` (any thread). No torch here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from rf_notebook.store import RunRecord
from rf_notebook.trainers import TRAINERS

if TYPE_CHECKING:
    from rf_notebook.chunking import ChunkPlan
    from rf_notebook.search import RunSpec

__all__ = ["Backend", "PreparedRun", "RunStateLost", "Slot", "WorkerLost"]


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    """A run validated on the caller's thread: its spec and real TRL / PEFT config objects."""

    run_id: int
    spec: RunSpec
    args: Any  # trl.SFTConfig, DPOConfig, ...
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


class Slot(Protocol):
    """One run in memory, as the loop sees it: where it is and how far it trains next."""

    run_id: int
    step: int  # optimizer steps done
    plan: ChunkPlan  # its chunk ends (rungs)

    @property
    def finished(self) -> bool: ...

    def advance(self, pause_at: int) -> Any:
        """Train until step `pause_at`, the end of training, or until the backend's `should_yield` says so."""

    def close(self) -> None:
        """Unwind the run's training (nothing of it trains again)."""


class RunStateLost(RuntimeError):
    """A backend could not put a run back as it was (after an anneal probe): the run fails rather than train on."""


class WorkerLost(RuntimeError):
    """The process that held a run's state is gone (a Ray worker killed, its node lost), the run is not: the loop
    rebuilds it with `reload` from its last checkpoint, elsewhere, and forgets the metrics it logged after that."""


class Backend(Protocol):
    """What the loop asks of the side that trains. See the module docstring."""

    def connect(
        self,
        should_yield: Callable[[], bool],
        record: Callable[[Any, int, dict[str, float]], None],
        warn: Callable[[Any, str], None],
    ) -> None:
        """How a training run asks whether to hand control back, where its metrics go, and where what went wrong
        without ending it goes."""

    def setup(self, runs: Sequence[Any], unloaded: Sequence[Any] = ()) -> dict[int, Slot]:
        """Load what the runs share and build each of `runs`; the `unloaded` ones (on disk) are only remembered."""

    def build(self, run: Any, warm_from: Slot | None = None) -> Slot:
        """Build one more run (a clone): from scratch, or continuing `warm_from`'s current state."""

    def materialize(self, slot: Slot) -> None:
        """Build what the run's build left for its first turn (a backend may defer a run's trainer until then);
        nothing for a run already built. The engine calls it before every turn it trains the run alone (its time
        counts as setup); `activate` must do the same for the other paths."""

    def activate(self, slot: Slot) -> None:
        """Put back what the run expects of the shared model and the process, before it trains."""

    def suspended(self, slot: Slot) -> None:
        """The run handed control back: keep what its training changed on the shared model."""

    def evaluate(self, slot: Slot) -> None:
        """Evaluate the run at a chunk end."""

    def probe(self, slot: Slot, steps: int, rung: int) -> float | None:
        """The run's eval loss after `steps` throwaway optimizer steps with its learning rate annealed (an anneal
        probe at chunk end `rung`), the run left exactly as it was; None if it has nothing to evaluate on."""

    def checkpoint(self, slot: Slot) -> Any:
        """Write the run's state at this chunk end (may finish later; raise OSError for a failed write)."""

    def flush(self) -> None:
        """Wait until every checkpoint taken is written; raise OSError for a failed write."""

    def wait_for_writes(self) -> None:
        """Wait for the checkpoints being written before reading them (any thread; a failure is left to flush)."""

    def caller_idle(self) -> None:
        """The calling thread leaves the CPU to training (it starts the engine, or waits for it): free what it holds
        that would slow the scheduler thread down (any thread)."""

    def unload(self, slot: Slot) -> None:
        """Write a stopped run to its checkpoint and free it; `reload` rebuilds it exactly. Its memory may wait for
        `collect()`, which the loop calls after unloading the runs due together."""

    def collect(self) -> None:
        """Free the memory of the runs unloaded since the last call."""

    def reload(self, run: Any) -> Slot:
        """Rebuild an unloaded run from its checkpoint."""

    def discard(self, slot: Slot, keep_adapter: bool) -> None:
        """Free the run's training state; without `keep_adapter`, its weights too (it can then only be reloaded)."""

    def forget(self, run_id: int) -> None:
        """A deleted run: nothing of it stays in memory."""

    def export(self, run_id: int, path: str, record: Mapping[str, Any]) -> str:
        """Write the run's adapter as a standard PEFT folder at `path`."""

    def release(self) -> None:
        """Free everything (the experiment's end); checkpoints being written are finished first."""

    # Optional, for fused steps (`TorchBackend`); a backend without them trains one run at a time:
    #   fusion_partners(slot, candidates) -> [slot, *the candidates that train together with it]
    #   train_together(slots, pause_at: {run_id: step}) -> {run_id: exception} for the runs that failed
