"""RapidFire AI fit notebooks run unchanged but for their imports: ported copies of their shapes (SFT with a
formatting_func and generation-based compute_metrics, DPO, GRPO), written here on the demo model and local data,
plus the nested-List expansion and the mapping access a create_model_fn uses."""

from __future__ import annotations

import warnings

import datasets
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from rf_notebook import (
    Experiment,
    List,
    Range,
    RFDPOConfig,
    RFGridSearch,
    RFGRPOConfig,
    RFLoraConfig,
    RFModelConfig,
    RFRandomSearch,
    RFSFTConfig,
)
from rf_notebook.configs import LegacyFieldWarning
from rf_notebook.demo import MODEL_DIR
from rf_notebook.demo._data import arithmetic_pairs

MODEL = str(MODEL_DIR)  # a local model folder, loaded as a hub id would be


# -- the shapes of RapidFire's tutorials ------------------------------------------------------------------------


def sample_create_model(model_config):
    """As in RapidFire's tutorials: item access on the model config, returns (model, tokenizer)."""
    model_name = model_config["model_name"]
    model_type = model_config["model_type"]
    model_kwargs = model_config["model_kwargs"]
    if model_type == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(model_name, **model_kwargs)
    else:
        raise ValueError(model_type)
    tokenizer = AutoTokenizer.from_pretrained(model_name, **model_config["tokenizer_kwargs"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (model, tokenizer)


SYSTEM_PROMPT = "Answer with the sum only."
CALLS = {"n": 0}


def sample_formatting_function(row):
    CALLS["n"] += 1
    return {
        "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["instruction"]}],
        "completion": [{"role": "assistant", "content": row["response"]}],
    }


def sample_compute_metrics(eval_preds):
    predictions, references = eval_preds  # decoded texts
    assert all(isinstance(p, str) for p in predictions) and all(isinstance(r, str) for r in references)
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)
    return {"exact": round(exact, 4), "answered": len(predictions)}


def raw_qa(split, n):
    """An instruction / response data set, as the tutorials load from the hub."""
    return datasets.Dataset.from_list(
        [{"instruction": f"{a}+{b}", "response": str(a + b)} for a, b in arithmetic_pairs(split)[:n]]
    )


def test_sft_chatqa_shape(tmp_path):
    peft_configs = List(
        [
            RFLoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], bias="none"),
            RFLoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias="none"),
        ]
    )
    config_set = List(
        [
            RFModelConfig(
                model_name=MODEL,
                peft_config=peft_configs,
                training_args=RFSFTConfig(
                    learning_rate=3e-3,
                    lr_scheduler_type="linear",
                    per_device_train_batch_size=8,
                    per_device_eval_batch_size=8,
                    max_steps=8,
                    logging_steps=2,
                    eval_strategy="steps",
                    eval_steps=3,
                    bf16=True,  # written for a GPU
                ),
                model_type="causal_lm",
                model_kwargs={"device_map": "auto", "dtype": "auto"},
                tokenizer_kwargs={"padding_side": "left"},
                formatting_func=sample_formatting_function,
                compute_metrics=sample_compute_metrics,
                generation_config={"max_new_tokens": 4, "do_sample": False},
            )
        ]
    )
    config_group = RFGridSearch(configs=config_set, trainer_type="SFT")
    train, evl = raw_qa("train", 64), raw_qa("eval", 8)
    experiment = Experiment(experiment_name="exp1-chatqa-lite", mode="fit", experiment_path=tmp_path)
    CALLS["n"] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        experiment.run_fit(config_group, sample_create_model, train, evl, num_shards=2, seed=42)
    device = [w for w in caught if "cannot honour" in str(w.message)]
    assert len(device) == 1, [str(w.message) for w in caught]
    assert "bf16=True" in str(device[0].message) and "device_map='auto'" in str(device[0].message)
    assert CALLS["n"] == (64 + 1) + (8 + 1)  # once per row (plus a first-row check), not once per run
    experiment.end()  # the tutorial's next cell (its run_fit blocked): every run trains to its end first

    info = experiment.get_runs_info()
    assert list(info.status) == ["finished", "finished"] and list(info.source) == ["initial", "initial"]
    results = experiment.get_results()
    assert {"run_id", "step", "loss", "eval_loss", "eval_exact", "eval_answered"} <= set(results.columns)
    eval_steps = sorted(results[(results.run_id == 1) & results.eval_exact.notna()].step)
    assert eval_steps == [3, 4, 6, 8]  # eval_strategy's steps 3 and 6, and the chunk ends 4 and 8
    assert (results[results.eval_answered.notna()].eval_answered == 8).all()
    assert sorted(results[(results.run_id == 1) & results.loss.notna()].step) == [2, 4, 6, 8]  # logging_steps=2
    run_1 = results[results.run_id == 1].set_index("step")
    assert list(results.columns[:4]) == ["run_id", "step", "chunk", "epoch"]
    assert all(chunk == (1 if step <= 4 else 2) for step, chunk in run_1.chunk.items())  # 2 chunks of 4 steps
    assert run_1.epoch[4] == 0.5 and run_1.epoch[8] == 1.0  # 64 rows / batch 8 = 8 steps per epoch
    assert experiment.best_run("exact", "max").run_id in (1, 2)  # the metric by the name compute_metrics gave it


