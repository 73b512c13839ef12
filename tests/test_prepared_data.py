"""Runs whose data preparation would be the same share one prepared copy (`trainers._prepared`): tokenized once,
not once per run, and not again by a later `run_fit` on the same data and tokenizer; a run that prepares
differently gets its own. (That shared data trains exactly as each run's own would is the exactness and conformance
suites' job: their runs share it.)"""

from __future__ import annotations

import inspect
import re

import pytest
from trl import DPOTrainer, SFTTrainer

from rf_notebook import Experiment, List, RFDPOConfig, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn, preference_dataset
from rf_notebook.trainers import dpo
from rf_notebook.trainers._prepared import clear_shared


@pytest.fixture(autouse=True)
def nothing_prepared_before():
    """Each test counts preparations from nothing: what earlier tests in the process prepared is forgotten."""
    clear_shared()
    yield
    clear_shared()


@pytest.fixture
def sft_prepared(monkeypatch) -> list[tuple[str, int | None]]:
    """(data set name, max_length) of every data set SFTTrainer prepares."""
    prepared: list[tuple[str, int | None]] = []
    original = SFTTrainer._prepare_dataset

    def counting(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        prepared.append((dataset_name, args.max_length))
        return original(self, dataset, processing_class, args, packing, formatting_func, dataset_name)

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", counting)
    return prepared


def test_runs_that_prepare_alike_tokenize_once(sft_prepared, tmp_path):
    prepared = sft_prepared

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


def sft_sweep(formatting_func=None) -> RFGridSearch:
    return RFGridSearch(
        RFModelConfig(
            model_name=DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, target_modules="all-linear"),
            training_args=RFSFTConfig(max_steps=4, per_device_train_batch_size=8, learning_rate=List([1e-3, 3e-4])),
            formatting_func=formatting_func,
        ),
        trainer_type="SFT",
    )


def losses(exp: Experiment) -> dict[str, list[float]]:
    results = exp.results()
    rows = results[results.metric == "loss"].sort_values("step")
    return {run.name: rows[rows.run_id == run.run_id].value.tolist() for run in exp.runs()}


def test_a_later_run_fit_reuses_what_an_earlier_one_prepared(sft_prepared, tmp_path):
    train, evl = arithmetic_dataset("train", n=64), arithmetic_dataset("eval", n=8)

    def fit(name: str, create_model_fn=demo_model_fn, search=None) -> dict[str, list[float]]:
        exp = Experiment(name, experiments_dir=tmp_path)
        exp.run_fit(search or sft_sweep(), create_model_fn, train, evl, seed=0, display=False)
        assert exp.wait(timeout=300)
        assert [r.status.value for r in exp.runs()] == ["finished"] * 2, [r.error for r in exp.runs()]
        trained = losses(exp)
        exp.end()
        return trained

    first = fit("first")
    assert len(sft_prepared) == 2  # train and eval, once for both runs
    # A new experiment, a new base and tokenizer loaded from the same files, data sets equal by content: no preparation,
    # and the runs train exactly as they did on their own preparation.
    again = fit("again")
    assert len(sft_prepared) == 2 and again == first

    def other_template(model_config):
        model, tokenizer = demo_model_fn(model_config)
        tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
        return model, tokenizer

    fit("other-template", other_template)  # a tokenizer that renders otherwise prepares its own
    assert len(sft_prepared) == 4

    def swap(row):
        return {"completion": [{"role": "assistant", "content": row["completion"][0]["content"][::-1]}]}

    fit("formatted", search=sft_sweep(formatting_func=swap))
    assert len(sft_prepared) == 6
    fit("formatted-again", search=sft_sweep(formatting_func=swap))
    assert len(sft_prepared) == 6  # what the function made is named by its rows: the same rows, nothing to prepare

    def unchanged(row):
        return {"completion": row["completion"]}

    fit("formatted-unchanged", search=sft_sweep(formatting_func=unchanged))  # the first fit's rows: nothing new
    assert len(sft_prepared) == 6

    def exclaimed(row):
        return {"completion": [{"role": "assistant", "content": row["completion"][0]["content"] + "!"}]}

    fit("formatted-otherwise", search=sft_sweep(formatting_func=exclaimed))  # other rows: prepared
    assert len(sft_prepared) == 8


