"""A run_fit's plan and record in the experiment, and continuing it after a kernel restart (`run_fit(...,
resume=True)`).

`plan_fit` prepares what a run_fit trains (every run of the search, or the resumed ones) before anything is loaded;
`begin` records it in the store once nothing can refuse it any more.

Each run_fit stores what it started with (trainer type, chunks, seed, data fingerprints, precision, its run ids) in
the store's "fits" meta. A resume rebuilds the last run_fit's runs from the same search (checked against the stored
configs), re-creates the clones made from them in order, finds where each continues (its newest checkpoint), and
sorts the ops a process logged but never applied into the policy's decisions to apply first and the rest, refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from rf_notebook.commands import CloneModify, Command, Stop
from rf_notebook.control.prepare import Preparer, check_num_chunks, format_datasets
from rf_notebook.engine.backend import PreparedRun
from rf_notebook.engine.checkpoints import resume_point
from rf_notebook.fields import OWNED_FIELDS
from rf_notebook.search import RunSpec, Search
from rf_notebook.store import RunStatus, Store
from rf_notebook.trainers._common import check_shared_state

__all__ = [
    "FitPlan",
    "begin",
    "close_interrupted",
    "config_changes",
    "data_fingerprint",
    "fit_record",
    "plan_fit",
    "resumable",
]

# What a resume must match, and how its error names it.
_MATCHED = (
    ("trainer_type", "trainer_type"),
    ("num_chunks", "`num_chunks`"),
    ("seed", "`seed`"),
    ("train_fingerprint", "`train_dataset` (content fingerprint)"),
    ("eval_fingerprint", "`eval_dataset` (content fingerprint)"),
    ("precision", "`precision`"),
)


def fit_record(
    trainer_type: str, num_chunks: int, seed: int, train: Any, evl: Any, precision: str | None
) -> dict[str, Any]:
    """What a run_fit started with, as stored (and compared by a resume)."""
    return {
        "trainer_type": trainer_type,
        "num_chunks": num_chunks,
        "seed": seed,
        "train_fingerprint": data_fingerprint(train),
        "eval_fingerprint": None if evl is None else data_fingerprint(evl),
        "precision": precision,
    }


class FitPlan:
    """What a run_fit trains: the runs, and for a resume where each continues ({run_id: (step, folder)}), the
    policy's decisions to apply first (commands), the last rung the policy fully decided, and the other pending ops
    with why they never apply; the data sets put through each formatting_func, and the fit's record."""

    def __init__(self) -> None:
        self.resume = False
        self.record: dict[str, Any] = {}
        self.formatted: dict[int, tuple[Any, Any]] = {}
        self.runs: list[PreparedRun] = []
        self.points: dict[int, tuple[int, str]] = {}
        self.replay: list[Command] = []
        self.decided: int | None = None
        self.refusals: list[tuple[int, str]] = []


def plan_fit(
    store: Store,
    preparer: Preparer,
    search: Search,
    train: Any,
    evl: Any,
    *,
    num_chunks: int,
    seed: int,
    precision: str | None,
    resume: bool,
    name: str,
) -> FitPlan:
    """Prepare a run_fit (validated, nothing loaded or recorded yet): every run of `search`, or with `resume` the
    last run_fit's runs that can still train."""
    specs = search.expand()
    formatted = format_datasets(search.trainer_type, specs, train, evl)
    record = fit_record(search.trainer_type, num_chunks, seed, train, evl, precision)
    if resume:
        plan = resumable(store, preparer, specs, record, name)
    else:
        plan = FitPlan()
        ids = store.reserve_run_ids(len(specs))
        plan.runs = [preparer.prepare(run_id, spec, seed, precision) for run_id, spec in zip(ids, specs)]
        check_num_chunks(plan.runs, len(train), num_chunks)
    check_shared_state(plan.runs)
    plan.resume, plan.record, plan.formatted = resume, record, formatted
    return plan


