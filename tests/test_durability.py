"""Durable experiments: SIGKILL at 10 points and resume exactly; a kernel restart keeps history; storage failures
pause without corrupting anything."""

from __future__ import annotations

import errno
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook._feed import Feed
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn
from rf_notebook.store import RunStatus

CHILD = Path(__file__).with_name("_durability_child.py")

# Where each process of the chain kills itself (the N-th occurrence in that process), in order.
KILL_POINTS = [
    "step:20",  # inside an optimizer step (first process: after a few chunks)
    "eval:3",  # inside an evaluation
    "ckpt-save:4",  # a checkpoint half written
    "ckpt-rename:2",  # a checkpoint written, not yet in place
    "ckpt-clean:3",  # a new checkpoint in place, the old one not yet removed
    "between:5",  # between two chunks
    "step:4",
    "eval:5",
    "ckpt-save:7",
    "between:2",
]


def child(directory: Path, mode: str, point: str | None = None, policy: str | None = None, extra: tuple = ()):
    args = [sys.executable, str(CHILD), str(directory), mode, *([point] if point else [])]
    args += ["--policy", policy] if policy else []
    args += list(extra)
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def metric_rows(directory: Path) -> list[tuple]:
    db = sqlite3.connect(directory / "crash" / "experiment.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return db.execute("SELECT run_id, step, name, value FROM metrics ORDER BY run_id, step, name").fetchall()
    finally:
        db.close()


def final_adapter(directory: Path, run_id: int) -> dict[str, torch.Tensor]:
    (folder,) = (directory / "crash" / "runs" / str(run_id) / "checkpoints").iterdir()
    return load_file(folder / "adapter_model.safetensors")


def assert_same_adapters(reference: Path, crashed: Path, run_ids) -> None:
    for run_id in run_ids:
        ref, got = final_adapter(reference, run_id), final_adapter(crashed, run_id)
        assert ref.keys() == got.keys()
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=0, msg=f"run {run_id} {key}")


def test_sigkill_at_ten_points_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference = child(tmp_path / "ref", "start")
    assert reference.returncode == 0, reference.stderr[-3000:]

    crashed = tmp_path / "crashed"
    for i, point in enumerate(KILL_POINTS):
        proc = child(crashed, "start" if i == 0 else "resume", point)
        assert proc.returncode == -signal.SIGKILL, f"{point}: the process was not killed there\n{proc.stderr[-3000:]}"
        metric_rows(crashed)  # the database is intact after every kill
    final = child(crashed, "resume")
    assert final.returncode == 0, final.stderr[-3000:]

    assert_same_adapters(tmp_path / "ref", crashed, (1, 2, 3, 4))
    ref_rows, got_rows = metric_rows(tmp_path / "ref"), metric_rows(crashed)
    keys = [(run, step, name) for run, step, name, _ in got_rows]
    assert len(keys) == len(set(keys)), "duplicated (run, step, metric) rows"
    assert set(keys) == {(run, step, name) for run, step, name, _ in ref_rows}, "missing or extra rows"
    assert {(r, s) for r, s, _ in keys} == {(r, s) for r, s, _, _ in ref_rows}
    for (run, step, name, want), (*_, value) in zip(ref_rows, got_rows):
        assert value == pytest.approx(want, abs=1e-5), (run, step, name)
    leftovers = [p for p in (crashed / "crash" / "runs").rglob(".tmp-*")]
    assert not leftovers

    # A new process (this one) reads the whole history back: results, statuses, the panel's curves.
    exp = Experiment("crash", experiments_dir=crashed)
    assert {r.status for r in exp.runs()} == {RunStatus.FINISHED}
    assert len(exp.results()) == len(ref_rows)
    snapshot = Feed(exp.store, "crash").snapshot()
    assert sorted(snapshot["series"]) == ["1", "2", "3", "4"]
    assert [step for step, _ in snapshot["series"]["3"]["loss"]] == list(range(1, 17))
    exported = exp.export(2, tmp_path / "winner")  # from the last checkpoint: no model loaded
    assert load_file(exported / "adapter_model.safetensors").keys() == final_adapter(crashed, 2).keys()
    exp.store.close()


