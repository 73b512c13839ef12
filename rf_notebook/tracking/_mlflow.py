"""MLflow through one `MlflowClient` bound to a tracking URI: no active run, no process-global state."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rf_notebook.tracking import Point, TrackedRun

# MLflow's limits per log_batch call and per value (mlflow.utils.validation).
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
MAX_PARAM_CHARS = 6000
KEY_TAG = "rf_notebook.key"

# rf_notebook status -> MLflow run status (a stopped run may be resumed: KILLED, then RUNNING again).
STATUS = {
    "queued": "RUNNING",
    "training": "RUNNING",
    "stopped": "KILLED",
    "finished": "FINISHED",
    "failed": "FAILED",
    "deleted": "KILLED",
}


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    return text[:MAX_PARAM_CHARS]


class MLflowImpl:
    def __init__(self, uri: str, experiment_name: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        with _quiet("mlflow.store.db.utils", "alembic"):  # creating a database logs to stderr: a notebook's last cell
            found = self.client.get_experiment_by_name(experiment_name)
        if found is None:
            self.experiment_id = self.client.create_experiment(experiment_name)
        else:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            self.experiment_id = found.experiment_id
        self.ids: dict[str, str] = {}  # TrackedRun.key -> MLflow run id

    def _find(self, key: str) -> Any:
        found = self.client.search_runs([self.experiment_id], f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
        return found[0] if found else None

    def start_run(self, run: TrackedRun) -> Mapping[str, int]:
        from mlflow.entities import Param

        existing = self._find(run.key)
        if existing is not None:
            run_id = existing.info.run_id
            self.ids[run.key] = run_id
            last = {}
            for name in existing.data.metrics:
                history = self.client.get_metric_history(run_id, name)
                if history:
                    last[name] = max(m.step for m in history)
            self.set_tags(run, run.tags)  # the status may have changed while no session was logging
            return last
        tags = {KEY_TAG: run.key, **run.tags}
        parent = self.ids.get(run.parent_key) if run.parent_key else None
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        created = self.client.create_run(self.experiment_id, run_name=run.name, tags=tags)
        run_id = created.info.run_id
        self.ids[run.key] = run_id
        params = [Param(str(k)[:250], _param(v)) for k, v in run.params.items()]
        for i in range(0, len(params), MAX_PARAMS):
            self.client.log_batch(run_id, params=params[i : i + MAX_PARAMS])
        self._status(run_id, run.tags)
        return {}

    def log(self, run: TrackedRun, points: Sequence[Point]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(p.name, p.value, int(p.wall_time * 1000), p.step) for p in points]
        run_id = self.ids[run.key]
        for i in range(0, len(metrics), MAX_METRICS):
            self.client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS])

    def set_tags(self, run: TrackedRun, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        run_id = self.ids[run.key]
        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), MAX_TAGS):
            self.client.log_batch(run_id, tags=items[i : i + MAX_TAGS])
        self._status(run_id, tags)

    def _status(self, run_id: str, tags: Mapping[str, str]) -> None:
        status = STATUS.get(tags.get("rf_notebook.status", ""), "RUNNING")
        if status == "RUNNING":
            self.client.update_run(run_id, status=status)
        else:
            self.client.set_terminated(run_id, status=status)
