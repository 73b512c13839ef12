"""`RFOptunaSearch`: an Optuna sampler proposes the configs, and proposes again whenever a run's slot is freed.

    search = RFOptunaSearch(
        RFModelConfig("m", peft_config=RFLoraConfig(r=List([4, 16])),
                      training_args=RFSFTConfig(learning_rate=Range(1e-4, 3e-3, log=True))),
        trainer_type="SFT", num_runs=8, budget=24)
    exp.run_fit(search, ..., policy=SuccessiveHalving())

`num_runs` configs train side by side. Each run is an Optuna trial: its metric at every chunk end is reported to the
study as an intermediate value; a run the policy stops is told as pruned, a finished run as complete with its final
metric. When a run ends (stopped by the policy, finished or failed) the sampler proposes a new config, which starts
in its place as a cold Clone-Modify of the search's first run with origin "policy" (logged, shown in the panel), until
`budget` configs have been proposed. The sampler (TPE, seeded by `seed`, unless one is given) sees every pruned
run's curve, so pruning does not turn it into random search. The study lives in the experiment: a resumed run_fit
continues it. What runs the study is `rf_notebook.control.study`; this module only describes the space and asks.

Optuna is an optional dependency: `pip install 'rf_notebook[optuna]'`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from rf_notebook.configs import RFModelConfig
from rf_notebook.search import ALIASES, RunSpec, Search, _flatten, _walk, format_value
from rf_notebook.space import List, Range
from rf_notebook.spec import ConfigSpec

__all__ = ["RFOptunaSearch", "Proposal", "OutsideSpace"]

logger = logging.getLogger(__name__)

SECTIONS = ("training_args", "peft_config")
_PRIMITIVE = (type(None), bool, int, float, str)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ImportError(
            "RFOptunaSearch needs Optuna, which is not installed: pip install 'rf_notebook[optuna]'"
        ) from None
    quiet = logging.getLogger("optuna.storages._in_memory")
    if not any(isinstance(f, _OwnStudies) for f in quiet.filters):
        quiet.addFilter(_OwnStudies())
    return optuna


STUDY_NAME = "rf_notebook-search"
REASKS = 16  # how often a proposal that repeats a config already tried is asked again


class _OwnStudies(logging.Filter):
    """Optuna says "A new study created in memory" at INFO for every study; a search makes one per proposal (a
    question to its sampler), which is nothing the user did. Other studies are said as usual."""

    def filter(self, record: logging.LogRecord) -> bool:
        return STUDY_NAME not in record.getMessage()


class OutsideSpace(ValueError):
    """The sampler proposed a value outside the search space (its trial counts, as failed)."""

    def __init__(self, message: str, number: int, system_attrs: dict[str, Any], study_attrs: dict[str, Any]):
        super().__init__(message)
        self.number, self.system_attrs, self.study_attrs = number, system_attrs, study_attrs


class Proposal:
    """One config the sampler proposed: its trial number, the sampler's values (`params`, by dotted field path), the
    concrete values they stand for (`values`: a List of lists is sampled by index) and what the sampler keeps on
    the trial (`system_attrs`: a grid sampler's grid point, CMA-ES's state)."""

    def __init__(
        self,
        number: int,
        params: dict[str, Any],
        values: dict[str, Any],
        system_attrs: dict[str, Any],
        study_attrs: dict[str, Any],
    ):
        self.number, self.params, self.values, self.system_attrs = number, params, values, system_attrs
        self.study_attrs = study_attrs  # what the sampler keeps on the study (QMC's sample id, NSGA's population)

    def overrides(self) -> dict[str, Any]:
        """The Clone-Modify overrides that make the search's base config into this one."""
        return dict(self.values)

    def label(self) -> str:
        short = ", ".join(
            f"{ALIASES.get(k.rsplit('.', 1)[-1], k.rsplit('.', 1)[-1])}={format_value(v)}"
            for k, v in self.values.items()
        )
        return f"trial {self.number}: {short}" if short else f"trial {self.number}"


