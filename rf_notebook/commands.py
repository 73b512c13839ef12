"""Commands for the scheduler thread: small frozen objects put on one queue, drained between optimizer steps.

Any thread may validate and enqueue; only the scheduler thread acts on them. A command that needs an answer
carries a `concurrent.futures.Future` that the scheduler thread resolves. IC ops carry the id of their entry in
the store's op log, where the scheduler records the outcome. Pure: no torch.
"""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any, ClassVar

__all__ = [
    "Command",
    "Export",
    "Shutdown",
    "ICOp",
    "Stop",
    "Resume",
    "Delete",
    "CloneModify",
    "CommandQueue",
    "OP_NAMES",
    "RUN_OPS",
]


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


@dataclasses.dataclass(frozen=True)
class ICOp(Command):
    """An interactive-control op on run `run_id`, logged in the store as op `op_id`."""

    name: ClassVar[str] = ""  # the op's name in the op log, the panel's messages and the API

    op_id: int = 0
    run_id: int = 0


@dataclasses.dataclass(frozen=True)
class Stop(ICOp):
    """Pause the run at its next optimizer step; its exact state is kept. With `requires`, only if op `requires`
    was applied (a policy's replacement: the run stops only once its replacing clone exists)."""

    name: ClassVar[str] = "stop"
    requires: int | None = None


@dataclasses.dataclass(frozen=True)
class Resume(ICOp):
    """A stopped run rejoins the schedule."""

    name: ClassVar[str] = "resume"


@dataclasses.dataclass(frozen=True)
class Delete(ICOp):
    """End the run and free its adapter, optimizer and trainer; its metrics stay."""

    name: ClassVar[str] = "delete"


@dataclasses.dataclass(frozen=True)
class CloneModify(ICOp):
    """Start run `new_run_id` from `run_id`'s config with validated overrides; `warm_start` continues from the
    parent's current weights, optimizer state, step and data position instead of from scratch."""

    name: ClassVar[str] = "clone_modify"
    new_run_id: int = 0
    prepared: Any = None  # the new run's validated spec and configs, built on the caller's thread
    warm_start: bool = False
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# The one list of IC ops: their names, and the command of each op that acts on one run and takes no arguments.
OP_NAMES = tuple(op.name for op in (Stop, Resume, Delete, CloneModify))
RUN_OPS = {op.name: op for op in (Stop, Resume, Delete)}


class CommandQueue(queue.Queue):
    """A `queue.Queue` of commands (named for what it carries)."""
