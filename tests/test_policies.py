"""Pruning policies: pure decisions from recorded metric tables, then the same policies steering real runs."""

from __future__ import annotations

import math

import pytest

from rf_notebook.policies import PBT, Decision, MedianOfPeers, RunAtRung, SuccessiveHalving


def table(rows: dict[int, dict[int, float]], status: dict[int, str] | None = None, lr: float = 1e-3):
    """Runs 1..n with eval_loss per rung; all training unless `status` says otherwise."""
    status = status or {}
    return [
        RunAtRung(run_id, f"run {run_id}", status.get(run_id, "queued"), values, {"training_args.learning_rate": lr})
        for run_id, values in rows.items()
    ]


EIGHT = table({i: {1: 1.0 + i / 10, 2: 1.0 + i / 20} for i in range(1, 9)})  # run 1 best, run 8 worst


def stopped(decisions: list[Decision]) -> list[int]:
    return [d.run_id for d in decisions if d.op == "stop"]


def test_successive_halving_keeps_the_best_1_over_eta_at_its_rungs():
    sh = SuccessiveHalving(eta=2)
    assert [r for r in range(1, 10) if sh.is_rung(r)] == [1, 2, 4, 8]
    assert [r for r in range(1, 30) if SuccessiveHalving(eta=3, min_chunks=2).is_rung(r)] == [2, 6, 18]
    decisions = sh.decide(1, EIGHT)
    assert stopped(decisions) == [5, 6, 7, 8]
    assert decisions[-1].reason == "rank 8/8 at chunk 1 on eval_loss 1.8 > cut 1.4 (keeping the best 4)"
    assert sh.decide(3, EIGHT) == []  # not a rung of eta=2
    assert stopped(SuccessiveHalving(eta=4).decide(1, EIGHT)) == [3, 4, 5, 6, 7, 8]
    assert stopped(SuccessiveHalving(metric="eval_loss", mode="max", eta=2).decide(1, EIGHT)) == [4, 3, 2, 1]


def test_successive_halving_ranks_only_live_runs_with_a_value():
    runs = table({1: {1: 1.0}, 2: {1: 2.0}, 3: {1: 3.0}, 4: {}, 5: {1: 0.5}}, status={5: "stopped"})
    assert stopped(SuccessiveHalving(eta=2).decide(1, runs)) == [3]  # 5 is stopped; 4 has no eval yet
    nan = table({1: {1: 1.0}, 2: {1: math.nan}})
    assert stopped(SuccessiveHalving(eta=2).decide(1, nan)) == [2]  # a diverged run ranks last


def test_diverged_runs_rank_last_and_are_pruned():
    runs = table({1: {1: 1.0, 2: 0.9}, 2: {1: math.nan, 2: math.inf}, 3: {1: 1.2, 2: 1.1}, 4: {1: 1.1, 2: 1.0}})
    assert stopped(SuccessiveHalving(eta=2).decide(1, runs)) == [3, 2]
    assert stopped(MedianOfPeers(warmup_chunks=0).decide(2, runs)) == [2, 3]
    assert [d.replaces for d in PBT(quantile=0.25).decide(1, runs)] == [2]


def test_a_late_run_is_judged_alone_against_every_run_that_reached_the_rung():
    # runs 1-8 were decided at rung 1 (5-8 stopped); run 9 joins late and reaches rung 1
    runs = table({i: {1: i / 10} for i in range(1, 9)}, status={i: "stopped" for i in range(5, 9)})
    late = RunAtRung(9, "run 9", "queued", {1: 0.25})
    decisions = SuccessiveHalving(eta=3).judge(1, late, [*runs, late])
    assert decisions == []  # 3rd of 9: within the best ceil(9/3) = 3, and no other run is touched
    late = RunAtRung(9, "run 9", "queued", {1: 0.45})
    (decision,) = SuccessiveHalving(eta=3).judge(1, late, [*runs, late])
    assert decision.run_id == 9 and decision.reason.startswith(
        "rank 5/9 of the runs that reached chunk 1, on eval_loss"
    )
    assert SuccessiveHalving(eta=3).judge(2, late, [*runs, late]) == []  # not a rung of eta=3
    assert [d.run_id for d in MedianOfPeers(warmup_chunks=0).judge(1, late, [*runs, late])] == []  # 0.45 = median
    worse = RunAtRung(9, "run 9", "queued", {1: 0.7})
    assert [d.run_id for d in MedianOfPeers(warmup_chunks=0).judge(1, worse, [*runs, worse])] == [9]