def test_dpo_shape(tmp_path):
    pairs = arithmetic_pairs("train")[:48]
    train = datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"{a}+{b}"}],
                "chosen": [{"role": "assistant", "content": str(a + b)}],
                "rejected": [{"role": "assistant", "content": str(a + b + 1)}],
            }
            for a, b in pairs
        ]
    )
    with pytest.warns(LegacyFieldWarning):  # fields of the TRL / transformers versions RapidFire pins
        base_dpo_config = RFDPOConfig(
            beta=0.1,
            loss_type="sigmoid",
            per_device_train_batch_size=8,
            max_steps=4,
            learning_rate=1e-3,
            warmup_ratio=0.1,
            max_prompt_length=32,
            max_completion_length=8,
            optim="adamw_8bit",
            model_adapter_name="default",
            ref_adapter_name="reference",
            force_use_ref_model=False,
            save_strategy="chunk",
        )
    base_lora_config = RFLoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    # the tutorial's variants: copies changed by attribute assignment
    lora_config_2, dpo_config_2 = base_lora_config.copy(), base_dpo_config.copy()
    lora_config_2.r = 16
    dpo_config_2.beta = 0.5
    dpo_config_2.loss_type = "robust"
    config_set = List(
        [
            *(
                RFModelConfig(
                    model_name=MODEL,
                    peft_config=lora,
                    training_args=dpo,
                    model_type="causal_lm",
                    model_kwargs={},
                    ref_model_name=None,
                    tokenizer_kwargs={},
                )
                for lora, dpo in ((base_lora_config, base_dpo_config), (lora_config_2, dpo_config_2))
            ),
            RFModelConfig(  # a reference model named explicitly (other loading kwargs: loaded once, separately)
                model_name=MODEL,
                peft_config=RFLoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                training_args=RFDPOConfig(beta=0.1, per_device_train_batch_size=8, max_steps=4, learning_rate=1e-3),
                ref_model_name=MODEL,
                ref_model_type="causal_lm",
                ref_model_kwargs={"dtype": "float32"},
            ),
        ]
    )
    experiment = Experiment(experiment_name="exp-dpo", mode="fit", experiment_path=tmp_path)
    experiment.run_fit(
        RFGridSearch(configs=config_set, trainer_type="DPO"), sample_create_model, train, None, num_chunks=2
    )
    slots = experiment._engine._slots
    assert slots[1].trainer.ref_model is None  # the shared base, adapter disabled
    reference = slots[3].trainer.ref_model
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    experiment.end()
    info = experiment.get_runs_info()
    assert set(info.status) == {"finished"} and set(info.completed_steps) == {4}
    trained = [
        (c["peft_config"]["r"], c["training_args"]["beta"], c["training_args"].get("loss_type")) for c in info.config
    ]
    assert trained == [(8, 0.1, "sigmoid"), (16, 0.5, "robust"), (8, 0.1, None)]  # each its own config
    assert {c["training_args"]["optim"] for c in info.config[:2]} == {"adamw_torch"}  # no bitsandbytes here
    assert info.config[0]["training_args"]["max_length"] == 40 and info.config[0]["training_args"]["warmup_steps"]
    assert "rewards/accuracies" in experiment.get_results().columns


