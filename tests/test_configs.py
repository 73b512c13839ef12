"""Search spaces and their expansion: pure, no training."""

from __future__ import annotations

import dataclasses
import random

import pytest

from rf_notebook.configs import (
    RFDPOConfig,
    RFGRPOConfig,
    RFLoraConfig,
    RFModelConfig,
    RFRLOOConfig,
    RFSFTConfig,
)
from rf_notebook.fields import OWNED_FIELDS
from rf_notebook.search import List, Range, RFGridSearch, RFRandomSearch, format_value


def model(**kw):
    return RFModelConfig(
        model_name=kw.pop("model_name", "m"),
        peft_config=kw.pop("peft_config", RFLoraConfig(r=8)),
        training_args=kw.pop("training_args", RFSFTConfig(learning_rate=1e-4)),
        **kw,
    )


def test_grid_is_the_cartesian_product_in_a_fixed_order_with_readable_names():
    group = RFGridSearch(
        model(
            peft_config=RFLoraConfig(r=List([4, 16]), lora_alpha=16),
            training_args=RFSFTConfig(learning_rate=List([3e-3, 3e-4]), max_steps=64),
        ),
        trainer_type="SFT",
    )
    specs = group.expand()
    assert [s.name for s in specs] == ["r=4, lr=3e-3", "r=4, lr=3e-4", "r=16, lr=3e-3", "r=16, lr=3e-4"]
    assert [s.model_config.peft_config.kwargs["r"] for s in specs] == [4, 4, 16, 16]
    assert specs[1].params == {
        "model_name": "m",
        "model_type": "causal_lm",
        "peft_config.r": 4,
        "peft_config.lora_alpha": 16,
        "training_args.learning_rate": 3e-4,
        "training_args.max_steps": 64,
    }
    assert [s.name for s in group.expand()] == [s.name for s in specs]  # deterministic


def test_grid_expands_lists_of_whole_configs_at_any_depth():
    group = RFGridSearch(
        List(
            [
                model(peft_config=List([RFLoraConfig(r=8), RFLoraConfig(r=32, lora_dropout=List([0.0, 0.1]))])),
                model(model_name="other"),
            ]
        ),
        trainer_type="SFT",
    )
    specs = group.expand()
    assert len(specs) == 4
    assert [s.model_config.model_name for s in specs] == ["m", "m", "m", "other"]
    assert [s.model_config.peft_config.kwargs.get("lora_dropout") for s in specs] == [None, 0.0, 0.1, None]
    assert len({s.name for s in specs}) == 4


def test_grid_refuses_a_range():
    with pytest.raises(ValueError, match=r"RFGridSearch cannot enumerate training_args.learning_rate=Range"):
        RFGridSearch(model(training_args=RFSFTConfig(learning_rate=Range(1e-5, 1e-3))), trainer_type="SFT")


def test_random_search_is_reproducible_and_respects_ranges():
    space = model(
        peft_config=RFLoraConfig(r=List([4, 8, 16])),
        training_args=RFSFTConfig(learning_rate=Range(1e-5, 1e-2, log=True), per_device_train_batch_size=Range(2, 6)),
    )
    a = RFRandomSearch(space, trainer_type="SFT", num_runs=12, seed=3).expand()
    b = RFRandomSearch(space, trainer_type="SFT", num_runs=12, seed=3).expand()
    c = RFRandomSearch(space, trainer_type="SFT", num_runs=12, seed=4).expand()
    assert [s.params for s in a] == [s.params for s in b]
    assert [s.params for s in a] != [s.params for s in c]
    for s in a:
        assert 1e-5 <= s.params["training_args.learning_rate"] <= 1e-2
        assert s.params["training_args.per_device_train_batch_size"] in range(2, 7)
        assert s.params["peft_config.r"] in (4, 8, 16)
    assert len({s.name for s in a}) == 12


