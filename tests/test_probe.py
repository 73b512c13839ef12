"""Anneal probes: a policy that ranks runs by where they would end once their learning rate annealed. The probe
trains a throwaway copy at a rung; the runs themselves must go on bit for bit as if never probed."""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import load_file

from rf_notebook import (
    Experiment,
    List,
    RFDPOConfig,
    RFGridSearch,
    RFGRPOConfig,
    RFLoraConfig,
    RFModelConfig,
    RFSFTConfig,
)
from rf_notebook.demo import (
    DEMO_MODEL,
    arithmetic_dataset,
    demo_model_fn,
    exact_match_reward,
    preference_dataset,
    prompt_dataset,
)
from rf_notebook.engine._probe import probe_lrs, probe_rows
from rf_notebook.policies import MedianOfPeers, SuccessiveHalving
from rf_notebook.policies._base import AUTO_PROBE_STEPS


def _search(trainer_type: str, args: dict, **model: object) -> RFGridSearch:
    config = {"SFT": RFSFTConfig, "DPO": RFDPOConfig, "GRPO": RFGRPOConfig}[trainer_type]
    return RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=List([4, 8]), lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"),
            training_args=config(**args),
            **model,
        ),
        trainer_type=trainer_type,
    )


SFT = dict(
    learning_rate=List([3e-3, 1e-4]),
    per_device_train_batch_size=8,
    gradient_accumulation_steps=List([1, 2]),
    max_steps=12,
    lr_scheduler_type="cosine",
    max_grad_norm=0.5,
)


def _metrics(exp: Experiment) -> dict[tuple[int, int, str], float]:
    return {(m.run_id, m.step, m.name): m.value for m in exp.store.metrics()}


def _adapter(exp: Experiment, run_id: int, path) -> dict[str, torch.Tensor]:
    return load_file(exp.export(run_id, path) / "adapter_model.safetensors")


# -- pure parts --------------------------------------------------------------------------------------------------


def test_probe_rows_are_the_same_for_every_run_at_a_rung_and_change_between_rungs():
    assert probe_rows(100, 16, seed=3, rung=1) == probe_rows(100, 16, seed=3, rung=1)
    assert probe_rows(100, 32, seed=3, rung=1)[:16] == probe_rows(100, 16, seed=3, rung=1)  # bigger batches: more
    assert probe_rows(100, 16, seed=3, rung=2) != probe_rows(100, 16, seed=3, rung=1)
    assert probe_rows(100, 16, seed=4, rung=1) != probe_rows(100, 16, seed=3, rung=1)
    small = probe_rows(5, 12, seed=0, rung=1)  # a data set smaller than the probe: every row, then again
    assert len(small) == 12 and sorted(small[:5]) == list(range(5))


def test_the_probe_compresses_the_rest_of_the_runs_own_schedule_and_ends_where_the_run_ends():
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    param = torch.nn.Parameter(torch.zeros(1))
    for make in (get_linear_schedule_with_warmup, get_cosine_schedule_with_warmup):
        optimizer = torch.optim.AdamW([param], lr=1e-3)
        scheduler = make(optimizer, num_warmup_steps=2, num_training_steps=20)
        lrs = [group[0] for group in probe_lrs(scheduler, optimizer, step=8, total=20, steps=4)]
        expected = [1e-3 * scheduler.lr_lambdas[0](t) for t in (10, 13, 16, 19)]  # 19: the run's own last step
        assert lrs == pytest.approx(expected)
        wrapped = types.SimpleNamespace(scheduler=scheduler)  # as Accelerate's AcceleratedScheduler holds it
        assert [group[0] for group in probe_lrs(wrapped, optimizer, step=8, total=20, steps=4)] == lrs
        assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-4
    # a schedule whose rate cannot be read at any step: linear from the current rate towards 0
    optimizer = torch.optim.SGD([param], lr=0.4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5)
    assert [g[0] for g in probe_lrs(scheduler, optimizer, step=3, total=10, steps=3)] == pytest.approx([0.3, 0.2, 0.1])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SuccessiveHalving(probe_steps=-1), r"`probe_steps` is -1, but must be an int >= 0"),
        (lambda: SuccessiveHalving(probe_steps="yes"), r"`probe_steps` is 'yes', but must be an int >= 0 .* or 'auto'"),
        (lambda: SuccessiveHalving(probe_from=0), r"`probe_from` is 0, but must be an int >= 1"),
        (lambda: SuccessiveHalving(probe_steps=2.0), r"`probe_steps` is 2.0"),
        (lambda: MedianOfPeers(metric="accuracy", mode="max", probe_steps=4), r"needs metric='eval_loss'"),
    ],
)
def test_bad_probe_arguments_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_probing_policy_ranks_by_the_probe_from_probe_from_on_and_only_probes_where_it_decides():
    policy = SuccessiveHalving(eta=2, probe_steps=4)
    assert [policy.ranked_by(k) for k in (1, 2)] == ["eval_loss", "probe_eval_loss"]
    assert [policy.probes_at(k) for k in range(1, 9)] == [0, 4, 0, 4, 0, 0, 0, 4]  # rungs 2, 4, 8 (not 1: too early)
    assert [SuccessiveHalving(eta=2, probe_steps=4, probe_from=1).probes_at(k) for k in (1, 2, 3)] == [4, 4, 0]
    assert [MedianOfPeers(warmup_chunks=2, probe_steps=2).probes_at(k) for k in range(1, 5)] == [0, 0, 2, 2]
    assert SuccessiveHalving(probe_steps=0).ranked_by(4) == "eval_loss"


