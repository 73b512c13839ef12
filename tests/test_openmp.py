"""The caller's idle OpenMP pool is released when training starts and when the caller waits (`engine._openmp`):
with it, the scheduler thread's OpenMP team sleeps between ops instead of spinning (see the module docstring)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from rf_notebook import Experiment, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn
from rf_notebook.engine import _openmp

CHILD = textwrap.dedent(
    """
    import os, torch
    from rf_notebook.engine._openmp import release_thread_pool

    def threads():
        return len(os.listdir("/proc/self/task"))

    torch.set_num_threads(2)
    before = threads()
    torch.ones(4_000_000).add_(1)  # a parallel op: this thread's OpenMP pool (one more worker)
    with_pool = threads()
    released = release_thread_pool()
    print(before, with_pool, threads(), released)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp (torch's Linux wheels) only")
def test_release_frees_the_calling_thread_s_workers():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True)
    before, with_pool, after, released = out.stdout.split()
    assert int(with_pool) == int(before) + 1  # the pool's worker
    assert released == "True" and int(after) == int(before)


def test_run_fit_and_wait_release_the_caller_s_pool(monkeypatch, tmp_path):
    calls: list[int] = []
    release = _openmp.release_thread_pool
    monkeypatch.setattr(_openmp, "release_thread_pool", lambda: calls.append(threading.get_ident()) or release())
    exp = Experiment("omp", experiments_dir=tmp_path)
    search = RFGridSearch(
        RFModelConfig(
            model_name=DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, target_modules="all-linear"),
            training_args=RFSFTConfig(max_steps=4, per_device_train_batch_size=8),
        ),
        trainer_type="SFT",
    )
    exp.run_fit(search, demo_model_fn, arithmetic_dataset("train", n=32), num_chunks=2, seed=0)
    assert calls == [threading.get_ident()]  # on the caller's thread, once, when the engine started
    assert exp.wait(timeout=300)
    assert calls == [threading.get_ident()] * 2
    assert {r.status.value for r in exp.runs()} == {"finished"}
    exp.end()
