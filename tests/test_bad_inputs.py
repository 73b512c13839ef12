"""The bad-input catalogue: each mistake a user can make across the API gets its own clear error, naming the value
and what was expected, before anything trains; nothing is written to a new experiment directory and nothing
already recorded in an existing one is lost or changed."""

from __future__ import annotations

import pytest

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
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn, preference_dataset, prompt_dataset


def search(lora=None, args=None, **model):
    return RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=lora if lora is not None else RFLoraConfig(r=4, target_modules="all-linear"),
            training_args=args if args is not None else RFSFTConfig(max_steps=4, per_device_train_batch_size=8),
            **model,
        ),
        trainer_type="SFT",
    )


TRAIN, EVAL = arithmetic_dataset("train", n=32), arithmetic_dataset("eval", n=8)


def fit(**overrides):
    """run_fit's arguments with some replaced."""
    kwargs = dict(
        param_config=search(), create_model_fn=demo_model_fn, train_dataset=TRAIN, eval_dataset=EVAL, num_chunks=2
    )
    kwargs.update(overrides)
    return kwargs


# (id, what the user calls given an Experiment, exception class, message pattern)
RUN_FIT_CASES = [
    (
        "search-is-a-dict",
        fit(param_config={"lr": 1}),
        TypeError,
        r"run_fit takes an RFGridSearch or RFRandomSearch, but got dict",
    ),
    ("num-chunks-zero", fit(num_chunks=0), ValueError, r"`num_chunks` is 0, but must be an int >= 1"),
    ("num-chunks-str", fit(num_chunks="4"), ValueError, r"`num_chunks` is '4', but must be an int >= 1"),
    (
        "num-chunks-too-many",
        fit(num_chunks=40),
        ValueError,
        r"`num_chunks` is 40, but run 'run 1' has only 4 optimizer steps per epoch",
    ),
    ("seed-float", fit(seed=1.5), TypeError, r"`seed` is 1.5, but must be an int"),
    (
        "model-fn-not-callable",
        fit(create_model_fn="gpt2"),
        TypeError,
        r"`create_model_fn` is 'gpt2', but must be callable or None",
    ),
    ("policy-str", fit(policy="halving"), TypeError, r"`policy` is 'halving', but must be None or a policy"),
    ("display-str", fit(display="yes"), TypeError, r"`display` is 'yes', but must be True, False or None"),
    ("resume-str", fit(resume="yes"), TypeError, r"`resume` is 'yes', but must be True or False"),
    (
        "on-nonfinite",
        fit(on_nonfinite="ignore"),
        ValueError,
        r"`on_nonfinite` is 'ignore', but must be 'fail' or 'continue'",
    ),
    (
        "no-peft-config",
        fit(param_config=RFGridSearch(RFModelConfig(DEMO_MODEL, training_args=RFSFTConfig(max_steps=2)))),
        ValueError,
        r"run 'run 1' has no peft_config; rf_notebook trains LoRA adapters",
    ),
    (
        "bad-scheduler",
        fit(param_config=search(args=RFSFTConfig(lr_scheduler_type="bogus", max_steps=2))),
        ValueError,
        r"run 'run 1' has an invalid config: bogus is not a valid SchedulerType, please select one of \['linear'",
    ),
    (
        "wrong-columns",
        fit(train_dataset=prompt_dataset("train", n=8)),
        ValueError,
        r"has columns \['prompt', 'answer'\], but SFT needs prompt\+completion",
    ),
    (
        "chat-template-of-a-model",  # TRL would add the model's tokens to the shared base and resize it
        fit(param_config=search(args=RFSFTConfig(chat_template_path="Qwen/Qwen2.5-0.5B-Instruct", max_steps=2))),
        ValueError,
        r"`chat_template_path` is 'Qwen/Qwen2.5-0.5B-Instruct', but must be a \.jinja / \.j2 file here",
    ),
    ("resume-unknown", fit(resume=True), ValueError, r"experiment '\w+' has no earlier run_fit to resume"),
    (
        "dpo-robust-smoothing-half",  # RapidFire AI's DPO tutorial; TRL only warns, and its loss is NaN at step 1
        fit(
            param_config=RFGridSearch(
                RFModelConfig(
                    DEMO_MODEL,
                    peft_config=RFLoraConfig(r=4, target_modules="all-linear"),
                    training_args=RFDPOConfig(loss_type=List(["sigmoid", "robust"]), label_smoothing=0.5, max_steps=2),
                ),
                trainer_type="DPO",
            ),
            train_dataset=preference_dataset("train", n=8),
            eval_dataset=None,
        ),
        ValueError,
        r"run 'loss_type=robust' has an invalid config: `label_smoothing` is 0.5, but the 'robust' loss needs it in "
        r"\[0.0, 0.5\)",
    ),
]