class RFOptunaSearch(Search):
    """Configs proposed by an Optuna sampler over the `List` / `Range` fields of one `RFModelConfig`'s
    `training_args` and `peft_config`; `num_runs` train at once, `budget` (default 2 x num_runs) configs in all.

    `metric` / `mode`: what each trial is scored by (its value at the run's last chunk; `mode` "min" or "max").
    `sampler`: any Optuna sampler (default `TPESampler(seed=seed, n_startup_trials=num_runs)`: the first
    `num_runs` configs are random, every later one is modelled on the results so far). It is copied, so the one
    passed stays fresh, and must be seeded for `run_fit(..., resume=True)` to find the same first configs.
    """

    def __init__(
        self,
        configs: Any,
        trainer_type: str = "SFT",
        num_runs: int = 4,
        budget: int | None = None,
        sampler: Any = None,
        metric: str = "eval_loss",
        mode: str = "min",
        seed: int = 42,
    ):
        optuna = _optuna()
        super().__init__(configs, trainer_type)
        if not isinstance(configs, RFModelConfig):
            raise TypeError(
                f"RFOptunaSearch takes one RFModelConfig (with List / Range values in its training_args and "
                f"peft_config), but got {configs!r}; search over several models with RFGridSearch / RFRandomSearch"
            )
        for name, value in (("num_runs", num_runs), ("budget", budget)):
            if value is None and name == "budget":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` is {value!r}, but must be an int >= 1")
        budget = 2 * num_runs if budget is None else budget
        if budget < num_runs:
            raise ValueError(f"`budget` is {budget}, but must be >= num_runs ({num_runs}): the first configs count")
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"`metric` is {metric!r}, but must be the name of a logged metric, e.g. 'eval_loss'")
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` is {mode!r}, but must be 'min' or 'max'")
        if sampler is None:  # TPE models the results from the second round of proposals on
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=num_runs)
        elif not isinstance(sampler, optuna.samplers.BaseSampler):
            raise TypeError(f"`sampler` is {sampler!r}, but must be an Optuna sampler (optuna.samplers.*)")
        if getattr(sampler, "_constraints_func", None) is not None:
            raise ValueError(
                f"`sampler` is {sampler!r} with a constraints_func, which Optuna applies when a trial is told; "
                "RFOptunaSearch does not tell trials that way (constraints are not supported)"
            )
        self.num_runs, self.budget, self.metric, self.mode, self.seed = num_runs, budget, metric, mode, seed
        self.space = _space(configs, optuna)
        if not self.space:
            raise ValueError(
                "RFOptunaSearch found no List or Range in the config's training_args or peft_config: nothing to search"
            )
        self.size = _size(self.space)  # how many configs the space holds (None: a continuous one)
        self._sampler = copy.deepcopy(sampler)  # the fresh sampler every expand() starts from
        self._first: tuple[Any, list[Proposal]] | None = None

    # -- asking -----------------------------------------------------------------------------------------------

    def fresh_sampler(self) -> Any:
        return copy.deepcopy(self._sampler)

    def ask(
        self, sampler: Any, trials: Sequence[Mapping[str, Any]], study_attrs: Mapping[str, Any] | None = None
    ) -> Proposal:
        """The sampler's next proposal, given the trials so far (records: `params`, `state`, `values` by chunk,
        `value`, `system_attrs`), as trial number len(trials). Optuna sees them in a study rebuilt for the
        question: ended trials as they ended, and a running trial that has reported results as where it stands (pruned
        at its latest chunk): runs still training after a rung are the best so far, and a study that counted them
        as running would make TPE steer away from them (its constant liar). A config already tried is asked again
        (up to `REASKS` times; the repeat stays in the question's study as running, which steers TPE elsewhere): in a
        space of Lists, TPE proposes its favourite again and again. A proposal outside the space raises
        `OutsideSpace` naming the value. `study_attrs`: what the sampler kept on the study after the last question."""
        study, storage, study_id = self._study(sampler, trials, study_attrs or {})
        dists = {path: dist for path, (dist, _) in self.space.items()}
        tried = [dict(t["params"]) for t in trials]
        for _ in range(REASKS + 1):
            trial = study.ask(dists)
            params = dict(trial.params)
            if params not in tried:
                break
        else:
            logger.warning(
                "RFOptunaSearch: the sampler proposed %s, tried already, %d times: it is trained again",
                params,
                REASKS + 1,
            )
        attrs = _json_attrs(study.get_trials(deepcopy=False)[-1].system_attrs, "trial")
        kept = _json_attrs(storage.get_study_system_attrs(study_id), "study")
        try:
            values = {path: _value(path, params, *space) for path, space in self.space.items()}
        except ValueError as exc:
            raise OutsideSpace(str(exc), len(trials), attrs, kept) from None
        return Proposal(len(trials), params, values, attrs, kept)

    def _study(
        self, sampler: Any, trials: Sequence[Mapping[str, Any]], study_attrs: Mapping[str, Any]
    ) -> tuple[Any, Any, int]:
        optuna = _optuna()
        states = optuna.trial.TrialState
        # A study for one question, in memory, in the search's direction.
        storage = optuna.storages.InMemoryStorage()
        direction = optuna.study.StudyDirection.MINIMIZE if self.mode == "min" else optuna.study.StudyDirection.MAXIMIZE
        study_id = storage.create_new_study([direction], STUDY_NAME)
        for key, value in study_attrs.items():
            storage.set_study_system_attr(study_id, key, value)
        study = optuna.study.Study(study_name=STUDY_NAME, storage=storage, sampler=sampler)
        dists = {path: dist for path, (dist, _) in self.space.items()}
        for t in trials:
            values = {int(k): v for k, v in t["values"].items()}
            last = values[max(values)] if values else None
            if t["state"] == "complete":
                state, value = states.COMPLETE, t["value"]
            elif t["state"] == "fail":
                state, value = states.FAIL, None
            elif t["state"] == "pruned" or values:  # pruned, or running with results: where it stands
                state, value = states.PRUNED, last
            else:
                state, value = states.RUNNING, None
            params = dict(t["params"])
            study.add_trial(
                optuna.trial.create_trial(
                    params=params,
                    distributions={k: dists[k] for k in params},
                    value=value,
                    intermediate_values=values,
                    state=state,
                    system_attrs=dict(t.get("system_attrs") or {}),
                )
            )
        return study, storage, study_id

    def first(self) -> tuple[Any, list[Proposal]]:
        """A fresh sampler and its first `num_runs` proposals (the same every time, and after a restart with the
        same seeded sampler), kept until a run_fit takes them (`take_first`)."""
        if self._first is None:
            sampler, proposals = self.fresh_sampler(), []
            for _ in range(self.num_runs):
                trials = [
                    {
                        "params": p.params,
                        "state": "running",
                        "values": {},
                        "value": None,
                        "system_attrs": p.system_attrs,
                    }
                    for p in proposals
                ]
                proposals.append(self.ask(sampler, trials, proposals[-1].study_attrs if proposals else None))
            self._first = (sampler, proposals)
        return self._first

    def take_first(self) -> tuple[Any, list[Proposal]]:
        """`first()`, for the run_fit that trains them: the next expand() starts from a fresh sampler."""
        first, self._first = self.first(), None
        return first

    def expand(self) -> list[RunSpec]:
        configs = [(p, self.config(p.values)) for p in self.first()[1]]
        return [RunSpec(p.label(), self.trainer_type, c, _flatten(c)) for p, c in configs]

    def config(self, values: Mapping[str, Any]) -> RFModelConfig:
        """The base config with `values` (dotted field path -> value) in place of its List / Range fields."""
        sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for path, value in values.items():
            section, field = path.split(".", 1)
            sections[section][field] = value
        return self.configs.replace(**{s: getattr(self.configs, s).replace(**kw) for s, kw in sections.items() if kw})

    def __repr__(self) -> str:
        space = ", ".join(self.space)
        return (
            f"RFOptunaSearch({self.trainer_type}, num_runs={self.num_runs}, budget={self.budget}, "
            f"metric={self.metric!r}, mode={self.mode!r}, space=[{space}])"
        )