def test_log_range_covers_orders_of_magnitude_evenly():
    rng = random.Random(0)
    draws = [Range(1e-6, 1e-2, log=True).sample(rng) for _ in range(4000)]
    below = sum(d < 1e-4 for d in draws) / len(draws)
    assert 0.45 < below < 0.55  # half the log-interval lies below 1e-4
    ints = {Range(1, 4).sample(rng) for _ in range(200)}
    assert ints == {1, 2, 3, 4}
    log_ints = [Range(1, 1023, log=True).sample(rng) for _ in range(4000)]
    assert min(log_ints) >= 1 and max(log_ints) <= 1023
    assert 0.45 < sum(v < 32 for v in log_ints) / len(log_ints) < 0.55


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: List([]), ValueError, r"List\(\[\]\) is empty"),
        (lambda: List("abc"), TypeError, "takes a list of values"),
        (lambda: Range(1e-3, 1e-3), ValueError, r"Range\(0.001, 0.001\) is empty: start must be < end"),
        (lambda: Range(5, 1), ValueError, r"Range\(5, 1\) is empty"),
        (lambda: Range(0, 1, log=True), ValueError, "needs start > 0"),
        (lambda: Range(0, float("nan")), TypeError, "Range end is nan"),
        (lambda: Range(0, 1, dtype="complex"), ValueError, "dtype is 'complex'"),
        (
            lambda: RFSFTConfig(learnin_rate=1e-3),
            TypeError,
            r"RFSFTConfig got an unknown field 'learnin_rate' \(did you mean 'learning_rate'\?\); expected a field of trl.SFTConfig",
        ),
        (lambda: RFLoraConfig(rank=8), TypeError, r"RFLoraConfig got an unknown field 'rank'.*peft.LoraConfig"),
        (
            lambda: RFGridSearch(model(), trainer_type="PPO"),
            ValueError,
            r"`trainer_type` is 'PPO', but must be one of \['SFT', 'DPO', 'GRPO', 'RLOO'\]",
        ),
        (lambda: RFGridSearch("not a config"), TypeError, "takes RFModelConfig objects"),
        (lambda: RFGridSearch([]), ValueError, "at least one RFModelConfig"),
        (lambda: RFGridSearch(model(training_args=RFLoraConfig(r=4))), TypeError, "needs an RFSFTConfig"),
        (lambda: RFGridSearch(model(model_type="seq2seq")), ValueError, "only 'causal_lm'"),
        (lambda: RFRandomSearch(model(), num_runs=0), ValueError, r"`num_runs` is 0, but must be an int >= 1"),
    ],
)
def test_bad_search_spaces_are_refused_with_the_value_named(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_values_are_formatted_short():
    assert [format_value(v) for v in (3e-4, 2.5e-5, 0.1, 16, "cosine", 1e-2)] == [
        "3e-4",
        "2.5e-5",
        "0.1",
        "16",
        "cosine",
        "0.01",
    ]


def test_model_config_supports_item_access_for_create_model_fn():
    config = model(model_kwargs={"dtype": "float32"})
    assert config["model_name"] == "m" and config["model_kwargs"] == {"dtype": "float32"}
    with pytest.raises(KeyError):
        config["nope"]


def test_specs_build_the_real_classes():
    from peft import LoraConfig

    lora = RFLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]).build()
    assert isinstance(lora, LoraConfig) and lora.r == 4
    with pytest.raises(ValueError, match="still a search space"):
        RFLoraConfig(r=List([4, 8])).build()


# -- fields the experiment owns -------------------------------------------------------------------------------------

TRAINING_CONFIGS = [RFSFTConfig, RFDPOConfig, RFGRPOConfig, RFRLOOConfig]

