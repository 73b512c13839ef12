"""Trainer types other than SFT: what is refused up front (with the value named), and how GRPO / RLOO runs are
cut into chunks."""

from __future__ import annotations

import pytest

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
    DEMO_MODEL,
    arithmetic_dataset,
    demo_model_fn,
    digit_reward,
    exact_match_reward,
    preference_dataset,
    prompt_dataset,
)
from rf_notebook.trainers import TRAINERS

LORA = RFLoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


def model(training_args, **kwargs):
    return RFModelConfig(DEMO_MODEL, peft_config=LORA, training_args=training_args, **kwargs)


def test_group_size_must_divide_the_generation_batch_before_anything_trains(tmp_path):
    group = RFGridSearch(
        model(
            RFGRPOConfig(num_generations=List([2, 4]), per_device_train_batch_size=6, max_steps=2),
            reward_funcs=exact_match_reward,
        ),
        trainer_type="GRPO",
    )
    exp = Experiment("groups", experiments_dir=tmp_path)
    with pytest.raises(ValueError) as error:
        exp.run_fit(group, demo_model_fn, prompt_dataset("train", n=16), display=False)
    message = str(error.value)
    assert "num_generations=4" in message  # the run, by name
    assert "6 completions per generation batch" in message and "`num_generations` = 4" in message
    assert "per_device_train_batch_size=8" in message  # a value that works
    assert exp.runs() == [] and not (tmp_path / "groups").exists()


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: RFGridSearch(model(RFGRPOConfig(max_steps=2)), trainer_type="GRPO"),
            TypeError,
            r"reward_funcs is None, but a GRPO run needs a reward function",
        ),
        (
            lambda: RFGridSearch(model(RFRLOOConfig(max_steps=2), reward_funcs=[]), trainer_type="RLOO"),
            TypeError,
            r"reward_funcs is \[\], but a RLOO run needs",
        ),
        (
            lambda: RFGridSearch(model(RFSFTConfig(), reward_funcs=exact_match_reward), trainer_type="SFT"),
            ValueError,
            r"SFT runs take no reward functions",
        ),
        (
            lambda: RFGridSearch(model(RFSFTConfig(learning_rate=1e-3)), trainer_type="DPO"),
            TypeError,
            r"a DPO run needs an RFDPOConfig \(one run_fit trains one trainer type\)",
        ),
        (
            lambda: RFGridSearch(List([model(RFDPOConfig()), model(RFSFTConfig())]), trainer_type="DPO"),
            TypeError,
            r"RFSFTConfig\(\), but a DPO run needs an RFDPOConfig",
        ),
        (lambda: RFGRPOConfig(num_generation=4), TypeError, r"did you mean 'num_generations'"),
    ],
)
def test_mismatched_trainer_pieces_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("trainer_type", "dataset", "match"),
    [
        ("DPO", arithmetic_dataset, r"has columns \['prompt', 'completion'\], but DPO needs prompt\+chosen\+rejected"),
        ("GRPO", preference_dataset, r"has columns \['prompt', 'chosen', 'rejected'\]|prompt"),
        ("SFT", prompt_dataset, r"has columns \['prompt', 'answer'\], but SFT needs prompt\+completion"),
    ],
)
def test_data_set_columns_are_checked_for_the_trainer_type(trainer_type, dataset, match, tmp_path):
    if trainer_type == "GRPO":  # a preference data set has a prompt column: GRPO can train on it
        TRAINERS["GRPO"].check_dataset(dataset("train", n=4), "train", None)
        with pytest.raises(ValueError, match=r"has columns \['chosen', 'rejected'\], but GRPO needs prompt"):
            TRAINERS["GRPO"].check_dataset(dataset("train", n=4).remove_columns("prompt"), "train", None)
        return
    args = {"SFT": RFSFTConfig, "DPO": RFDPOConfig}[trainer_type](max_steps=2)
    exp = Experiment("columns", experiments_dir=tmp_path)
    with pytest.raises(ValueError, match=match):
        exp.run_fit(RFGridSearch(model(args), trainer_type=trainer_type), demo_model_fn, dataset("train", n=8))


def test_eval_batch_holds_whole_groups():
    user = {"num_generations": 16, "per_device_train_batch_size": 16}
    args = TRAINERS["GRPO"].resolve_args(user, output_dir="x", seed=0, on_gpu=False)
    assert args["per_device_eval_batch_size"] == 16
    args = TRAINERS["RLOO"].resolve_args(
        {"num_generations": 4, "per_device_eval_batch_size": 2}, output_dir="x", seed=0, on_gpu=False
    )
    assert args["per_device_eval_batch_size"] == 2  # the user's own value is kept (TRL then names the problem)


def test_grpo_epoch_is_cut_into_chunks_as_the_trainer_counts_it(tmp_path):
    # 26 prompts, 8 completions per step in groups of 4: 2 prompts per step, 13 steps per epoch
    group = RFGridSearch(
        model(
            RFGRPOConfig(
                num_generations=4, per_device_train_batch_size=8, num_train_epochs=1, max_completion_length=3, beta=0.04
            ),
            reward_funcs=[exact_match_reward, digit_reward],
        ),
        trainer_type="GRPO",
    )
    exp = Experiment("epoch", experiments_dir=tmp_path)
    exp.run_fit(group, demo_model_fn, prompt_dataset("train", n=26), num_chunks=3, seed=0, display=False)
    assert exp.wait(timeout=300)
    (run,) = exp.runs()
    assert run.status.value == "finished", run.error
    assert run.total_steps == 13 and run.rungs == (4, 9, 13) and run.chunks_done == 3
    results = exp.results()
    assert sorted(results[results.metric == "loss"].step) == list(range(1, 14))
    assert {"reward", "reward_std", "kl", "completions/mean_length"} <= set(results.metric)
    exp.end(wait=False)