def correctness_reward_func(prompts, completions, answer, **kwargs) -> list[float]:
    responses = [completion[0]["content"] for completion in completions]
    return [1.0 if r.strip() == a else 0.0 for r, a in zip(responses, answer)]


def length_reward_func(completions, **kwargs) -> list[float]:
    return [-0.1 * abs(len(c[0]["content"]) - 2) for c in completions]


def test_grpo_shape(tmp_path):
    def format_row(row):
        return {
            "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["question"]}],
            "question": row["question"],
            "answer": row["answer"].split("####")[-1].strip(),
        }

    raw = datasets.Dataset.from_list(
        [{"question": f"{a}+{b}", "answer": f"{a}+{b} is #### {a + b}"} for a, b in arithmetic_pairs("train")[:16]]
    )
    config = RFModelConfig(
        model_name=MODEL,
        peft_config=RFLoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        training_args=RFGRPOConfig(
            learning_rate=List([1e-3, 3e-4]),
            num_generations=2,
            per_device_train_batch_size=4,
            max_prompt_length=64,
            max_completion_length=4,
            max_steps=4,
            warmup_ratio=0.1,
            optim="adamw_8bit",
        ),
        formatting_func=format_row,
        reward_funcs=[correctness_reward_func, length_reward_func],
        model_type="causal_lm",
        model_kwargs={"load_in_4bit": False, "device_map": "auto", "torch_dtype": "float16", "use_cache": False},
        tokenizer_kwargs={},
    )
    experiment = Experiment(experiment_name="exp-grpo", mode="fit", experiment_path=tmp_path)
    experiment.run_fit(RFGridSearch(configs=config, trainer_type="GRPO"), sample_create_model, raw, None, num_chunks=2)
    experiment.end()
    results = experiment.get_results()
    info = experiment.get_runs_info()
    assert set(info.status) == {"finished"} and set(info.completed_steps) == {4}
    assert [c["training_args"]["learning_rate"] for c in info.config] == [1e-3, 3e-4]
    assert {"rewards/correctness_reward_func/mean", "rewards/length_reward_func/mean"} <= set(results.columns)


# -- units -------------------------------------------------------------------------------------------------------


def test_nested_lists_expand_to_their_product_in_order():
    lora = List([RFLoraConfig(r=8), RFLoraConfig(r=32, target_modules=["q_proj"])])
    group = RFGridSearch(
        configs=List(
            [
                RFModelConfig(MODEL, peft_config=lora, training_args=RFSFTConfig(learning_rate=List([1e-3, 1e-4]))),
                RFModelConfig(MODEL, peft_config=RFLoraConfig(r=List([4, 2])), training_args=RFSFTConfig()),
            ]
        ),
        trainer_type="SFT",
    )
    runs = group.expand()
    got = [(r.params["peft_config.r"], r.params.get("training_args.learning_rate")) for r in runs]
    assert got == [(8, 1e-3), (8, 1e-4), (32, 1e-3), (32, 1e-4), (4, None), (2, None)]
    assert runs[2].model_config.peft_config.kwargs["target_modules"] == ["q_proj"]
    sampled = RFRandomSearch(
        configs=List(
            [
                RFModelConfig(
                    MODEL, peft_config=lora, training_args=RFSFTConfig(learning_rate=Range(1e-5, 1e-3, log=True))
                )
            ]
        ),
        trainer_type="SFT",
        num_runs=5,
        seed=7,
    ).expand()
    assert len(sampled) == 5 and all(1e-5 <= r.params["training_args.learning_rate"] <= 1e-3 for r in sampled)