# (field=value, what the refusal must say after "<Config>.<field> is <value>, but ")
OWNED_REFUSALS = [
    (
        {"output_dir": "/tmp/shared"},
        r"output_dir is '/tmp/shared', but the experiment owns each run's folder: a run's files live in "
        r"<experiments_dir>/<experiment_name>/runs/<run_id>, shared with no other run; export a run's adapter with "
        r"exp\.export\(run_id, path\)",
    ),
    ({"logging_dir": "logs"}, r"logging_dir is 'logs', but the experiment records every run's metrics"),
    ({"save_strategy": "best"}, r"save_strategy is 'best', but the experiment owns checkpoints: it writes each run's"),
    (
        {"load_best_model_at_end": List([False, True])},
        r"load_best_model_at_end is True, but the experiment owns checkpoints.*exp\.best_run\(\)",
    ),
    ({"save_only_model": True}, r"save_only_model is True, but the experiment owns checkpoints.*resumes exactly"),
    (
        {"resume_from_checkpoint": "ckpt/step-10"},
        r"resume_from_checkpoint is 'ckpt/step-10', but a run resumes from the experiment's own checkpoints: "
        r"run_fit\(\.\.\., resume=True\)",
    ),
    ({"push_to_hub": True}, r"push_to_hub is True, but the experiment does not push.*exp\.export\(run_id, path\)"),
    ({"hub_model_id": "me/model"}, r"hub_model_id is 'me/model', but the experiment does not push from inside"),
    ({"hub_token": "hf_secret"}, r"hub_token is <hidden>, but the experiment does not push"),
    (
        {"report_to": "wandb"},
        r"report_to is 'wandb', but rf_notebook logs every run itself.*assume one run per process",
    ),
    ({"report_to": List(["none", ["tensorboard"]])}, r"report_to is \['tensorboard'\], but rf_notebook logs"),
]


