"""Full garbage collections: the engine runs them itself, when memory is wanted, not once per run's `train()`.

transformers' `train()` starts with `accelerator.free_memory()`, a full `gc.collect()` that walks every live run's
trainer: one per run made the cost per run grow with the number of runs (a step at 64 runs was 6.5% slower than at
4 in `bench.scale`). rf_notebook's trainers keep the rest of `free_memory` and skip its collection."""

from __future__ import annotations

import gc
import sys

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn


def test_starting_a_run_does_not_collect_garbage(monkeypatch, tmp_path):
    callers: list[str] = []
    collect = gc.collect

    def counting(*args):
        callers.append(sys._getframe(1).f_globals.get("__name__", "?"))
        return collect(*args)

    monkeypatch.setattr(gc, "collect", counting)
    search = RFGridSearch(
        RFModelConfig(
            model_name=DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=List([1e-3, 3e-4, 1e-4]), per_device_train_batch_size=8, max_steps=4
            ),
        ),
        "SFT",
    )
    exp = Experiment("gc", experiments_dir=tmp_path)
    exp.run_fit(search, demo_model_fn, arithmetic_dataset("train", n=32), None, num_chunks=2, seed=0)
    assert exp.wait(timeout=300)
    assert [r.status.value for r in exp.runs()] == ["finished"] * 3
    exp.end()
    assert "accelerate.utils.memory" not in callers, callers  # before: one per run's train()
    assert callers == ["rf_notebook.engine.torch_backend"], callers  # once, when the experiment frees its models


def test_runs_a_policy_stops_together_are_unloaded_with_one_collection(monkeypatch, tmp_path):
    """Successive halving stopping 3 of 4 runs at a rung: they stay stopped and are unloaded (checkpointed and
    freed) together, with one garbage collection, not one each (10 of 16 cost 3 s of a 17 s sweep)."""
    from rf_notebook.policies import SuccessiveHalving

    collections: list[int] = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(1) or collect(*args))
    search = RFGridSearch(
        RFModelConfig(
            model_name=DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=List([3e-3, 1e-3, 1e-5, 1e-6]), per_device_train_batch_size=8, max_steps=16
            ),
        ),
        "SFT",
    )
    exp = Experiment("gc-policy", experiments_dir=tmp_path)
    train, evl = arithmetic_dataset("train", n=128), arithmetic_dataset("eval", n=8)
    exp.run_fit(search, demo_model_fn, train, evl, num_chunks=8, seed=0, policy=SuccessiveHalving(eta=4))
    assert exp.wait(timeout=300)
    statuses = sorted(r.status.value for r in exp.runs())
    assert statuses == ["finished", "stopped", "stopped", "stopped"], statuses
    assert exp.stats()["switches"] > 0
    during = len(collections)
    exp.end()
    assert during == 1, during  # the three stopped runs, unloaded at rung 3 (two rungs after their stop)
    assert len(collections) == 2  # and the experiment's end
