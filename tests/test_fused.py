"""Fused steps (`run_fit(fuse=True)`): runs on one base share each step's pass through the base, and each still
ends exactly as the same config trained alone by plain TRL (issue #21's contract: losses within 1e-5 relative over
the first 16 steps, adapter weights within 1e-4; measured here on fp32 CPU they are bit-for-bit equal)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_exactness import TARGETS, _train_alone

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import arithmetic_dataset, demo_model_fn
from rf_notebook.engine import _fused

SEED = 7


def _model(r: int, dropout: float, **args) -> RFModelConfig:
    return RFModelConfig(
        model_name="rf-demo/tiny-arith",
        peft_config=RFLoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=TARGETS),
        training_args=RFSFTConfig(**args),
    )


def _configs() -> List:
    """Four runs that differ in rank, learning rate, batch size, accumulation, scheduler and dropout."""
    return List(
        [
            _model(
                4, 0.1, learning_rate=3e-3, per_device_train_batch_size=16, max_steps=16, lr_scheduler_type="linear"
            ),
            _model(
                8,
                0.05,
                learning_rate=1e-3,
                per_device_train_batch_size=8,
                max_steps=20,
                lr_scheduler_type="cosine",
                weight_decay=0.01,
            ),
            _model(
                16,
                0.0,
                learning_rate=2e-3,
                per_device_train_batch_size=12,
                gradient_accumulation_steps=2,
                max_steps=16,
                lr_scheduler_type="constant_with_warmup",
                warmup_steps=3,
            ),
            _model(8, 0.1, learning_rate=5e-4, per_device_train_batch_size=4, max_steps=16),
        ]
    )


@pytest.fixture(scope="module")
def train():
    return arithmetic_dataset("train", n=192)


def _check_equal_to_plain_trl(exp: Experiment, train, tmp_path, loss_rtol: float = 1e-5) -> None:
    results = exp.results()
    for run in exp.runs():
        weights, losses = _train_alone(run.config, train)
        exported = load_file(exp.export(run.run_id, tmp_path / f"run{run.run_id}") / "adapter_model.safetensors")
        assert exported.keys() == weights.keys()
        for key, value in weights.items():
            torch.testing.assert_close(exported[key], value, atol=1e-4, rtol=0, msg=f"{run.name}: {key}")
        logged = results[(results.run_id == run.run_id) & (results.metric == "loss")].sort_values("step")
        assert logged.step.tolist() == list(range(1, run.total_steps + 1))
        torch.testing.assert_close(
            torch.tensor(logged.value.tolist()[:16]), torch.tensor(losses[:16]), rtol=loss_rtol, atol=0
        )


def _evals(exp: Experiment) -> list[tuple[int, int, float]]:
    results = exp.results()
    rows = results[results.metric == "eval_loss"].sort_values(["run_id", "step"])
    return list(zip(rows.run_id, rows.step, rows.value))


def test_fused_runs_equal_plain_trl(train, tmp_path):
    evl = arithmetic_dataset("eval", n=24)
    exp = Experiment("fused", experiments_dir=tmp_path)
    exp.run_fit(RFGridSearch(_configs(), "SFT"), demo_model_fn, train, evl, num_chunks=3, seed=SEED, fuse=True)
    assert exp.wait(timeout=600)
    assert [r.status.value for r in exp.runs()] == ["finished"] * 4, [r.error for r in exp.runs()]
    stats = exp.stats()
    assert stats["fusion"] == {1: "fused", 2: "fused", 3: "fused", 4: "fused"}
    assert stats["fused_groups"] >= 3 and stats["fused_forwards"] >= 3 * 5  # every chunk: 5+ shared steps
    _check_equal_to_plain_trl(exp, train, tmp_path)
    # Each run is evaluated at its chunk ends with its own adapter, as when the runs take turns.
    turns = Experiment("turns", experiments_dir=tmp_path)
    turns.run_fit(RFGridSearch(_configs(), "SFT"), demo_model_fn, train, evl, num_chunks=3, seed=SEED, fuse=False)
    assert turns.wait(timeout=600)
    fused_evals, turns_evals = _evals(exp), _evals(turns)
    assert len(fused_evals) >= 12 and [e[:2] for e in fused_evals] == [e[:2] for e in turns_evals]
    torch.testing.assert_close(torch.tensor([e[2] for e in fused_evals]), torch.tensor([e[2] for e in turns_evals]))
    exp.end(wait=False)
    turns.end(wait=False)


def _alike_configs() -> List:
    """Four runs of the same rank, alpha and batch size, two with dropout, two without; other seeds (samples)."""
    return List(
        [
            _model(8, dropout, learning_rate=lr, per_device_train_batch_size=8, max_steps=12, seed=seed)
            for dropout, lr, seed in ((0.1, 1e-3, 1), (0.0, 2e-3, 2), (0.1, 3e-3, 3), (0.0, 5e-4, 4))
        ]
    )


def _fit_alike(name: str, train, tmp_path, precision: str) -> Experiment:
    exp = Experiment(name, experiments_dir=tmp_path)
    search = RFGridSearch(_alike_configs(), "SFT")
    exp.run_fit(search, demo_model_fn, train, None, num_chunks=2, seed=SEED, fuse=True, precision=precision)
    assert exp.wait(timeout=600)
    assert [r.status.value for r in exp.runs()] == ["finished"] * 4, [r.error for r in exp.runs()]
    return exp


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_alike_runs_share_one_product_per_lora_matrix_and_stay_exact(precision, train, tmp_path, monkeypatch):
    """Runs with the same rank, alpha, batch size and dropout-or-not: at each LoRA layer their deltas are one batched
    product per matrix (dropout still drawn per run, on its own rows). Their seeds differ, so their batches differ
    in length and the product covers padding too. float32: each run ends as plain TRL trains its config. bf16: a
    fused forward may round one bf16 step away from the run's own (its products run over more rows; measured here:
    one run's loss at step 3, then Adam carries it on, 5.3e-4 on weights after 12 steps, with or without batched
    products), so what batching itself changes is checked against the same fused runs with per-run products."""
    batched = []
    group_delta = _fused._LoraPlan._group_delta

    def counting(plan, layer, group, x):
        delta = group_delta(plan, layer, group, x)
        if len(group) > 1 and delta is not None:
            batched.append(len(group))
        return delta

    monkeypatch.setattr(_fused._LoraPlan, "_group_delta", counting)
    exp = _fit_alike("fused-alike", train, tmp_path, precision)
    # 12 steps x 20 LoRA layers (5 targets x 4 layers) x 2 groups (with dropout, without) of 2 runs, but for the
    # first step's first pass: one run alone, its activations measured (`_SavedBytes`), so 20 products fewer
    assert batched == [2] * (12 * 20 * 2 - 20), len(batched)
    if precision == "fp32":
        _check_equal_to_plain_trl(exp, train, tmp_path)
    else:
        monkeypatch.setattr(_fused, "_batch_key", lambda entry, rows: None if entry else _fused._UNTARGETED)
        alone = _fit_alike("fused-per-run", train, tmp_path, precision)
        assert len(batched) == 12 * 20 * 2 - 20  # none batched this time
        losses = exp.results().query("metric == 'loss'").sort_values(["run_id", "step"]).value.tolist()
        per_run = alone.results().query("metric == 'loss'").sort_values(["run_id", "step"]).value.tolist()
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(per_run), rtol=2**-7, atol=0)
        for run in exp.runs():
            ours = load_file(exp.export(run.run_id, tmp_path / f"b{run.run_id}") / "adapter_model.safetensors")
            theirs = load_file(alone.export(run.run_id, tmp_path / f"a{run.run_id}") / "adapter_model.safetensors")
            for key, value in theirs.items():
                torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=0, msg=f"{run.name}: {key}")
        alone.end(wait=False)
    exp.end(wait=False)


def test_bf16_fused_runs_equal_plain_trl_in_bf16(train, tmp_path):
    """Mixed precision: the shared backbone call runs under the autocast the runs parked under (each parked run's
    autocast is taken off the thread while the others go on). Against plain TRL with bf16: adapter weights within
    the contract's 1e-4 (5.6e-6 measured), per-step losses within two bf16 rounding steps (2**-7 relative). A
    float32 difference of 1e-7 in a padded, batched product can flip a bf16 rounding: measured here, one step
    of 16 of the batch-4 run differs by 0.0038 relative (one bf16 ulp), the other three runs are bit-equal."""
    exp = Experiment("fused-bf16", experiments_dir=tmp_path)
    search = RFGridSearch(_configs(), "SFT")
    exp.run_fit(search, demo_model_fn, train, None, num_chunks=2, seed=SEED, fuse=True, precision="bf16")
    assert exp.wait(timeout=600)
    assert [r.status.value for r in exp.runs()] == ["finished"] * 4, [r.error for r in exp.runs()]
    assert exp.stats()["fusion"] == {1: "fused", 2: "fused", 3: "fused", 4: "fused"}
    assert exp.stats()["fused_forwards"] >= 2 * 5
    assert all(r.config["training_args"]["bf16"] for r in exp.runs())
    _check_equal_to_plain_trl(exp, train, tmp_path, loss_rtol=2**-7)
    float32 = dict(exp.runs()[0].config, training_args={**exp.runs()[0].config["training_args"], "bf16": False})
    bf16_losses = exp.results().query("run_id == 1 and metric == 'loss'").sort_values("step").value.tolist()
    assert _train_alone(float32, train)[1] != bf16_losses  # it did train in bf16: not as in float32
    exp.end(wait=False)


def test_fused_dpo_runs_equal_plain_trl_with_one_reference_forward_per_batch(monkeypatch, tmp_path):
    """DPO: each run's policy forward goes through the shared backbone pass; its reference forward (adapters off, no
    grad) runs outside it, once per distinct batch among the group (`dpo.share_reference_forward`)."""
    import dataclasses

    from test_conformance import CASES, train_alone
    from trl import DPOTrainer

    reference: list[int] = []
    original = DPOTrainer.compute_ref_log_probs

    def counting(self, model, inputs):
        reference.append(len(inputs["input_ids"]))
        return original(self, model, inputs)

    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", counting)
    case = dataclasses.replace(
        CASES["DPO"], args={**CASES["DPO"].args, "per_device_train_batch_size": List([4, 8]), "max_steps": 6}
    )
    train = case.data()[0]
    search = RFGridSearch(
        RFModelConfig(
            "rf-demo/tiny-arith",
            peft_config=RFLoraConfig(r=List([4, 8]), lora_alpha=16, target_modules="all-linear"),
            training_args=case.config(**case.args),
        ),
        "DPO",
    )
    exp = Experiment("fused-dpo", experiments_dir=tmp_path)
    exp.run_fit(search, demo_model_fn, train, None, num_chunks=2, seed=SEED, fuse=True)
    assert exp.wait(timeout=600)
    runs = exp.runs()
    assert [r.status.value for r in runs] == ["finished"] * 8, [r.error for r in runs]
    assert exp.stats()["fusion"] == {r.run_id: "fused" for r in runs} and exp.stats()["fused_forwards"] >= 2 * 3
    assert sorted(reference) == [8] * 6 + [16] * 6  # per step, one per batch size: [chosen; rejected] rows
    reference.clear()
    results = exp.results()
    for run in runs:
        weights, losses = train_alone(case, run.config, train)
        exported = load_file(exp.export(run.run_id, tmp_path / f"dpo{run.run_id}") / "adapter_model.safetensors")
        for key, value in weights.items():
            torch.testing.assert_close(exported[key], value, atol=1e-4, rtol=0, msg=f"{run.name}: {key}")
        logged = results[(results.run_id == run.run_id) & (results.metric == "loss")].sort_values("step")
        torch.testing.assert_close(torch.tensor(logged.value.tolist()), torch.tensor(losses), rtol=1e-5, atol=0)
    exp.end(wait=False)


def test_a_fused_run_stopped_and_resumed_mid_chunk_stays_exact(train, tmp_path):
    exp = Experiment("fused-ops", experiments_dir=tmp_path)
    exp.run_fit(RFGridSearch(_configs(), "SFT"), demo_model_fn, train, None, num_chunks=2, seed=SEED, fuse=True)
    deadline = time.monotonic() + 120
    while exp.runs()[1].step == 0 and time.monotonic() < deadline:  # the group is training
        time.sleep(0.01)
    exp.stop(2)
    while exp.runs()[1].status.value != "stopped" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert exp.runs()[1].status.value == "stopped"
    assert exp.runs()[1].step < 20  # stopped before its end
    exp.resume(2)
    assert exp.wait(timeout=600)
    assert [r.status.value for r in exp.runs()] == ["finished"] * 4, [r.error for r in exp.runs()]
    assert [r.outcome for r in exp.ic_log().itertuples()] == ["applied", "applied"]
    _check_equal_to_plain_trl(exp, train, tmp_path)
    exp.end(wait=False)


def test_runs_that_cannot_fuse_take_turns_and_say_why(tmp_path):
    # Activation checkpointing is one setting per base: the third and fourth runs share a second base (other
    # model_kwargs); the fourth is fusable but has no fusable partner there, so it takes turns too.
    second = {"model_kwargs": {"dtype": "float32"}}
    checkpointed = _model(4, 0.1, learning_rate=1e-3, per_device_train_batch_size=8, max_steps=4)
    checkpointed.training_args.activation_checkpointing = True
    search = RFGridSearch(
        List(
            [
                _model(4, 0.1, learning_rate=1e-3, per_device_train_batch_size=8, max_steps=4),
                _model(4, 0.1, learning_rate=3e-4, per_device_train_batch_size=8, max_steps=4),
                checkpointed.replace(**second),
            ]
        ),
        "SFT",
    )
    exp = Experiment("mixed", experiments_dir=tmp_path)
    exp.run_fit(search, demo_model_fn, arithmetic_dataset("train", n=32), None, num_chunks=2, seed=SEED, fuse=True)
    assert exp.wait(timeout=300)
    assert [r.status.value for r in exp.runs()] == ["finished"] * 3, [r.error for r in exp.runs()]
    assert exp.stats()["fusion"] == {1: "fused", 2: "fused", 3: "activation checkpointing"}
    exp.end(wait=False)


def test_auto_fuses_groups_of_three_or_more_float32_runs(tmp_path):
    """fuse="auto": 3 float32 runs fuse; 2 take turns (they may fuse, but 2 do not gain); bf16 runs take turns,
    saying why."""

    def search(n: int) -> RFGridSearch:
        return RFGridSearch(
            List(
                [
                    _model(4, 0.1, learning_rate=1e-3 * (i + 1), per_device_train_batch_size=8, max_steps=4)
                    for i in range(n)
                ]
            ),
            "SFT",
        )

    data = arithmetic_dataset("train", n=32)
    counts = {}
    for n, precision in ((3, "fp32"), (2, "fp32"), (3, "bf16")):
        exp = Experiment(f"auto-{n}-{precision}", experiments_dir=tmp_path)
        exp.run_fit(search(n), demo_model_fn, data, None, num_chunks=2, seed=SEED, fuse="auto", precision=precision)
        assert exp.wait(timeout=300)
        assert [r.status.value for r in exp.runs()] == ["finished"] * n, [r.error for r in exp.runs()]
        stats = exp.stats()
        counts[n, precision] = stats["fused_groups"], stats["fused_forwards"], set(stats["fusion"].values())
        exp.end(wait=False)
    assert counts[3, "fp32"][0] == 2 and counts[3, "fp32"][1] > 0 and counts[3, "fp32"][2] == {"fused"}
    assert counts[2, "fp32"][:2] == (0, 0) and counts[2, "fp32"][2] == {_fused.AUTO_WAITING}  # too few to gain
    assert counts[3, "bf16"][:2] == (0, 0)
    (reason,) = counts[3, "bf16"][2]
    assert reason.startswith("bf16 under fuse='auto'") and "fuse=True fuses them" in reason


def test_auto_fuses_float32_weights_only():
    model, _ = demo_model_fn()
    assert _fused.auto_reason(SimpleNamespace(bf16=False), model) is None
    assert _fused.auto_reason(SimpleNamespace(bf16=True), model).startswith("bf16 under fuse='auto'")
    reason = _fused.auto_reason(SimpleNamespace(bf16=False), model.to(torch.bfloat16))
    assert reason.startswith("bfloat16 weights under fuse='auto'")
    # off a CPU (here: meta tensors standing in for a GPU's) runs take turns under "auto" until measured there
    reason = _fused.auto_reason(SimpleNamespace(bf16=False), model.to(torch.float32).to("meta"))
    assert reason.startswith("a base on meta under fuse='auto'") and "fuse=True fuses them" in reason


class _Stub(SimpleNamespace):
    __hash__ = object.__hash__  # a key, as a run's slot and a base are


def _forward(rows: int, length: int) -> _fused.Forward:
    return _fused.Forward((), {"input_ids": torch.zeros(rows, length, dtype=torch.long)})


def test_a_step_goes_through_the_base_in_passes_that_fit_in_memory(monkeypatch):
    """The members due go through the base together while their activations (bytes per token, measured) fit in
    MEMORY_SHARE of the memory available, else in several passes, each of as many members as fit, in `_alike` order
    (at least one). Unmeasured, or a batch much longer than the one measured: one member goes alone (measured)."""
    base = _Stub(model=SimpleNamespace(base_model=SimpleNamespace(forward=None)))
    monkeypatch.setattr(
        _fused.FusedGroup, "_alike", lambda self, item: (item[1].kwargs["input_ids"].shape[0], 8, 16, 0)
    )
    slots = [_Stub(run_id=i, adapter=f"a{i}") for i in range(4)]
    due = {slots[0]: _forward(4, 10), slots[1]: _forward(4, 20), slots[2]: _forward(8, 10), slots[3]: _forward(4, 10)}
    order = [slots[0], slots[1], slots[3], slots[2]]  # `_alike` order (here: by rows)
    group = _fused.FusedGroup(base, slots, switch=None, token_bytes={})
    assert group._next_part(dict(due)) == [slots[2]]  # not measured yet: the last in order goes alone
    available = {"bytes": 10**9}
    monkeypatch.setattr(_fused, "_available_bytes", lambda device: available["bytes"])
    group.token_bytes[base] = (100.0, 10)  # 100 bytes per token, measured at length 10
    assert group._next_part(dict(due)) == [slots[1]] and group._remeasure  # length 20: measured again, alone
    group._remeasure = False
    group.token_bytes[base] = (100.0, 20)
    assert group._next_part(dict(due)) == order  # plenty: one pass
    assert group.memory_splits == 0
    # 4 x 10 and 4 x 20 rows: 8 rows padded to 20, 100 bytes per token: 16,000; with the next 12 x 20: 24,000
    available["bytes"] = int(16_000 / _fused.MEMORY_SHARE)
    assert group._next_part(dict(due)) == [slots[0], slots[1]]
    assert group.memory_splits == 1
    available["bytes"] = 0  # nothing fits: the first goes alone, as it would take its turn
    assert group._next_part(dict(due)) == [slots[0]]
    monkeypatch.setattr(_fused, "_available_bytes", lambda device: None)  # unknown: no limit
    assert group._next_part(dict(due)) == order
    group.token_bytes[base] = (0.0, 20)  # could not be measured: no limit
    available["bytes"] = 0
    assert group._next_part(dict(due)) == order


def test_a_containers_memory_limit_bounds_what_a_fused_pass_may_take(tmp_path):
    """cgroup v2 and v1: limit - usage + reclaimable page cache (inactive files); no limit: None."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("1000\n")
    (v2 / "memory.current").write_text("800\n")
    (v2 / "memory.stat").write_text("anon 500\ninactive_file 300\nactive_file 0\n")
    assert _fused._cgroup_headroom(str(v2), "memory.max", "memory.current", "inactive_file") == 500
    (v2 / "memory.max").write_text("max\n")
    assert _fused._cgroup_headroom(str(v2), "memory.max", "memory.current", "inactive_file") is None
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # v1's "no limit"
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    assert _fused._cgroup_headroom(str(v1), *names) is None
    (v1 / "memory.limit_in_bytes").write_text("2000\n")
    (v1 / "memory.usage_in_bytes").write_text("2500\n")
    (v1 / "memory.stat").write_text("total_inactive_file 100\n")
    assert _fused._cgroup_headroom(str(v1), *names) == 0  # over its limit: nothing to spare
    assert _fused._cgroup_headroom(str(tmp_path / "missing"), *names) is None


