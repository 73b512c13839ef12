"""Trackio's local store: the project's SQLite database in `TRACKIO_DIR`, written the way Trackio's own server
writes it (`SQLiteStorage.bulk_log`), never through `trackio.init`'s process-global current run, no Space, no
network. A run is identified by its `TrackedRun.key` (Trackio's run id) and shown under its panel name; its config
holds the flattened params and the rf_notebook tags (status, lineage, policy decisions)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from contextlib import closing
from datetime import datetime, timezone

from rf_notebook.tracking import Point, TrackedRun


def _iso(wall_time: float) -> str:
    return datetime.fromtimestamp(wall_time, timezone.utc).isoformat()


class TrackioImpl:
    def __init__(self, project: str):
        from trackio.sqlite_storage import SQLiteStorage

        self.storage = SQLiteStorage
        self.project = project
        self.db_path = SQLiteStorage.init_db(project)

    def start_run(self, run: TrackedRun) -> Mapping[str, int]:
        last: dict[str, int] = {}
        for row in self.storage.get_logs(self.project, run.name, run_id=run.key):
            for name in row:
                if name not in ("step", "timestamp"):
                    last[name] = max(last.get(name, row["step"]), row["step"])
        self.set_tags(run, run.tags)
        return last

    def log(self, run: TrackedRun, points: Sequence[Point]) -> None:
        rows: dict[int, dict[str, float]] = {}
        times: dict[int, float] = {}
        for p in points:
            rows.setdefault(p.step, {})[p.name] = p.value
            times.setdefault(p.step, p.wall_time)
        steps = sorted(rows)
        self.storage.bulk_log(
            self.project,
            run.name,
            [rows[s] for s in steps],
            steps=steps,
            timestamps=[_iso(times[s]) for s in steps],
            run_id=run.key,
        )

    def set_tags(self, run: TrackedRun, tags: Mapping[str, str]) -> None:
        """The run's config in Trackio: its params, then the tags (one row per run, replaced)."""
        config = json.dumps({**run.params, **tags}, default=str)
        with self.storage._get_process_lock(self.project), closing(sqlite3.connect(self.db_path, timeout=30)) as conn:
            with conn:  # one transaction
                conn.execute(
                    "INSERT OR REPLACE INTO configs (run_id, run_name, config, created_at) VALUES (?, ?, ?, ?)",
                    (run.key, run.name, config, datetime.now(timezone.utc).isoformat()),
                )
