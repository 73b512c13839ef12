"""TensorBoard: one `SummaryWriter` (one folder of event files) per run; scalars by optimizer step, the config as
HParams plus a JSON text, the tags as text whenever they change."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rf_notebook.tracking import Point, TrackedRun, safe_name

CONFIG_TAG, TAGS_TAG = "rf_notebook/config", "rf_notebook/tags"


def run_dir(log_dir: Path, run: TrackedRun) -> Path:
    """`<log_dir>/<run id> <run name>`: TensorBoard lists runs by folder."""
    return Path(log_dir) / safe_name(f"{run.run_id:03d} {run.name}")


def _hparam(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)


def written(folder: Path) -> tuple[dict[str, int], dict[str, str] | None]:
    """What `folder`'s event files already hold (TensorBoard's own reader): the last step of every scalar, and the
    latest tags written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not folder.is_dir() or not any(folder.iterdir()):
        return {}, None
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    steps = {tag: max(e.step for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"] if acc.Scalars(tag)}
    texts = acc.Tensors(f"{TAGS_TAG}/text_summary") if f"{TAGS_TAG}/text_summary" in acc.Tags()["tensors"] else []
    tags = json.loads(texts[-1].tensor_proto.string_val[0]) if texts else None
    return steps, tags


class TensorBoardImpl:
    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writers: dict[str, Any] = {}
        self.steps: dict[str, int] = {}  # run key -> latest step logged (where a change of tags is written)

    def run_dir(self, run: TrackedRun) -> Path:
        return run_dir(self.log_dir, run)

    def _writer(self, run: TrackedRun) -> Any:
        """The run's writer, opened when needed (a finished run's is closed: one thread and one file per run)."""
        from torch.utils.tensorboard import SummaryWriter

        if run.key not in self.writers:
            self.writers[run.key] = SummaryWriter(str(self.run_dir(run)))
        return self.writers[run.key]

    def start_run(self, run: TrackedRun) -> Mapping[str, int]:
        from torch.utils.tensorboard.summary import hparams

        last, tags = written(self.run_dir(run))
        if not last and tags is None:  # a new run: its config, once
            writer = self._writer(run)
            params = {k: _hparam(v) for k, v in run.params.items()}
            for summary in hparams(params, {}):
                writer.file_writer.add_summary(summary)
            writer.add_text(CONFIG_TAG, json.dumps(dict(run.params), default=str, indent=1), 0)
        self.steps[run.key] = max(last.values(), default=0)
        if tags != dict(run.tags):
            self.set_tags(run, run.tags)
        return last

    def log(self, run: TrackedRun, points: Sequence[Point]) -> None:
        writer = self._writer(run)
        for p in points:
            writer.add_scalar(p.name, p.value, p.step, walltime=p.wall_time)
        self.steps[run.key] = max(self.steps[run.key], *(p.step for p in points))
        writer.flush()

    def set_tags(self, run: TrackedRun, tags: Mapping[str, str]) -> None:
        writer = self._writer(run)
        writer.add_text(TAGS_TAG, json.dumps(dict(tags), indent=1), self.steps[run.key])
        if tags.get("rf_notebook.status") in ("finished", "failed", "deleted"):  # it logs nothing more
            self.writers.pop(run.key).close()
        else:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
