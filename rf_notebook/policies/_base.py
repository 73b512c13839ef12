"""The policy interface: at each rung (every live run has finished chunk k), a pure function of the recorded
metrics returns decisions. Policies import no torch and keep no state of their own: what they need is in the
store (the metrics, and which rungs already have decisions in the IC log), so a restarted experiment makes the
same decisions.

    decisions = policy.decide(rung=2, runs=[RunAtRung(...), ...])
    # [Decision("stop", run_id=7, reason="rank 7/8 at chunk 2 on eval_loss 1.93 > cut 1.41"), ...]
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from rf_notebook.store import LIVE_STATUSES

__all__ = ["AUTO_PROBE_STEPS", "PROBE_PREFIX", "PROBE_TRAINERS", "Decision", "Policy", "RunAtRung"]

PROBE_PREFIX = "probe_"  # an anneal probe's result is logged as "probe_eval_loss"
PROBE_TRAINERS = ("SFT", "DPO")  # trainers with a loss on data rows, which a probe can anneal and evaluate
AUTO_PROBE_STEPS = 4  # probe_steps="auto" (bench/pruning.py: 4 of 5 seeds within 1% vs 3 of 5 ranking by eval loss)


@dataclasses.dataclass(frozen=True)
class RunAtRung:
    """What a policy sees of one run at a rung."""

    run_id: int
    name: str
    status: str  # the store's RunStatus value
    values: Mapping[int, float]  # rung (chunks done) -> the policy's metric at that rung
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def value(self, rung: int) -> float | None:
        """The metric at `rung` (NaN or inf for a diverged run), or None if the run has not logged it there."""
        return self.values.get(rung)

    def last_value(self, rung: int) -> float | None:
        """The latest value at or before `rung`: where a run that stopped earlier stands."""
        done = [k for k in self.values if k <= rung]
        return self.values[max(done)] if done else None


@dataclasses.dataclass(frozen=True)
class Decision:
    """Stop a run, or clone it (warm start, with overrides) in place of run `replaces`, which is stopped once the
    clone is accepted. Every decision becomes an IC op with origin "policy"."""

    op: str  # "stop" or "clone"
    run_id: int
    reason: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    replaces: int | None = None

    def __post_init__(self) -> None:
        if self.op not in ("stop", "clone"):
            raise ValueError(f"a decision's op is {self.op!r}, but must be 'stop' or 'clone'")


class Policy(abc.ABC):
    """Decides at rungs. `metric` is compared at the same data position (rung) for every run; `mode` is
    "min" (losses) or "max" (rewards, accuracies).

    `probe_steps` > 0 compares runs by an anneal probe from rung `probe_from` on (`metric` must then be
    "eval_loss"): at each rung where the policy decides, a copy of every run's adapter and optimizer trains
    `probe_steps` more steps with the learning rate taken down the rest of the run's own schedule, is evaluated,
    and is thrown away. The result is logged as "probe_eval_loss"; the run itself is left exactly as it was. A run's
    eval loss early on says little about where it ends once its learning rate has annealed; the probe says more,
    except at the first rung, where the rest of the schedule is too long to squeeze into a few steps (measured:
    `bench/pruning.py`). "auto": `AUTO_PROBE_STEPS` for SFT and DPO runs with an eval data set and
    metric="eval_loss", else none (resolved by `run_fit`)."""

    def __init__(self, metric: str = "eval_loss", mode: str = "min", probe_steps: int | str = 0, probe_from: int = 2):
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"`metric` is {metric!r}, but must be the name of a logged metric, e.g. 'eval_loss'")
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` is {mode!r}, but must be 'min' or 'max'")
        if probe_steps != "auto" and (
            isinstance(probe_steps, bool) or not isinstance(probe_steps, int) or probe_steps < 0
        ):
            raise ValueError(
                f"`probe_steps` is {probe_steps!r}, but must be an int >= 0 (0: no anneal probe) or 'auto'"
            )
        if isinstance(probe_steps, int) and probe_steps and (metric, mode) != ("eval_loss", "min"):
            raise ValueError(
                f"`probe_steps` is {probe_steps} with metric={metric!r}, mode={mode!r}: an anneal probe measures "
                "the eval loss, so it needs metric='eval_loss' and mode='min'"
            )
        if isinstance(probe_from, bool) or not isinstance(probe_from, int) or probe_from < 1:
            raise ValueError(f"`probe_from` is {probe_from!r}, but must be an int >= 1 (the first rung probed)")
        self.metric, self.mode, self.probe_steps, self.probe_from = metric, mode, probe_steps, probe_from

    def probes_at(self, rung: int) -> int:
        """The anneal probe's optimizer steps at `rung` (0: the policy ranks by `metric` there)."""
        if self.probe_steps == "auto" or rung < self.probe_from or not self.decides_at(rung):
            return 0
        return self.probe_steps

    def ranked_by(self, rung: int) -> str:
        """The logged metric the policy compares at `rung`: `metric`, or the probe's result where it probes."""
        return f"{PROBE_PREFIX}{self.metric}" if self.probes_at(rung) else self.metric

    def resolved(self, trainer_type: str, has_eval: bool) -> Policy:
        """This policy with `probe_steps="auto"` made a number for these runs (itself when nothing to resolve)."""
        if self.probe_steps != "auto":
            return self
        probe = trainer_type in PROBE_TRAINERS and has_eval and (self.metric, self.mode) == ("eval_loss", "min")
        policy = copy.copy(self)
        policy.probe_steps = AUTO_PROBE_STEPS if probe else 0
        return policy

    def decides_at(self, rung: int) -> bool:
        """Whether `decide` may act at `rung` (where an anneal probe is worth its cost)."""
        return True

    @abc.abstractmethod
    def decide(self, rung: int, runs: Sequence[RunAtRung]) -> list[Decision]:
        """Decisions at `rung` for `runs` (every run of the experiment, any status)."""

    def judge(self, rung: int, run: RunAtRung, runs: Sequence[RunAtRung]) -> list[Decision]:
        """Decisions about `run` alone, which reached `rung` after the others had passed it (a run that joined
        late, e.g. a search's new config); `runs` holds every run's recorded values. By default none: it meets the
        others at the next rung they all reach."""
        return []

    def better_first(self, runs: Sequence[RunAtRung], rung: int) -> list[RunAtRung]:
        """Runs with a value at `rung`, best first, diverged ones (NaN, inf) last; ties keep run-id order."""
        scored = [r for r in runs if r.value(rung) is not None]
        sign = 1 if self.mode == "min" else -1

        def key(r: RunAtRung) -> tuple[bool, float, int]:
            v = r.value(rung)
            return (not math.isfinite(v), sign * v if math.isfinite(v) else 0.0, r.run_id)

        return sorted(scored, key=key)

    def worse(self, a: float, b: float) -> bool:
        """Whether `a` is worse than `b`; a value that is not a finite number is worse than any."""
        if not math.isfinite(a):
            return True
        return a > b if self.mode == "min" else a < b

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


_LIVE = frozenset(status.value for status in LIVE_STATUSES)


def live(runs: Sequence[RunAtRung]) -> list[RunAtRung]:
    """The runs still in the schedule (queued or training)."""
    return [r for r in runs if r.status in _LIVE]


def fmt(value: float) -> str:
    return f"{value:.4g}"
