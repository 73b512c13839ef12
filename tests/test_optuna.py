"""RFOptunaSearch: the space and its refusals, reproducible proposals, and a real sweep where the sampler fills the
slots the policy frees (its restart after SIGKILL is in test_durability.py)."""

from __future__ import annotations

import math

import optuna
import pytest

from rf_notebook import Experiment, List, Range, RFLoraConfig, RFModelConfig, RFOptunaSearch, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn
from rf_notebook.policies import SuccessiveHalving
from rf_notebook.store import RunStatus


def config(lr=None, r=None, targets="all-linear", **args):
    return RFModelConfig(
        DEMO_MODEL,
        peft_config=RFLoraConfig(r=List([4, 8]) if r is None else r, lora_alpha=8, target_modules=targets),
        training_args=RFSFTConfig(
            learning_rate=Range(1e-4, 3e-3, log=True) if lr is None else lr,
            per_device_train_batch_size=8,
            max_steps=16,
            **args,
        ),
    )


def params(search):
    return [spec.params for spec in search.expand()]


# -- the space, without training ----------------------------------------------------------------------------------


def test_the_space_maps_ranges_and_lists_to_optuna_distributions():
    search = RFOptunaSearch(
        config(
            targets=List([["q_proj"], ["q_proj", "v_proj"]]), warmup_steps=Range(0, 4), weight_decay=Range(0.0, 0.1)
        ),
        num_runs=3,
    )
    dists = {path: dist for path, (dist, _) in search.space.items()}
    assert dists["training_args.learning_rate"] == optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True)
    assert dists["training_args.warmup_steps"] == optuna.distributions.IntDistribution(0, 4)
    assert dists["peft_config.r"] == optuna.distributions.CategoricalDistribution([4, 8])
    # a List of lists is sampled by index, and the run gets the list itself
    assert dists["peft_config.target_modules"] == optuna.distributions.CategoricalDistribution([0, 1])
    specs = search.expand()
    assert [s.name.split(":")[0] for s in specs] == ["trial 0", "trial 1", "trial 2"]
    for spec in specs:
        lr = spec.params["training_args.learning_rate"]
        assert 1e-4 <= lr <= 3e-3 and spec.params["peft_config.r"] in (4, 8)
        assert spec.params["peft_config.target_modules"] in (["q_proj"], ["q_proj", "v_proj"])
        assert spec.model_config.training_args.kwargs["learning_rate"] == lr