def test_median_of_peers_counts_pruned_runs_so_survivors_are_not_halved_again():
    # runs 5-8 were stopped at rung 2; at rung 3 the survivors 1-4 are compared with all eight
    runs = table({i: {1: i / 10, 2: i / 10, **({3: i / 10} if i <= 4 else {})} for i in range(1, 9)})
    runs = [r if r.run_id <= 4 else RunAtRung(r.run_id, r.name, "stopped", r.values, r.params) for r in runs]
    assert stopped(MedianOfPeers().decide(3, runs)) == []


def test_median_of_peers_stops_runs_worse_than_the_median_after_warmup():
    policy = MedianOfPeers(warmup_chunks=1)
    assert policy.decide(1, EIGHT) == []
    decisions = policy.decide(2, EIGHT)
    assert stopped(decisions) == [5, 6, 7, 8]
    assert decisions[0].reason == "eval_loss 1.25 at chunk 2 > median 1.225 of 8 runs"
    # stopped runs are peers but are not stopped again
    runs = table({1: {2: 1.0}, 2: {2: 2.0}, 3: {2: 3.0}}, status={1: "stopped", 3: "stopped"})
    assert stopped(policy.decide(2, runs)) == []
    runs = table({1: {2: 1.0}, 2: {2: 2.5}, 3: {2: 2.0}}, status={1: "stopped", 3: "stopped"})
    assert stopped(policy.decide(2, runs)) == [2]
    assert stopped(MedianOfPeers(mode="max", warmup_chunks=0).decide(1, EIGHT)) == [1, 2, 3, 4]


def test_pbt_replaces_the_bottom_quantile_with_perturbed_warm_clones_of_the_top():
    policy = PBT(quantile=0.25, perturb={"learning_rate": (0.8, 1.25)}, seed=3)
    decisions = policy.decide(1, EIGHT)
    assert [(d.op, d.run_id, d.replaces) for d in decisions] == [("clone", 1, 7), ("clone", 2, 8)]
    for clone in decisions:
        assert clone.overrides["learning_rate"] in (pytest.approx(0.8e-3), pytest.approx(1.25e-3))
        assert "learning_rate x" in clone.reason
    assert (
        "exploit at chunk 1: run 8 (rank 8/8 on eval_loss 1.8) replaced by a warm clone of run 2" in decisions[1].reason
    )
    assert policy.decide(1, EIGHT) == decisions  # a pure function of the table: a restart decides the same
    assert PBT(interval=2).decide(1, EIGHT) == []
    assert PBT(quantile=0.25).decide(1, EIGHT[:3]) == []  # a quarter of 3 runs is nobody


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SuccessiveHalving(eta=5), r"`eta` is 5, but must be 2, 3 or 4"),
        (lambda: SuccessiveHalving(min_chunks=0), r"`min_chunks` is 0"),
        (lambda: MedianOfPeers(mode="avg"), r"`mode` is 'avg', but must be 'min' or 'max'"),
        (lambda: MedianOfPeers(metric=""), r"`metric` is ''"),
        (lambda: PBT(quantile=0.7), r"`quantile` is 0.7, but must be in \(0, 0.5\]"),
        (lambda: PBT(perturb={"learning_rate": ()}), r"perturb\['learning_rate'\]"),
        (lambda: Decision("explode", 1, "why"), r"must be 'stop' or 'clone'"),
    ],
)
def test_bad_policy_arguments_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- the same policies on real runs (demo model) ----------------------------------------------------------------