def _space(config: RFModelConfig, optuna: Any) -> dict[str, tuple[Any, list[Any] | None]]:
    """Each searched field's Optuna distribution (and, for a List of non-scalar values, the values its index picks)."""
    allowed: dict[int, str] = {}
    for section in SECTIONS:
        spec = getattr(config, section)
        if isinstance(spec, ConfigSpec):
            for field, value in spec.kwargs.items():
                if isinstance(value, (List, Range)):
                    allowed[id(value)] = f"{section}.{field}"
    for path, value in _walk(config, ""):
        if isinstance(value, (List, Range)) and allowed.get(id(value)) != path:
            raise ValueError(
                f"RFOptunaSearch searches fields of training_args and peft_config, but {path or 'the config'} is "
                f"{value!r}; make it one value (or search it with RFGridSearch / RFRandomSearch)"
            )
    space: dict[str, tuple[Any, list[Any] | None]] = {}
    for path in allowed.values():
        section, field = path.split(".", 1)
        value = getattr(config, section).kwargs[field]
        space[path] = _distribution(path, value, optuna)
    return space


def _distribution(path: str, value: List | Range, optuna: Any) -> tuple[Any, list[Any] | None]:
    dists = optuna.distributions
    if isinstance(value, Range):
        if value.log and value.step is not None:
            raise ValueError(f"{path}={value!r}: Optuna samples a log range without a step; drop `step` or `log`")
        if value.dtype == "int":
            if value.log and value.step not in (None, 1):
                raise ValueError(f"{path}={value!r}: an int log range is sampled with step 1")
            step = int(value.step or 1)
            return dists.IntDistribution(int(value.start), int(value.end), log=value.log, step=step), None
        return dists.FloatDistribution(float(value.start), float(value.end), log=value.log, step=value.step), None
    for v in value.values:  # (a List or Range inside it was refused by `_space`)
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            raise ValueError(
                f"{path}={value!r}: {v!r} is not JSON data (numbers, strings, booleans, lists, dicts, null), which a "
                "proposed config is made of"
            ) from None
    if all(isinstance(v, _PRIMITIVE) for v in value.values):
        return dists.CategoricalDistribution(list(value.values)), None
    return dists.CategoricalDistribution(list(range(len(value.values)))), list(value.values)


