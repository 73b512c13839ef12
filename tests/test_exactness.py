"""The project's contract: a run trained in chunks, interleaved with other runs on one shared base model, ends
with the same adapter weights and the same per-step losses as that config trained alone by plain TRL."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import arithmetic_dataset, demo_model_fn, exact_match_metrics

SEED = 7
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _configs() -> List:
    # Three runs that differ in rank, learning rate, batch size, accumulation, scheduler and dropout; with 192
    # rows they have 12, 24 and 8 optimizer steps per epoch, and two of them cross an epoch boundary.
    def model(r, dropout, **args):
        return RFModelConfig(
            model_name="rf-demo/tiny-arith",
            peft_config=RFLoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=TARGETS),
            training_args=RFSFTConfig(**args),
            compute_metrics=exact_match_metrics,
        )

    return List(
        [
            model(4, 0.1, learning_rate=3e-3, per_device_train_batch_size=16, max_steps=16, lr_scheduler_type="linear"),
            model(
                8,
                0.05,
                learning_rate=1e-3,
                per_device_train_batch_size=8,
                max_steps=20,
                lr_scheduler_type="cosine",
                weight_decay=0.01,
            ),
            model(
                16,
                0.1,
                learning_rate=2e-3,
                per_device_train_batch_size=12,
                gradient_accumulation_steps=2,
                num_train_epochs=2,
                lr_scheduler_type="constant_with_warmup",
                warmup_steps=3,
            ),
        ]
    )


@pytest.fixture(scope="module")
def data():
    return arithmetic_dataset("train", n=192), arithmetic_dataset("eval", n=24)


def _train_alone(
    config: dict, train, base: tuple | None = None, state: dict | None = None
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The same resolved config, trained by a plain SFTTrainer on a fresh copy of the base (or `base`: a fresh
    (model, tokenizer) prepared by the caller); `state`, if given, gets the trainer's final `total_flos`."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = base or demo_model_fn(None)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**config["training_args"]),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=LoraConfig(**config["peft_config"]),
    )
    trainer.train()
    weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if state is not None:
        state["total_flos"] = trainer.state.total_flos
    return weights, losses


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Runs' resolved configs and their lone-trained results, computed once for every num_chunks."""
    train, evl = data
    exp = Experiment("probe", experiments_dir=tmp_path_factory.mktemp("probe"))
    configs = [r.config for r in _plan(exp, train, evl)]
    return [_train_alone(c, train) for c in configs], configs


def _plan(exp: Experiment, train, evl):
    exp.run_fit(RFGridSearch(_configs(), trainer_type="SFT"), demo_model_fn, train, evl, num_chunks=1, seed=SEED)
    exp.end(wait=False)
    return exp.runs()


@pytest.mark.parametrize(
    ("num_chunks", "fuse"),
    [(1, False), (3, False), (8, False), (3, None)],
    ids=["1-turns", "3-turns", "8-turns", "3-default"],
)
def test_interleaved_runs_equal_plain_trl(num_chunks, fuse, data, reference, tmp_path):
    """Runs taking turns, and by default (`fuse="auto"`: these three float32 runs on a CPU train in fused steps)."""
    train, evl = data
    expected, configs = reference
    exp = Experiment(f"exact-{num_chunks}", experiments_dir=tmp_path)
    search = RFGridSearch(_configs(), trainer_type="SFT")
    fuse_arg = {} if fuse is None else {"fuse": fuse}
    exp.run_fit(search, demo_model_fn, train, evl, num_chunks=num_chunks, seed=SEED, **fuse_arg)
    assert exp.wait(timeout=600)
    runs = exp.runs()
    assert [r.status.value for r in runs] == ["finished"] * 3, [r.error for r in runs]
    fused = set(exp.stats()["fusion"].values()) == {"fused"}
    assert fused == (fuse is None), exp.stats()["fusion"]
    assert [r.chunks_done for r in runs] == [r.chunks_total for r in runs]
    results = exp.results()
    for run, config, (weights, losses) in zip(runs, configs, expected):
        assert {**run.config["training_args"], "output_dir": ""} == {**config["training_args"], "output_dir": ""}
        exported = load_file(exp.export(run.run_id, tmp_path / f"run{run.run_id}") / "adapter_model.safetensors")
        assert exported.keys() == weights.keys()
        for key, value in weights.items():
            torch.testing.assert_close(exported[key], value, atol=1e-5, rtol=0, msg=f"{run.name}: {key}")
        logged = results[(results.run_id == run.run_id) & (results.metric == "loss")].sort_values("step")
        assert logged.step.tolist() == list(range(1, run.total_steps + 1))
        torch.testing.assert_close(torch.tensor(logged.value.tolist()), torch.tensor(losses), atol=1e-5, rtol=1e-5)
        evals = results[(results.run_id == run.run_id) & (results.metric == "eval_loss")]
        assert len(evals) == run.chunks_total  # one evaluation at every rung
    exp.end(wait=False)


def test_the_flop_count_a_checkpoint_keeps_is_plain_trls(data, tmp_path):
    """transformers' FLOP estimate counts the model's parameters at every step; rf_notebook counts them once per run
    (other runs' adapters are parked meanwhile, `_count_parameters_once`). A run's final checkpoint keeps plain
    TRL's `total_flos`."""
    train, _ = data
    exp = Experiment("flops", experiments_dir=tmp_path)
    exp.run_fit(RFGridSearch(_configs(), trainer_type="SFT"), demo_model_fn, train, None, num_chunks=2, seed=SEED)
    assert exp.wait(timeout=600)
    runs = exp.runs()
    exp.end()  # the checkpoints being written are on disk
    assert [r.status.value for r in runs] == ["finished"] * 3, [r.error for r in runs]
    for run in runs:
        final = exp.path / "runs" / str(run.run_id) / "checkpoints" / f"step-{run.total_steps}" / "trainer_state.json"
        plain: dict = {}
        _train_alone(run.config, train, state=plain)
        assert json.loads(final.read_text())["total_flos"] == plain["total_flos"] > 0
