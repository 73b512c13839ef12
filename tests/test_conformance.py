"""One conformance suite for every trainer type (SFT, DPO, GRPO, RLOO) on the demo model.

Runs interleaved in chunks on one shared base, with an evaluation at every chunk end, end with the same adapter
weights (1e-5, float32, CPU) and log the same per-step losses as each config trained alone by plain TRL,
GRPO's and RLOO's sampled completions included. Every run shares the one base: no reference-model copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from rf_notebook import (
    Experiment,
    List,
    RFDPOConfig,
    RFGridSearch,
    RFGRPOConfig,
    RFLoraConfig,
    RFModelConfig,
    RFRLOOConfig,
    RFSFTConfig,
)
from rf_notebook.demo import (
    arithmetic_dataset,
    demo_model_fn,
    digit_reward,
    exact_match_reward,
    preference_dataset,
    prompt_dataset,
)

SEED = 11
LORA = RFLoraConfig(r=List([4, 8]), lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
ONLINE = dict(max_completion_length=4, temperature=1.0, reward_weights=[1.0, 0.5])


@dataclasses.dataclass
class Case:
    config: type
    trl_name: str  # "SFT" -> trl.SFTConfig / trl.SFTTrainer
    args: dict[str, Any]
    data: Callable[[], tuple[Any, Any]]
    reward_funcs: list[Callable] | None = None


CASES = {
    "SFT": Case(
        RFSFTConfig,
        "SFT",
        dict(learning_rate=List([3e-3, 1e-3]), per_device_train_batch_size=8, max_steps=7),
        lambda: (arithmetic_dataset("train", n=64), arithmetic_dataset("eval", n=8)),
    ),
    "DPO": Case(
        RFDPOConfig,
        "DPO",
        dict(beta=List([0.1, 0.5]), learning_rate=3e-3, per_device_train_batch_size=8, max_steps=7),
        lambda: (preference_dataset("train", n=64), preference_dataset("eval", n=8)),
    ),
    "GRPO": Case(
        RFGRPOConfig,
        "GRPO",
        dict(
            num_generations=List([2, 4]),
            beta=0.04,
            learning_rate=3e-3,
            per_device_train_batch_size=8,
            max_steps=6,
            **ONLINE,
        ),
        lambda: (prompt_dataset("train", n=64), prompt_dataset("eval", n=4)),
        [exact_match_reward, digit_reward],
    ),
    "RLOO": Case(
        RFRLOOConfig,
        "RLOO",
        dict(
            num_generations=List([2, 4]),
            beta=List([0.0, 0.05]),
            learning_rate=3e-3,
            per_device_train_batch_size=8,
            max_steps=6,
            **ONLINE,
        ),
        lambda: (prompt_dataset("train", n=64), prompt_dataset("eval", n=4)),
        [exact_match_reward, digit_reward],
    ),
}


def search(case: Case, trainer_type: str) -> RFGridSearch:
    return RFGridSearch(
        RFModelConfig(
            "rf-demo/tiny-arith",
            peft_config=LORA,
            training_args=case.config(**case.args),
            reward_funcs=case.reward_funcs,
        ),
        trainer_type=trainer_type,
    )


def train_alone(case: Case, config: dict, train) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The run's resolved config trained by the plain TRL trainer (with `peft_config=`) on a fresh base."""
    import trl
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model, tokenizer = demo_model_fn(None)
    args = getattr(trl, f"{case.trl_name}Config")(**config["training_args"])
    kwargs = {"reward_funcs": case.reward_funcs} if case.reward_funcs else {}
    trainer = getattr(trl, f"{case.trl_name}Trainer")(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=LoraConfig(**config["peft_config"]),
        **kwargs,
    )
    trainer.train()
    weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    return weights, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_one_shared_base(exp: Experiment) -> None:
    """While training: every run's trainer built so far (a run's trainer is built at its first turn) trains the same
    model object and holds no separate reference model. (The module tree itself is not walked here: it changes as
    the scheduler thread switches runs.)"""
    slots = [slot for slot in list(exp._engine._slots.values()) if slot.trainer is not None]
    assert slots, "no live run to inspect"
    assert len({id(slot.trainer.model) for slot in slots}) == 1, "a run trains on its own copy of the base"
    assert all(getattr(slot.trainer, "ref_model", None) is None for slot in slots)


def assert_base_loaded_once(exp: Experiment) -> None:
    """Once training is over: the shared model holds one copy of the base weights."""
    base = exp._engine.backend.base_of(exp.runs()[0].run_id)
    ptrs = {p.data_ptr() for name, p in base.peft.named_parameters() if "lora_" not in name}
    model, _ = demo_model_fn(None)
    assert len(ptrs) == len(list(model.parameters())), "base weights loaded more than once"


@pytest.mark.parametrize("trainer_type", list(CASES))
def test_interleaved_runs_equal_plain_trl(trainer_type, tmp_path):
    case = CASES[trainer_type]
    train, evl = case.data()
    exp = Experiment(f"conformance-{trainer_type}", experiments_dir=tmp_path)
    # taking turns, each run bit for bit plain TRL (fused steps: tests/test_fused.py, to their contract)
    exp.run_fit(search(case, trainer_type), demo_model_fn, train, evl, num_chunks=3, seed=SEED, fuse=False)
    assert_one_shared_base(exp)
    assert exp.wait(timeout=600)
    assert_base_loaded_once(exp)
    runs = exp.runs()
    assert [r.status.value for r in runs] == ["finished"] * len(runs), [r.error for r in runs]
    results = exp.results()
    for run in runs:
        weights, losses = train_alone(case, run.config, train)
        exported = load_file(exp.export(run.run_id, tmp_path / f"run{run.run_id}") / "adapter_model.safetensors")
        assert exported.keys() == weights.keys()
        trained = [v for k, v in weights.items() if "lora_B" in k]
        assert any(v.abs().max() > 1e-4 for v in trained), f"{run.name}: the adapter did not move; nothing was tested"
        for key, value in weights.items():
            torch.testing.assert_close(exported[key], value, atol=1e-5, rtol=0, msg=f"{run.name}: {key}")
        logged = results[(results.run_id == run.run_id) & (results.metric == "loss")].sort_values("step")
        assert logged.step.tolist() == list(range(1, run.total_steps + 1))
        torch.testing.assert_close(torch.tensor(logged.value.tolist()), torch.tensor(losses), atol=1e-5, rtol=1e-5)
        evals = results[(results.run_id == run.run_id) & (results.metric == "eval_loss")]
        assert len(evals) == run.chunks_total, f"{run.name}: one evaluation at every chunk end"
    exp.end(wait=False)