def test_proposals_are_reproducible_by_seed():
    assert params(RFOptunaSearch(config(), num_runs=4, seed=1)) == params(RFOptunaSearch(config(), num_runs=4, seed=1))
    assert params(RFOptunaSearch(config(), num_runs=4, seed=1)) != params(RFOptunaSearch(config(), num_runs=4, seed=2))
    search = RFOptunaSearch(config(), num_runs=4, seed=1)
    assert params(search) == params(search)  # expand() is stable until a run_fit takes the proposals
    # a sampler given is copied: the same object gives the same first proposals to two searches
    sampler = optuna.samplers.TPESampler(seed=5)
    assert params(RFOptunaSearch(config(), sampler=sampler)) == params(RFOptunaSearch(config(), sampler=sampler))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: RFOptunaSearch([config(), config()]), TypeError, "takes one RFModelConfig"),
        (
            lambda: RFOptunaSearch(config().replace(model_name=List([DEMO_MODEL, "b"]))),
            ValueError,
            "model_name is List",
        ),
        (lambda: RFOptunaSearch(config(lr=Range(1e-4, 1e-2, log=True, step=1e-4))), ValueError, "log range without"),
        (lambda: RFOptunaSearch(config(lr=List([Range(1e-4, 1e-3), 1e-2]))), ValueError, "learning_rate"),
        (lambda: RFOptunaSearch(config(lr=1e-3, r=4)), ValueError, "nothing to search"),
        (lambda: RFOptunaSearch(config(), num_runs=4, budget=3), ValueError, "`budget` is 3, but must be >= num_runs"),
        (lambda: RFOptunaSearch(config(), num_runs=0), ValueError, "`num_runs` is 0"),
        (lambda: RFOptunaSearch(config(), sampler="tpe"), TypeError, "`sampler` is 'tpe'"),
        (lambda: RFOptunaSearch(config(), mode="lowest"), ValueError, "`mode` is 'lowest'"),
        (lambda: RFOptunaSearch(config(targets=List([print]))), ValueError, "is not JSON data"),
        # a Range without bounds (or with an infinite one) is refused where it is written
        (lambda: RFOptunaSearch(config(lr=Range(1e-5, math.inf))), TypeError, "Range end is inf"),
        (lambda: RFOptunaSearch(config(lr=Range(1e-5, None))), TypeError, "Range end is None"),
    ],
)
def test_a_space_optuna_cannot_search_is_refused_with_its_value(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_proposal_outside_the_space_is_refused_naming_the_value():
    fixed = optuna.samplers.PartialFixedSampler({"training_args.learning_rate": 0.5}, optuna.samplers.RandomSampler(0))
    with pytest.raises(ValueError, match=r"proposed training_args.learning_rate=0.5, which is outside the search"):
        RFOptunaSearch(config(), sampler=fixed).expand()


def test_a_list_with_none_is_searched():
    fixed = optuna.samplers.PartialFixedSampler({"training_args.max_grad_norm": None}, optuna.samplers.RandomSampler(0))
    search = RFOptunaSearch(config(r=4, max_grad_norm=List([None, 1.0])), sampler=fixed, num_runs=2)
    assert [p["training_args.max_grad_norm"] for p in params(search)] == [None, None]


def test_an_eval_metric_without_an_eval_set_or_pbt_is_refused_before_training(tmp_path):
    from rf_notebook.policies import PBT

    exp = Experiment("no-eval", experiments_dir=tmp_path)
    train = arithmetic_dataset("train", n=64)
    with pytest.raises(ValueError, match=r"scores each config by 'eval_loss', but `eval_dataset` is None"):
        exp.run_fit(RFOptunaSearch(config()), demo_model_fn, train, None, display=False)
    with pytest.raises(ValueError, match=r"PBT replaces runs with warm clones"):
        exp.run_fit(RFOptunaSearch(config()), demo_model_fn, train, train, policy=PBT(), display=False)
    assert exp.runs() == []


# -- real runs ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    return arithmetic_dataset("train", n=128), arithmetic_dataset("eval", n=16)


def sweep(tmp_path, name, data, search, policy=None):
    exp = Experiment(name, experiments_dir=tmp_path)
    exp.run_fit(search, demo_model_fn, *data, num_chunks=4, seed=0, policy=policy, display=False)
    assert exp.wait(timeout=600)
    return exp


def proposals(exp):
    log = exp.ic_log()
    clones = log[log.op == "clone_modify"]
    return [(row.args["name"], row.args["overrides"], row.outcome) for row in clones.itertuples()]


def test_the_sampler_fills_each_slot_the_policy_frees_within_the_budget(data, tmp_path, monkeypatch):
    from rf_notebook.control.study import Study

    running = []  # trials running after each of the study's steps: never more than num_runs
    step = Study.step

    def counted(self, rung):
        started = step(self, rung)
        running.append(sum(r["state"] == "running" for r in self.records))
        return started

    monkeypatch.setattr(Study, "step", counted)
    search = RFOptunaSearch(config(), num_runs=3, budget=7, seed=0)
    exp = sweep(tmp_path, "fill", data, search, SuccessiveHalving(eta=3, probe_steps=0))
    assert running and max(running) == 3
    runs = {r.run_id: r for r in exp.runs()}
    assert len(runs) == 7  # the budget: 3 first configs and 4 proposed for freed slots
    log = exp.ic_log()
    clones = log[log.op == "clone_modify"]
    assert len(clones) == 4 and set(clones.origin) == {"policy"} and set(clones.outcome) == {"applied"}
    assert all(reason.endswith("proposed by the TPESampler for a freed slot") for reason in clones.reason)
    assert not any(args["warm_start"] for args in clones.args)  # cold: each proposal is its own training
    for row in clones.itertuples():  # each proposal runs the config it names, from the first step
        run = runs[row.new_run_id]
        assert run.name == row.args["name"] and run.name.startswith("trial ")
        assert run.params["training_args.learning_rate"] == row.args["overrides"]["training_args.learning_rate"]
        assert run.params["peft_config.r"] == row.args["overrides"]["peft_config.r"]
        steps = exp.results().query(f"run_id == {row.new_run_id} and metric == 'loss'").step.tolist()
        assert steps[0] == 1
    stops = log[(log.op == "stop") & (log.origin == "policy")]
    assert len(stops) >= 4
    # the study knows every trial's fate, as the runs ended
    trials = exp.store.meta("study")["trials"]
    assert [t["run_id"] for t in trials] == sorted(runs)
    fate = {RunStatus.FINISHED: "complete", RunStatus.STOPPED: "pruned"}
    assert [t["state"] for t in trials] == [fate[runs[t["run_id"]].status] for t in trials]
    for t in trials:  # intermediate values: the eval loss at each chunk end the run passed
        evals = exp.results().query(f"run_id == {t['run_id']} and metric == 'eval_loss'")
        assert {int(k): v for k, v in t["values"].items()} == dict(zip(evals.chunk, evals.value))
        if t["state"] == "complete":
            assert t["value"] == evals.value.iloc[-1]
    # late runs (proposed after a rung) are judged when they reach it, against every run that did
    assert any("of the runs that reached chunk 1" in reason for reason in stops.reason)
    exp.end(wait=False)


def test_without_a_policy_the_sampler_starts_a_new_round_when_the_runs_finish(data, tmp_path):
    exp = sweep(tmp_path, "rounds", data, RFOptunaSearch(config(), num_runs=2, budget=4, seed=3))
    runs = exp.runs()
    assert [r.status for r in runs] == [RunStatus.FINISHED] * 4
    first, second = runs[:2], runs[2:]
    # the second round started after the first had finished: TPE had both results to go on
    started = exp.results().groupby("run_id").wall_time.min()
    assert started[second[0].run_id] > max(exp.results().query(f"run_id == {r.run_id}").wall_time.max() for r in first)
    assert [t["state"] for t in exp.store.meta("study")["trials"]] == ["complete"] * 4
    assert not exp.training
    exp.end(wait=False)


def test_the_same_seed_proposes_and_decides_the_same(data, tmp_path):
    def run(name):
        search = RFOptunaSearch(config(), num_runs=3, budget=5, seed=11)
        exp = sweep(tmp_path, name, data, search, SuccessiveHalving(eta=3, probe_steps=0))
        got = proposals(exp), [(r.name, r.status.value) for r in exp.runs()]
        exp.end(wait=False)
        return got

    assert run("a") == run("b")


class _Unrunnable(optuna.samplers.RandomSampler):
    """Proposes LoRA on modules the demo model does not have, from the 3rd trial on."""

    def sample_independent(self, study, trial, name, distribution):
        if name == "peft_config.target_modules":
            return 1 if trial.number >= 2 else 0
        return super().sample_independent(study, trial, name, distribution)


class _Outside(optuna.samplers.RandomSampler):
    """Proposes a learning rate outside the Range from the 3rd trial on."""

    def sample_independent(self, study, trial, name, distribution):
        if name == "training_args.learning_rate" and trial.number >= 2:
            return 0.5
        return super().sample_independent(study, trial, name, distribution)


def test_a_proposal_outside_the_space_later_on_is_skipped_and_counts_toward_the_budget(data, tmp_path):
    exp = sweep(tmp_path, "outside", data, RFOptunaSearch(config(), num_runs=2, budget=4, sampler=_Outside(seed=0)))
    assert [t["state"] for t in exp.store.meta("study")["trials"]] == ["complete", "complete", "fail", "fail"]
    assert len(exp.ic_log()) == 0 and [r.status for r in exp.runs()] == [RunStatus.FINISHED] * 2
    exp.end(wait=False)


def test_a_proposal_the_base_cannot_run_fails_its_trial_and_the_others_go_on(data, tmp_path):
    search = RFOptunaSearch(
        config(targets=List(["all-linear", ["no_such_module"]])), num_runs=2, budget=4, sampler=_Unrunnable(seed=0)
    )
    exp = sweep(tmp_path, "unrunnable", data, search)
    log = exp.ic_log()
    clones = log[log.op == "clone_modify"]
    assert len(clones) == 2 and set(clones.outcome) == {"refused"}
    assert all("no_such_module" in reason for reason in clones.reason)
    trials = exp.store.meta("study")["trials"]
    assert [t["state"] for t in trials] == ["complete", "complete", "fail", "fail"]  # the budget counts them
    assert [r.status for r in exp.runs()] == [RunStatus.FINISHED] * 2
    exp.end(wait=False)


def test_without_optuna_the_search_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'rf_notebook\[optuna\]'"):
        RFOptunaSearch(config())


def test_a_config_already_tried_is_asked_again():
    # 4 configs in the space, 4 proposals: none repeats (random sampling alone repeats one in ~90% of seeds)
    search = RFOptunaSearch(config(lr=List([1e-4, 1e-3])), num_runs=4, sampler=optuna.samplers.RandomSampler(0))
    got = [(p["training_args.learning_rate"], p["peft_config.r"]) for p in params(search)]
    assert sorted(got) == [(1e-4, 4), (1e-4, 8), (1e-3, 4), (1e-3, 8)]


def test_a_sampler_keeping_state_on_the_study_proposes_as_in_one_study():
    # QMC keeps its sample counter on the study: each question's study gets it back, so the proposals are the
    # sampler's sequence, as one ordinary study asks it (its first trial complete, the others running)
    search = RFOptunaSearch(config(r=4), sampler=optuna.samplers.QMCSampler(seed=0))
    dists = {path: dist for path, (dist, _) in search.space.items()}
    reference = optuna.create_study(sampler=optuna.samplers.QMCSampler(seed=0))
    trial = reference.ask(dists)
    reference.tell(trial, 1.0)
    want = [reference.ask(dists).params for _ in range(20)]  # more than REASKS: a counter lost would show
    sampler, got = search.fresh_sampler(), []
    first = search.ask(sampler, [])
    assert first.params == trial.params
    trials = [{"params": first.params, "state": "complete", "values": {}, "value": 1.0, **_attrs(first)}]
    attrs = first.study_attrs
    for _ in range(20):
        proposal = search.ask(sampler, trials, attrs)
        got.append(proposal.params)
        trials.append({"params": proposal.params, "state": "running", "values": {}, **_attrs(proposal)})
        attrs = proposal.study_attrs
    assert got == want


def _attrs(proposal):
    return {"system_attrs": proposal.system_attrs}


def test_a_sampler_with_constraints_is_refused():
    sampler = optuna.samplers.TPESampler(constraints_func=lambda trial: [0.0])
    with pytest.raises(ValueError, match="constraints_func"):
        RFOptunaSearch(config(), sampler=sampler)


def test_a_finite_space_tried_in_full_proposes_no_more(data, tmp_path):
    exp = sweep(tmp_path, "full", data, RFOptunaSearch(config(lr=List([1e-4, 1e-3])), num_runs=2, budget=8, seed=0))
    assert len(exp.runs()) == 4  # the 4 configs of the space, not 8
    assert sorted((r.params["training_args.learning_rate"], r.params["peft_config.r"]) for r in exp.runs()) == [
        (1e-4, 4),
        (1e-4, 8),
        (1e-3, 4),
        (1e-3, 8),
    ]
    exp.end(wait=False)