def resumable(store: Store, preparer: Preparer, specs: list[RunSpec], fit: dict[str, Any], name: str) -> FitPlan:
    """The last run_fit's runs (and clones made from them) that can still train, rebuilt from the same search."""
    fits = store.meta("fits", [])
    if not fits:
        raise ValueError(
            f"experiment {name!r} has no earlier run_fit to resume (nothing recorded in {str(preparer.path)!r}); "
            "call run_fit without resume=True to start it"
        )
    last = fits[-1]
    for key, what in _MATCHED:
        if fit[key] != last.get(key):  # (experiments from before `precision` existed stored none: None)
            raise ValueError(
                f"cannot resume experiment {name!r}: {what} is {fit[key]!r}, but it was started with "
                f"{last[key]!r}; resume with the same arguments, or start a new experiment"
            )
    ids = last["run_ids"]
    if len(specs) != len(ids):
        raise ValueError(
            f"cannot resume experiment {name!r}: the search expands to {len(specs)} runs, but it was started with "
            f"{len(ids)} (runs {ids}); resume with the same search, or start a new experiment"
        )
    prepared: dict[int, PreparedRun] = {}
    for run_id, spec in zip(ids, specs):
        run = preparer.prepare(run_id, spec, fit["seed"], fit["precision"])
        changed = config_changes(store.run(run_id).config, run.config)
        if changed:
            raise ValueError(
                f"cannot resume experiment {name!r}: run {run_id} ({store.run(run_id).name!r}) was started with a "
                f"different config ({changed}); resume with the same search, or start a new experiment"
            )
        prepared[run_id] = run
    for op in store.ic_log():  # clones, in the order they were made (a clone of a clone follows)
        if op.op == "clone_modify" and op.outcome == "applied" and op.run_id in prepared:
            prepared[op.new_run_id] = preparer.prepare_clone(
                prepared[op.run_id],
                op.new_run_id,
                op.args["overrides"],
                op.args["warm_start"],
                fit["seed"],
                op.args.get("name"),
            )
    resumed = FitPlan()
    for run_id, run in prepared.items():
        if store.run(run_id).status.is_terminal:
            continue
        point = resume_point(run.args.output_dir)
        if point is not None:
            resumed.points[run_id] = point
        resumed.runs.append(run)
    _replay(store, preparer, prepared, fit["seed"], len(fits), resumed)
    if not resumed.runs and not any(isinstance(c, CloneModify) for c in resumed.replay):
        raise ValueError(f"experiment {name!r} has no unfinished run to resume (all finished, failed or deleted)")
    return resumed


def _replay(
    store: Store, preparer: Preparer, prepared: dict[int, PreparedRun], seed: int, fit_number: int, into: FitPlan
) -> None:
    """Commands for the policy's ops that a process ended before applying, the last rung the policy fully decided,
    and the other pending ops with why they never apply (refused once run_fit starts). Ops of a rung whose decision
    was cut short are among those: that rung is decided again."""
    mark = store.meta("policy_rung") or {}
    # No mark for this run_fit (it started without a policy, or was recorded before marks existed): the rungs it
    # passed count as decided.
    decided = mark["rung"] if mark.get("fit") == fit_number else None
    for op in store.ic_log():
        if op.outcome != "pending":
            continue
        rung = op.args.get("rung")
        if op.origin != "policy" or rung is None or decided is None or rung > decided or op.run_id not in prepared:
            cut_short = op.origin == "policy" and decided is not None and op.args.get("rung", 0) > decided
            why = (
                f"the process ended while the policy was deciding chunk {op.args['rung']}; decided again on resume"
                if cut_short
                else "the process ended before the op was applied"
            )
            into.refusals.append((op.op_id, why))
        elif op.op == "stop":
            into.replay.append(Stop(op_id=op.op_id, run_id=op.run_id, requires=op.args.get("requires")))
        else:
            overrides, warm_start = op.args["overrides"], op.args["warm_start"]
            prepared[op.new_run_id] = preparer.prepare_clone(
                prepared[op.run_id], op.new_run_id, overrides, warm_start, seed, op.args.get("name")
            )
            into.replay.append(
                CloneModify(
                    op_id=op.op_id,
                    run_id=op.run_id,
                    new_run_id=op.new_run_id,
                    prepared=prepared[op.new_run_id],
                    warm_start=bool(warm_start),
                    overrides=dict(overrides),
                )
            )
    into.decided = decided


def close_interrupted(store: Store) -> None:
    """An experiment opened by a new process: its runs left queued or training are not training any more
    (stopped: `run_fit(resume=True)` continues them), and ops left pending never apply, except a policy's, which
    wait for the resume to apply them."""
    for r in store.runs():
        if r.status.is_live:
            store.update_run(r.run_id, status=RunStatus.STOPPED)
    for op in store.ic_log():
        if op.outcome == "pending" and op.origin != "policy":
            store.settle_op(op.op_id, "refused", "the process ended before the op was applied")