def test_sigkill_inside_fused_steps_then_resume_equals_an_uninterrupted_fused_run(tmp_path):
    """Fused steps (#21) under the same crashes: killed inside a shared step, in a checkpoint write and between
    chunks, then resumed, the runs end as a fused run that was never interrupted."""
    reference = child(tmp_path / "ref", "start", extra=("--fuse",))
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "'fusion': {1: 'fused', 2: 'fused', 3: 'fused', 4: 'fused'}" in reference.stdout, reference.stdout

    crashed = tmp_path / "crashed"
    for i, point in enumerate(["step:6", "ckpt-save:3", "between:4", "step:3"]):
        proc = child(crashed, "start" if i == 0 else "resume", point, extra=("--fuse",))
        assert proc.returncode == -signal.SIGKILL, f"{point}: the process was not killed there\n{proc.stderr[-3000:]}"
    final = child(crashed, "resume", extra=("--fuse",))
    assert final.returncode == 0, final.stderr[-3000:]
    assert "'fused'" in final.stdout, final.stdout

    assert_same_adapters(tmp_path / "ref", crashed, (1, 2, 3, 4))
    ref_rows, got_rows = metric_rows(tmp_path / "ref"), metric_rows(crashed)
    assert [row[:3] for row in got_rows] == [row[:3] for row in ref_rows]  # every (run, step, metric) once
    for (run, step, name, want), (*_, value) in zip(ref_rows, got_rows):
        assert value == pytest.approx(want, abs=1e-5), (run, step, name)


def decisions(directory: Path) -> tuple[list[tuple], list[tuple], int]:
    """The policy's applied ops in order, every run's final status, and how many ops are still pending."""
    from rf_notebook.store import Store

    store = Store.open(directory / "crash")
    try:
        ops = [(o.origin, o.op, o.run_id, o.new_run_id, o.reason) for o in store.ic_log() if o.outcome == "applied"]
        pending = sum(o.outcome == "pending" for o in store.ic_log())
        return ops, [(r.run_id, r.status.value) for r in store.runs()], pending
    finally:
        store.close()


@pytest.mark.parametrize(
    "policy, points",
    [
        # SH: killed at a rung before the policy ran, while it was deciding (one op logged, the rung not marked),
        # before its first op applied, and between its two ops.
        ("sh", ["rung:1", "deciding:1", "apply:1", "apply:2"]),
        # PBT: killed before its clone applied, and between the clone and the stop of the run it replaces.
        ("pbt", ["rung:1", "apply:1", "apply:2"]),
        # SH over an RFOptunaSearch: killed before the first rung's decisions, while deciding, before a proposal's
        # clone applied, and before a late run's stop: the resumed study proposes the same configs (its sampler's
        # state is kept) and ends with the same trials.
        ("sh+optuna", ["rung:1", "deciding:1", "apply:3", "apply:2", "rung:2"]),
        # An RFOptunaSearch without a policy, killed between two rounds: every run of the first has finished, the
        # second's proposals are logged, not applied.
        ("none+optuna", ["apply:1"]),
    ],
)
def test_sigkill_around_a_rungs_decision_then_resume_decides_the_same(policy, points, tmp_path):
    policy, *search = policy.split("+")
    policy = None if policy == "none" else policy
    extra = ("--optuna",) if search else ()
    reference = child(tmp_path / "ref", "start", policy=policy, extra=extra)
    assert reference.returncode == 0, reference.stderr[-3000:]
    want_ops, want_runs, _ = decisions(tmp_path / "ref")
    assert any(origin == "policy" for origin, *_ in want_ops), "the policy decided nothing: nothing was tested"

    crashed = tmp_path / "crashed"
    for i, point in enumerate(points):
        proc = child(crashed, "start" if i == 0 else "resume", point, policy=policy, extra=extra)
        assert proc.returncode == -signal.SIGKILL, f"{point}: the process was not killed there\n{proc.stderr[-3000:]}"
    final = child(crashed, "resume", policy=policy, extra=extra)
    assert final.returncode == 0, final.stderr[-3000:]
    got_ops, got_runs, pending = decisions(crashed)
    assert got_ops == want_ops
    assert got_runs == want_runs
    assert_same_adapters(tmp_path / "ref", crashed, [run_id for run_id, _ in want_runs])
    assert pending == 0
    if search:  # the study's record: every trial's params, run, intermediate values, state and value
        assert study_trials(crashed) == study_trials(tmp_path / "ref")