def test_a_backbone_pass_measures_the_activations_it_keeps_for_the_backward():
    """`_SavedBytes` counts what autograd saves during the backbone call, once per storage, the base's weights not:
    at least one hidden state per layer per token, and it grows with the batch as the activations do."""
    from peft import LoraConfig, get_peft_model

    model, _ = demo_model_fn()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS))
    base = _Stub(model=peft_model)
    config = model.config
    measured = {}
    for rows in (2, 8):
        into = {}
        kwargs = {"input_ids": torch.randint(0, config.vocab_size, (rows, 12))}
        with _fused._SavedBytes(base, kwargs, into):
            peft_model.base_model.model.model(**kwargs)
        per_token, length = into[base]
        assert length == 12
        measured[rows] = per_token
        # float32 hidden states, and 8 bytes per vocabulary entry for what the LM head and loss may keep
        assert per_token >= config.num_hidden_layers * config.hidden_size * 4 + 8 * config.vocab_size
    # per token about the same at any batch size: no weight counted (the demo's 0.9 MB of weights over 24 tokens
    # would add 38 KB per token, over 96 tokens 9.5 KB)
    assert measured[8] == pytest.approx(measured[2], rel=0.1)


def test_fused_runs_split_for_memory_stay_exact(train, tmp_path, monkeypatch):
    """With memory for one run's activations at a time, the fused group's runs go through the base one by one
    (each pass followed by its backward), and each still ends exactly as plain TRL's."""
    monkeypatch.setattr(_fused, "_available_bytes", lambda device: 0)
    backward, losses = _fused.FusedGroup._backward, []
    monkeypatch.setattr(_fused.FusedGroup, "_backward", lambda self, ls: (losses.append(len(ls)), backward(self, ls)))
    exp = Experiment("fused-memory", experiments_dir=tmp_path)
    exp.run_fit(RFGridSearch(_configs(), "SFT"), demo_model_fn, train, None, num_chunks=2, seed=SEED, fuse=True)
    assert exp.wait(timeout=600)
    assert [r.status.value for r in exp.runs()] == ["finished"] * 4, [r.error for r in exp.runs()]
    stats = exp.stats()
    assert stats["fused_groups"] >= 2 and stats["fused_forwards"] == 0 and stats["memory_splits"] >= 16
    assert len(losses) >= 4 * 16 and set(losses) == {1}  # each pass's backward before the next pass's forward
    _check_equal_to_plain_trl(exp, train, tmp_path)
    exp.end(wait=False)