def test_range_step_keeps_samples_on_its_grid():
    import random

    rng = random.Random(0)
    floats = {Range(1e-4, 1e-3, step=1e-4).sample(rng) for _ in range(200)}
    assert all(abs(v / 1e-4 - round(v / 1e-4)) < 1e-6 and 1e-4 <= v <= 1e-3 + 1e-12 for v in floats)
    assert {Range(8, 64, step=8).sample(rng) for _ in range(200)} == set(range(8, 65, 8))
    with pytest.raises(ValueError, match=r"Range step is 0, but must be a number in \(0, end - start\]"):
        Range(1, 2, step=0)


def test_model_config_mapping_access():
    config = RFModelConfig(MODEL, model_kwargs={"dtype": "float32"}, ref_model_name="ref/model")
    assert config["model_name"] == config.model_name == MODEL
    assert config["model_type"] == "causal_lm"
    assert config["model_kwargs"] == {"dtype": "float32"}
    assert config["tokenizer_kwargs"] == {}  # unset kwargs read as {} so that **model_config[...] works
    assert config["ref_model_config"] == {"model_name": "ref/model", "model_type": "causal_lm", "model_kwargs": {}}
    assert config.get("num_gpus", 1) == 1 and "generation_config" in config
    with pytest.raises(KeyError, match="RFModelConfig has no 'modle_name'"):
        config["modle_name"]


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: Experiment("x", mode="evals"), ValueError, r"`mode` is 'evals', but rf_notebook runs fine-tuning"),
        (lambda: Experiment("x", mode="fit", num_gpus=4), ValueError, r"`num_gpus` is 4, but rf_notebook trains"),
        (
            lambda: RFGridSearch(RFModelConfig(MODEL, generation_config={"max_new_token": 4}), trainer_type="SFT"),
            ValueError,
            r"generation_config has 'max_new_token', which is not a generate\(\) argument; did you mean 'max_new_tokens'",
        ),
        (
            lambda: RFGridSearch(RFModelConfig(MODEL, ref_model_name=MODEL), trainer_type="SFT"),
            ValueError,
            r"RFModelConfig.ref_model_name is .*, but only DPO runs have a reference model",
        ),
        (
            lambda: RFGridSearch(RFModelConfig(MODEL, num_gpus=2), trainer_type="SFT"),
            ValueError,
            r"RFModelConfig.num_gpus is 2, but rf_notebook trains every run on the process's one device",
        ),
    ],
)
def test_rapidfire_fields_are_validated(make, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        make()


def test_what_a_gpu_notebook_asks_is_decided_before_anything_trains(tmp_path):
    """GRPO lite's model_kwargs and the tutorials' 8-bit optimizer, on a machine without a GPU or bitsandbytes:
    adjusted up front, with the one device warning telling the truth about what the base is loaded in."""
    import torch

    from rf_notebook.control.prepare import Preparer

    experiment = Experiment("gpu-notebook", experiments_dir=tmp_path)
    asked = RFModelConfig(
        model_name=MODEL,
        model_kwargs={"load_in_4bit": False, "load_in_8bit": True, "device_map": "auto", "torch_dtype": torch.float16},
    )
    preparer = Preparer(experiment.path)
    args, adjusted = preparer.fit_device({"optim": "adamw_8bit", "bf16": True}, asked, on_gpu=False)
    assert args == {"optim": "adamw_torch", "bf16": False}
    assert adjusted.model_kwargs == {"torch_dtype": "float32"}  # nothing transformers 5 would refuse
    assert asked.model_kwargs["load_in_8bit"] is True  # the user's config is untouched
    said = "; ".join(preparer.device_changes)
    for part in (
        "bf16=True (this machine has no GPU: trained in float32)",
        "model_kwargs torch_dtype=float16 (no GPU: the base is loaded in float32)",
        "model_kwargs load_in_8bit=True (this machine has no GPU: the base is loaded unquantized)",
        "optim='adamw_8bit' (this machine has no GPU: adamw_torch)",
    ):
        assert part in said, said
    model, _ = sample_create_model(adjusted)  # the tutorial's own loader takes the adjusted kwargs
    assert next(model.parameters()).dtype == torch.float32
    experiment.end(wait=False)