def test_auto_probes_sft_and_dpo_runs_with_an_eval_set_and_ranks_others_by_their_metric():
    policy = SuccessiveHalving()  # probe_steps="auto"
    assert policy.probes_at(3) == 0  # not resolved yet: no probe
    assert policy.resolved("SFT", has_eval=True).probes_at(3) == AUTO_PROBE_STEPS
    assert policy.resolved("DPO", has_eval=True).probe_steps == AUTO_PROBE_STEPS
    assert policy.resolved("SFT", has_eval=False).probe_steps == 0
    assert policy.resolved("GRPO", has_eval=True).probe_steps == 0
    assert SuccessiveHalving(metric="eval_reward", mode="max").resolved("SFT", has_eval=True).probe_steps == 0
    assert policy.probe_steps == "auto"  # the user's object is left as it was
    explicit = SuccessiveHalving(probe_steps=2)
    assert explicit.resolved("GRPO", has_eval=True) is explicit  # refused by run_fit (below), not silently dropped


# -- on real runs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer_type", ["SFT", "DPO"])
def test_probed_runs_train_bit_for_bit_as_unprobed_ones_and_the_policy_ranks_by_the_probe(tmp_path, trainer_type):
    if trainer_type == "SFT":
        search = lambda: _search("SFT", SFT)  # noqa: E731
        data = arithmetic_dataset("train", n=96), arithmetic_dataset("eval", n=16)
    else:
        args = dict(learning_rate=List([3e-3, 1e-4]), beta=0.1, per_device_train_batch_size=4, max_steps=8)
        search = lambda: _search("DPO", args)  # noqa: E731
        data = preference_dataset("train", n=32), preference_dataset("eval", n=8)
    runs = {}
    for probe in (0, 3):
        exp = Experiment(f"probe{probe}", experiments_dir=tmp_path)
        policy = SuccessiveHalving(eta=2, min_chunks=2, probe_steps=probe) if probe else None
        # taking turns: under fused steps a run stopped by the policy changes the others' passes (their rounding)
        exp.run_fit(search(), demo_model_fn, *data, num_chunks=4, seed=5, policy=policy, fuse=False)
        assert exp.wait(timeout=600)
        runs[probe] = exp
    plain, probed = runs[0], runs[3]
    before, after = _metrics(plain), _metrics(probed)
    probes = {k: v for k, v in after.items() if k[2] == "probe_eval_loss"}
    # probes at chunk 2 (each run's own second rung) for every run; a finished run's probe is its eval loss
    assert {k[:2] for k in probes} >= {(r.run_id, r.rungs[1]) for r in plain.runs()}
    for r in probed.runs():
        if r.status.value == "finished":
            assert probes[(r.run_id, r.step, "probe_eval_loss")] == pytest.approx(
                after[(r.run_id, r.step, "eval_loss")], rel=1e-5
            )
    # every value the probed experiment logged is the unprobed one's, bit for bit (losses, grad norms, eval)
    common = [k for k in after if k[2] != "probe_eval_loss"]
    assert common and all(k in before for k in common)
    assert [k for k in common if after[k] != before[k]] == []
    log = probed.ic_log()
    stops = log[(log.origin == "policy") & (log.op == "stop")]
    assert len(stops) >= 1 and all("on probe_eval_loss" in reason for reason in stops.reason)
    survivors = [r.run_id for r in probed.runs() if r.status.value == "finished"]
    assert survivors
    for run_id in survivors:  # and their adapters are the same tensors
        a, b = _adapter(plain, run_id, tmp_path / f"a{run_id}"), _adapter(probed, run_id, tmp_path / f"b{run_id}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the probes trained: an unfinished run's probe differs from its eval loss, by the steps the stats count
    unfinished = [k for k in probes if not (k[0] in survivors and k[1] == probed.runs()[k[0] - 1].step)]
    assert unfinished and all(probes[k] != after[(k[0], k[1], "eval_loss")] for k in unfinished)
    assert probed.stats()["probes"] == len(probes) and probed.stats()["probe_steps"] == 3 * len(unfinished)
    for exp in runs.values():
        exp.end(wait=False)


def _two_runs(tmp_path, name: str, policy) -> Experiment:
    """Runs that take turns (`fuse=False`): compared bit for bit with other experiments whose policy stops other runs
    (in fused steps, which runs share a pass changes the rounding)."""
    exp = Experiment(name, experiments_dir=tmp_path)
    train, evl = arithmetic_dataset("train", n=64), arithmetic_dataset("eval", n=8)
    args = dict(learning_rate=List([3e-3, 1e-3]), per_device_train_batch_size=8, max_steps=8)
    search = _search("SFT", args)
    exp.run_fit(search, demo_model_fn, train, evl, num_chunks=2, seed=1, policy=policy, fuse=False)
    assert exp.wait(timeout=300)
    return exp


def test_a_probe_that_fails_is_said_and_its_rung_is_ranked_by_the_eval_loss(tmp_path, monkeypatch):
    from rf_notebook.engine import _probe

    def broken(trainer, params, steps, rows):
        raise RuntimeError("probe out of memory")

    monkeypatch.setattr(_probe, "anneal_probe", broken)
    exp = _two_runs(tmp_path, "broken", SuccessiveHalving(eta=4, probe_steps=2, probe_from=1))
    runs = exp.runs()
    assert sorted(r.status.value for r in runs) == ["finished", "stopped", "stopped", "stopped"]
    assert all("its anneal probe at chunk 1 failed (RuntimeError: probe out of memory)" in r.warning for r in runs)
    reasons = set(exp.ic_log().reason)
    assert reasons and all(" on eval_loss " in reason for reason in reasons)  # not exempt: ranked by eval loss
    exp.end(wait=False)


def test_a_probe_that_fails_half_way_leaves_the_run_exactly_as_it_was(tmp_path, monkeypatch):
    from rf_notebook.engine import _probe

    plain = _two_runs(tmp_path, "plain", None)
    batches = _probe._batches

    def second_batch_broken(trainer, rows, size):  # the probe's first step trains, its second one raises
        out = batches(trainer, rows, size)
        return [out[0], {"input_ids": "not a tensor"}, *out[2:]]

    monkeypatch.setattr(_probe, "_batches", second_batch_broken)
    probed = _two_runs(tmp_path, "half", MedianOfPeers(warmup_chunks=0, probe_steps=3, probe_from=1))
    assert all("its anneal probe at chunk 1 failed" in r.warning for r in probed.runs())
    before, after = _metrics(plain), _metrics(probed)
    common = [k for k in after if k in before]
    assert len(common) > 20 and [k for k in common if after[k] != before[k]] == []
    for exp in (plain, probed):
        exp.end(wait=False)


def test_a_run_the_probe_cannot_put_back_fails_and_the_others_go_on(tmp_path, monkeypatch):
    from rf_notebook.engine import _probe

    calls = []

    def put_back(params, weights, grads):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return _put_back(params, weights, grads)

    _put_back = _probe._put_back
    monkeypatch.setattr(_probe, "_put_back", put_back)
    exp = _two_runs(tmp_path, "lost", SuccessiveHalving(eta=4, probe_steps=2, probe_from=1))
    assert sorted(r.status.value for r in exp.runs()) == ["failed", "finished", "stopped", "stopped"]
    (failed,) = [r for r in exp.runs() if r.status.value == "failed"]
    assert "RunStateLost: putting the run back after its anneal probe failed" in failed.error
    exp.end(wait=False)


def test_probes_are_refused_before_training_for_reward_runs_and_without_eval_data(tmp_path):
    exp = Experiment("refused", experiments_dir=tmp_path)
    grpo = _search(
        "GRPO",
        dict(num_generations=2, per_device_train_batch_size=4, max_steps=2, max_completion_length=4),
        reward_funcs=[exact_match_reward],
    )
    with pytest.raises(ValueError, match=r"which ranks runs by anneal probes, but the runs are GRPO runs"):
        exp.run_fit(
            grpo,
            demo_model_fn,
            prompt_dataset("train", n=8),
            prompt_dataset("eval", n=4),
            policy=SuccessiveHalving(probe_steps=2),
        )
    with pytest.raises(ValueError, match=r"but `eval_dataset` is None: pass an eval data set, or use probe_steps=0"):
        exp.run_fit(
            _search("SFT", dict(max_steps=2)),
            demo_model_fn,
            arithmetic_dataset("train", n=8),
            policy=SuccessiveHalving(probe_steps=2),
        )
    assert exp.runs() == []
    exp.end(wait=False)