def sweep(lrs, max_steps=32):
    from rf_notebook import List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
    from rf_notebook.demo import DEMO_MODEL

    return RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
            training_args=RFSFTConfig(learning_rate=List(lrs), per_device_train_batch_size=8, max_steps=max_steps),
        ),
        trainer_type="SFT",
    )


def test_successive_halving_on_real_runs_logs_its_decisions_and_can_be_overridden(tmp_path):
    from rf_notebook import Experiment
    from rf_notebook.demo import arithmetic_dataset, demo_model_fn

    exp = Experiment("sh", experiments_dir=tmp_path)
    train, evl = arithmetic_dataset("train", n=256), arithmetic_dataset("eval", n=16)
    exp.run_fit(
        sweep([3e-3, 1e-3, 1e-5, 1e-6]), demo_model_fn, train, evl, num_chunks=4, policy=SuccessiveHalving(eta=2)
    )
    assert exp.wait(timeout=300)
    log = exp.ic_log()
    policy_ops = log[log.origin == "policy"]
    assert len(policy_ops) == 3 and set(policy_ops.op) == {"stop"} and set(policy_ops.outcome) == {"applied"}
    assert all(reason.startswith("rank ") for reason in policy_ops.reason)
    # by default: the eval loss at rung 1, an anneal probe from rung 2 on (SFT runs with an eval set)
    assert [reason.split(" on ")[1].split()[0] for reason in policy_ops.reason] == ["eval_loss"] * 2 + [
        "probe_eval_loss"
    ]
    runs = {r.run_id: r for r in exp.runs()}
    finished = [r for r in runs.values() if r.status.value == "finished"]
    assert len(finished) == 1 and finished[0].run_id in (1, 2)  # a learning rate that learns wins
    pruned_at_1 = [r for r in runs.values() if r.status.value == "stopped" and r.chunks_done == 1]
    assert {r.run_id for r in pruned_at_1} == {3, 4}  # lr 1e-5 and 1e-6 go first
    # the user overrides the policy: a pruned run resumes and trains to the end
    exp.resume(3)
    assert exp.wait(timeout=300)
    assert exp.runs()[2].status.value == "finished"
    exp.end(wait=False)


def test_pbt_on_real_runs_clones_the_leader_with_a_warm_start(tmp_path):
    from rf_notebook import Experiment
    from rf_notebook.demo import arithmetic_dataset, demo_model_fn

    exp = Experiment("pbt", experiments_dir=tmp_path)
    train, evl = arithmetic_dataset("train", n=128), arithmetic_dataset("eval", n=16)
    policy = PBT(quantile=0.25, perturb={"learning_rate": (2.0,)}, interval=2)
    exp.run_fit(sweep([3e-3, 1e-3, 1e-5, 1e-6], max_steps=16), demo_model_fn, train, evl, num_chunks=4, policy=policy)
    assert exp.wait(timeout=300)
    log = exp.ic_log()
    clones = log[(log.origin == "policy") & (log.op == "clone_modify")]
    assert len(clones) >= 1 and set(clones.outcome) == {"applied"}
    first = clones.iloc[0]
    runs = {r.run_id: r for r in exp.runs()}
    parent_lr = runs[first.run_id].params["training_args.learning_rate"]
    assert parent_lr in (3e-3, 1e-3)  # a leader, not a learning rate that does not learn
    assert first.args["warm_start"] is True and first.args["overrides"]["learning_rate"] == pytest.approx(2 * parent_lr)
    child = runs[first.new_run_id]
    assert child.params["training_args.learning_rate"] == pytest.approx(2 * parent_lr)
    assert child.status.value == "finished"
    stops = log[(log.origin == "policy") & (log.op == "stop")]
    assert first.run_id != 4 and 4 in set(stops.run_id)  # lr 1e-6 is the worst at chunk 2: replaced
    assert (stops.op_id > first.op_id).all()  # stopped only after its replacement was accepted
    exp.end(wait=False)
