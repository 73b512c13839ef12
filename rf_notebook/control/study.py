"""The Optuna search of an `RFOptunaSearch`, run from the scheduler thread at each rung, after a late run is judged,
and whenever nothing is left to train.

Each trial is one run. Its record (params, run, the metric at every chunk end it passed, state, final value) is the
one truth: at every call the records learn what happened since the last one (finished -> complete with its last
value, stopped by the policy -> pruned, failed or deleted -> failed, a proposal whose Clone-Modify was refused ->
failed). Then every freed slot (`num_runs` minus the trials still running; a run the user stopped keeps its slot)
gets a new proposal, until `budget` proposals were made: a cold Clone-Modify of the search's first run, origin
"policy". The sampler answers each proposal from a study rebuilt from the records (`RFOptunaSearch.ask`).

The records, the sampler's random streams and what it keeps on the study are kept in the store's "study" meta after
every call (JSON: nothing is unpickled); a resumed run_fit continues from them, so the sampler proposes what it would
have.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from typing import Any

from rf_notebook.control.results import logged_name
from rf_notebook.optuna_search import OutsideSpace, RFOptunaSearch, random_streams, restore_streams
from rf_notebook.store import RunStatus, Store

logger = logging.getLogger(__name__)

__all__ = ["Study"]

META = "study"
RUNNING, COMPLETE, PRUNED, FAIL = "running", "complete", "pruned", "fail"


class Study:
    """The trials of one run_fit's search: `step(rung)` at rungs (after the rung is marked decided), after a late
    run's judgement, and `step(0)` when the engine is idle; `control` submits the proposals' Clone-Modify ops."""

    def __init__(self, search: RFOptunaSearch, store: Store, control: Any, fit: int, run_ids: list[int], resume: bool):
        self.search, self.store, self.control, self.fit = search, store, control, fit
        self._orphaned = False
        saved = store.meta(META)
        sampler, proposals = search.take_first()
        if resume and saved is not None and saved.get("fit") == fit:
            self.records = [dict(r) for r in saved["trials"]]
            self._link()
            self.sampler = self._load(saved.get("sampler"))
            self.study_attrs = dict(saved.get("study_attrs") or {})
        else:
            self.sampler = sampler
            self.study_attrs = proposals[-1].study_attrs
            self.records = [
                _record(p.number, p.params, run_id, None, system_attrs=p.system_attrs)
                for p, run_id in zip(proposals, run_ids, strict=True)
            ]
            self._save()

    # -- each call ------------------------------------------------------------------------------------------------

    def step(self, rung: int) -> int:
        """Learn what happened, fill the freed slots; the number of proposals submitted."""
        self._learn()
        running = sum(r["state"] == RUNNING for r in self.records)
        free = min(self.search.num_runs - running, self.search.budget - len(self.records))
        if free > 0 and self._exhausted():
            free = 0
        parent = self._parent() if free > 0 else None
        started = 0
        for _ in range(max(free, 0) if parent is not None else 0):
            started += self._propose(rung, parent)
        self._save()
        return started

    def _learn(self) -> None:
        runs = {r.run_id: r for r in self.store.runs()}
        ops = self.store.ic_log()
        stops = [op for op in ops if op.op == "stop" and op.origin == "policy"]
        stopping = {op.run_id for op in stops if op.outcome == "pending"}  # applied before anything trains further
        pruned = {op.run_id for op in stops if op.outcome == "applied"}
        values = self._values()
        for record in self.records:
            run = runs.get(record["run_id"])
            if record["state"] == PRUNED and run is not None and not self._pruned(run, stopping, pruned):
                record["state"] = RUNNING  # resumed by the user (or its stop was refused): its result counts
            if record["state"] != RUNNING:
                continue
            if record["op_id"] is not None:
                op = self.store.op(record["op_id"])
                if op.outcome == "pending":
                    continue
                if op.outcome == "refused":
                    self._end(record, FAIL, why=f"its Clone-Modify was refused: {op.reason}")
                    continue
            run = runs.get(record["run_id"])
            if run is None:
                continue
            for chunk, value in sorted(values.get(record["run_id"], {}).items()):
                if math.isfinite(value):
                    record["values"][str(chunk)] = value
            if run.status is RunStatus.FINISHED:
                final = values.get(record["run_id"], {})
                last = final[max(final)] if final else None
                if last is None or not math.isfinite(last):
                    self._end(record, FAIL, why=f"it finished without a finite {self.search.metric} ({last})")
                else:
                    self._end(record, COMPLETE, value=last)
            elif run.status in (RunStatus.FAILED, RunStatus.DELETED):
                self._end(record, FAIL, why=f"its run {run.status.value}")
            elif self._pruned(run, stopping, pruned):
                self._end(record, PRUNED)

    @staticmethod
    def _pruned(run: Any, stopping: set[int], pruned: set[int]) -> bool:
        """Stopped by the policy: its stop waits to apply, or applied and the run still stopped."""
        return run.run_id in stopping or (run.status is RunStatus.STOPPED and run.run_id in pruned)

    def _values(self) -> dict[int, dict[int, float]]:
        """The search's metric by run and chunk (the last value logged in each chunk)."""
        metrics = self.store.metrics()
        name = logged_name(self.search.metric, {m.name for m in metrics})
        values: dict[int, dict[int, float]] = {}
        for m in metrics:
            if m.name == name:
                values.setdefault(m.run_id, {})[m.chunk] = m.value
        return values

    def _end(self, record: dict[str, Any], state: str, value: float | None = None, why: str = "") -> None:
        record["state"], record["value"] = state, value
        if why:  # the sampler learns nothing from it: said where the user sees it
            logger.warning("RFOptunaSearch: trial %d (run %s) failed: %s", record["number"], record["run_id"], why)

    def _propose(self, rung: int, parent: int) -> int:
        """Ask for one config and submit it; 0 if the proposal was refused (it still counts toward the budget)."""
        try:
            proposal = self.search.ask(self.sampler, self.records, self.study_attrs)
        except OutsideSpace as exc:
            self.study_attrs = exc.study_attrs
            self.records.append(_record(exc.number, {}, None, None, state=FAIL, system_attrs=exc.system_attrs))
            logger.warning("RFOptunaSearch: %s; the proposal is skipped", exc)
            return 0
        self.study_attrs = proposal.study_attrs
        record = _record(
            proposal.number, proposal.params, None, None, label=proposal.label(), system_attrs=proposal.system_attrs
        )
        self.records.append(record)
        self._save()  # before its op is logged: a resume links the two by the run's name
        reason = f"{proposal.label()}: proposed by the {type(self.sampler).__name__} for a freed slot"
        try:
            op_id, run_id = self.control.clone_modify(
                parent, proposal.overrides(), False, origin="policy", reason=reason, rung=rung, name=proposal.label()
            )
        except (KeyError, TypeError, ValueError) as exc:  # refused and logged as such; the slot stays free
            self._end(record, FAIL, why=f"its Clone-Modify was refused: {exc}")
            return 0
        record["op_id"], record["run_id"] = op_id, run_id
        return 1

    def _exhausted(self) -> bool:
        """Whether every config of a finite space has been tried (said once): nothing new is left to propose."""
        size = self.search.size
        tried = {json.dumps(r["params"], sort_keys=True) for r in self.records if r["params"]}
        if size is None or len(tried) < size:
            return False
        if not self._orphaned:
            self._orphaned = True
            logger.warning(
                "RFOptunaSearch: all %d configs of the space have been tried; the %d left of the budget are not used",
                size,
                self.search.budget - len(self.records),
            )
        return True

    def _parent(self) -> int | None:
        """The run a proposal is cloned from (cold: only its lineage): the search's first run not deleted that this
        run_fit holds (after a restart: its unfinished runs). None, said once: the search proposes no more."""
        runs = {r.run_id: r for r in self.store.runs()}
        for record in self.records:
            run = runs.get(record["run_id"])
            if run is not None and run.status is not RunStatus.DELETED and record["run_id"] in self.control.engine.runs:
                return run.run_id
        if not self._orphaned:
            self._orphaned = True
            left = self.search.budget - len(self.records)
            logger.warning(
                "RFOptunaSearch: no run of the search is left to clone a proposal from (deleted, or ended before a "
                "restart); the %d configs left of its budget are not proposed",
                left,
            )
        return None

    # -- kept in the store ----------------------------------------------------------------------------------------

    def _save(self) -> None:
        sampler = random_streams(self.sampler)
        # a copy: readers of the store (any thread) never see a record change under them
        self.store.set_meta(
            META,
            {
                "fit": self.fit,
                "trials": copy.deepcopy(self.records),
                "sampler": sampler,
                "study_attrs": copy.deepcopy(self.study_attrs),
            },
        )

    def _link(self) -> None:
        """A proposal saved before the process ended: its Clone-Modify op (found by the run's name), or failed if
        the process ended before the op was logged."""
        ours = {r["run_id"] for r in self.records if r["run_id"] is not None}  # a proposal's parent is one of them
        clones = {
            op.args.get("name"): op for op in self.store.ic_log() if op.op == "clone_modify" and op.run_id in ours
        }
        for record in self.records:
            if record["state"] == RUNNING and record["run_id"] is None and record["op_id"] is None:
                op = clones.get(record.get("label"))
                if op is None:
                    record["state"] = FAIL
                else:
                    record["op_id"], record["run_id"] = op.op_id, op.new_run_id

    def _load(self, streams: Any) -> Any:
        """A fresh copy of the search's sampler with its random streams as saved (nothing else of a sampler's state
        outlives a question: its caches are rebuilt from the trials)."""
        sampler = self.search.fresh_sampler()
        try:
            restore_streams(sampler, streams or {})
        except Exception as exc:  # noqa: BLE001 - e.g. saved by another Optuna version
            logger.warning("RFOptunaSearch: the sampler's saved state does not fit (%s); it goes on fresh", exc)
            return self.search.fresh_sampler()
        return sampler


def _record(
    number: int,
    params: dict[str, Any],
    run_id: int | None,
    op_id: int | None,
    state: str = RUNNING,
    label: str = "",
    system_attrs: dict[str, Any] | None = None,
) -> dict:
    return {
        "number": number,
        "label": label,
        "system_attrs": dict(system_attrs or {}),
        "params": dict(params),
        "run_id": run_id,
        "op_id": op_id,
        "state": state,
        "values": {},
        "value": None,
    }