def begin(store: Store, plan: FitPlan, with_policy: bool) -> None:
    """Record a planned run_fit in the store: a new one, or a resume."""
    if plan.resume:
        _begin_resumed(store, plan)
    else:
        _begin_new(store, plan.runs, plan.record, with_policy)


def _begin_new(store: Store, prepared: Sequence[PreparedRun], fit: dict[str, Any], with_policy: bool) -> None:
    """Record a new run_fit: its runs (queued) and what it started with; ops a process that ended left pending
    never apply."""
    for op in store.ic_log():
        if op.outcome == "pending":
            store.settle_op(op.op_id, "refused", "the process ended and the experiment was not resumed")
    for run in prepared:
        store.add_run(run.record())
    store.set_meta("fits", [*store.meta("fits", []), {**fit, "run_ids": [r.run_id for r in prepared]}])
    if with_policy:  # no rung decided yet; a resume decides every rung passed after the mark
        store.set_meta("policy_rung", {"fit": len(store.meta("fits")), "rung": 0})


def _begin_resumed(store: Store, resumed: FitPlan) -> None:
    """Record a resume: the ops that never apply refused, each run's metrics after its checkpoint dropped (they are
    logged again), and runs that were interrupted (not stopped by an op) queued again."""
    for op_id, why in resumed.refusals:
        store.settle_op(op_id, "refused", why)
    for run in resumed.runs:
        record = store.run(run.run_id)
        store.drop_metrics_after(run.run_id, resumed.points.get(run.run_id, (0, None))[0])
        if record.status is RunStatus.STOPPED and not _stopped_by_op(store, run.run_id):
            store.update_run(run.run_id, status=RunStatus.QUEUED)


def _stopped_by_op(store: Store, run_id: int) -> bool:
    """Whether the run's latest applied stop/resume op is a stop (a user's or a policy's decision)."""
    ops = [op.op for op in store.ic_log() if op.run_id == run_id and op.outcome == "applied"]
    ops = [op for op in ops if op in ("stop", "resume")]
    return bool(ops) and ops[-1] == "stop"


def data_fingerprint(dataset: Any, metadata: bool = True) -> str:
    """A content hash of a data set (datasets.Dataset: its Arrow table; else its rows as JSON). Without `metadata`,
    the table's schema metadata is left out (`datasets` keeps the data set's fingerprint there, which may differ for
    equal rows)."""
    digest = hashlib.blake2b(digest_size=16)
    table = getattr(dataset, "data", None)
    table = getattr(table, "table", table)  # datasets wraps the pyarrow table
    if hasattr(dataset, "_indices") and getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()  # a selected / shuffled view: hash the rows it shows
        table = dataset.data.table
    if not metadata and hasattr(table, "replace_schema_metadata"):
        table = table.replace_schema_metadata(None)
    if hasattr(table, "to_batches"):
        import pyarrow as pa

        digest.update(repr(table.schema).encode())
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=65536):
                writer.write_batch(batch)
        digest.update(sink.getvalue())
    else:
        for row in dataset:
            digest.update(json.dumps(row, sort_keys=True, default=repr).encode())
    return f"{len(dataset)} rows, {digest.hexdigest()}"


def config_changes(stored: Any, new: Any) -> str:
    """What differs between a stored resolved config and a rebuilt one ("" if nothing); the fields the experiment
    owns (the run's folder, checkpoints, trackers: values rf_notebook sets, not the user) are ignored."""
    a, b = json.loads(json.dumps(stored, default=str)), json.loads(json.dumps(new, default=str))
    # Activation checkpointing recomputes exactly what it dropped (random state included): it changes memory and
    # time, never the result (and experiments written before it defaulted off here have no value stored).
    ignored = (*OWNED_FIELDS, "activation_checkpointing", "activation_checkpointing_kwargs")
    for config in (a, b):
        for field in ignored:
            config.get("training_args", {}).pop(field, None)
    changes = []
    for section in sorted(set(a) | set(b)):
        x, y = a.get(section), b.get(section)
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y)):
                if x.get(key) != y.get(key):
                    changes.append(f"{section}.{key}: {x.get(key)!r} -> {y.get(key)!r}")
        elif x != y:
            changes.append(f"{section}: {x!r} -> {y!r}")
    return "; ".join(changes)