def study_trials(directory: Path) -> list[dict]:
    """The search's trial records, but for their op ids (a decision cut short leaves refused ops in the log)."""
    from rf_notebook.store import Store

    store = Store.open(directory / "crash")
    try:
        return [{k: v for k, v in t.items() if k != "op_id"} for t in store.meta("study")["trials"]]
    finally:
        store.close()


# -- in one process: resume after end(), clones, stopped runs, storage failures ----------------------------------


def group(lrs=(3e-3, 1e-3), max_steps=12):
    return RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=List(list(lrs)), per_device_train_batch_size=8, max_steps=max_steps
            ),
        ),
        trainer_type="SFT",
    )


@pytest.fixture(scope="module")
def data():
    return arithmetic_dataset("train", n=96), arithmetic_dataset("eval", n=16)


def steps_logged(exp, run_id, metric="loss"):
    r = exp.results()
    return r[(r.run_id == run_id) & (r.metric == metric)].step.tolist()


def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_restart_keeps_user_stops_and_resumes_warm_clones(data, tmp_path):
    exp = Experiment("restart", experiments_dir=tmp_path)
    exp.run_fit(group(max_steps=24), demo_model_fn, *data, num_chunks=3, seed=1, display=False)
    wait_for(lambda: exp.store.run(1).chunks_done >= 1)
    exp.stop(2)
    clone = exp.clone_modify(1, {"learning_rate": 5e-4}, warm_start=True)
    wait_for(lambda: clone in {r.run_id for r in exp.runs()} and steps_logged(exp, clone))
    exp.end(wait=False)  # as a kernel restart would leave it: runs unfinished, the process state gone
    assert exp.store.run(1).status is RunStatus.STOPPED

    again = Experiment("restart", experiments_dir=tmp_path)  # takes the directory over from `exp`
    with pytest.raises(RuntimeError, match="no longer holds"):
        exp.run_fit(group(max_steps=24), demo_model_fn, *data, num_chunks=3, seed=1, display=False)
    again.run_fit(group(max_steps=24), demo_model_fn, *data, num_chunks=3, seed=1, display=False, resume=True)
    assert again.wait(timeout=300)
    statuses = {r.run_id: r.status for r in again.runs()}
    assert statuses[2] is RunStatus.STOPPED  # the user's stop is kept
    assert statuses[1] is RunStatus.FINISHED and statuses[clone] is RunStatus.FINISHED
    assert steps_logged(again, 1) == list(range(1, 25))
    steps = steps_logged(again, clone)  # starts where its parent was when it was cloned, no gap, no repeat
    assert steps == list(range(steps[0], 25))
    again.resume(2)  # and the stopped run can still be resumed after the restart
    assert again.wait(timeout=300)
    assert steps_logged(again, 2) == list(range(1, 25))
    again.end(wait=False)


