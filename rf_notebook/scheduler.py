"""Which run trains next. Pure functions of recorded progress; no torch.

The default is least progress first: the run with the fewest completed chunks goes next (ties by run id), so a
run never starts chunk k+1 while another live run has not finished chunk k, and all live runs are compared at
the same data position.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["least_progress_first"]


def least_progress_first(chunks_done: Mapping[int, int]) -> int | None:
    """The run id to advance by one chunk, given each runnable run's completed chunk count; None if none."""
    if not chunks_done:
        return None
    return min(chunks_done, key=lambda run_id: (chunks_done[run_id], run_id))
