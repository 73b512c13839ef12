"""MLflow through one `MlflowClient` bound to a tracking URI: no active run, no process-global state."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rf_notebook.tracking import Point, TrackedRun

# MLflow's limits per log_batch call and per value (mlflow.utils.validation).
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
MAX_PARAM_CHARS = 6000
KEY_TAG = "rf_notebook.key"

# rf_notebook status -> MLflow run status (a stopped run may be resumed: KILLED, then RUNNING again).
STATUS = {
    "running": "RUNNING",
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


def key(name: str) -> str:
    """`name` as an MLflow key: letters, digits, `_ - . / ` and spaces, a normal relative path (no empty, `.` or
    `..` parts, no leading or trailing `/`), at most 250 characters."""
    text = re.sub(r"[^\w\-. /]", "_", str(name))
    parts = [p if p not in (".", "..") else "_" for p in text.split("/") if p]
    return "/".join(parts)[:250].rstrip("/") or "_"


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    return text[:MAX_PARAM_CHARS]


def _new_sqlite(uri: str) -> None:
    """A new SQLite tracking database starts as a copy of an empty one this MLflow version already made (kept in the
    user's cache folder): creating one runs MLflow's schema migrations, ~3 s of CPU taken from training each time."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///") :])
    if path.exists():
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rf_notebook"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    try:
        if not template.exists():
            cache.mkdir(parents=True, exist_ok=True)
            made = template.with_name(f"{template.name}.{os.getpid()}-{threading.get_ident()}")
            MlflowClient(f"sqlite:///{made}").search_experiments()  # creates and migrates it
            os.replace(made, template)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
    except OSError:  # no cache folder: MLflow creates the database itself
        path.unlink(missing_ok=True)


class MLflowImpl:
    def __init__(self, uri: str, experiment_name: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        with _quiet("mlflow.store.db.utils", "alembic"):  # creating a database logs to stderr: a notebook's last cell
            _new_sqlite(uri)
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment_name)
        if found is None:
            self.experiment_id = self.client.create_experiment(experiment_name)
        else:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            self.experiment_id = found.experiment_id
        self.ids: dict[str, str] = {}  # TrackedRun.key -> MLflow run id
        self.known = self._runs_by_key()  # runs an earlier session made
        self.status: dict[str, str] = {}  # MLflow run id -> the status MLflow holds

    def _runs_by_key(self) -> dict[str, Any]:
        runs: dict[str, Any] = {}
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=1000, page_token=token)
            runs.update({r.data.tags[KEY_TAG]: r for r in page if KEY_TAG in r.data.tags})
            token = page.token
            if not token:
                return runs

    def _find(self, run_key: str) -> Any:
        """The MLflow run of `run_key` made by this tracking (a retried start), an earlier session, or another
        writer since this one opened."""
        if run_key in self.ids:
            return self.client.get_run(self.ids[run_key])
        if run_key in self.known:
            return self.known.pop(run_key)
        found = self.client.search_runs([self.experiment_id], f"tags.`{KEY_TAG}` = '{run_key}'", max_results=1)
        return found[0] if found else None

    def start_run(self, run: TrackedRun) -> Mapping[str, int]:
        from mlflow.entities import Param

        tags = {**run.tags}
        parent = self.ids.get(run.parent_key) if run.parent_key else None
        if parent is not None:
            tags["mlflow.parentRunId"] = parent  # a clone sits under its parent in MLflow's run list
        existing = self._find(run.key)
        if existing is None:  # one request, the key among the tags: a retry after a failure below finds this run
            first = {KEY_TAG: run.key, **{key(k): v for k, v in list(tags.items())[: MAX_TAGS - 1]}}
            existing = self.client.create_run(self.experiment_id, run_name=run.name, tags=first)
        run_id = existing.info.run_id
        self.ids[run.key], self.status[run_id] = run_id, existing.info.status
        params: dict[str, str] = {}
        for name, value in run.params.items():  # two names made one by key(): the first keeps it
            params.setdefault(key(name), _param(value))
        missing = [Param(k, v) for k, v in params.items() if k not in existing.data.params]
        for i in range(0, len(missing), MAX_PARAMS):
            self.client.log_batch(run_id, params=missing[i : i + MAX_PARAMS])
        if any(existing.data.tags.get(key(k)) != v for k, v in tags.items()):
            self.set_tags(run, tags)
        else:
            self._status(run_id, tags)
        last = {}
        for name in existing.data.metrics:  # what an earlier session logged: not logged again
            history = self.client.get_metric_history(run_id, name)
            if history:
                last[name] = max(m.step for m in history)
        return last

    def log(self, run: TrackedRun, points: Sequence[Point]) -> None:
        self.update(run, points, None)

    def set_tags(self, run: TrackedRun, tags: Mapping[str, str]) -> None:
        self.update(run, [], tags)

    def update(self, run: TrackedRun, points: Sequence[Point], tags: Mapping[str, str] | None) -> None:
        """New points and changed tags in as few `log_batch` requests as MLflow's limits allow (one, usually). If a
        later request of several fails, the retry sends the earlier ones again: MLflow's stores drop a metric point
        identical to one they hold, and tags are set, not added."""
        from mlflow.entities import Metric, RunTag

        run_id = self.ids[run.key]
        metrics = [Metric(key(p.name), p.value, int(p.wall_time * 1000), p.step) for p in points]
        items = [RunTag(key(k), v) for k, v in (tags or {}).items()]
        while metrics or items:
            batch_tags, items = items[:MAX_TAGS], items[MAX_TAGS:]
            room = MAX_METRICS - len(batch_tags)  # MLflow caps a request at 1000 entities in all
            batch_metrics, metrics = metrics[:room], metrics[room:]
            self.client.log_batch(run_id, metrics=batch_metrics, tags=batch_tags)
        if tags is not None:
            self._status(run_id, tags)

    def _status(self, run_id: str, tags: Mapping[str, str]) -> None:
        status = STATUS.get(tags.get("rf_notebook.status", ""), "RUNNING")
        if self.status.get(run_id) == status:
            return
        if status == "RUNNING":
            self.client.update_run(run_id, status=status)
        else:
            self.client.set_terminated(run_id, status=status)
        self.status[run_id] = status  # only now: a failed call is made again by the retry
