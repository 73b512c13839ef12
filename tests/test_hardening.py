"""Silent ways a user could corrupt or wedge an experiment, each pinned by a test: ops on runs of an earlier run_fit,
GRPO's buffered generations across chunk ends, and stopped runs written to disk and freed (then resumed exactly)."""

from __future__ import annotations

import gc
import time
import weakref

import pytest
import torch
from safetensors.torch import load_file
from test_conformance import CASES, Case, search, train_alone
from test_durability import group

from rf_notebook import Experiment, List, RFGRPOConfig
from rf_notebook.demo import (
    arithmetic_dataset,
    demo_model_fn,
    digit_reward,
    exact_match_reward,
    prompt_dataset,
)
from rf_notebook.engine import _slot
from rf_notebook.store import RunStatus

# GRPO that trains on buffered generations: 4 micro-batches per generation, each generation used twice, so one
# generation cycle is 8 optimizer steps and a state taken in between must carry the buffer.
BUFFERED = Case(
    RFGRPOConfig,
    "GRPO",
    dict(
        num_generations=2,
        steps_per_generation=4,
        num_iterations=2,
        beta=0.04,
        learning_rate=List([3e-3, 1e-3]),
        per_device_train_batch_size=4,
        max_steps=16,
        max_completion_length=4,
        temperature=1.0,
    ),
    lambda: (prompt_dataset("train", n=16), prompt_dataset("eval", n=4)),  # 16 steps per epoch: 2 cycles
    [exact_match_reward, digit_reward],
)


@pytest.fixture(scope="module")
def data():
    return arithmetic_dataset("train", n=96), arithmetic_dataset("eval", n=16)


# -- ops on runs of an earlier run_fit ----------------------------------------------------------------------------


def test_ops_on_an_earlier_run_fits_runs_are_refused_before_anything_changes(data, tmp_path):
    exp = Experiment("two-fits", experiments_dir=tmp_path)
    exp.run_fit(group(max_steps=24), demo_model_fn, *data, num_chunks=3, seed=1, display=False)
    exp.stop(1)
    assert exp.wait(timeout=300)
    first = {r.run_id: r for r in exp.runs()}
    assert first[1].status is RunStatus.STOPPED and first[2].status is RunStatus.FINISHED
    exp.run_fit(group(lrs=(5e-4,), max_steps=16), demo_model_fn, *data, num_chunks=2, seed=1, display=False)

    for call in (exp.resume, exp.delete):
        with pytest.raises(ValueError, match=r"run 1 is not part of the current run_fit .*ops apply to runs \[3\]"):
            call(1)
    with pytest.raises(ValueError, match=r"run 1 is not part of the current run_fit"):
        exp.clone_modify(1, {"learning_rate": 1e-4}, warm_start=False)
    assert exp.wait(timeout=300)  # returns: nothing of the earlier run_fit is waited for
    assert exp.store.run(1) == first[1]  # untouched: still stopped, same step
    refused = [op for op in exp.store.ic_log() if op.run_id == 1 and op.op != "stop"]
    assert [op.outcome for op in refused] == ["refused"] * 3
    assert exp.store.run(3).status is RunStatus.FINISHED
    exp.run_fit(group(lrs=(2e-4,), max_steps=4), demo_model_fn, *data, num_chunks=1, seed=1, display=False)
    assert exp.wait(timeout=300)  # the next run_fit is not blocked either
    exp.end(wait=False)


# -- GRPO / RLOO generation buffers --------------------------------------------------------------------------------


def test_chunk_ends_fall_between_generation_cycles():
    from rf_notebook.chunking import chunk_plan
    from rf_notebook.trainers import TRAINERS

    class Args:  # what the trainer module reads of a resolved GRPOConfig
        generation_batch_size, num_generations, steps_per_generation, num_iterations = 16, 2, 4, 2
        gradient_accumulation_steps = 1

    grpo = TRAINERS["GRPO"]
    assert grpo.rung_multiple(Args) == 8
    plan = chunk_plan(
        64,
        4,
        4,
        max_steps=64,
        per_epoch=grpo.steps_per_epoch(64, Args),
        rows_per_step=grpo.rows_per_step(Args),
        align=8,
    )
    assert [r.step for r in plan.rungs] == [16, 32, 48, 64]
    assert all(r.step % 8 == 0 for r in chunk_plan(64, 4, 3, max_steps=64, per_epoch=64, align=8).rungs)
    with pytest.raises(ValueError, match=r"generation cycle is 8 optimizer steps .* use num_chunks <= 2"):
        chunk_plan(20, 4, 3, per_epoch=16, align=8)


def test_buffered_grpo_interleaved_equals_plain_trl(tmp_path):
    train, evl = BUFFERED.data()
    exp = Experiment("grpo-buffered", experiments_dir=tmp_path)
    exp.run_fit(search(BUFFERED, "GRPO"), demo_model_fn, train, evl, num_chunks=2, seed=5, display=False)
    assert exp.wait(timeout=600)
    for run in exp.runs():
        assert run.status is RunStatus.FINISHED, run.error
        assert run.rungs == (8, 16)
        weights, _ = train_alone(BUFFERED, run.config, train)
        exported = load_file(exp.export(run.run_id, tmp_path / f"run{run.run_id}") / "adapter_model.safetensors")
        for key, value in weights.items():
            torch.testing.assert_close(exported[key], value, atol=1e-5, rtol=0, msg=f"{run.name}: {key}")
    exp.end(wait=False)


