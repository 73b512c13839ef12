"""DPO runs of one base share the reference forward of each batch (`trainers.dpo.share_reference_forward`): runs
that see the same batches compute the reference log-probabilities once between them, and train exactly as they do
when each computes its own. (That each equals plain TRL alone is `test_conformance`'s DPO case, whose two runs
share their batches.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from trl import DPOTrainer

from rf_notebook import Experiment, List, RFDPOConfig, RFGridSearch, RFLoraConfig, RFModelConfig
from rf_notebook.demo import DEMO_MODEL, demo_model_fn, preference_dataset
from rf_notebook.trainers import dpo

STEPS = 4


@pytest.fixture
def reference_forwards(monkeypatch) -> list[bool]:
    """The mode (training or not) of every reference forward the trainers do for rf_notebook's cache."""
    calls: list[bool] = []
    original = DPOTrainer.compute_ref_log_probs

    def counting(self, model, inputs):
        calls.append(model.training)
        return original(self, model, inputs)

    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", counting)
    return calls


def fit(tmp_path, name: str, model_fn=demo_model_fn, **args) -> tuple[Experiment, dict[str, list[float]], dict]:
    search = RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
            training_args=RFDPOConfig(
                **{
                    "beta": List([0.1, 0.5]),
                    "learning_rate": List([3e-3, 1e-3]),
                    "per_device_train_batch_size": 4,
                    "max_steps": STEPS,
                    **args,
                }
            ),
        ),
        trainer_type="DPO",
    )
    exp = Experiment(name, experiments_dir=tmp_path)
    exp.run_fit(search, model_fn, preference_dataset("train", n=16), preference_dataset("eval", n=4), seed=3)
    assert exp.wait(timeout=600)
    runs = exp.runs()
    assert [r.status.value for r in runs] == ["finished"] * 4, [r.error for r in runs]
    results = exp.results()
    losses = {
        r.name: results[(results.run_id == r.run_id) & (results.metric.isin(["loss", "eval_loss"]))]
        .sort_values(["step", "metric"])
        .value.tolist()
        for r in runs
    }
    weights = {
        r.name: load_file(exp.export(r.run_id, tmp_path / name / str(r.run_id)) / "adapter_model.safetensors")
        for r in runs
    }
    return exp, losses, weights


def test_runs_that_see_the_same_batches_do_one_reference_forward_each(reference_forwards, monkeypatch, tmp_path):
    exp, shared_losses, shared_weights = fit(tmp_path, "shared")
    exp.end()
    # 4 runs x 4 steps, and 4 runs x 4 chunk-end evaluations of one eval batch: one forward per distinct batch
    assert reference_forwards.count(True) == STEPS and reference_forwards.count(False) == 1

    reference_forwards.clear()
    monkeypatch.setattr(dpo, "share_reference_forward", lambda trainer: None)  # each run's own, inside TRL's loss
    exp, own_losses, own_weights = fit(tmp_path, "own")
    exp.end()
    assert reference_forwards == []
    assert own_losses == shared_losses  # bit for bit: the same forward, only done once
    for name, weights in own_weights.items():
        for key, value in weights.items():
            assert torch.equal(value, shared_weights[name][key]), f"{name}: {key}"


def attention_dropout(model_config):
    """The demo model with attention dropout: applied by the attention function from the config, which TRL's
    `disable_dropout` does not zero (it zeroes `nn.Dropout` modules)."""
    model, tokenizer = demo_model_fn(model_config)
    model.config.attention_dropout = 0.1
    return model, tokenizer


@pytest.mark.parametrize(
    ("model_fn", "args"),
    [(demo_model_fn, {"disable_dropout": False}), (attention_dropout, {})],
    ids=["disable_dropout=False", "attention_dropout"],
)
def test_a_reference_forward_that_draws_random_numbers_is_not_shared(reference_forwards, model_fn, args, tmp_path):
    exp, _, _ = fit(tmp_path, "dropout", model_fn, **args)
    exp.end()
    assert reference_forwards == []  # TRL's own path: each run's forward, in its own random stream