@pytest.mark.parametrize("config", TRAINING_CONFIGS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs, message", OWNED_REFUSALS, ids=[str(next(iter(k))) for k, _ in OWNED_REFUSALS])
def test_fields_the_experiment_owns_are_refused_naming_the_value_and_what_to_do(config, kwargs, message):
    with pytest.raises(ValueError, match=rf"^{config.__name__}\.{message}") as caught:
        config(max_steps=4, **kwargs)
    assert "hf_secret" not in str(caught.value)  # a token is never echoed


# What RapidFire AI's tutorials and TRL's defaults pass for these fields: nothing the experiment would not do anyway.
HARMLESS = [
    {"report_to": "none"},  # every fit tutorial ("Disables wandb")
    {"save_strategy": "epoch"},  # the SFT chatqa and DPO alignment tutorials: every epoch end is a chunk end
    {"save_strategy": "chunk"},  # RapidFire AI's own value
    {"save_strategy": "steps", "save_steps": 50, "save_total_limit": 3},  # RapidFire AI users' scripts
    {"save_strategy": "no"},
    {"report_to": None},
    {"report_to": []},
    {"report_to": "no"},
    {"push_to_hub": False},
    {"output_dir": None},
    {"logging_dir": None},  # not a field of transformers 5: accepted, and not passed on
    {"save_total_limit": 2},  # only the latest checkpoint of a run is kept: within any limit
    {"resume_from_checkpoint": None},
]


@pytest.mark.parametrize("config", TRAINING_CONFIGS, ids=lambda c: c.__name__)
def test_values_that_change_nothing_stay_accepted(config):
    import dataclasses

    for kwargs in HARMLESS:
        config(max_steps=4, **kwargs)
    defaults = {f.name: f.default for f in dataclasses.fields(config.target()) if f.name in OWNED_FIELDS}
    assert defaults.keys() >= {"output_dir", "save_strategy", "save_steps", "report_to", "push_to_hub"}
    config(**defaults)  # TRL's own defaults, as a config printed from TRL carries them
    built = config(logging_dir=None, save_strategy="epoch", use_cpu=True, bf16=False).build(output_dir="x")
    assert built.output_dir == "x"


def test_every_checkpoint_hub_and_tracker_field_of_trl_is_owned():
    """A TRL upgrade that adds one fails here rather than letting a run write or push outside its folder."""
    import dataclasses

    for config in TRAINING_CONFIGS:
        for field in dataclasses.fields(config.target()):
            if field.name.startswith(("save_", "hub_", "push_", "resume_", "output_", "logging_dir", "report_")):
                assert field.name in OWNED_FIELDS, f"{config.__name__}: {field.name} is not in OWNED_FIELDS"


def test_the_base_is_the_model_and_its_tokenizer():
    base = RFModelConfig("m").base_key()
    assert RFModelConfig("m", tokenizer="m", tokenizer_kwargs={}, model_kwargs={}).base_key() == base  # the defaults
    assert RFModelConfig("m", tokenizer="other-tokenizer").base_key() != base
    assert RFModelConfig("m", tokenizer_kwargs={"padding_side": "left"}).base_key() != base
    assert (
        RFModelConfig("m", tokenizer_kwargs={"a": 1, "b": 2}).base_key()
        == RFModelConfig("m", tokenizer_kwargs={"b": 2, "a": 1}).base_key()
    )


def test_copy_and_attribute_assignment_change_what_the_search_trains():
    """RapidFire AI's DPO tutorial builds its variants this way: copies changed by attribute assignment."""
    lora, dpo = RFLoraConfig(r=8, lora_alpha=16), RFDPOConfig(beta=0.1, learning_rate=1e-3)
    lora_2, dpo_2 = lora.copy(), dpo.copy()
    lora_2.r = 16
    dpo_2.beta = List([0.2, 0.5])
    first = RFModelConfig(model_name="m", peft_config=lora, training_args=dpo)
    second = first.copy()
    second.peft_config, second.training_args = lora_2, dpo_2
    runs = RFGridSearch(List([first, second]), trainer_type="DPO").expand()
    assert [(r.model_config.peft_config.r, r.model_config.training_args.beta) for r in runs] == [
        (8, 0.1),
        (16, 0.2),
        (16, 0.5),
    ]
    assert lora.r == 8 and dpo.beta == 0.1  # the originals are untouched
    assert lora_2.lora_dropout == 0.0 and lora_2.target_modules is None  # unset: the real class's default
    nested = first.copy()
    nested.peft_config.r = 4  # a copy of the model config copies its nested configs too
    assert first.peft_config.r == 8 and nested.peft_config.r == 4


def test_attribute_assignment_is_checked_as_the_constructor_checks():
    lora, sft = RFLoraConfig(r=8), RFSFTConfig(learning_rate=1e-4)
    with pytest.raises(AttributeError, match=r"unknown field 'rr' \(did you mean 'r'\?\)"):
        lora.rr = 16
    with pytest.raises(ValueError, match="output_dir"):
        sft.output_dir = "shared"
    with pytest.raises(AttributeError, match="unknown field 'nope'"):
        sft.nope  # noqa: B018
    with pytest.raises(AttributeError, match=r"no field 'peft_configg' \(did you mean 'peft_config'\?\)"):
        model().peft_configg = RFLoraConfig(r=4)
    assert lora.kwargs == {"r": 8} and sft.kwargs == {"learning_rate": 1e-4}  # a refused value changed nothing
    del sft.learning_rate
    default = next(f.default for f in dataclasses.fields(RFSFTConfig.target()) if f.name == "learning_rate")
    assert sft.kwargs == {} and sft.learning_rate == default


def test_fields_of_the_versions_rapidfire_pins_become_todays_with_one_warning():
    from rf_notebook.fields import LegacyFieldWarning

    with pytest.warns(LegacyFieldWarning) as caught:
        dpo = RFDPOConfig(beta=0.1, warmup_ratio=0.1, max_prompt_length=512, max_completion_length=512)
        grpo = RFGRPOConfig(warmup_ratio=List([0.05, 0.1]), max_prompt_length=256, max_completion_length=256)
        sft = RFSFTConfig(max_seq_length=128)
    assert dpo.kwargs == {"beta": 0.1, "warmup_steps": 0.1, "max_length": 1024}
    assert grpo.kwargs == {"warmup_steps": List([0.05, 0.1]), "max_completion_length": 256}
    assert sft.kwargs == {"max_length": 128}
    said = [str(w.message) for w in caught]
    assert said == [
        "RFDPOConfig: warmup_ratio=0.1 -> warmup_steps=0.1 (transformers >= 5: a value below 1 is the ratio)",
        "RFDPOConfig: max_prompt_length=512, max_completion_length=512 -> max_length=1024 (TRL >= 1 caps prompt and "
        "completion together; pre-truncate long prompts in the data for the old split)",
        "RFGRPOConfig: warmup_ratio=List([0.05, 0.1]) -> warmup_steps=List([0.05, 0.1]) (transformers >= 5: a value "
        "below 1 is the ratio)",
        "RFGRPOConfig: max_prompt_length=256 -> dropped: TRL >= 1 never truncates GRPO prompts (pre-truncate the data)",
        "RFSFTConfig: max_seq_length=128 -> max_length=128",
    ]
    dpo.build(bf16=False, use_cpu=True)  # today's TRL takes what they became
    with pytest.warns(LegacyFieldWarning, match="-> dropped: max_length=2048"):
        assert RFDPOConfig(max_prompt_length=512, max_length=2048).kwargs == {"max_length": 2048}
    with pytest.warns(LegacyFieldWarning):
        copy = dpo.copy()
        copy.warmup_ratio = 0.2  # replaces what the first ratio became
    assert copy.warmup_steps == 0.2 and dpo.warmup_steps == 0.1
    with pytest.raises(ValueError, match=r"RFSFTConfig: warmup_ratio is 1.0, but .* a ratio in \[0, 1\)"):
        RFSFTConfig(warmup_ratio=1.0)
    with pytest.raises(ValueError, match="warmup_ratio=0.1 and warmup_steps=10 are both set"):
        RFSFTConfig(warmup_ratio=0.1, warmup_steps=10)
    with pytest.warns(LegacyFieldWarning):  # a searched ratio: both ends of its Range are checked
        assert isinstance(RFSFTConfig(warmup_ratio=Range(0.01, 0.1)).warmup_steps, Range)
    with pytest.raises(ValueError, match="warmup_ratio is 1.5"):
        RFSFTConfig(warmup_ratio=Range(0.1, 1.5))


def test_the_names_that_moved_stay_importable_from_configs():
    """Code written against the one-module layout keeps working: rf_notebook.configs re-exports the names that now
    live in rf_notebook.space, rf_notebook.fields, rf_notebook.spec and rf_notebook.search (the search ones loaded on
    first use)."""
    import subprocess
    import sys

    from rf_notebook import configs, fields, search, space, spec

    moved = {
        space: ["List", "Range"],
        fields: ["LegacyFieldWarning", "OwnedField", "OWNED_FIELDS", "owned_refusal", "owned_value_repr"]
        + ["PRECISION_FIELDS", "PROCESS_FIELDS", "PER_BASE_FIELDS"],
        spec: ["ConfigSpec"],
        search: ["RunSpec", "RFGridSearch", "RFRandomSearch", "format_value", "varying_params"],
    }
    for module, names in moved.items():
        for name in names:
            assert getattr(configs, name) is getattr(module, name), name
    assert "RunSpec" in dir(configs)
    with pytest.raises(AttributeError):
        configs.no_such_name  # noqa: B018
    # Either module may be imported first.
    for first in ("rf_notebook.search", "rf_notebook.configs"):
        code = f"import {first}; from rf_notebook.configs import RunSpec, Search; from rf_notebook.search import Search"
        subprocess.run([sys.executable, "-c", code], check=True)