def test_a_run_that_changes_its_tokenizer_leaves_the_others_preparations_reusable(sft_prepared, tmp_path):
    """SFTTrainer sets a run's `eos_token` on the tokenizer it is given: that run gets a copy, so the run built after
    it prepares with the base's own eos token, and a later run_fit of that config finds that preparation; the
    changed copy's preparation is never found by it."""
    train, evl = arithmetic_dataset("train", n=64), arithmetic_dataset("eval", n=8)

    def config(**args):
        return RFModelConfig(
            model_name=DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, target_modules="all-linear"),
            training_args=RFSFTConfig(max_steps=2, per_device_train_batch_size=8, **args),
        )

    both = RFGridSearch(List([config(learning_rate=1e-3, eos_token="<|im_start|>"), config()]), trainer_type="SFT")
    exp = Experiment("changed", experiments_dir=tmp_path)
    exp.run_fit(both, demo_model_fn, train, evl, seed=0, display=False)
    assert exp.wait(timeout=300)
    exp.end()
    assert len(sft_prepared) == 4
    alone = Experiment("alone", experiments_dir=tmp_path)
    alone.run_fit(RFGridSearch(config(), trainer_type="SFT"), demo_model_fn, train, evl, seed=0, display=False)
    assert alone.wait(timeout=300)
    alone.end()
    assert len(sft_prepared) == 4  # the second run's preparation, made with the base tokenizer's own eos token


def dpo_config(**args) -> RFModelConfig:
    return RFModelConfig(
        model_name=DEMO_MODEL,
        peft_config=RFLoraConfig(r=4, target_modules="all-linear"),
        training_args=RFDPOConfig(**{"max_steps": 2, "per_device_train_batch_size": 4, **args}),
    )


def test_dpo_runs_that_prepare_alike_tokenize_once(monkeypatch, tmp_path):
    prepared: list[tuple[str, int | None]] = []
    original = DPOTrainer._prepare_dataset

    def counting(self, dataset, processing_class, args, dataset_name):
        prepared.append((dataset_name, args.max_length))
        return original(self, dataset, processing_class, args, dataset_name)

    monkeypatch.setattr(DPOTrainer, "_prepare_dataset", counting)
    search = RFGridSearch(
        List(
            [
                dpo_config(beta=0.1, learning_rate=1e-3),
                dpo_config(beta=0.5, loss_type="ipo", learning_rate=3e-4, per_device_train_batch_size=2),
                dpo_config(beta=0.1, max_length=24),  # truncates differently: its own preparation
            ]
        ),
        trainer_type="DPO",
    )
    exp = Experiment("dpo-prepared", experiments_dir=tmp_path)
    exp.run_fit(search, demo_model_fn, preference_dataset("train", n=16), preference_dataset("eval", n=4), seed=0)
    built = [slot.trainer for slot in exp._engine._slots.values()]
    assert exp.wait(timeout=300)
    assert [r.status.value for r in exp.runs()] == ["finished"] * 3, [r.error for r in exp.runs()]
    assert sorted(prepared, key=str) == sorted([("train", 1024), ("eval", 1024), ("train", 24), ("eval", 24)], key=str)
    # every trainer is TRL's own class, with nothing of the routing left on it
    assert all(type(trainer) is DPOTrainer and "_prepare_dataset" not in vars(trainer) for trainer in built)
    exp.end()


def test_dpo_preparation_reads_only_the_arguments_in_its_key():
    """`dpo.PREPARATION_ARGS` must name every argument TRL's DPO preparation reads, and the tokenizer everything else
    it reads of the trainer (besides the vision flag that skips it): a TRL that reads more fails here."""
    source = inspect.getsource(DPOTrainer._prepare_dataset)
    assert set(re.findall(r"\bargs\.(\w+)", source)) == set(dpo.PREPARATION_ARGS)
    assert set(re.findall(r"\bself\.(\w+)", source)) <= {"_tokenizer"}
