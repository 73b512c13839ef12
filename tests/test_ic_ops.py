"""IC ops on a running experiment (demo model): Stop, Resume, Delete, Clone-Modify, Warm start, and refusals."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn
from rf_notebook.engine.torch_backend import TorchBackend
from rf_notebook.store import RunStatus
from rf_notebook.trainers import sft


def group(lrs=(3e-3,), max_steps=24, dropout=0.1):
    return RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=List(list(lrs)),
                per_device_train_batch_size=8,
                max_steps=max_steps,
                lr_scheduler_type="cosine",
            ),
        ),
        trainer_type="SFT",
    )


@pytest.fixture(scope="module")
def data():
    return arithmetic_dataset("train", n=96), arithmetic_dataset("eval", n=16)


def losses(exp, run_id):
    r = exp.results()
    rows = r[(r.run_id == run_id) & (r.metric == "loss")].sort_values("step")
    return dict(zip(rows.step.tolist(), rows.value.tolist()))


def wait_for_step(exp, run_id, step, timeout=120):
    deadline = time.time() + timeout
    while max(losses(exp, run_id), default=0) < step:
        assert time.time() < deadline, f"run {run_id} did not reach step {step}"
        time.sleep(0.005)


def adapter(exp, run_id, tmp_path):
    return load_file(exp.export(run_id, tmp_path / f"export-{run_id}") / "adapter_model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """Two runs trained without any op: the reference for stop/resume and warm starts."""
    path = tmp_path_factory.mktemp("ref")
    exp = Experiment("ref", experiments_dir=path)
    exp.run_fit(group(lrs=(3e-3, 1e-3)), demo_model_fn, *data, num_chunks=3, seed=5)
    assert exp.wait(timeout=300)
    result = {run_id: (losses(exp, run_id), adapter(exp, run_id, path)) for run_id in (1, 2)}
    exp.end(wait=False)
    return result


def test_stop_then_resume_is_exactly_an_uninterrupted_run(data, uninterrupted, tmp_path):
    exp = Experiment("stop", experiments_dir=tmp_path)
    exp.run_fit(group(lrs=(3e-3, 1e-3)), demo_model_fn, *data, num_chunks=3, seed=5)
    wait_for_step(exp, 1, 2)  # stop it inside its first chunk
    logged_before = max(losses(exp, 1), default=0)
    op = exp.stop(1)
    assert exp.wait(timeout=300)  # returns: run 2 finished, run 1 stopped
    run1, run2 = exp.runs()
    assert run1.status is RunStatus.STOPPED and run2.status is RunStatus.FINISHED
    stopped_at = run1.step
    assert 0 < stopped_at < run1.total_steps
    record = exp.ic_log().set_index("op_id").loc[op]
    assert record.outcome == "applied" and record.step == stopped_at
    assert stopped_at - logged_before <= 1  # took effect at the next optimizer step boundary
    assert max(losses(exp, 1)) == stopped_at  # nothing trained after the stop
    exp.resume(1)
    assert exp.wait(timeout=300)
    assert exp.runs()[0].status is RunStatus.FINISHED
    for run_id in (1, 2):
        ref_losses, ref_weights = uninterrupted[run_id]
        assert losses(exp, run_id) == pytest.approx(ref_losses, abs=1e-5)
        assert_same_weights(adapter(exp, run_id, tmp_path), ref_weights)
    assert list(exp.ic_log().outcome) == ["applied", "applied"]
    exp.end(wait=False)


@pytest.fixture
def builds(monkeypatch):
    """The run ids whose SFT trainers were built, in order (a later run's trainer is built at its first turn)."""
    built: list[int] = []
    original = sft.build_trainer

    def counting(model, tokenizer, args, *rest, **kwargs):
        built.append(int(Path(args.output_dir).name))
        return original(model, tokenizer, args, *rest, **kwargs)

    monkeypatch.setattr(sft, "build_trainer", counting)
    return built


@pytest.fixture
def held(monkeypatch):
    """An event that the first run's first activation waits for: ops submitted before it is set apply before
    anything trains (the engine drains commands at the first optimizer step)."""
    go = threading.Event()
    activate = TorchBackend.activate

    def waiting(self, slot):
        assert go.wait(timeout=120), "the test never let training start"
        return activate(self, slot)

    monkeypatch.setattr(TorchBackend, "activate", waiting)
    yield go
    go.set()


def test_a_run_stopped_before_its_first_turn_never_builds_a_trainer(data, uninterrupted, builds, held, tmp_path):
    exp = Experiment("unbuilt", experiments_dir=tmp_path)
    exp.run_fit(group(lrs=(3e-3, 1e-3)), demo_model_fn, *data, num_chunks=3, seed=5)
    assert builds == [1] and exp._engine.backend._deferred == {2}
    exp.stop(2)
    held.set()
    fresh = load_file(exp.export(2, tmp_path / "fresh") / "adapter_model.safetensors")
    assert exp.wait(timeout=300)
    assert [r.status for r in exp.runs()] == [RunStatus.FINISHED, RunStatus.STOPPED] and exp.runs()[1].step == 0
    assert builds == [1]
    assert {k for k, v in fresh.items() if "lora_B" in k and v.abs().sum() > 0} == set()  # its initial adapter
    exp.resume(2)
    assert exp.wait(timeout=300)
    assert builds == [1, 2]
    for run_id in (1, 2):
        ref_losses, ref_weights = uninterrupted[run_id]
        assert losses(exp, run_id) == pytest.approx(ref_losses, abs=1e-5)
        assert_same_weights(adapter(exp, run_id, tmp_path), ref_weights)
    exp.end(wait=False)


def test_a_warm_start_from_a_run_before_its_first_turn_is_that_run(data, uninterrupted, builds, held, tmp_path):
    exp = Experiment("warm-unbuilt", experiments_dir=tmp_path)
    exp.run_fit(group(lrs=(3e-3, 1e-3)), demo_model_fn, *data, num_chunks=3, seed=5)
    assert builds == [1] and exp._engine.backend._deferred == {2}
    clone = exp.clone_modify(2, {}, warm_start=True)  # run 2 has not trained: its trainer is built for this
    held.set()
    assert exp.wait(timeout=300)
    assert exp.ic_log().iloc[0].step == 0 and sorted(builds) == [1, 2, clone]
    ref_losses, ref_weights = uninterrupted[2]
    for run_id in (2, clone):
        assert losses(exp, run_id) == pytest.approx(ref_losses, abs=1e-5)
        assert_same_weights(adapter(exp, run_id, tmp_path), ref_weights)
    exp.end(wait=False)


def test_a_trainer_that_fails_at_its_first_turn_fails_that_run_only(data, held, monkeypatch, tmp_path):
    original = sft.build_trainer

    def failing(model, tokenizer, args, *rest, **kwargs):
        if Path(args.output_dir).name == "2":
            raise RuntimeError("simulated constructor failure")
        return original(model, tokenizer, args, *rest, **kwargs)

    monkeypatch.setattr(sft, "build_trainer", failing)
    exp = Experiment("unbuildable", experiments_dir=tmp_path)
    exp.run_fit(group(lrs=(3e-3, 1e-3)), demo_model_fn, *data, num_chunks=3, seed=5)
    exp.clone_modify(2, {}, warm_start=True)  # needs run 2's trainer: refused, run 2 left to fail at its turn
    held.set()
    assert exp.wait(timeout=300)
    run1, run2 = exp.runs()
    assert run1.status is RunStatus.FINISHED and run2.status is RunStatus.FAILED
    assert "simulated constructor failure" in run2.error
    op = exp.ic_log().iloc[0]
    assert op.outcome == "refused" and "simulated constructor failure" in op.reason
    assert adapter(exp, 2, tmp_path)  # its (untrained) adapter stays for export
    exp.end(wait=False)


def test_delete_frees_the_run_and_keeps_its_metrics(data, tmp_path):
    exp = Experiment("delete", experiments_dir=tmp_path)
    exp.run_fit(group(lrs=(3e-3, 1e-3), max_steps=48), demo_model_fn, *data, num_chunks=3, seed=0)
    engine = exp._engine
    slot = engine._slots[1]
    gone = [weakref.ref(slot.trainer), weakref.ref(slot)]
    base = engine.backend.base_of(1)
    peft_model = base.peft
    lora_params = [weakref.ref(p) for p in base.adapters.parameters("run1")]
    assert lora_params
    exp.delete(1)
    assert exp.wait(timeout=300)
    run1, run2 = exp.runs()
    assert run1.status is RunStatus.DELETED and run2.status is RunStatus.FINISHED
    del slot
    gc.collect()
    assert all(ref() is None for ref in gone + lora_params)  # trainer, optimizer state and adapter are freed
    assert "run1" not in peft_model.peft_config
    assert len(losses(exp, 1)) == run1.step  # its metrics stay
    with pytest.raises(ValueError, match="run 1 is deleted"):
        exp.stop(1)
    with pytest.raises(Exception, match="run 1 has no adapter any more"):
        exp.export(1, tmp_path / "nope")
    exp.end(wait=False)


def test_clone_modify_trains_a_new_run_from_scratch(data, tmp_path):
    exp = Experiment("clone", experiments_dir=tmp_path)
    exp.run_fit(group(max_steps=12), demo_model_fn, *data, num_chunks=3, seed=0)
    new = exp.clone_modify(1, {"learning_rate": 1e-4, "peft_config.r": 8})
    assert new == 2
    assert exp.wait(timeout=300)
    parent, clone = exp.runs()
    assert clone.status is RunStatus.FINISHED and clone.step == 12
    assert clone.name == "run 1 > r=8, lr=1e-4"
    assert clone.config["training_args"]["learning_rate"] == 1e-4 and clone.config["peft_config"]["r"] == 8
    assert min(losses(exp, 2)) == 1  # from step 1: trained from scratch
    r = exp.results()
    lrs = r[(r.run_id == 2) & (r.metric == "learning_rate")].value
    assert lrs.max() <= 1e-4
    log = exp.ic_log()
    assert log.iloc[0].op == "clone_modify" and log.iloc[0].new_run_id == 2 and log.iloc[0].outcome == "applied"
    exp.end(wait=False)


def test_a_warm_start_without_overrides_continues_the_parents_trajectory(data, uninterrupted, tmp_path):
    exp = Experiment("warm", experiments_dir=tmp_path)
    exp.run_fit(group(lrs=(3e-3, 1e-3)), demo_model_fn, *data, num_chunks=3, seed=5)
    wait_for_step(exp, 1, 2)
    clone = exp.clone_modify(1, {}, warm_start=True)
    assert exp.wait(timeout=300)
    at = exp.ic_log().iloc[0].step
    assert 0 < at < 24
    parent_losses, parent_weights = uninterrupted[1]
    clone_losses = losses(exp, clone)
    assert min(clone_losses) == at + 1  # continues from the parent's step
    assert clone_losses == pytest.approx({s: v for s, v in parent_losses.items() if s > at}, abs=1e-5)
    assert_same_weights(adapter(exp, clone, tmp_path), parent_weights)
    assert_same_weights(adapter(exp, 1, tmp_path), parent_weights)  # the parent is untouched
    exp.end(wait=False)


def test_a_warm_start_applies_a_new_learning_rate_from_the_next_step(data, tmp_path):
    exp = Experiment("warm-lr", experiments_dir=tmp_path)
    exp.run_fit(group(max_steps=24, dropout=0.0), demo_model_fn, *data, num_chunks=3, seed=0)
    wait_for_step(exp, 1, 2)
    clone = exp.clone_modify(1, {"learning_rate": 3e-4}, warm_start=True)
    assert exp.wait(timeout=300)
    r = exp.results()
    parent_lr = r[(r.run_id == 1) & (r.metric == "learning_rate")].set_index("step").value
    clone_lr = r[(r.run_id == clone) & (r.metric == "learning_rate")].set_index("step").value
    for step, lr in clone_lr.items():  # same cosine schedule, scaled by the new base learning rate
        assert lr == pytest.approx(parent_lr[step] * 0.1, rel=1e-6)
    assert exp.runs()[1].name == "lr=3e-3 > lr=3e-4 (warm)" or exp.runs()[1].name.endswith("lr=3e-4 (warm)")
    exp.end(wait=False)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    exp = Experiment("refusals", experiments_dir=tmp_path_factory.mktemp("refusals"))
    exp.run_fit(group(max_steps=6), demo_model_fn, *data, num_chunks=2, seed=0)
    assert exp.wait(timeout=300)
    yield exp
    exp.end(wait=False)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda e: e.stop(42), ValueError, "no run with id 42"),
        (lambda e: e.stop(1), ValueError, "run 1 is finished"),
        (lambda e: e.resume(1), ValueError, "run 1 is finished, not stopped"),
        (lambda e: e.delete(1), ValueError, "run 1 is finished"),
        (
            lambda e: e.clone_modify(1, {}, warm_start=True),
            ValueError,
            "run 1 is finished: its optimizer state is gone; clone it without warm_start",
        ),
        (
            lambda e: e.clone_modify(1, {"learnin_rate": 1e-3}),
            ValueError,
            r"override 'learnin_rate' is not a field .* \(did you mean 'learning_rate'\?\)",
        ),
        (lambda e: e.clone_modify(1, {"learning_rate": -1.0}), ValueError, "'learning_rate' is -1.0, but must be > 0"),
        (lambda e: e.clone_modify(1, {"r": 0}), ValueError, "'r' is 0, but must be > 0"),
        (
            lambda e: e.clone_modify(1, {"learning_rate": "fast"}),
            TypeError,
            r"override 'learning_rate' is 'fast' \(str\), but the run's value is 0.003 \(float\)",
        ),
        (lambda e: e.clone_modify(1, {"max_steps": 2.5}), TypeError, "override 'max_steps' is 2.5"),
        (lambda e: e.clone_modify(1, {"learning_rate": object()}), TypeError, "values must be JSON data"),
        (lambda e: e.clone_modify(1, {"lr_scheduler_type": "bogus"}), ValueError, "has an invalid config: .*bogus"),
        (lambda e: e.clone_modify(1, {"bogus.r": 4}), ValueError, "names section 'bogus'"),
        (lambda e: e.clone_modify(1, "lr=1"), TypeError, "overrides is a str, but must be a dict"),
    ],
)
def test_refused_ops_say_why_and_are_logged(finished, call, error, message):
    before = len(finished.ic_log())
    with pytest.raises(error, match=message):
        call(finished)
    log = finished.ic_log()
    assert len(log) == before + 1
    assert log.iloc[-1].outcome == "refused" and log.iloc[-1].reason
    assert [r.run_id for r in finished.runs()] == [1]  # nothing was added


def test_warm_start_refuses_a_new_adapter_shape(data, tmp_path):
    exp = Experiment("warm-shape", experiments_dir=tmp_path)
    exp.run_fit(group(max_steps=48), demo_model_fn, *data, num_chunks=3, seed=0)
    with pytest.raises(ValueError, match="warm start cannot change 'r': it changes the adapter's shape"):
        exp.clone_modify(1, {"r": 8}, warm_start=True)
    with pytest.raises(ValueError, match="warm start cannot change 'per_device_train_batch_size'"):
        exp.clone_modify(1, {"per_device_train_batch_size": 4}, warm_start=True)
    exp.end(wait=False)
