"""Every run in the trackers people keep their experiments in: MLflow, TensorBoard and Trackio.

    exp.run_fit(group, ..., trackers=["mlflow", "tensorboard", "trackio"])    # stores inside the experiment folder
    exp.run_fit(group, ..., trackers=[MLflow("http://127.0.0.1:5000"), TensorBoard("runs/")])
    exp.export_tracking("mlflow", uri="sqlite:///mlflow.db")                  # a finished experiment, afterwards

TRL's own tracking callbacks (`report_to`) assume one run per process, so with many runs interleaved in one kernel
they would mix them; rf_notebook logs instead, through explicit handles (an `MlflowClient` with its tracking URI,
one `SummaryWriter` per run, Trackio's local store), never a tracker's process-global "current run".

One tracker run per rf_notebook run, named as in the panel, with the run's flattened config as params and tags for
the experiment, trainer type, status, lineage (cloned from, warm-started from) and the policy decisions that touched
it. Every metric the store records is logged by optimizer step, plus `samples` (data set rows seen), which MLflow
and Trackio can use as the x-axis.

A sink is one small class (`Sink`); each tracker's lives in its own module and imports its package only when used.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Sink", "TrackedRun", "Point", "MLflow", "TensorBoard", "Trackio", "resolve", "KINDS"]


@dataclasses.dataclass(frozen=True)
class TrackedRun:
    """What a tracker is told about one rf_notebook run."""

    key: str  # unique across experiments: "<experiment uid>-<run id>"
    run_id: int
    name: str  # as in the panel
    experiment: str
    params: Mapping[str, Any]  # the resolved, flattened config ("peft_config.r": 8)
    tags: Mapping[str, str]  # status, lineage, policy decisions (see `run_tags`)
    parent_key: str | None = None  # the run it was cloned from, if any


@dataclasses.dataclass(frozen=True)
class Point:
    step: int
    name: str
    value: float
    wall_time: float  # seconds since the epoch, as the store recorded it


class Sink(abc.ABC):
    """One tracker. Every method is called from that tracker's own thread (never the training thread), in order:
    `open` once, then `start_run` once per run before its first `log`, `log` / `set_tags` as values arrive, and
    `close` once. An exception is reported once in the panel and the log; the call is retried later with the same
    values, so a sink must not half-apply a call it raises from (or must tolerate the retry)."""

    kind: str = "sink"

    @abc.abstractmethod
    def open(self, experiment: str, experiment_dir: Path) -> None:
        """Connect to the tracker and make (or find) the experiment's place in it."""

    @abc.abstractmethod
    def start_run(self, run: TrackedRun) -> Mapping[str, int]:
        """Create the tracker run for `run`, or find the one an earlier session made (same `run.key`); return the
        last step the tracker already holds for each metric, so that nothing is logged twice after a restart."""

    @abc.abstractmethod
    def log(self, run: TrackedRun, points: Sequence[Point]) -> None:
        """Log metric points (in step order within each metric)."""

    @abc.abstractmethod
    def set_tags(self, run: TrackedRun, tags: Mapping[str, str]) -> None:
        """The run's tags changed (status, policy decisions): record the new ones."""

    def update(self, run: TrackedRun, points: Sequence[Point], tags: Mapping[str, str] | None) -> None:
        """One pass's news about one run in one call: new `points` (maybe none) and its tags if they changed (else
        None). Optional: a tracker that can write both in one request overrides it (MLflow: one `log_batch`); it
        must then apply all of it or raise. Otherwise `log` and `set_tags` are called."""
        if points:
            self.log(run, points)
        if tags is not None:
            self.set_tags(run, tags)

    def close(self) -> None:  # noqa: B027 - optional: most sinks have nothing to release
        """Flush and release what the sink holds."""

    def metric_key(self, name: str) -> str:
        """The name the tracker keeps metric `name` under (what `start_run`'s last steps are keyed by)."""
        return name

    def fresh(self) -> Sink:
        """The copy one run_fit's tracking works on (shallow; the built-in sinks drop their connection state)."""
        copied = copy.copy(self)
        if hasattr(copied, "_impl"):
            copied._impl = None
        return copied

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _needs(package: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ValueError(f"trackers: {extra!r} needs the {package} package: pip install 'rf_notebook[{extra}]'")


class _Builtin(Sink):
    """A built-in tracker: `open` makes `_impl` (its module's class, imported only then), which does the work."""

    _impl: Any = None

    def start_run(self, run: TrackedRun) -> Mapping[str, int]:
        return self._impl.start_run(run)

    def log(self, run: TrackedRun, points: Sequence[Point]) -> None:
        self._impl.log(run, points)

    def set_tags(self, run: TrackedRun, tags: Mapping[str, str]) -> None:
        self._impl.set_tags(run, tags)

    def close(self) -> None:
        if self._impl is not None and hasattr(self._impl, "close"):
            self._impl.close()


class MLflow(_Builtin):
    """MLflow through an `MlflowClient` bound to `tracking_uri` (default: SQLite in the experiment folder,
    `sqlite:///<experiment dir>/mlflow.db`; view it with `mlflow ui --backend-store-uri <that uri>`). The MLflow
    experiment is `experiment_name` (default: the rf_notebook experiment's name)."""

    kind = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None):
        _needs("mlflow", "mlflow")
        if tracking_uri is not None and not isinstance(tracking_uri, str):
            raise ValueError(f"MLflow(tracking_uri={tracking_uri!r}): expected a URI string or None")
        self.tracking_uri, self.experiment_name = tracking_uri, experiment_name
        self._impl = None

    def open(self, experiment: str, experiment_dir: Path) -> None:
        from rf_notebook.tracking._mlflow import MLflowImpl

        uri = self.tracking_uri or f"sqlite:///{Path(experiment_dir).resolve() / 'mlflow.db'}"
        self._impl = MLflowImpl(uri, self.experiment_name or experiment)

    def update(self, run: TrackedRun, points: Sequence[Point], tags: Mapping[str, str] | None) -> None:
        if type(self).log is not MLflow.log or type(self).set_tags is not MLflow.set_tags:  # a subclass's own
            return super().update(run, points, tags)
        self._impl.update(run, points, tags)

    def metric_key(self, name: str) -> str:
        from rf_notebook.tracking._mlflow import key

        return key(name)

    def __repr__(self) -> str:
        return f"MLflow(tracking_uri={self.tracking_uri!r})"


