"""The IC-op service: the one path every op takes, whoever asks (the Python API, the panel, a policy).

    log (pending, with its origin) -> check (refused at once if it cannot apply now) -> for a clone: validate the
    overrides, build the clone's spec and prepare it -> submit the command to the engine's queue -> the scheduler
    thread applies it between two optimizer steps and settles it (applied / refused) in the store.

A policy is asked at each synchronous rung from the engine's rung hook (`policy_hook`), and its decisions go the same
way with origin "policy". Ops are submitted from any thread; nothing here touches a model.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

from rf_notebook.commands import RUN_OPS, CloneModify
from rf_notebook.control.prepare import Preparer
from rf_notebook.control.results import logged_name
from rf_notebook.engine import Engine
from rf_notebook.policies import Policy, RunAtRung
from rf_notebook.policies._base import live
from rf_notebook.store import Store

if TYPE_CHECKING:
    from rf_notebook.control.study import Study

logger = logging.getLogger(__name__)

__all__ = ["Control"]


class Control:
    """The IC ops of one experiment. `engine` is the engine of its current run_fit (None before the first)."""

    def __init__(self, name: str, store: Store, preparer: Preparer):
        self.name, self.store, self.preparer = name, store, preparer
        self.engine: Engine | None = None

    # -- ops ------------------------------------------------------------------------------------------------------

    def submit(
        self,
        op: str,
        run_id: int,
        *,
        origin: str,
        reason: str | None = None,
        rung: int | None = None,
        requires: int | None = None,
    ) -> int:
        """Log op `op` ("stop", "resume" or "delete") on `run_id`, refuse it at once if it cannot apply, else
        queue it; return its op id. A policy's ops carry their `rung`; a stop that `requires` another op applies
        only if that one did."""
        if op not in RUN_OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {sorted(RUN_OPS)} (or clone_modify)")
        if op == "resume" and self.store.storage_error is not None:
            self.store.recover()  # the experiment paused on a failed write: the directory must work again
        args = {k: v for k, v in (("rung", rung), ("requires", requires)) if v is not None}
        record = self.store.log_op(origin, op, run_id, args, reason=reason)
        try:
            self._check(op, run_id)
        except ValueError as exc:
            self.store.settle_op(record.op_id, "refused", str(exc))
            raise
        extra = {"requires": requires} if requires is not None else {}
        self.engine.submit(RUN_OPS[op](op_id=record.op_id, run_id=run_id, **extra))
        return record.op_id

    def clone_modify(
        self,
        run_id: int,
        overrides: dict[str, Any],
        warm_start: bool,
        *,
        origin: str,
        reason: str | None = None,
        rung: int | None = None,
        name: str | None = None,
    ) -> tuple[int, int]:
        """Log, check, prepare and queue a clone of `run_id` with `overrides`; return (op id, the new run's id).
        `name`: the new run's (default: the parent's name and what changed)."""
        new_id = self.store.reserve_run_ids(1)[0]
        args = {"overrides": overrides, "warm_start": warm_start}
        args.update({k: v for k, v in (("rung", rung), ("name", name)) if v is not None})
        op = self.store.log_op(origin, "clone_modify", run_id, args, new_run_id=new_id, reason=reason)
        try:
            self._check("clone_modify", run_id, warm_start)
            parent = self.engine.runs[run_id]
            prepared = self.preparer.prepare_clone(parent, new_id, overrides, warm_start, parent.args.seed, name)
        except (KeyError, TypeError, ValueError) as exc:
            self.store.settle_op(op.op_id, "refused", str(exc))
            raise
        command = CloneModify(
            op_id=op.op_id,
            run_id=run_id,
            new_run_id=new_id,
            prepared=prepared,
            warm_start=bool(warm_start),
            overrides=dict(overrides),
        )
        self.engine.submit(command)
        return op.op_id, new_id

    def stop_all(self, *, origin: str) -> list[int]:
        """Stop every run still queued or training; the ids of the stop ops (a run that ended meanwhile is
        refused in the log, the others still stop)."""
        op_ids = []
        for run_id in self.live_runs():
            try:
                op_ids.append(self.submit("stop", run_id, origin=origin))
            except ValueError:
                pass
        return op_ids

    def live_runs(self) -> list[int]:
        """The runs queued or training, of any run_fit."""
        return [r.run_id for r in self.store.runs() if r.status.is_live]

    def _check(self, op: str, run_id: int, warm_start: bool = False) -> None:
        """Refuse at once what cannot apply now (the scheduler checks again when it applies the op)."""
        if self.engine is None or not self.engine.alive:
            raise ValueError(f"experiment {self.name!r} is not running (not started, or end() was called)")
        reason = self.engine.refusal(op, run_id, warm_start=warm_start)
        if reason is not None:
            raise ValueError(reason)

    # -- policies -------------------------------------------------------------------------------------------------

    def policy_hook(self, policy: Policy | None, study: Study | None = None) -> Any:
        """The engine's rung hook for `policy` and an `RFOptunaSearch`'s `study` (None: no hook)."""
        if policy is None and study is None:
            return None
        return lambda rung: self.policy_step(policy, rung, study)

    def late_hook(self, policy: Policy | None, study: Study | None = None) -> Any:
        """The engine's hook for a run that reaches a rung the others passed (None: no policy)."""
        if policy is None:
            return None
        return lambda run_id, rung: self.late_step(policy, run_id, rung, study)

    def late_step(self, policy: Policy, run_id: int, rung: int, study: Study | None = None) -> None:
        """Ask `policy` to judge run `run_id` alone at `rung` (it joined late); a `study` fills a slot it frees.
        Only a run the policy's side made (a search's proposal) is judged so: one the user cloned meets the others at
        their next rung, as before, and one the user resumed is the user's call."""
        if not policy.decides_at(rung):
            return
        ops = self.store.ic_log()
        proposed = any(
            op.op == "clone_modify" and op.origin == "policy" and op.new_run_id == run_id and op.outcome == "applied"
            for op in ops
        )
        applied = [op for op in ops if op.run_id == run_id and op.outcome == "applied"]
        pruned = [op.op_id for op in applied if op.op == "stop" and op.origin == "policy"]
        overridden = (
            any(op.op == "resume" and op.origin != "policy" and op.op_id > max(pruned) for op in applied)
            if pruned
            else False
        )
        if not proposed or overridden:
            return
        runs = self._runs_at_rung(policy, self.store.metrics(), self._fit_runs())
        run = next((r for r in runs if r.run_id == run_id), None)
        if run is None:
            return
        if policy.probes_at(rung) and run.value(rung) is None:  # its probe failed: judged by the metric
            policy = copy.copy(policy)
            policy.probe_steps = 0
            runs = self._runs_at_rung(policy, self.store.metrics(), self._fit_runs())
            run = next(r for r in runs if r.run_id == run_id)
        for decision in policy.judge(rung, run, runs):
            if decision.op != "stop" or decision.run_id != run_id:
                continue
            try:
                self.submit("stop", run_id, origin="policy", reason=decision.reason, rung=rung)
            except ValueError as exc:
                logger.warning("policy decision stop on run %d refused: %s", run_id, exc)
        if study is not None:
            try:
                study.step(rung)
            except Exception:
                logger.exception("RFOptunaSearch failed after judging run %d at chunk %d", run_id, rung)

    def _fit_runs(self) -> set[int]:
        """This run_fit's runs, any status, and their clones."""
        fit = set(self.store.meta("fits")[-1]["run_ids"])
        for op in self.store.ic_log():
            if op.op == "clone_modify" and op.outcome == "applied" and op.run_id in fit:
                fit.add(op.new_run_id)
        return fit

    def idle_hook(self, study: Study | None) -> Any:
        """The engine's idle hook: a study fills the slots of the runs that ended (None: no hook)."""
        if study is None:
            return None
        return lambda: self.idle_step(study)

    def idle_step(self, study: Study) -> int:
        """Nothing is left to train: the study proposes runs for the freed slots (scheduler thread). They pass
        rungs 1, 2, ... anew, so the policy's rung mark starts again."""
        started = study.step(0)  # rung 0: a resume replays them (any mark is >= 0)
        if started:
            self.store.set_meta("policy_rung", {"fit": len(self.store.meta("fits")), "rung": 0})
        return started

    @staticmethod
    def probe_plan(policy: Policy | None) -> Any:
        """The engine's anneal-probe plan for `policy`: chunk number -> probe steps at that rung (None: no probes)."""
        if policy is None or not policy.probe_steps:
            return None
        return policy.probes_at

    def _runs_at_rung(self, policy: Policy, metrics: list[Any], fit: set[int]) -> list[RunAtRung]:
        """What `policy` sees of the runs of `fit`: each rung's values in the metric it ranks by there (the eval loss,
        or an anneal probe's result)."""
        logged = {m.name for m in metrics}
        names = {chunk: logged_name(policy.ranked_by(chunk), logged) for chunk in {m.chunk for m in metrics}}
        values: dict[int, dict[int, float]] = {}
        for m in metrics:
            if m.name == names[m.chunk]:
                values.setdefault(m.run_id, {})[m.chunk] = m.value
        return [
            RunAtRung(r.run_id, r.name, r.status.value, values.get(r.run_id, {}), {**_resolved(r.config), **r.params})
            for r in self.store.runs()
            if r.run_id in fit
        ]

    def policy_step(self, policy: Policy | None, rung: int, study: Study | None = None) -> None:
        """Ask `policy` about rung `rung` (scheduler thread) and submit its decisions as ops, origin "policy"; then
        a `study` fills the slots they freed."""
        if policy is not None:
            self._decide(policy, rung)
        self.store.set_meta("policy_rung", {"fit": len(self.store.meta("fits")), "rung": rung})
        # After the mark: a resume replays the proposals logged here (a process that ends before them leaves the
        # slots free, and the study fills them at its next step), never refuses them as a decision cut short.
        if study is not None:
            try:
                study.step(rung)
            except Exception:  # a broken sampler must not take the runs down
                logger.exception("RFOptunaSearch failed at chunk %d", rung)

    def _decide(self, policy: Policy, rung: int) -> None:
        metrics = self.store.metrics()
        fit = self._fit_runs()
        runs = self._runs_at_rung(policy, metrics, fit)
        probed = policy.probes_at(rung)
        missing = [r.run_id for r in live(runs) if r.value(rung) is None] if probed else []
        if missing:  # a failed probe (or a rung reached before probes existed) must not exempt runs from the cut
            logger.warning(
                "policy %r: runs %s have no anneal probe at chunk %d; that rung is ranked by %r",
                policy,
                missing,
                rung,
                policy.metric,
            )
            policy = copy.copy(policy)
            policy.probe_steps = 0
            runs = self._runs_at_rung(policy, metrics, fit)
        if policy.decides_at(rung) and not any(rung in run.values for run in runs):
            logger.warning(
                "policy %r: no run logged %r at chunk %d (logged: %s); nothing to decide",
                policy,
                policy.ranked_by(rung),
                rung,
                sorted({m.name for m in metrics}),
            )
        # Each decision is logged (pending) before any is applied, then the rung is marked decided: a process that
        # ends before the mark decides the rung again on resume; one that ends after it applies the pending ops.
        for decision in policy.decide(rung, runs):
            try:
                if decision.op == "stop":
                    self.submit("stop", decision.run_id, origin="policy", reason=decision.reason, rung=rung)
                    continue
                clone_op, _ = self.clone_modify(
                    decision.run_id, dict(decision.overrides), True, origin="policy", reason=decision.reason, rung=rung
                )
                if decision.replaces is not None:  # stopped only if its replacement is applied: all or nothing
                    self.submit(
                        "stop", decision.replaces, origin="policy", reason=decision.reason, rung=rung, requires=clone_op
                    )
            except (KeyError, TypeError, ValueError) as exc:  # refused and logged as such; the others go on
                logger.warning("policy decision %s on run %d refused: %s", decision.op, decision.run_id, exc)


def _resolved(config: Any) -> dict[str, Any]:
    """A run's resolved trainer and adapter arguments as flat params ("training_args.learning_rate": ...)."""
    flat: dict[str, Any] = {}
    for section in ("training_args", "peft_config"):
        for key, value in (config.get(section) or {}).items() if isinstance(config, dict) else ():
            flat[f"{section}.{key}"] = value
    return flat