@pytest.mark.parametrize("kwargs, error, message", [c[1:] for c in RUN_FIT_CASES], ids=[c[0] for c in RUN_FIT_CASES])
def test_run_fit_refuses_before_anything_is_written(kwargs, error, message, tmp_path):
    exp = Experiment("fresh", experiments_dir=tmp_path)
    with pytest.raises(error, match=message):
        exp.run_fit(**kwargs)
    assert not (tmp_path / "fresh").exists()  # nothing written
    assert exp.runs() == [] and exp.results().empty


CONFIG_CASES = [
    (
        "misspelled-field",
        lambda: RFSFTConfig(learing_rate=1e-3),
        TypeError,
        r"'learing_rate'.*did you mean 'learning_rate'",
    ),
    (
        "misspelled-lora-field",
        lambda: RFLoraConfig(lora_alpah=16),
        TypeError,
        r"'lora_alpah'.*did you mean 'lora_alpha'",
    ),
    (
        "output-dir-of-its-own",
        lambda: RFSFTConfig(output_dir="out", learning_rate=List([1e-3, 1e-4])),
        ValueError,
        r"RFSFTConfig.output_dir is 'out', but the experiment owns each run's folder",
    ),
    (
        "tracker",
        lambda: RFGRPOConfig(report_to="tensorboard"),
        ValueError,
        r"RFGRPOConfig.report_to is 'tensorboard', but rf_notebook logs every run itself",
    ),
    ("empty-list", lambda: List([]), ValueError, r"List\(\[\]\) is empty, but must hold at least one value"),
    ("list-of-a-scalar", lambda: List(3), TypeError, r"List\(\) takes a list of values, but got 3"),
    ("empty-range", lambda: Range(1e-3, 1e-4), ValueError, r"Range\(0.001, 0.0001\) is empty: start must be < end"),
    ("log-range-at-zero", lambda: Range(0, 1, log=True), ValueError, r"Range\(0, 1, log=True\) needs start > 0"),
    (
        "range-in-grid",
        lambda: RFGridSearch(RFModelConfig(DEMO_MODEL, peft_config=RFLoraConfig(r=Range(4, 16, dtype="int")))),
        ValueError,
        r"Range",
    ),
    (
        "unknown-trainer",
        lambda: RFGridSearch(RFModelConfig(DEMO_MODEL), trainer_type="PPO"),
        ValueError,
        r"`trainer_type` is 'PPO', but must be one of \['SFT', 'DPO', 'GRPO', 'RLOO'\]",
    ),
    (
        "random-zero-runs",
        lambda: RFRandomSearch(RFModelConfig(DEMO_MODEL), num_runs=0),
        ValueError,
        r"`num_runs` is 0, but must be an int >= 1",
    ),
    (
        "grpo-without-reward",
        lambda: RFGridSearch(RFModelConfig(DEMO_MODEL, training_args=RFGRPOConfig()), trainer_type="GRPO"),
        TypeError,
        r"reward_funcs is None, but a GRPO run needs a reward function",
    ),
    (
        "model-name-empty",
        lambda: RFGridSearch(RFModelConfig("")).expand(),
        TypeError,
        r"RFModelConfig.model_name is '', but must be a non-empty string",
    ),
    (
        "neftune",  # its noise hook on the shared embedding would stay on for every run while one trains
        lambda: RFSFTConfig(neftune_noise_alpha=5),
        ValueError,
        r"RFSFTConfig.neftune_noise_alpha is 5, but it patches the base model every run shares",
    ),
    (
        "unsafe-experiment-name",
        lambda: Experiment("../escape"),
        ValueError,
        r"experiment name '../escape' is not a safe directory name",
    ),
    (
        "experiments-dir-not-a-path",
        lambda: Experiment("x", experiments_dir=3),
        TypeError,
        r"`experiments_dir` is 3, but must be a path",
    ),
]