def test_resume_refuses_a_changed_data_set_or_search(data, tmp_path):
    exp = Experiment("changed", experiments_dir=tmp_path)
    exp.run_fit(group(max_steps=6), demo_model_fn, *data, num_chunks=2, seed=1, display=False)
    exp.end(wait=False)
    before = exp.store.metrics()
    again = Experiment("changed", experiments_dir=tmp_path)
    other_train = data[0].select(range(1, 96))
    with pytest.raises(ValueError, match=r"`train_dataset` \(content fingerprint\) is '95 rows, \w+', but it was"):
        again.run_fit(group(max_steps=6), demo_model_fn, other_train, data[1], num_chunks=2, seed=1, resume=True)
    with pytest.raises(ValueError, match=r"run 2 \('lr=1e-3'\) was started with a different config \(.*learning_rate"):
        again.run_fit(group(lrs=(3e-3, 2e-3), max_steps=6), demo_model_fn, *data, num_chunks=2, seed=1, resume=True)
    with pytest.raises(ValueError, match=r"`num_chunks` is 3, but it was started with 2"):
        again.run_fit(group(max_steps=6), demo_model_fn, *data, num_chunks=3, seed=1, resume=True)
    assert again.store.metrics() == before  # nothing lost, nothing added
    again.store.close()


def test_resume_of_an_experiment_that_never_ran(data, tmp_path):
    with pytest.raises(ValueError, match=r"experiment 'never' has no earlier run_fit to resume"):
        Experiment("never", experiments_dir=tmp_path).run_fit(
            group(), demo_model_fn, *data, num_chunks=2, seed=1, resume=True
        )
    assert not (tmp_path / "never").exists()  # nothing written


def test_a_second_process_cannot_open_a_live_experiment(data, tmp_path):
    exp = Experiment("locked", experiments_dir=tmp_path)
    exp.run_fit(group(max_steps=3), demo_model_fn, *data, num_chunks=1, seed=1, display=False)
    exp.wait(timeout=300)
    code = (
        "import sys; from rf_notebook import Experiment\n"
        f"try:\n    Experiment('locked', experiments_dir={str(tmp_path)!r})\n"
        "except RuntimeError as e:\n    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "is open in another live process" in proc.stdout
    exp.end(wait=False)


def test_a_failed_checkpoint_write_pauses_the_experiment_and_corrupts_nothing(data, tmp_path, monkeypatch):
    from rf_notebook.engine import checkpoints, torch_backend

    real = torch_backend.TorchBackend.checkpoint
    calls = {"n": 0}

    def disk_full_on_the_third(self, slot):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, slot)

    monkeypatch.setattr(torch_backend.TorchBackend, "checkpoint", disk_full_on_the_third)
    exp = Experiment("full", experiments_dir=tmp_path)
    exp.run_fit(group(), demo_model_fn, *data, num_chunks=3, seed=1, display=False)
    assert exp.wait(timeout=300)
    assert "No space left on device" in exp.store.storage_error
    assert {r.status for r in exp.runs()} == {RunStatus.STOPPED}  # paused, nothing failed
    assert exp.store.integrity() == "ok"
    for run_id in (1, 2):  # each run's last good checkpoint is complete
        point = checkpoints.latest_checkpoint(tmp_path / "full" / "runs" / str(run_id))
        assert point is not None and (point[1] / "adapter_model.safetensors").is_file()
    monkeypatch.setattr(torch_backend.TorchBackend, "checkpoint", real)  # space freed
    exp.resume(1), exp.resume(2)
    assert exp.wait(timeout=300)
    assert {r.status for r in exp.runs()} == {RunStatus.FINISHED} and exp.store.storage_error is None
    assert steps_logged(exp, 1) == list(range(1, 13))
    exp.end(wait=False)


def test_a_checkpoint_that_cannot_be_serialized_pauses_the_experiment_like_a_failed_write(data, tmp_path, monkeypatch):
    """Serializing happens on the training thread (see `checkpoints.encode`); out of memory there is a failed
    checkpoint like a full disk: the experiment pauses, no run fails."""
    from rf_notebook.engine import checkpoints

    real, calls = checkpoints.encode, {"n": 0}

    def out_of_memory_on_the_third(snapshot):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("cannot allocate 1 GiB")
        return real(snapshot)

    monkeypatch.setattr(checkpoints, "encode", out_of_memory_on_the_third)
    exp = Experiment("oom", experiments_dir=tmp_path)
    exp.run_fit(group(), demo_model_fn, *data, num_chunks=3, seed=1, display=False)
    assert exp.wait(timeout=300)
    assert "serializing the checkpoint failed: MemoryError('cannot allocate 1 GiB')" in exp.store.storage_error
    assert {r.status for r in exp.runs()} == {RunStatus.STOPPED}  # paused, nothing failed
    exp.end(wait=False)