class TensorBoard(_Builtin):
    """TensorBoard event files, one `SummaryWriter` (one folder) per run: in `tensorboard/` of the experiment folder
    by default, else in `<log_dir>/<experiment name>/` (view either with `tensorboard --logdir <folder>`)."""

    kind = "tensorboard"

    def __init__(self, log_dir: str | Path | None = None):
        _needs("tensorboard", "tensorboard")
        if log_dir is not None and not isinstance(log_dir, (str, Path)):
            raise ValueError(f"TensorBoard(log_dir={log_dir!r}): expected a folder path or None")
        self.log_dir = None if log_dir is None else Path(log_dir)
        self._impl = None

    def open(self, experiment: str, experiment_dir: Path) -> None:
        from rf_notebook.tracking._tensorboard import TensorBoardImpl

        # A folder of one's own may hold several experiments: each gets its subfolder.
        folder = self.log_dir / safe_name(experiment) if self.log_dir else Path(experiment_dir) / "tensorboard"
        self._impl = TensorBoardImpl(folder)

    def __repr__(self) -> str:
        return f"TensorBoard(log_dir={str(self.log_dir) if self.log_dir else None!r})"


class Trackio(_Builtin):
    """Trackio's local store (its SQLite database per project in `TRACKIO_DIR`, by default
    `~/.cache/huggingface/trackio`; view it with `trackio show --project <project>`): no Space, no network. The
    project is `project` (default: the rf_notebook experiment's name)."""

    kind = "trackio"

    def __init__(self, project: str | None = None):
        _needs("trackio", "trackio")
        if project is not None and (not isinstance(project, str) or not project):
            raise ValueError(f"Trackio(project={project!r}): expected a non-empty project name or None")
        self.project = project
        self._impl = None

    def open(self, experiment: str, experiment_dir: Path) -> None:
        from rf_notebook.tracking._trackio import TrackioImpl

        self._impl = TrackioImpl(self.project or experiment)

    def __repr__(self) -> str:
        return f"Trackio(project={self.project!r})"


KINDS: dict[str, type[Sink]] = {"mlflow": MLflow, "tensorboard": TensorBoard, "trackio": Trackio}


def resolve(trackers: Any) -> list[Sink]:
    """`trackers` as sinks: None or [] -> none; names ("mlflow", "tensorboard", "trackio") get their defaults;
    `Sink` instances are used as they are. Unknown names, duplicates and missing packages raise ValueError."""
    if trackers is None:
        return []
    if isinstance(trackers, (str, Sink)):
        trackers = [trackers]
    if not isinstance(trackers, (list, tuple)):
        raise ValueError(
            f"trackers={trackers!r}: expected a list of tracker names ({', '.join(map(repr, KINDS))}) or sinks"
        )
    sinks: list[Sink] = []
    for item in trackers:
        if isinstance(item, str):
            if item.lower() not in KINDS:
                raise ValueError(f"trackers: unknown tracker {item!r}; expected one of {', '.join(map(repr, KINDS))}")
            sinks.append(KINDS[item.lower()]())
        elif isinstance(item, Sink):
            sinks.append(item)
        else:
            raise ValueError(f"trackers: {item!r} is neither a tracker name ({', '.join(KINDS)}) nor a Sink")
    seen: set[tuple[str, str]] = set()
    for sink in sinks:
        if (sink.kind, repr(sink)) in seen:
            raise ValueError(f"trackers: {sink!r} is listed twice")
        seen.add((sink.kind, repr(sink)))
    return sinks


def safe_name(text: str, limit: int = 120) -> str:
    """`text` as one file-name component (no separators or control characters)."""
    return re.sub(r"[\\/:*?\"<>|\x00-\x1f]+", "_", text).strip(" .")[:limit] or "run"


from rf_notebook.tracking._worker import Tracking  # noqa: E402 - it builds on the classes above

__all__ += ["Tracking"]