def test_too_few_prompts_for_one_generation_batch_is_refused(tmp_path):
    group = RFGridSearch(
        model(RFGRPOConfig(num_generations=4, per_device_train_batch_size=16), reward_funcs=exact_match_reward),
        trainer_type="GRPO",
    )
    exp = Experiment("few", experiments_dir=tmp_path)
    with pytest.raises(ValueError, match=r"gets no optimizer step out of 3 rows: one step needs 4 rows"):
        exp.run_fit(group, demo_model_fn, prompt_dataset("train", n=3), num_chunks=1, display=False)


@pytest.mark.parametrize("trainer_type", sorted(TRAINERS))
def test_the_run_folder_and_what_the_experiment_owns_are_never_the_users(trainer_type):
    """Whatever reaches the trainer's arguments (a config built with replace(), a stored config), the run's own
    folder, no trainer checkpoints, no trackers and no pushes win over the user's values."""
    user = {
        "output_dir": "/tmp/shared",
        "save_strategy": "steps",
        "save_steps": 1,
        "report_to": ["wandb"],
        "push_to_hub": True,
        "hub_model_id": "me/model",
        "logging_dir": "logs",
        "learning_rate": 1e-3,
    }
    args = TRAINERS[trainer_type].resolve_args(user, output_dir="exp/runs/7", seed=0, on_gpu=False)
    assert args["output_dir"] == "exp/runs/7"
    assert (args["save_strategy"], args["report_to"]) == ("no", "none")
    assert not {"save_steps", "push_to_hub", "hub_model_id", "logging_dir"} & args.keys()  # TRL's defaults
    assert args["learning_rate"] == 1e-3  # the user's other values stay


def fake_run(name, base="demo", **args):
    from types import SimpleNamespace

    from rf_notebook.configs import PER_BASE_FIELDS, PROCESS_FIELDS

    values = {**dict.fromkeys(PROCESS_FIELDS + PER_BASE_FIELDS), "bf16": False, "fp16": False, **args}
    model_config = SimpleNamespace(base_key=lambda: (base,))
    return SimpleNamespace(args=SimpleNamespace(**values), spec=SimpleNamespace(name=name, model_config=model_config))


def test_process_wide_settings_are_one_per_run_fit_and_checkpointing_one_per_base():
    from rf_notebook.trainers._common import check_shared_state

    runs = [fake_run("lr=1e-3", bf16=True), fake_run("lr=1e-4", bf16=True), fake_run("fp16 run", fp16=True)]
    with pytest.raises(
        ValueError,
        match=r"run 'lr=1e-3' trains with bf16=True, fp16=False but run 'fp16 run' with bf16=False, fp16=True: these "
        r"are one setting for the whole process .*split the sweep into two run_fit calls",
    ):
        check_shared_state(runs)
    check_shared_state(runs[:2])
    check_shared_state([])
    with pytest.raises(ValueError, match=r"trains with tf32=True but run 'b' with tf32=False"):
        check_shared_state([fake_run("a", tf32=True), fake_run("b", tf32=False)])
    with pytest.raises(ValueError, match=r"full_determinism=True"):
        check_shared_state([fake_run("a", full_determinism=True), fake_run("b")])
    # activation checkpointing: one value per shared base, different bases may differ
    with pytest.raises(
        ValueError,
        match=r"run 'a' trains with activation_checkpointing=True but run 'b' with activation_checkpointing=False: "
        r"activation checkpointing is switched on the base model the runs share",
    ):
        check_shared_state(
            [fake_run("a", activation_checkpointing=True), fake_run("b", activation_checkpointing=False)]
        )
    check_shared_state(
        [fake_run("a", activation_checkpointing=True), fake_run("b", base="other", activation_checkpointing=False)]
    )


def test_activation_checkpointing_is_off_unless_asked_on_every_device():
    """TRL's default turns it on (each step runs its forward twice): off here on a GPU too, unless the run asks;
    RapidFire AI's `gradient_checkpointing=True` is taken as today's `activation_checkpointing` (a default of the
    new name would otherwise silently win over the deprecated alias)."""
    import warnings

    from rf_notebook import RFDPOConfig
    from rf_notebook.configs import LegacyFieldWarning

    for on_gpu in (False, True):
        args = TRAINERS["SFT"].resolve_args({}, output_dir="o", seed=0, on_gpu=on_gpu)
        assert args["activation_checkpointing"] is False
        args = TRAINERS["SFT"].resolve_args({"activation_checkpointing": True}, output_dir="o", seed=0, on_gpu=on_gpu)
        assert args["activation_checkpointing"] is True
    with pytest.warns(LegacyFieldWarning, match="gradient_checkpointing=True -> activation_checkpointing=True"):
        config = RFDPOConfig(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert config.kwargs == {
        "activation_checkpointing": True,
        "activation_checkpointing_kwargs": {"use_reentrant": True},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no transformers FutureWarning about the deprecated alias either
        built = config.replace(output_dir="o", use_cpu=True, bf16=False).build()
    assert built.activation_checkpointing is True
