"""Which run trains next, and whether an IC op can apply. Pure functions of recorded state; no torch.

The default order is least progress first: the run with the fewest completed chunks goes next (ties by run id),
so a run never starts chunk k+1 while another live run has not finished chunk k, and all live runs are compared
at the same data position. A run interrupted in the middle of a chunk (an IC op arrived between two of its
steps) continues first, unless it can no longer train.
"""

from __future__ import annotations

from collections.abc import Mapping

from rf_notebook.store import RunStatus

__all__ = ["least_progress_first", "pick_next", "refusal"]


def least_progress_first(chunks_done: Mapping[int, int]) -> int | None:
    """The run id to advance by one chunk, given each runnable run's completed chunk count; None if none."""
    if not chunks_done:
        return None
    return min(chunks_done, key=lambda run_id: (chunks_done[run_id], run_id))


def pick_next(chunks_done: Mapping[int, int], current: int | None) -> int | None:
    """`current` (a run interrupted mid-chunk) if it is still runnable, else least progress first."""
    if current is not None and current in chunks_done:
        return current
    return least_progress_first(chunks_done)


def refusal(op: str, run_id: int, status: RunStatus | None, warm_start: bool = False) -> str | None:
    """Why `op` cannot apply to a run in `status` (None: it can). `status` None means no such run."""
    if status is None:
        return f"no run with id {run_id}"
    if op == "stop":
        if status is RunStatus.STOPPED:
            return f"run {run_id} is already stopped"
        if status.is_terminal:
            return f"run {run_id} is {status.value}"
    elif op == "resume":
        if status is not RunStatus.STOPPED:
            return f"run {run_id} is {status.value}, not stopped"
    elif op == "delete":
        if status.is_terminal:
            return f"run {run_id} is {status.value}"
    elif op == "clone_modify":
        if status is RunStatus.DELETED:
            return f"run {run_id} is deleted"
        if warm_start and status.is_terminal:
            return f"run {run_id} is {status.value}: its optimizer state is gone; clone it without warm_start"
    else:
        raise ValueError(f"unknown op {op!r}")
    return None
