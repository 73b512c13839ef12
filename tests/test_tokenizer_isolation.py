"""A trainer's constructor may change the tokenizer and the model config it is given (TRL's SFTTrainer sets
`eos_token` / `pad_token` from its config, loads `chat_template_path`, writes the token ids into the model's config
and generation config). Plain TRL gives every trainer its own; rf_notebook's runs share one base: each run still
trains as its config alone with plain TRL, whatever the runs built before it changed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_exactness import TARGETS, _train_alone

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import arithmetic_dataset, demo_model_fn

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}"


@pytest.fixture(scope="module")
def train():
    from datasets import Dataset

    rows = arithmetic_dataset("train", n=48)  # as plain text: TRL appends the tokenizer's eos_token to each row
    return Dataset.from_dict({"text": [f"{r['prompt'][0]['content']}={r['completion'][0]['content']}" for r in rows]})


def test_runs_that_change_the_tokenizer_do_not_change_the_others(train, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    args = [
        {"learning_rate": 2e-3},  # built before the others: its trainer holds the tokenizer it was given
        {"eos_token": "<|im_start|>"},  # TRL sets the eos of the tokenizer it is given to it
        {"chat_template_path": str(template)},
        {"learning_rate": 1e-3},  # must still see the base's own eos and chat template
    ]
    configs = [
        RFModelConfig(
            "rf-demo/tiny-arith",
            peft_config=RFLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
            training_args=RFSFTConfig(
                **{"learning_rate": 3e-3, "per_device_train_batch_size": 8, "max_steps": 4, **extra}
            ),
        )
        for extra in args
    ]
    exp = Experiment("tokenizers", experiments_dir=tmp_path)
    exp.run_fit(RFGridSearch(List(configs), "SFT"), demo_model_fn, train, None, num_chunks=2, seed=3, display=False)
    assert exp.wait(timeout=600)
    runs = exp.runs()
    assert [r.status.value for r in runs] == ["finished"] * 4, [r.error for r in runs]
    results = exp.results()
    for run in runs:
        weights, expected = _train_alone(run.config, train)
        logged = results[(results.run_id == run.run_id) & (results.metric == "loss")].sort_values("step")
        torch.testing.assert_close(
            torch.tensor(logged.value.tolist()), torch.tensor(expected), rtol=1e-5, atol=0, msg=run.name
        )
        exported = load_file(exp.export(run.run_id, tmp_path / f"run{run.run_id}") / "adapter_model.safetensors")
        for key, value in weights.items():
            torch.testing.assert_close(exported[key], value, atol=1e-5, rtol=0, msg=f"{run.name}: {key}")
    exp.end(wait=False)
