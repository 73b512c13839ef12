"""`Experiment(..., cluster="ray")` on a local Ray cluster started by the test (no dashboard, two CPU workers of one
thread each): runs placed on both workers train there, in parallel, exactly as each config alone
with plain TRL, through Stop / Resume (the run is written to its checkpoint and read back, possibly by the other
worker) and a warm start; a worker that dies loses no finished chunk: its runs continue on the other one from
their last chunk checkpoints, and still end exactly as alone; an idle worker takes queued runs from a busy one; an
interrupted run_fit resumes on new workers."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file
from test_exactness import _train_alone

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn
from rf_notebook.store import RunStatus

ray = pytest.importorskip("ray")

LRS = (3e-3, 1e-3, 3e-4, 1e-4)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from rf_notebook.engine.ray_backend import connect

    connect()  # what Experiment(cluster="ray") does without an address and without a Ray: a local one
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data():
    return arithmetic_dataset("train", n=96), arithmetic_dataset("eval", n=16)


def group(max_steps: int) -> RFGridSearch:
    return RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=List(list(LRS)), per_device_train_batch_size=8, max_steps=max_steps
            ),
        ),
        trainer_type="SFT",
    )


def losses(exp: Experiment, run_id: int) -> list[float]:
    r = exp.results()
    return r[(r.run_id == run_id) & (r.metric == "loss")].sort_values("step").value.tolist()


def assert_as_alone(exp: Experiment, run_ids, train, steps: int, out) -> None:
    """Each run logged every step once, with the losses and final adapter of its config trained alone by plain TRL."""
    results = exp.results()
    for run_id in run_ids:
        weights, expected = _train_alone(exp.run(run_id).config, train)
        logged = results[(results.run_id == run_id) & (results.metric == "loss")].step.tolist()
        assert logged == list(range(1, steps + 1))  # every step once (a run read back logs its later steps again)
        torch.testing.assert_close(torch.tensor(losses(exp, run_id)), torch.tensor(expected), atol=1e-5, rtol=1e-5)
        exported = load_file(exp.export(run_id, out / f"run{run_id}") / "adapter_model.safetensors")
        for key, value in weights.items():
            torch.testing.assert_close(exported[key], value, atol=1e-5, rtol=0, msg=f"run {run_id}: {key}")


def test_runs_train_on_both_workers_exactly_as_alone_through_stop_resume_and_warm_start(data, tmp_path):
    train, evl = data
    exp = Experiment("ray", experiments_dir=tmp_path, cluster="ray", workers=2)
    exp.run_fit(group(max_steps=12), demo_model_fn, train, evl, num_chunks=3, seed=5, display=False)
    backend = exp._engine.backend
    assert sorted(backend.home.values()) == [0, 0, 1, 1]  # placed on the least loaded worker
    exp.stop(1)  # applied at the engine's first look at its queue: run 1 stops before or inside its first chunk
    assert exp.wait(timeout=600)
    assert exp.run(1).status is RunStatus.STOPPED
    warm = exp.clone_modify(1, {}, warm_start=True)  # continues run 1's state, on run 1's worker
    exp.resume(1)
    assert exp.wait(timeout=600)
    runs = {r.run_id: r for r in exp.runs()}
    assert [r.status for r in runs.values()] == [RunStatus.FINISHED] * 5, [r.error for r in runs.values()]
    stats = exp.stats()  # chunks of runs on the two workers were trained at the same time
    assert stats["parallel_groups"] > 0 and "fused_groups" not in stats and stats["workers"] == 2
    results = exp.results()
    for run_id in (1, 2, 3, 4):
        weights, expected = _train_alone(runs[run_id].config, train)
        logged = losses(exp, run_id)
        assert len(logged) == 12  # every step's metrics reached the store, from the worker
        torch.testing.assert_close(torch.tensor(logged), torch.tensor(expected), atol=1e-5, rtol=1e-5)
        exported = load_file(exp.export(run_id, tmp_path / f"run{run_id}") / "adapter_model.safetensors")
        assert exported.keys() == weights.keys()
        for key, value in weights.items():
            torch.testing.assert_close(exported[key], value, atol=1e-5, rtol=0, msg=f"run {run_id}: {key}")
        evals = results[(results.run_id == run_id) & (results.metric == "eval_loss")]
        assert len(evals) == 3  # evaluated by its worker at every chunk end
        if run_id == 1:
            run1 = exported
    clone = load_file(exp.export(warm, tmp_path / "warm") / "adapter_model.safetensors")
    for key, value in run1.items():  # the warm clone of run 1 (same config) trained as run 1 did
        torch.testing.assert_close(clone[key], value, atol=1e-5, rtol=0, msg=f"warm clone: {key}")
    exp.end()


def test_a_dead_workers_runs_continue_from_their_last_checkpoints_on_the_other_worker_exactly(data, tmp_path):
    train, evl = data
    exp = Experiment("ray-fault", experiments_dir=tmp_path, cluster="ray", workers=2)
    exp.run_fit(group(max_steps=24), demo_model_fn, train, evl, num_chunks=4, seed=5, display=False)
    backend = exp._engine.backend
    on_first = sorted(run_id for run_id, worker in backend.home.items() if worker == 0)
    deadline = time.time() + 300
    while not any(exp.run(run_id).chunks_done for run_id in on_first):  # finished work to lose: a chunk's
        assert time.time() < deadline, "nothing trained on worker 0"
        time.sleep(0.02)
    ray.kill(backend.workers[0])
    assert exp.wait(timeout=600)  # the notebook's side goes on, and so do worker 0's runs, on worker 1
    assert backend.dead.keys() == {0} and set(backend.home.values()) == {1}
    assert exp.stats()["workers_lost"] == 1 and exp.stats()["runs_moved"] == len(on_first)
    runs = {r.run_id: r for r in exp.runs()}
    assert [r.status for r in runs.values()] == [RunStatus.FINISHED] * 4, [r.error for r in runs.values()]
    for run_id in on_first:  # what happened, on the run's record (the panel shows it)
        assert "Ray worker 0 died" in runs[run_id].warning and "continued from its last checkpoint" in (
            runs[run_id].warning
        )
    ray.kill(backend.workers[1])  # now every run's adapter is read from its last checkpoint
    assert_as_alone(exp, on_first, train, 24, tmp_path)
    exp.end()


def test_an_idle_worker_takes_queued_runs_from_a_busy_one_exactly(data, tmp_path):
    """Runs placed 4 / 4, then three of worker 1's deleted: worker 1, done with its one run, reads a queued run of
    worker 0 back (never trained, or from its last chunk checkpoint) and trains it; every run ends as alone."""
    train, _ = data
    search = RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=List([3e-3, 2e-3, 1e-3, 5e-4, 3e-4, 2e-4, 1e-4, 5e-5]),
                per_device_train_batch_size=8,
                max_steps=12,
            ),
        ),
        trainer_type="SFT",
    )
    exp = Experiment("ray-balance", experiments_dir=tmp_path, cluster="ray", workers=2)
    exp.run_fit(search, demo_model_fn, train, None, num_chunks=3, seed=5, display=False)
    backend = exp._engine.backend
    assert sorted(r for r, w in backend.home.items() if w == 1) == [2, 4, 6, 8]
    for run_id in (4, 6, 8):  # applied before anything trains: worker 1 holds one run, worker 0 four
        exp.delete(run_id)
    assert exp.wait(timeout=600)
    stats = exp.stats()
    assert stats["runs_rebalanced"] >= 1 and sorted(backend.home[r] for r in (1, 2, 3, 5, 7)).count(1) >= 2
    runs = {r.run_id: r for r in exp.runs() if r.run_id in (1, 2, 3, 5, 7)}
    assert [r.status for r in runs.values()] == [RunStatus.FINISHED] * 5, [r.error for r in runs.values()]
    assert_as_alone(exp, runs, train, 12, tmp_path)
    exp.end()


def test_an_interrupted_cluster_run_fit_resumes_on_new_workers_exactly(data, tmp_path):
    """`run_fit(resume=True)` after the experiment ended mid-training (a kernel restart): new workers read every
    run back from its last chunk checkpoint, and each run ends as its config trained alone, each step logged once."""
    train, _ = data
    exp = Experiment("ray-resume", experiments_dir=tmp_path, cluster="ray", workers=2)
    exp.run_fit(group(max_steps=12), demo_model_fn, train, None, num_chunks=3, seed=5, display=False)
    deadline = time.time() + 300
    while not any(r.chunks_done for r in exp.runs()):
        assert time.time() < deadline, "no chunk ended"
        time.sleep(0.02)
    exp.end(wait=False)  # the workers are gone with it
    assert any(not r.status.is_terminal for r in exp.runs())

    again = Experiment("ray-resume", experiments_dir=tmp_path, cluster="ray", workers=2)
    again.run_fit(group(max_steps=12), demo_model_fn, train, None, num_chunks=3, seed=5, display=False, resume=True)
    assert again.wait(timeout=600)
    runs = {r.run_id: r for r in again.runs()}
    assert [r.status for r in runs.values()] == [RunStatus.FINISHED] * 4, [r.error for r in runs.values()]
    assert_as_alone(again, runs, train, 12, tmp_path)
    again.end()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cluster": "spark"}, ValueError, r"`cluster` is 'spark', but must be None \(this process\) or 'ray'"),
        ({"cluster": "ray", "workers": 0}, ValueError, r"`workers` is 0, but must be None"),
        ({"workers": 2}, ValueError, r"they apply only with cluster='ray'"),
        ({"cluster": "ray", "ray_address": 6379}, TypeError, r"`ray_address` is 6379"),
    ],
)
def test_cluster_arguments_are_checked(kwargs, error, match, tmp_path):
    with pytest.raises(error, match=match):
        Experiment("bad", experiments_dir=tmp_path, **kwargs)


def test_fused_steps_are_refused_on_a_cluster_before_anything_starts(data, tmp_path):
    exp = Experiment("ray-fuse", experiments_dir=tmp_path, cluster="ray")
    with pytest.raises(ValueError, match=r"`fuse` is True, but fused steps are not available with cluster='ray'"):
        exp.run_fit(group(max_steps=4), demo_model_fn, *data, fuse=True, display=False)
    assert exp.runs() == []


def test_another_address_while_connected_to_a_ray_is_refused(data, tmp_path):
    exp = Experiment("ray-address", experiments_dir=tmp_path, cluster="ray", ray_address="10.9.9.9:6379")
    with pytest.raises(ValueError, match=r"`ray_address` is '10.9.9.9:6379', but this process is already connected"):
        exp.run_fit(group(max_steps=4), demo_model_fn, *data, display=False)
    assert {r.status for r in exp.runs()} == {RunStatus.FAILED}  # nothing left looking queued
