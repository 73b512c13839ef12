"""The experiment's records as tables: metrics (long and RapidFire AI's wide shape), runs, leaderboard, best run.
Pure reads of the store; pandas is imported when a table is asked for."""

from __future__ import annotations

import dataclasses
from typing import Any

from rf_notebook.store import ICRecord, RunRecord, Store

__all__ = ["best_run", "get_results", "ic_log", "leaderboard", "logged_name", "results", "runs_info"]

RESULT_COLUMNS = ["run_id", "run_name", "step", "chunk", "metric", "value", "wall_time"]
RUN_COLUMNS = [
    "run_id",
    "name",
    "status",
    "completed_steps",
    "total_steps",
    "chunks_done",
    "chunks_total",
    "error",
    "warning",
    "source",
    "cloned_from",
    "warm_started_from",
    "config",
]


def logged_name(metric: str, logged: set[str]) -> str:
    """`metric` as it was logged: an evaluation metric is stored with the trainer's `eval_` prefix, and its name as
    `compute_metrics` returned it (RapidFire AI's, e.g. "rougeL") names it too."""
    return f"eval_{metric}" if metric not in logged and f"eval_{metric}" in logged else metric


def results(store: Store) -> Any:
    """One row per (run, step, metric): run_id, run_name, step, chunk, metric, value, wall_time."""
    import pandas as pd

    names = {r.run_id: r.name for r in store.runs()}
    rows = [
        {
            "run_id": m.run_id,
            "run_name": names.get(m.run_id),
            "step": m.step,
            "chunk": m.chunk,
            "metric": m.name,
            "value": m.value,
            "wall_time": m.wall_time,
        }
        for m in store.metrics()
    ]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def get_results(store: Store) -> Any:
    """RapidFire AI's shape: one row per (run_id, step) with its chunk and (fractional) epoch, one column per
    metric, sorted by run_id and step."""
    import pandas as pd

    long = results(store)
    if long.empty:
        return pd.DataFrame(columns=["run_id", "step", "chunk", "epoch"])
    wide = long.pivot_table(index=["run_id", "step"], columns="metric", values="value", aggfunc="last")
    wide.columns.name = None
    chunks = long.groupby(["run_id", "step"]).chunk.max()
    wide.insert(0, "chunk", chunks.reindex(wide.index).astype(int))
    wide = wide.reset_index()
    per_epoch = _steps_per_epoch(store)
    wide.insert(3, "epoch", wide.step / wide.run_id.map(per_epoch))
    return wide.sort_values(["run_id", "step"]).reset_index(drop=True)


def _steps_per_epoch(store: Store) -> dict[int, float]:
    """Optimizer steps in one epoch of each run: the end of its first epoch's last chunk (a clone's from the
    run_fit of the run it was cloned from)."""
    chunks_of = {run_id: fit["num_chunks"] for fit in store.meta("fits", []) for run_id in fit["run_ids"]}
    parent = {op.new_run_id: op.run_id for op in store.ic_log() if op.op == "clone_modify" and op.new_run_id}
    steps: dict[int, float] = {}
    for r in store.runs():
        origin = r.run_id
        while origin not in chunks_of and origin in parent:
            origin = parent[origin]
        k = chunks_of.get(origin)
        steps[r.run_id] = float(r.rungs[k - 1]) if k and len(r.rungs) >= k else float("nan")
    return steps


def runs_info(store: Store) -> Any:
    """One row per run with its status, progress, what went wrong, where it came from and its config."""
    import pandas as pd

    made_by = {op.new_run_id: op for op in store.ic_log() if op.op == "clone_modify" and op.new_run_id}
    rows = []
    for r in store.runs():
        op = made_by.get(r.run_id)
        rows.append(
            {
                "run_id": r.run_id,
                "name": r.name,
                "status": r.status.value,
                "completed_steps": r.step,
                "total_steps": r.total_steps,
                "chunks_done": r.chunks_done,
                "chunks_total": r.chunks_total,
                "error": r.error,
                "warning": r.warning,
                "source": "initial" if op is None else op.origin,
                "cloned_from": None if op is None else op.run_id,
                "warm_started_from": op.run_id if op is not None and op.args.get("warm_start") else None,
                "config": dict(r.config),
            }
        )
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def leaderboard(store: Store, metric: str, mode: str) -> Any:
    """One row per run with its latest eval metrics, best `metric` first."""
    import pandas as pd

    metrics = store.metrics()
    metric = logged_name(metric, {m.name for m in metrics})
    latest: dict[int, dict[str, float]] = {}
    for m in metrics:
        if m.name.startswith("eval_"):
            latest.setdefault(m.run_id, {})[m.name] = m.value
    rows = [
        {"run_id": r.run_id, "run": r.name, "status": r.status.value, "step": r.step, **latest.get(r.run_id, {})}
        for r in store.runs()
    ]
    frame = pd.DataFrame(rows)
    if metric in frame:
        frame = frame.sort_values(metric, ascending=(mode == "min"), na_position="last")
    return frame.reset_index(drop=True)


def best_run(store: Store, metric: str, mode: str) -> RunRecord:
    """The run whose latest `metric` is best (`mode` "min" or "max"), among runs that logged it."""
    if mode not in ("min", "max"):
        raise ValueError(f"`mode` is {mode!r}, but must be 'min' or 'max'")
    metrics = store.metrics()
    metric = logged_name(metric, {m.name for m in metrics})
    latest = {m.run_id: m.value for m in metrics if m.name == metric}
    if not latest:
        known = sorted({m.name for m in metrics})
        raise ValueError(f"no run has logged metric {metric!r}; logged metrics: {known}")
    pick = min if mode == "min" else max
    return store.run(pick(latest, key=lambda rid: latest[rid]))


def ic_log(store: Store) -> Any:
    """Every IC op, one row each: op_id, time, origin, op, run_id, args, outcome, reason, step, new_run_id."""
    import pandas as pd

    columns = [f.name for f in dataclasses.fields(ICRecord)]
    return pd.DataFrame([dataclasses.asdict(r) for r in store.ic_log()], columns=columns)
