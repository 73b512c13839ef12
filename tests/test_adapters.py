"""Every run's adapter on one PEFT model with only the active one in the module tree (`engine._adapters`): the model
computes exactly what PEFT's own multi-adapter model computes, and what the trainer walks does not grow with runs."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rf_notebook.demo import demo_model_fn
from rf_notebook.engine._adapters import Adapters

CONFIGS = {
    "run1": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
    "run2": LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    "run3": LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj"], use_rslora=True, lora_dropout=0.1),
}


def _model(parking: bool):
    """The demo base with the three adapters (random B, so each changes the output), in either representation."""
    model, _ = demo_model_fn()
    names = list(CONFIGS)
    torch.manual_seed(0)
    peft = get_peft_model(model, CONFIGS[names[0]], adapter_name=names[0])
    adapters = Adapters(peft) if parking else None
    for name in names[1:]:
        torch.manual_seed(len(name))
        adapters.add(name, CONFIGS[name]) if parking else peft.add_adapter(name, CONFIGS[name])
    with torch.no_grad():
        for name in names:
            if parking:
                adapters.use(name)
            else:
                peft.set_adapter(name)
            torch.manual_seed(hash(name) % 1000)
            for n, p in peft.named_parameters():
                if f".{name}." in n and "lora_B" in n:
                    p.normal_(std=0.5)
    return peft, adapters


def _lora_names(peft) -> set[str]:
    return {n for n, _ in peft.named_parameters() if "lora_" in n}


def test_only_the_active_adapter_is_in_the_tree_and_outputs_match_peft():
    parked, adapters = _model(parking=True)
    plain, _ = _model(parking=False)
    assert adapters.parking
    ids = torch.tensor([[1, 5, 9, 13, 7, 3]])
    for name in ["run2", "run1", "run3", "run2"]:
        adapters.use(name)
        plain.set_adapter(name)
        assert adapters.in_tree() == [name] and parked.active_adapters == [name]
        trainable = {n for n, p in parked.named_parameters() if p.requires_grad}
        assert trainable and all(f".{name}." in n for n in trainable)
        assert trainable == {n for n, p in plain.named_parameters() if p.requires_grad}
        parked.eval(), plain.eval()
        with torch.no_grad():
            torch.testing.assert_close(parked(ids).logits, plain(ids).logits, rtol=0, atol=0)


def test_what_the_trainer_walks_does_not_grow_with_the_number_of_runs():
    model, _ = demo_model_fn()
    peft = get_peft_model(model, CONFIGS["run1"], adapter_name="run1")
    adapters = Adapters(peft)
    one = (len(list(peft.parameters())), len(list(peft.modules())), set(peft.state_dict()))
    for i in range(2, 12):
        adapters.add(f"run{i}", CONFIGS["run1"])
    adapters.use("run1")
    assert (len(list(peft.parameters())), len(list(peft.modules())), set(peft.state_dict())) == one
    assert len(adapters.parameters("run7")) == len(adapters.parameters("run1")) > 0  # parked, not lost


def test_training_a_parked_adapter_continues_where_it_stopped():
    peft, adapters = _model(parking=True)
    adapters.use("run1")
    before = [p.detach().clone() for p in adapters.parameters("run1")]
    optimizer = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.1)
    peft.train()
    peft(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    optimizer.step()
    adapters.use("run2")
    adapters.use("run1")
    after = adapters.parameters("run1")
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the step reached run1's own tensors
    assert all(p.requires_grad for p in after)


def test_remove_a_parked_and_the_active_adapter():
    peft, adapters = _model(parking=True)
    adapters.use("run3")
    adapters.remove("run1")  # parked
    assert "run1" not in peft.peft_config and adapters.active == "run3"
    adapters.remove("run3")  # active: another one takes its place
    assert list(peft.peft_config) == ["run2"] and adapters.in_tree() == ["run2"] and peft.active_adapters == ["run2"]
    with pytest.raises(KeyError, match=r"no adapter 'run1' on this model \(adapters: \['run2'\]\)"):
        adapters.use("run1")


def test_a_name_removed_and_added_again_with_more_targets_parks_all_of_them():
    peft, adapters = _model(parking=True)
    adapters.use("run2")
    adapters.use("run1")  # run2's places remembered: q_proj and v_proj
    adapters.remove("run2")
    adapters.add("run2", CONFIGS["run1"])  # all-linear now
    for name in ["run1", "run2", "run3", "run2", "run1"]:
        adapters.use(name)
        assert adapters.in_tree() == [name]
        assert _lora_names(peft) and all(f".{name}." in n for n in _lora_names(peft))
    assert len(adapters.parameters("run2")) == len(adapters.parameters("run1"))


def test_modules_to_save_keep_peft_s_own_switching():
    model, _ = demo_model_fn()
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["input_layernorm"])
    peft = get_peft_model(model, config, adapter_name="run1")
    adapters = Adapters(peft)
    adapters.add("run2", config)
    assert not adapters.parking and sorted(adapters.in_tree()) == ["run1", "run2"]
    adapters.use("run1")
    assert peft.active_adapters == ["run1"]
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and not any(".run2." in n for n in trainable)


def test_an_adapter_added_after_the_last_one_was_removed():
    model, _ = demo_model_fn()
    peft = get_peft_model(model, CONFIGS["run1"], adapter_name="run1")
    adapters = Adapters(peft)
    adapters.remove("run1")  # every run on this base unloaded, say
    assert not peft.peft_config and not _lora_names(peft)
    adapters.add("run2", CONFIGS["run2"])  # a Resume rebuilds one
    assert adapters.in_tree() == ["run2"] and peft.active_adapters == ["run2"]
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable == _lora_names(peft) and all(".run2." in n for n in trainable)


def test_a_wrapper_added_later_puts_the_parked_adapters_back():
    peft, adapters = _model(parking=True)
    weights = {name: [p.detach().clone() for p in adapters.parameters(name)] for name in CONFIGS}
    adapters.add("run4", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["input_layernorm"]))
    assert not adapters.parking and sorted(adapters.in_tree()) == ["run1", "run2", "run3", "run4"]
    for name, before in weights.items():
        adapters.use(name)
        assert peft.active_adapters == [name]
        for a, b in zip(adapters.parameters(name), before, strict=True):
            assert torch.equal(a, b) and a.requires_grad


def test_a_checkpoint_reads_the_same_weights_as_peft_without_walking_the_model():
    """`SharedBase.adapter_weights(hub_check=False)` maps PEFT's state dict to the adapter's parameters once and then
    reads them: the same keys and the same tensors (storage included) as PEFT's function gives, after training
    changed them, after other adapters were active, and for an adapter removed and added again under its name."""
    from peft.utils import get_peft_model_state_dict

    from rf_notebook.engine._bases import SharedBase

    model, tokenizer = demo_model_fn()
    base = SharedBase(model, tokenizer)
    configs = {**CONFIGS, "dora": LoraConfig(r=4, target_modules=["q_proj", "o_proj"], use_dora=True)}
    for i, (name, config) in enumerate(configs.items()):
        base.add_adapter(name, config, seed=i)
    walks = []
    real = base.peft.state_dict

    def counted(*args, **kwargs):
        walks.append(1)
        return real(*args, **kwargs)

    base.peft.state_dict = counted

    def peft_s(name):
        base.use(name)
        return get_peft_model_state_dict(base.peft, adapter_name=name, save_embedding_layers=False)

    def same(ours, theirs):
        assert list(ours) == list(theirs) and ours
        for key in theirs:
            assert ours[key].data_ptr() == theirs[key].data_ptr() and torch.equal(ours[key], theirs[key]), key

    for name in configs:
        same(base.adapter_weights(name, hub_check=False), peft_s(name))  # the first call asks PEFT
    walks.clear()
    for name in ["run3", "dora", "run1"]:
        base.use(name)
        with torch.no_grad():  # a training step's in-place update
            for p in base.adapters.parameters(name):
                p.add_(0.25)
        ours = base.adapter_weights(name, hub_check=False)
        assert not walks  # read from the parameters, no walk over the model
        same(ours, peft_s(name))
        walks.clear()
    base.remove_adapter("run2")
    base.add_adapter("run2", LoraConfig(r=2, target_modules=["k_proj"]), seed=9)  # same name, new parameters
    ours = base.adapter_weights("run2", hub_check=False)
    same(ours, peft_s("run2"))
    assert all(".k_proj." in key for key in ours)