def wait_for(predicate, timeout=30):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def stop_at(monkeypatch, exp_ref, run_id: int, step: int) -> None:
    """Submit exp.stop(run_id) from inside the run, just before its optimizer step `step + 1` (deterministic)."""
    original = _slot._Suspend.on_step_begin
    fired = []

    def on_step_begin(self, args, state, control, **kwargs):
        if self.slot.run_id == run_id and state.global_step == step and not fired:
            fired.append(step)
            exp_ref().stop(run_id)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(_slot._Suspend, "on_step_begin", on_step_begin)


@pytest.mark.parametrize("name", ["SFT", "GRPO-buffered"])
def test_a_run_stopped_mid_chunk_is_unloaded_and_resumes_exactly(name, tmp_path, monkeypatch):
    """Stopped at step 3 (inside a chunk, inside a GRPO generation cycle), written to disk and freed once two rungs
    passed; resumed, it ends with the adapter of the same config trained alone by plain TRL."""
    case = BUFFERED if name == "GRPO-buffered" else CASES["SFT"]
    case = Case(case.config, case.trl_name, {**case.args, "max_steps": 16}, case.data, case.reward_funcs)
    train, evl = case.data()
    exp = Experiment("unload", experiments_dir=tmp_path)
    stop_at(monkeypatch, weakref.ref(exp), run_id=1, step=3)
    num_chunks = 2 if name == "GRPO-buffered" else 4
    search_ = search(case, case.trl_name)  # taking turns: compared with plain TRL to 1e-5
    exp.run_fit(search_, demo_model_fn, train, evl, num_chunks=num_chunks, seed=5, display=False, fuse=False)
    assert exp.wait(timeout=600)
    assert exp.store.run(1).status is RunStatus.STOPPED and exp.store.run(1).step == 3
    wait_for(lambda: 1 not in exp._engine._slots)  # unloaded once nothing else is left to train
    assert (tmp_path / "unload" / "runs" / "1" / "checkpoints" / "step-3" / "optimizer.pt").is_file()
    if name == "GRPO-buffered":
        assert (tmp_path / "unload" / "runs" / "1" / "checkpoints" / "step-3" / "rf_generation_buffer.pt").is_file()
    exported = load_file(exp.export(1, tmp_path / "stopped") / "adapter_model.safetensors")  # from its checkpoint
    assert exported
    exp.resume(1)
    assert exp.wait(timeout=600)
    run = exp.store.run(1)
    assert run.status is RunStatus.FINISHED, run.error
    weights, losses = train_alone(case, run.config, train)
    final = load_file(exp.export(1, tmp_path / "final") / "adapter_model.safetensors")
    for key, value in weights.items():
        torch.testing.assert_close(final[key], value, atol=1e-5, rtol=0, msg=key)
    results = exp.results()
    logged = results[(results.run_id == 1) & (results.metric == "loss")].sort_values("step")
    assert logged.step.tolist() == list(range(1, 17))
    torch.testing.assert_close(torch.tensor(logged.value.tolist()), torch.tensor(losses), atol=1e-5, rtol=1e-5)
    exp.end(wait=False)


def test_a_warm_clone_taken_inside_a_generation_cycle_continues_its_parent_exactly(tmp_path, monkeypatch):
    """A warm clone with no changes, taken at step 3 of an 8-step generation cycle, ends where its parent ends."""
    case = Case(BUFFERED.config, "GRPO", {**BUFFERED.args, "learning_rate": 3e-3}, BUFFERED.data, BUFFERED.reward_funcs)
    train, evl = case.data()
    exp = Experiment("warm-buffer", experiments_dir=tmp_path)
    original = _slot._Suspend.on_step_begin
    clones = []

    def on_step_begin(self, args, state, control, **kwargs):
        if self.slot.run_id == 1 and state.global_step == 3 and not clones:
            clones.append(exp.clone_modify(1, {}, warm_start=True))
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(_slot._Suspend, "on_step_begin", on_step_begin)
    exp.run_fit(search(case, "GRPO"), demo_model_fn, train, evl, num_chunks=2, seed=5, display=False)
    assert exp.wait(timeout=600)
    (clone,) = clones
    assert [op.step for op in exp.store.ic_log() if op.new_run_id == clone] == [3]
    parent = load_file(exp.export(1, tmp_path / "parent") / "adapter_model.safetensors")
    child = load_file(exp.export(clone, tmp_path / "clone") / "adapter_model.safetensors")
    for key, value in parent.items():
        torch.testing.assert_close(child[key], value, atol=1e-5, rtol=0, msg=key)
    exp.end(wait=False)


def test_unloaded_runs_free_their_trainers(data, tmp_path):
    exp = Experiment("freed", experiments_dir=tmp_path)
    exp.run_fit(group(lrs=(3e-3, 1e-3, 5e-4), max_steps=24), demo_model_fn, *data, num_chunks=4, seed=1)
    trainer = weakref.ref(exp._engine._slots[1].trainer)  # the first run's, built before run_fit returns
    exp.stop(1)
    assert exp.wait(timeout=300)
    wait_for(lambda: 1 not in exp._engine._slots)
    gc.collect()
    assert trainer() is None, "the stopped run's trainer (and optimizer) is still in memory"
    assert exp.store.run(1).status is RunStatus.STOPPED
    exp.end(wait=False)
