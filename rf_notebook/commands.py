"""Commands for the scheduler thread: small frozen objects put on one queue, drained between optimizer steps.

Any thread may validate and enqueue; only the scheduler thread acts on them. A command that needs an answer
carries a `concurrent.futures.Future` that the scheduler thread resolves. Pure: no torch.
"""

from __future__ import annotations

import dataclasses
import queue
from concurrent.futures import Future

__all__ = ["Command", "Export", "Shutdown", "CommandQueue"]


@dataclasses.dataclass(frozen=True)
class Command:
    reply: Future = dataclasses.field(default_factory=Future, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Export(Command):
    """Write run `run_id`'s adapter as a standard PEFT folder at `path`."""

    run_id: int = 0
    path: str = ""


@dataclasses.dataclass(frozen=True)
class Shutdown(Command):
    """Stop the scheduler thread; suspended runs are unwound and every model is released."""


class CommandQueue(queue.Queue):
    """A `queue.Queue` of commands (named for what it carries)."""