def test_a_failed_database_write_pauses_and_recovery_rewrites_everything(data, tmp_path, monkeypatch):
    from rf_notebook import _journal

    real = _journal.Journal.put_metrics
    calls = {"n": 0}

    def fails_once(self, rows):
        calls["n"] += 1
        if calls["n"] == 5:
            raise _journal.StorageError(errno.ENOSPC, "cannot write the experiment database: database or disk is full")
        return real(self, rows)

    monkeypatch.setattr(_journal.Journal, "put_metrics", fails_once)
    exp = Experiment("dbfull", experiments_dir=tmp_path)
    exp.run_fit(group(), demo_model_fn, *data, num_chunks=3, seed=1, display=False)
    assert exp.wait(timeout=300)
    assert "disk is full" in exp.store.storage_error
    assert {r.status for r in exp.runs()} == {RunStatus.STOPPED}
    exp.resume(1), exp.resume(2)  # recover(): the database is rewritten from memory, with no hole
    assert exp.wait(timeout=300)
    exp.end(wait=False)
    in_memory = [(m.run_id, m.step, m.name) for m in exp.store.metrics()]
    exp.store.close()
    reread = Experiment("dbfull", experiments_dir=tmp_path)
    assert [(m.run_id, m.step, m.name) for m in reread.store.metrics()] == in_memory
    assert steps_logged(reread, 2) == list(range(1, 13))
    reread.store.close()


def test_an_unwritable_experiment_directory_is_a_clear_error_before_training(data, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the experiments folder should be")
    exp = Experiment("x", experiments_dir=blocker)
    with pytest.raises(OSError, match=r"cannot create or write the experiment directory '.*not-a-dir/x'"):
        exp.run_fit(group(), demo_model_fn, *data, num_chunks=2, seed=1, display=False)
    assert exp.runs() == [] and blocker.read_text().startswith("a file")


def test_a_policy_makes_the_same_decisions_after_a_restart(data, tmp_path):
    from rf_notebook.policies import SuccessiveHalving

    lrs = (3e-3, 1e-3, 1e-5, 1e-6)

    def ops(exp):
        return [(o.origin, o.op, o.run_id, o.outcome, o.reason) for o in exp.store.ic_log()]

    ref = Experiment("policy-ref", experiments_dir=tmp_path)
    ref.run_fit(
        group(lrs, 16), demo_model_fn, *data, num_chunks=4, seed=2, display=False, policy=SuccessiveHalving(eta=2)
    )
    assert ref.wait(timeout=300)
    expected = ops(ref)
    assert len(expected) >= 3  # halvings at rungs 1 and 2
    ref.end(wait=False)

    exp = Experiment("policy", experiments_dir=tmp_path)
    exp.run_fit(
        group(lrs, 16), demo_model_fn, *data, num_chunks=4, seed=2, display=False, policy=SuccessiveHalving(eta=2)
    )
    wait_for(lambda: len(ops(exp)) >= 2 and max(r.chunks_done for r in exp.runs()) >= 2)
    exp.end(wait=False)  # interrupted after the first halving
    again = Experiment("policy", experiments_dir=tmp_path)
    again.run_fit(
        group(lrs, 16),
        demo_model_fn,
        *data,
        num_chunks=4,
        seed=2,
        display=False,
        policy=SuccessiveHalving(eta=2),
        resume=True,
    )
    assert again.wait(timeout=300)
    assert ops(again) == expected
    assert [r.status for r in again.runs()] == [r.status for r in ref.runs()]
    again.end(wait=False)
