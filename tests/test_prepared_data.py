"""SFT runs whose data preparation would be the same share one prepared copy (`trainers.sft.preparation_key`):
tokenized once per experiment, not once per run; a run that prepares differently gets its own. (That shared data
trains exactly as each run's own would is the exactness suite's job: its runs share it.)"""

from __future__ import annotations

from trl import SFTTrainer

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn


def test_runs_that_prepare_alike_tokenize_once(monkeypatch, tmp_path):
    prepared: list[tuple[str, int | None]] = []
    original = SFTTrainer._prepare_dataset

    def counting(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        prepared.append((dataset_name, args.max_length))
        return original(self, dataset, processing_class, args, packing, formatting_func, dataset_name)

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", counting)

    def config(**args):
        return RFModelConfig(
            model_name=DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, target_modules="all-linear"),
            training_args=RFSFTConfig(max_steps=4, **{"per_device_train_batch_size": 8, **args}),
        )

    search = RFGridSearch(
        List(
            [
                config(learning_rate=1e-3),
                config(learning_rate=3e-4, per_device_train_batch_size=4, lr_scheduler_type="cosine"),
                config(learning_rate=1e-3, max_length=48),  # truncates differently: its own preparation
                config(
                    learning_rate=1e-3, packing=True, max_length=64, per_device_train_batch_size=4
                ),  # packed: not shared
                config(learning_rate=3e-4, packing=True, max_length=64, per_device_train_batch_size=4),
            ]
        ),
        trainer_type="SFT",
    )
    exp = Experiment("prepared", experiments_dir=tmp_path)
    exp.run_fit(search, demo_model_fn, arithmetic_dataset("train", n=64), arithmetic_dataset("eval", n=8), seed=0)
    assert exp.wait(timeout=300)
    assert [r.status.value for r in exp.runs()] == ["finished"] * 5
    expected = [("train", 1024), ("eval", 1024), ("train", 48), ("eval", 48)] + [("train", 64), ("eval", 64)] * 2
    assert sorted(prepared, key=str) == sorted(expected, key=str)
    new = exp.clone_modify(1, {"learning_rate": 5e-4})  # a clone reuses the prepared data as well
    assert exp.wait(timeout=300)
    assert exp.run(new).status.value == "finished" and len(prepared) == len(expected)
    exp.end()
