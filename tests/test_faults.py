"""A failing run is contained: NaN/inf loss, a raising reward function, an out-of-memory step. It is marked failed
with its traceback (store and panel), its trainer and optimizer are freed, and every other run finishes."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from trl import SFTTrainer

from rf_notebook import Experiment, List, RFGridSearch, RFGRPOConfig, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook._feed import Feed
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn, exact_match_reward, prompt_dataset
from rf_notebook.engine.torch_backend import TorchBackend
from rf_notebook.store import RunStatus


@pytest.fixture(scope="module")
def data():
    return arithmetic_dataset("train", n=64), arithmetic_dataset("eval", n=8)


def sft(lrs, max_steps=8):
    return RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
            training_args=RFSFTConfig(learning_rate=List(lrs), per_device_train_batch_size=8, max_steps=max_steps),
        ),
        trainer_type="SFT",
    )


@pytest.fixture
def trainers(monkeypatch):
    """Weak references to every run's trainer, taken as each is built (a run's trainer is built at its first turn)."""
    refs = {}
    build = TorchBackend._build_slot

    def watched(self, run, *args, **kwargs):
        slot = build(self, run, *args, **kwargs)
        refs[run.run_id] = weakref.ref(slot.trainer)
        return slot

    monkeypatch.setattr(TorchBackend, "_build_slot", watched)
    return refs


def assert_contained(exp, failed_id, match):
    statuses = {r.run_id: r.status for r in exp.runs()}
    assert statuses.pop(failed_id) is RunStatus.FAILED
    assert set(statuses.values()) == {RunStatus.FINISHED}, statuses
    error = exp.store.run(failed_id).error
    assert "Traceback (most recent call last)" in error and match in error, error
    panel_run = next(r for r in Feed(exp.store, exp.name).snapshot()["runs"] if r["id"] == failed_id)
    assert panel_run["status"] == "failed" and match in panel_run["error"]


def test_a_nan_loss_fails_its_run_only(data, trainers, tmp_path):
    exp = Experiment("nan", experiments_dir=tmp_path)
    exp.run_fit(sft([3e-3, 1e38, 1e-3]), demo_model_fn, *data, num_chunks=2, seed=0, display=False)
    assert exp.wait(timeout=300)
    assert_contained(exp, 2, "NonFiniteLoss: the training loss is nan at step 2")
    losses = [m.value for m in exp.store.metrics(2) if m.name == "loss"]
    assert len(losses) == 2 and math.isfinite(losses[0]) and math.isnan(losses[1])
    gc.collect()
    assert trainers[2]() is None, "the failed run's trainer (and its optimizer) is still alive"
    exp.end(wait=False)


def test_on_nonfinite_continue_keeps_training(data, tmp_path):
    exp = Experiment("nan-ok", experiments_dir=tmp_path)
    exp.run_fit(sft([1e38]), demo_model_fn, *data, num_chunks=2, seed=0, display=False, on_nonfinite="continue")
    assert exp.wait(timeout=300)
    assert exp.store.run(1).status is RunStatus.FINISHED
    losses = [m.value for m in exp.store.metrics(1) if m.name == "loss"]
    assert len(losses) == 8 and not all(math.isfinite(v) for v in losses)
    exp.end(wait=False)


def test_an_out_of_memory_step_fails_its_run_only(data, trainers, tmp_path, monkeypatch):
    real = SFTTrainer.training_step

    def oom_for_one_run(self, *args, **kwargs):
        if self.args.learning_rate == 2e-3 and self.state.global_step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", oom_for_one_run)
    exp = Experiment("oom", experiments_dir=tmp_path)
    exp.run_fit(sft([3e-3, 2e-3, 1e-3]), demo_model_fn, *data, num_chunks=2, seed=0, display=False)
    assert exp.wait(timeout=300)
    assert_contained(exp, 2, "OutOfMemoryError: CUDA out of memory")
    gc.collect()
    assert trainers[2]() is None, "the failed run's trainer (and its optimizer) is still alive"
    assert [m.step for m in exp.store.metrics(2) if m.name == "loss"] == [1, 2, 3]  # step 3 logged, 4 raised
    exp.end(wait=False)


def broken_reward(completions, **_):
    raise RuntimeError("reward service unavailable")


def test_a_raising_reward_function_fails_its_run_only(trainers, tmp_path):
    group = RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
            training_args=RFGRPOConfig(
                num_generations=2, per_device_train_batch_size=4, max_steps=4, max_completion_length=8
            ),
            reward_funcs=List([exact_match_reward, broken_reward]),
        ),
        trainer_type="GRPO",
    )
    exp = Experiment("reward", experiments_dir=tmp_path)
    exp.run_fit(group, demo_model_fn, prompt_dataset("train", n=16), num_chunks=2, seed=0, display=False)
    assert exp.wait(timeout=300)
    assert_contained(exp, 2, "RuntimeError: reward service unavailable")
    gc.collect()
    assert trainers[2]() is None
    exp.end(wait=False)
