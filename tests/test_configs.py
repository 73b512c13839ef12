"""Search spaces and their expansion: pure, no training."""

from __future__ import annotations

import random

import pytest

from rf_notebook.configs import (
    List,
    Range,
    RFGridSearch,
    RFLoraConfig,
    RFModelConfig,
    RFRandomSearch,
    RFSFTConfig,
    format_value,
)


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
