"""The store's durable side: one SQLite database in WAL mode per experiment directory.

Every change the store makes in memory is written here in the same call, inside the store's lock, as one
committed transaction: a process killed at any instant leaves the database at a change boundary (SQLite's WAL
guarantees that), and a later process reads the experiment back with `load()`.

    journal = Journal.open(Path("rf_experiments/demo"))   # creates the folder and schema, takes the lock
    runs, metrics, ops, meta = journal.load()

A write that fails (disk full, folder made read-only) raises `StorageError`, naming the database and the OS
error; the transaction is rolled back, so what was written before stays intact.

The lock: `fcntl.flock` on `<dir>/lock`, released by the kernel when the process dies (SIGKILL included), so a
second live process cannot write the same experiment, and a crashed one never leaves it locked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Journal", "StorageError", "ExperimentLocked"]

DB_NAME = "experiment.db"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (run_id INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    seq INTEGER PRIMARY KEY, run_id INTEGER NOT NULL, step INTEGER NOT NULL, chunk INTEGER NOT NULL,
    name TEXT NOT NULL, value REAL, wall_time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_by_run ON metrics (run_id, step);
CREATE TABLE IF NOT EXISTS ops (op_id INTEGER PRIMARY KEY, record TEXT NOT NULL);
"""


# The journal of each experiment directory open in this process (a newer one takes the directory over).
_OPEN: weakref.WeakValueDictionary[Path, Journal] = weakref.WeakValueDictionary()


class StorageError(OSError):
    """The experiment directory could not be written (disk full, read-only, removed)."""


class ExperimentLocked(RuntimeError):
    """Another live process has the experiment open."""


class Journal:
    """Durable copy of a store. Not thread-safe by itself: the store calls it under its own lock."""

    def __init__(self, path: Path, connection: sqlite3.Connection, lock_file: Any):
        self.path, self._db, self._lock_file = path, connection, lock_file

    @classmethod
    def open(cls, directory: Path) -> Journal:
        directory = Path(directory)
        earlier = _OPEN.get(directory.resolve())
        if earlier is not None:  # an abandoned store of this process: its later writes fail as "closed"
            earlier.close()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock_file = open(directory / "lock", "a")  # noqa: SIM115 - held open for the journal's lifetime
        except OSError as exc:
            raise StorageError(
                exc.errno, f"cannot create or write the experiment directory {str(directory)!r}: {exc.strerror}"
            ) from exc
        _take_lock(lock_file, directory)
        path = directory / DB_NAME
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses no commit
            db.executescript(_SCHEMA)
            version = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if version is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(version[0]) != SCHEMA_VERSION:
                raise StorageError(
                    0, f"{str(path)!r} has schema version {version[0]}, this rf_notebook reads {SCHEMA_VERSION}"
                )
        except sqlite3.DatabaseError as exc:
            lock_file.close()
            raise StorageError(0, f"cannot open the experiment database {str(path)!r}: {exc}") from exc
        except StorageError:
            lock_file.close()
            raise
        journal = cls(path, db, lock_file)
        _OPEN[directory.resolve()] = journal
        return journal

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
            self._lock_file.close()  # releases the lock (so does the process's death, or garbage collection)

    # -- reading -----------------------------------------------------------------------------------------------

    def load(self) -> tuple[list[dict], list[tuple], list[dict], dict[str, Any]]:
        """Runs (dicts), metric rows (run_id, step, chunk, name, value, wall_time) in logging order, ops, meta."""
        db = self._db
        runs = [json.loads(r) for (r,) in db.execute("SELECT record FROM runs ORDER BY run_id")]
        metrics = [
            (run_id, step, chunk, name, math.nan if value is None else value, wall)
            for run_id, step, chunk, name, value, wall in db.execute(
                "SELECT run_id, step, chunk, name, value, wall_time FROM metrics ORDER BY seq"
            )
        ]
        ops = [json.loads(r) for (r,) in db.execute("SELECT record FROM ops ORDER BY op_id")]
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta WHERE key != 'schema'")}
        return runs, metrics, ops, meta

    def integrity(self) -> str:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    # -- writing: one committed transaction per call ------------------------------------------------------------

    def put_run(self, record: Any) -> None:
        self._write("INSERT OR REPLACE INTO runs VALUES (?, ?)", [(record.run_id, _dumps(_run_dict(record)))])

    def put_metrics(self, rows: Iterable[Any]) -> None:
        self._write(_INSERT_METRICS, [_metric_row(m) for m in rows])

    def drop_metrics_after(self, run_id: int, step: int) -> None:
        self._write("DELETE FROM metrics WHERE run_id = ? AND step > ?", [(run_id, step)])

    def put_op(self, record: Any) -> None:
        self._write("INSERT OR REPLACE INTO ops VALUES (?, ?)", [(record.op_id, _dumps(dataclasses.asdict(record)))])

    def put_meta(self, key: str, value: Any) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(key, _dumps(value))])

    def rewrite(self, runs: list[Any], metrics: list[Any], ops: list[Any], meta: Mapping[str, Any]) -> None:
        """Replace the whole content with the store's, in one transaction."""
        self._write_many(
            [
                ("DELETE FROM runs", [()]),
                ("DELETE FROM metrics", [()]),
                ("DELETE FROM ops", [()]),
                ("DELETE FROM meta WHERE key != 'schema'", [()]),
                ("INSERT INTO runs VALUES (?, ?)", [(r.run_id, _dumps(_run_dict(r))) for r in runs]),
                (_INSERT_METRICS, [_metric_row(m) for m in metrics]),
                ("INSERT INTO ops VALUES (?, ?)", [(o.op_id, _dumps(dataclasses.asdict(o))) for o in ops]),
                ("INSERT INTO meta VALUES (?, ?)", [(k, _dumps(v)) for k, v in meta.items()]),
            ]
        )

    def _write(self, sql: str, rows: list[tuple]) -> None:
        self._write_many([(sql, rows)])

    def _write_many(self, statements: list[tuple[str, list[tuple]]]) -> None:
        if self._db is None:
            raise StorageError(0, f"the experiment database {str(self.path)!r} is closed")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for sql, rows in statements:
                self._db.executemany(sql, rows)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StorageError(0, f"cannot write the experiment database {str(self.path)!r}: {exc}") from exc


_INSERT_METRICS = "INSERT INTO metrics (run_id, step, chunk, name, value, wall_time) VALUES (?,?,?,?,?,?)"


def _metric_row(m: Any) -> tuple:
    # SQLite stores inf but not NaN: NaN goes in as NULL and comes back as NaN.
    return (m.run_id, m.step, m.chunk, m.name, None if math.isnan(m.value) else m.value, m.wall_time)


def _take_lock(lock_file: Any, directory: Path) -> None:
    import fcntl

    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise ExperimentLocked(
            f"experiment {str(directory)!r} is open in another live process; end() it there (or shut that "
            "kernel down) first"
        ) from None


def _run_dict(record: Any) -> dict[str, Any]:
    out = dataclasses.asdict(record)
    out["status"] = record.status.value
    out["rungs"] = list(record.rungs)
    return out


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_jsonable, allow_nan=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)