@pytest.mark.parametrize("make, error, message", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_mistakes_are_named(make, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        make()
    assert list(tmp_path.iterdir()) == []  # nothing written


# -- an experiment with history: bad calls on it lose and change nothing ------------------------------------------


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A live experiment: run 1 finished, run 2 stopped by the user (its trainer kept for a resume)."""
    path = tmp_path_factory.mktemp("history")
    exp = Experiment("hist", experiments_dir=path)
    group = search(args=RFSFTConfig(learning_rate=List([3e-3, 1e-3]), max_steps=4, per_device_train_batch_size=8))
    exp.run_fit(group, demo_model_fn, TRAIN, EVAL, num_chunks=2, seed=0, display=False)
    exp.stop(2)
    assert exp.wait(timeout=300)
    yield exp
    exp.end(wait=False)


def snapshot(exp):
    return exp.runs(), exp.store.metrics(), exp.store.meta("fits")


HISTORY_CASES = [
    (
        "clone-unknown-field",
        lambda e: e.clone_modify(1, {"learing_rate": 1e-4}),
        ValueError,
        r"override 'learing_rate' is not a field of the training arguments or the LoRA config \(did you mean 'learning_rate'\?\)",
    ),
    (
        "clone-wrong-type",
        lambda e: e.clone_modify(1, {"learning_rate": "fast"}),
        TypeError,
        r"override 'learning_rate' is 'fast'",
    ),
    (
        "clone-negative-lr",
        lambda e: e.clone_modify(1, {"learning_rate": -1.0}),
        ValueError,
        r"override 'learning_rate' is -1.0, but must be > 0",
    ),
    (
        "warm-changes-data",
        lambda e: e.clone_modify(2, {"per_device_train_batch_size": 4}, warm_start=True),
        ValueError,
        r"warm start cannot change 'per_device_train_batch_size'",
    ),
    (
        "warm-from-finished",
        lambda e: e.clone_modify(1, {}, warm_start=True),
        ValueError,
        r"run 1 is finished: its optimizer state is gone",
    ),
    ("stop-unknown-run", lambda e: e.stop(99), ValueError, r"no run with id 99"),
    ("resume-finished", lambda e: e.resume(1), ValueError, r"run 1 is finished, not stopped"),
    ("export-unknown", lambda e: e.export(42, e.path / "nope"), KeyError, r"no run with id 42; known ids: \[1, 2\]"),
    ("best-run-mode", lambda e: e.best_run(mode="up"), ValueError, r"`mode` is 'up', but must be 'min' or 'max'"),
    (
        "best-run-metric",
        lambda e: e.best_run(metric="bleu"),
        ValueError,
        r"no run has logged metric 'bleu'; logged metrics:",
    ),
    (
        "resume-other-data",
        lambda e: (
            e.end(wait=False),
            e.run_fit(
                search(args=RFSFTConfig(learning_rate=List([3e-3, 1e-3]), max_steps=4, per_device_train_batch_size=8)),
                demo_model_fn,
                TRAIN.select(range(31)),
                EVAL,
                num_chunks=2,
                seed=0,
                resume=True,
            ),
        ),
        ValueError,
        r"`train_dataset` \(content fingerprint\) is '31 rows",
    ),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in HISTORY_CASES], ids=[c[0] for c in HISTORY_CASES])
def test_bad_calls_on_an_experiment_change_nothing(history, call, error, message):
    before = snapshot(history)
    with pytest.raises(error, match=message):
        call(history)
    assert snapshot(history) == before  # nothing lost, nothing changed (a refused op is logged as refused)
    assert history.store.integrity() == "ok"


# -- Clone-Modify overrides of fields the experiment owns, and of the precision ------------------------------------

OVERRIDE_CASES = [
    ("output-dir", {"output_dir": "/tmp/shared"}, r"override 'output_dir' is '/tmp/shared', but the experiment owns"),
    (
        "dotted-output-dir",
        {"training_args.output_dir": "elsewhere"},
        r"override 'training_args.output_dir' is 'elsewhere', but the experiment owns each run's folder",
    ),
    ("report-to", {"report_to": ["wandb"]}, r"override 'report_to' is \['wandb'\], but rf_notebook logs every run"),
    (
        "load-best",
        {"load_best_model_at_end": True},
        r"override 'load_best_model_at_end' is True, but the experiment owns checkpoints",
    ),
    ("resume-from", {"resume_from_checkpoint": "x"}, r"override 'resume_from_checkpoint' is 'x', but a run resumes"),
    ("push", {"push_to_hub": True}, r"override 'push_to_hub' is True, but the experiment does not push"),
    ("hub-token", {"hub_token": "hf_secret"}, r"override 'hub_token' is <hidden>, but"),
    (
        "bf16",
        {"bf16": True},
        r"override 'bf16' is True, but the run trains with bf16=False and that is one setting for the whole process "
        r"\(one Accelerate mixed-precision mode.* start another run_fit for bf16=True",
    ),
    ("fp16", {"fp16": True}, r"override 'fp16' is True, but the run trains with fp16=False"),
    ("tf32", {"tf32": True}, r"override 'tf32' is True, but the run trains with tf32=None and that is one setting"),
    ("tf32-false", {"tf32": False}, r"override 'tf32' is False, but the run trains with tf32=None"),  # torch-wide
    (
        "gradient-checkpointing",
        {"gradient_checkpointing": True},
        r"override 'gradient_checkpointing' is True, but .* one setting for the whole base model",
    ),
    ("neftune", {"neftune_noise_alpha": 5.0}, r"override 'neftune_noise_alpha' is 5.0, but it patches the base"),
    (
        "activation-checkpointing",
        {"activation_checkpointing": True},
        r"override 'activation_checkpointing' is True, but the run trains with activation_checkpointing=False and "
        r"that is one setting for the whole base model the runs share",
    ),
]


@pytest.mark.parametrize("overrides, message", [c[1:] for c in OVERRIDE_CASES], ids=[c[0] for c in OVERRIDE_CASES])
def test_overrides_of_what_the_experiment_owns_are_refused(overrides, message):
    from rf_notebook.overrides import split_overrides

    parent = RFSFTConfig(max_steps=4, use_cpu=True, bf16=False, activation_checkpointing=False).build(
        output_dir="runs/1"
    )
    current = {"training_args": parent.to_dict(), "peft_config": RFLoraConfig(r=4).build().to_dict()}
    fields = {"training_args": RFSFTConfig.field_names(), "peft_config": RFLoraConfig.field_names()}
    with pytest.raises(ValueError, match=message) as caught:
        split_overrides(overrides, current, fields, warm_start=False)
    assert "hf_secret" not in str(caught.value)
    harmless = {"report_to": "none", "push_to_hub": False, "save_strategy": "chunk", "bf16": False}
    assert split_overrides(harmless, current, fields, warm_start=False)["training_args"] == harmless
