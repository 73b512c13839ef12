"""QLoRA: runs on a 4-bit base share one quantized copy, prepared once, and train exactly as plain TRL would on it.

bitsandbytes (>= 0.50) quantizes and trains a 4-bit base on a CPU, so this runs on the CI machine: two runs
interleaved on one NF4 demo base end with the adapters, and log the losses, of the same configs trained alone by a
plain `SFTTrainer` on a freshly loaded and prepared (`prepare_model_for_kbit_training`) 4-bit base.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_exactness import _train_alone

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import arithmetic_dataset, demo_model_fn

pytest.importorskip("bitsandbytes")

SEED = 5


def _nf4() -> object:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def _config(quantization: object, lr: float, r: int, **args) -> RFModelConfig:
    return RFModelConfig(
        model_name="rf-demo/tiny-arith",
        model_kwargs={"quantization_config": quantization},
        peft_config=RFLoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
        training_args=RFSFTConfig(learning_rate=lr, per_device_train_batch_size=8, max_steps=8, **args),
    )


@pytest.fixture
def loads(monkeypatch):
    """create_model_fn calls, and QLoRA preparations, counted."""
    import peft

    counted = {"model_fn": 0, "prepared": 0}
    prepare = peft.prepare_model_for_kbit_training

    def counting_prepare(*args, **kwargs):
        counted["prepared"] += 1
        return prepare(*args, **kwargs)

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", counting_prepare)

    def model_fn(model_config):
        counted["model_fn"] += 1
        return demo_model_fn(model_config)

    return counted, model_fn


def _alone(config: dict, train) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The QLoRA recipe with plain TRL: a fresh 4-bit base, prepared, then SFTTrainer(peft_config=...)."""
    from peft import prepare_model_for_kbit_training

    model, tokenizer = demo_model_fn({"model_kwargs": {"quantization_config": _nf4()}})
    return _train_alone(
        config, train, (prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), tokenizer)
    )


def test_interleaved_qlora_runs_share_one_prepared_base_and_equal_plain_trl(loads, tmp_path):
    counted, model_fn = loads
    train = arithmetic_dataset("train", n=64)
    search = RFGridSearch(List([_config(_nf4(), 3e-3, 4), _config(_nf4(), 1e-3, 8, weight_decay=0.01)]), "SFT")
    exp = Experiment("qlora", experiments_dir=tmp_path)
    exp.run_fit(search, model_fn, train, None, num_chunks=4, seed=SEED)
    assert exp.wait(timeout=600)
    runs = exp.runs()
    assert [r.status.value for r in runs] == ["finished", "finished"], [r.error for r in runs]
    assert counted == {"model_fn": 1, "prepared": 1}  # one 4-bit base for both runs, prepared once
    results = exp.results()
    for run in runs:
        weights, losses = _alone(run.config, train)
        exported = load_file(exp.export(run.run_id, tmp_path / f"run{run.run_id}") / "adapter_model.safetensors")
        assert exported.keys() == weights.keys()
        for key, value in weights.items():
            assert exported[key].dtype == value.dtype  # TRL keeps a quantized base's adapter in bfloat16
            torch.testing.assert_close(exported[key], value, atol=1e-5, rtol=0, msg=f"{run.name}: {key}")
        logged = results[(results.run_id == run.run_id) & (results.metric == "loss")].sort_values("step")
        torch.testing.assert_close(torch.tensor(logged.value.tolist()), torch.tensor(losses), atol=1e-5, rtol=1e-5)
    exp.end(wait=False)


def test_runs_that_differ_in_quantization_have_their_own_bases(loads, tmp_path):
    from transformers import BitsAndBytesConfig

    counted, model_fn = loads
    fp4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32)
    search = RFGridSearch(List([_config(_nf4(), 1e-3, 4), _config(fp4, 1e-3, 4), _config(_nf4(), 3e-3, 4)]), "SFT")
    exp = Experiment("two-bases", experiments_dir=tmp_path)
    exp.run_fit(search, model_fn, arithmetic_dataset("train", n=32), None, num_chunks=2, seed=SEED)
    assert exp.wait(timeout=600)
    assert [r.status.value for r in exp.runs()] == ["finished"] * 3, [r.error for r in exp.runs()]
    assert counted == {"model_fn": 2, "prepared": 2}
    exp.end(wait=False)


def test_a_bitsandbytes_base_without_bitsandbytes_is_refused_before_training(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"quantization_config.*bitsandbytes is not installed.*rf_notebook\[qlora\]"):
        RFGridSearch(_config(_nf4(), 1e-3, 4), "SFT")
