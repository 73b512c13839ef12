"""The experiments of this process.

Runs share process-wide state (random generators, Accelerate's singletons) that the one scheduler thread swaps per
run, so one experiment trains at a time. Each experiment directory is held by one `Experiment` object: re-running a
notebook's `exp = Experiment("x")` cell hands the directory over to the new object. A script that exits without
`end()` has its experiments ended first (a training thread still holding suspended greenlets at exit aborts the
process). Held weakly: an experiment that nothing holds is kept alive by its engine while it trains.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["check_can_train", "register", "take_over"]

_EXPERIMENTS: weakref.WeakSet[Any] = weakref.WeakSet()
_HOLDERS: weakref.WeakValueDictionary[Path, Any] = weakref.WeakValueDictionary()


def take_over(path: Path, name: str) -> None:
    """Before a new Experiment object opens `path`: refuse while another object of this process trains there, else
    release that object's hold (its history stays readable through it)."""
    holder = _HOLDERS.get(path.resolve())
    if holder is None:
        return
    if holder.training:
        raise RuntimeError(
            f"experiment {name!r} is training in this process (another Experiment object): use that object, or "
            "end() it first"
        )
    holder.end(wait=False)
    holder.store.close()


def register(experiment: Any) -> None:
    """`experiment` now holds its directory."""
    _HOLDERS[experiment.path.resolve()] = experiment
    _EXPERIMENTS.add(experiment)


def check_can_train(experiment: Any) -> None:
    """Refuse a run_fit while this experiment or another one of the process trains, or from an object that no
    longer holds its directory."""
    if experiment.training:
        raise RuntimeError(
            f"experiment {experiment.name!r} is already running a run_fit; wait() for it or end() it first"
        )
    for other in list(_EXPERIMENTS):
        if other is not experiment and other.training:
            raise RuntimeError(
                f"experiment {other.name!r} is still training in this process; one experiment trains at a time: "
                "wait() for it or end() it first"
            )
    if _HOLDERS.get(experiment.path.resolve()) is not experiment:
        raise RuntimeError(
            f"this Experiment object no longer holds {str(experiment.path)!r}: a newer "
            f"Experiment({experiment.name!r}) in this process took it over; use that one"
        )


@atexit.register
def _end_all() -> None:
    for experiment in list(_EXPERIMENTS):
        try:
            experiment.end(wait=False)
        except Exception:  # exiting anyway; one experiment's failure must not keep the others running
            logger.exception("ending experiment %r at exit", experiment.name)
