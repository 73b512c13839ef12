"""The shared model's quicker `train()` and `parameters()` (`engine._walks`) give what torch's give: the same modes
on the same modules, every class with its own method called as torch calls it, the same parameters in the same
order (gradient clipping sums norms in that order)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from rf_notebook.demo import demo_model_fn
from rf_notebook.engine import _walks
from rf_notebook.engine._adapters import Adapters

CALLS: list[tuple[str, bool]] = []


class OwnTrain(torch.nn.Module):
    """Trains its own way: keeps its child in eval mode, and records the call."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Dropout(0.5)

    def train(self, mode: bool = True):
        CALLS.append(("own", mode))
        self.training = mode
        self.inner.train(False)
        return self


class OwnSetattr(torch.nn.Linear):
    def __setattr__(self, name, value):
        if name == "training":
            CALLS.append(("setattr", value))
        super().__setattr__(name, value)


class OwnChildren(torch.nn.Module):
    """Lists only its first child."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Dropout(0.1), torch.nn.Dropout(0.2)

    def named_children(self):
        yield "first", self.first


class OwnNamedModules(torch.nn.Module):
    """Lists its submodules its own way (as PEFT's LoRA MultiheadAttention does)."""

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(2, 2)

    def named_modules(self, *args, **kwargs):
        CALLS.append(("named_modules", True))
        return super().named_modules(*args, **kwargs)


def _tree() -> torch.nn.Module:
    shared = torch.nn.Linear(3, 3)
    root = torch.nn.Module()
    root.a = torch.nn.Sequential(shared, torch.nn.Dropout(0.1), shared)  # a module twice under one parent
    own = OwnTrain()
    root.b = torch.nn.ModuleDict({"again": shared, "own": own, "twice": own, "setattr": OwnSetattr(2, 2)})
    root.own_again = own  # a module with its own train(), reached from two parents and twice from one
    root.c = OwnChildren()
    root.register_module("missing", None)
    root.tied = torch.nn.Linear(3, 3)
    root.tied.weight = root.a[0].weight  # a parameter twice
    root.scale = torch.nn.Parameter(torch.ones(1))
    return root


def _state(model: torch.nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("modes", [[False], [False, True], [True, False, False, True]])
def test_train_sets_what_torch_sets_and_calls_what_torch_calls(modes):
    ours, theirs = _tree(), _tree()
    _walks.install(ours)
    for mode in modes:
        CALLS.clear()
        torch.nn.Module.train(theirs, mode)
        expected = list(CALLS)
        CALLS.clear()
        assert ours.train(mode) is ours
        assert CALLS == expected and ("own", mode) in expected
        assert _state(ours) == _state(theirs)
    assert ours.c.second.training  # OwnChildren hides it from train(), as from torch's
    assert not ours.b.own.inner.training  # OwnTrain's own rule, not the walk's


def test_eval_and_a_mode_that_is_not_a_bool():
    model = _tree()
    _walks.install(model)
    model.eval()
    assert not any(m.training for m in model.modules() if m is not model.c.second)
    with pytest.raises(ValueError, match="training mode is expected to be boolean"):
        model.train(1)


def test_parameters_are_torch_s_in_torch_s_order():
    model = _tree()
    _walks.install(model)
    expected = list(torch.nn.Module.parameters(model))
    got = list(model.parameters())
    assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected))
    assert list(model.parameters(recurse=False)) == [model.scale]


def test_a_module_that_lists_its_submodules_its_own_way_is_asked():
    model = _tree()
    model.special = OwnNamedModules()
    _walks.install(model)
    CALLS.clear()
    got = list(model.parameters())
    assert ("named_modules", True) in CALLS
    assert [id(p) for p in got] == [id(p) for p in torch.nn.Module.parameters(model)]


def test_instance_level_walks_are_honoured():
    model, theirs = _tree(), _tree()
    for tree in (model, theirs):
        tree.a.children = lambda: iter([])  # this Sequential hides its children from train()
    _walks.install(model)
    model.eval(), torch.nn.Module.train(theirs, False)
    assert _state(model) == _state(theirs) and model.a[1].training
    model.special = OwnNamedModules()
    model.special.named_modules = lambda *a, **k: iter([("", model.special)])  # lists only itself
    expected = list(torch.nn.Module.parameters(model))
    assert [id(p) for p in model.parameters()] == [id(p) for p in expected]


def test_a_class_patched_after_the_first_walk_is_honoured(monkeypatch):
    class Late(torch.nn.Module):
        pass

    model = _tree()
    model.late = Late()
    _walks.install(model)
    model.train(), list(model.parameters())
    calls = []
    monkeypatch.setattr(Late, "train", lambda self, mode=True: calls.append(mode) or self)
    monkeypatch.setattr(Late, "named_modules", lambda self, *a, **k: calls.append("named") or iter([("", self)]))
    model.eval()
    list(model.parameters())
    assert calls == [False, "named"] and model.late.training  # its own train() left it as it was


def test_transformers_train_is_known_to_do_more_only_on_a_mode_change():
    assert _walks._pretrained_shortcut()  # else the walk calls it at every step: correct, but slow


def test_a_deep_copy_walks_its_own_tree():
    model = _tree()
    _walks.install(model)
    clone = copy.deepcopy(model)
    clone.eval()
    assert model.training and not clone.training
    assert {id(p) for p in clone.parameters()}.isdisjoint({id(p) for p in model.parameters()})


def test_a_pickled_model_unpickles():
    model = _tree()
    _walks.install(model)
    clone = pickle.loads(pickle.dumps(model))
    clone.eval()
    assert not clone.a[1].training and model.a[1].training
    assert [p.shape for p in clone.parameters()] == [p.shape for p in model.parameters()]


def test_the_shared_peft_model_walks_as_torch_with_parked_adapters(monkeypatch):
    model, _ = demo_model_fn()
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1), adapter_name="one")
    _walks.install(peft)
    adapters = Adapters(peft)
    adapters.add("two", LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    calls = []
    original = transformers.PreTrainedModel.train

    def spy(self, mode=True):
        calls.append(mode)
        return original(self, mode)

    monkeypatch.setattr(transformers.PreTrainedModel, "train", spy)
    for name in ["one", "two", "one"]:
        adapters.use(name)
        expected = list(torch.nn.Module.parameters(peft))
        got = list(peft.parameters())
        assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected))
        peft.train(False)
        assert not any(m.training for m in peft.modules())
        peft.train()
        assert all(m.training for m in peft.modules())
    assert calls  # the model's own train(): called where the mode changes
    calls.clear()
    peft.train()
    assert calls == []  # unchanged: what it would do is torch's, done by the walk