def _value(path: str, params: dict[str, Any], dist: Any, choices: list[Any] | None) -> Any:
    """The concrete value of the sampled param at `path`, checked to lie in the field's space (a custom or grid
    sampler may propose anything)."""
    param = params.get(path)
    try:
        inside = path in params and dist._contains(dist.to_internal_repr(param))
    except (TypeError, ValueError):
        inside = False
    if isinstance(param, float) and not math.isfinite(param):
        inside = False
    if not inside:
        raise ValueError(f"the sampler proposed {path}={param!r}, which is outside the search space ({dist!r})")
    return choices[param] if choices is not None else param


def _json_attrs(attrs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The sampler's state on a trial or the study that can be kept in the experiment's record (JSON data)."""
    kept = {}
    for key, value in attrs.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            logger.warning("RFOptunaSearch: the sampler's %s state %r is not JSON data; it is not kept", where, key)
            continue
        kept[key] = value
    return kept


def _size(space: Mapping[str, tuple[Any, Any]]) -> int | None:
    """The number of configs in the space, or None when a field is continuous."""
    size = 1
    for dist, _ in space.values():
        if hasattr(dist, "choices"):
            size *= len(dist.choices)
        elif getattr(dist, "step", None) is not None:
            size *= int(round((dist.high - dist.low) / dist.step)) + 1
        else:
            return None
    return size


def random_streams(sampler: Any) -> dict[str, Any]:
    """The state of every numpy random stream inside an Optuna sampler (its own and its helpers', e.g. TPE's
    startup RandomSampler), by attribute path, as JSON data: what a seeded sampler has consumed so far. With the trial
    records this is all a sampler needs to continue where it was (its caches are rebuilt from the trials)."""
    import numpy as np

    streams: dict[str, Any] = {}

    def walk(obj: Any, path: str, depth: int) -> None:
        for name, value in vars(obj).items() if hasattr(obj, "__dict__") and depth < 5 else ():
            where = f"{path}.{name}" if path else name
            if isinstance(value, np.random.RandomState):
                kind, keys, pos, has_gauss, gauss = value.get_state()
                streams[where] = [kind, keys.tolist(), pos, has_gauss, gauss]
            elif isinstance(value, np.random.Generator):
                streams[where] = value.bit_generator.state
            elif type(value).__module__.startswith("optuna."):
                walk(value, where, depth + 1)

    walk(sampler, "", 0)
    return streams


def restore_streams(sampler: Any, streams: Mapping[str, Any]) -> None:
    """Put `random_streams(...)` back into a fresh copy of the same sampler."""
    import numpy as np

    for where, state in streams.items():
        *parents, name = where.split(".")
        owner = sampler
        for parent in parents:
            owner = getattr(owner, parent)
        current = getattr(owner, name, None)
        if isinstance(state, dict):
            if not isinstance(current, np.random.Generator):
                raise TypeError(f"{where} is {current!r}, not a numpy Generator")
            current.bit_generator.state = state
            continue
        if current is None:  # a lazily created stream, not drawn from yet in the fresh copy
            current = np.random.RandomState()
            setattr(owner, name, current)
        kind, keys, pos, has_gauss, gauss = state
        current.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