@pytest.mark.parametrize(
    "fuse, fusable, groups", [(True, 9, [5, 4]), (True, 10, [5, 5]), (True, 17, [6, 6, 5]), ("auto", 10, [5, 5])]
)
def test_more_runs_than_a_group_holds_split_evenly(fuse, fusable, groups):
    """Past MAX_GROUP fusable runs in a chunk, the groups are of even size, none left alone (or, under "auto", in a
    group too small to gain)."""
    from rf_notebook.engine.torch_backend import TorchBackend

    slots = [SimpleNamespace(run_id=i) for i in range(fusable)]
    backend = SimpleNamespace(fuse=fuse, _fusable=set(range(fusable)), base_of=lambda run_id: "base")
    sizes, left = [], list(slots)
    while left:
        group = TorchBackend.fusion_partners(backend, left[0], left[1:])
        sizes.append(len(group))
        left = [s for s in left if s not in group]
    assert sizes == groups


def test_fuse_takes_true_false_or_auto(tmp_path):
    exp = Experiment("bad-fuse", experiments_dir=tmp_path)
    search = RFGridSearch(_model(4, 0.0, learning_rate=1e-3, max_steps=2), "SFT")
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match=rf"`fuse` is {bad!r}, but must be True, False or 'auto'"):
            exp.run_fit(search, demo_model_fn, arithmetic_dataset("train", n=8), fuse=bad)


def test_a_run_parked_inside_its_autocast_takes_it_along_and_gives_it_back_when_closed():
    """A run parks inside its forward (under mixed precision: inside its autocast): the others must not train under
    that autocast, and closing the run mid-forward (its group failed) must unwind it to nesting 0, or autocast's
    weight cache would never be cleared again on this thread."""
    from types import SimpleNamespace

    from rf_notebook.engine._fused import park
    from rf_notebook.engine._slot import RunSlot

    def nesting() -> int:
        level = torch.autocast_increment_nesting() - 1
        torch.autocast_decrement_nesting()
        return level

    def train(resume_from_checkpoint=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            park("forward")  # as `_fused` parks a run at its backbone call

    slot = RunSlot(1, "run1")
    slot.trainer = SimpleNamespace(state=SimpleNamespace(global_step=0), train=train)
    assert slot.advance(1) == "forward"
    assert not torch.is_autocast_enabled("cpu") and nesting() == 0  # taken off the thread while it is parked
    slot.close()
    assert not torch.is_autocast_enabled("cpu") and nesting() == 0
