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
