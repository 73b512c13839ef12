"""Quicker walks of the shared model, for the ones a trainer makes at every step.

transformers' Trainer calls `model.train()` at every micro-step and walks `model.parameters()` at every optimizer
step, twice: for gradient clipping and in `model.zero_grad()`. torch does both with recursive generators and
`Module.__setattr__`: on the demo model (341 modules) about 2 ms per step, in plain TRL as in rf_notebook, and on
a GPU host time the device may wait through. Here each is one loop over an explicit stack, ~1.5 ms less per step
(`python -m bench.walks`).

`install(model)` gives the shared PEFT model its own `train` and `parameters`: instance attributes, bound methods
(a deep copy walks its own tree), named as torch's methods (a pickled model unpickles, with torch's). They give
what torch's give: the same modules set to the same mode, the same parameters in the same order (gradient
clipping sums the norms in that order). A module whose class walks or trains its own way (it overrides `train`,
`children`, `named_modules`, ..., or `__setattr__`) is handed to its own method, or the whole call to torch's.
"""

from __future__ import annotations

import functools
import types
from typing import Any

__all__ = ["install", "plain_setattr"]

# Where a class's methods are torch's, listing its parameters here is what torch's `parameters` does.
_MEMBER_METHODS = ("parameters", "named_parameters", "_named_members")


def install(model: Any) -> None:
    """Give `model` the quicker `train` and `parameters` (see the module docstring), where its class has torch's."""
    import torch

    if type(model).train is torch.nn.Module.train:
        model.train = types.MethodType(train, model)
    if type(model).parameters is torch.nn.Module.parameters:
        model.parameters = types.MethodType(parameters, model)


@functools.cache
def plain_setattr(kind: type, attribute: str) -> bool:
    """Whether setting `attribute` on a `kind` module is writing it into the instance's `__dict__`: torch's
    `__setattr__`, and no descriptor of that name in the class. (The methods that walk are looked up at every call
    instead: a class may be patched while the model lives, a test's monkeypatch, a library's fix.)"""
    import torch

    descriptor = getattr(kind, attribute, None)
    return kind.__setattr__ is torch.nn.Module.__setattr__ and not hasattr(type(descriptor), "__set__")


@functools.cache
def _pretrained_shortcut() -> bool:
    """Whether transformers' `PreTrainedModel.train(mode)` is `Module.train` where the mode does not change: its body
    (transformers 5.x) reads `training`, calls `super().train` and, on a change, `set_use_kernels`. A body that
    uses anything else is always called."""
    from transformers import PreTrainedModel

    known = {"training", "super", "train", "use_kernels", "set_use_kernels"}
    return set(PreTrainedModel.train.__code__.co_names) <= known


def train(self: Any, mode: bool = True) -> Any:
    """`Module.train(mode)` over the tree: each module's `training` set, in the order torch sets it. A module of a
    class with its own `train` (transformers' `PreTrainedModel.train` where it would change the mode) gets that
    method called for its subtree, as torch's recursion would call it."""
    import torch
    from transformers import PreTrainedModel

    if not isinstance(mode, bool):
        raise ValueError("training mode is expected to be boolean")
    base = torch.nn.Module
    plain_train, plain_children, plain_named = base.train, base.children, base.named_children
    pretrained, shortcut = PreTrainedModel.train, _pretrained_shortcut()
    stack = [self]
    while stack:
        module = stack.pop()
        kind = module.__class__
        own = module.__dict__
        if module is not self and (kind.train is not plain_train or "train" in own):
            if not (shortcut and kind.train is pretrained and module.training == mode and "train" not in own):
                module.train(mode)  # its own (PreTrainedModel's does more only when the mode changes)
                continue
        if (
            kind.children is not plain_children
            or kind.named_children is not plain_named
            or "children" in own
            or "named_children" in own
        ):
            base.train(module, mode) if module is self else module.train(mode)
            continue
        if plain_setattr(kind, "training"):
            module.__dict__["training"] = mode  # where Module.__setattr__ puts a bool
        else:
            module.training = mode
        children = module._modules
        if children:
            if len(children) == 1:
                stack.extend(child for child in children.values() if child is not None)
            else:  # torch's children(): in order, no None, no repeats
                seen: set = set()
                stack.extend(
                    reversed([c for c in children.values() if c is not None and not (c in seen or seen.add(c))])
                )
    return self


def parameters(self: Any, recurse: bool = True) -> Any:
    """`Module.parameters(recurse)`: every module in pre-order, each module once, each parameter once."""
    import torch

    kind = type(self)
    if not recurse or not all(getattr(kind, n) is getattr(torch.nn.Module, n) for n in _MEMBER_METHODS):
        return torch.nn.Module.parameters(self, recurse)
    plain_named = torch.nn.Module.named_modules
    params: list = []
    members: set = set()
    seen: set = set()
    stack = [self]
    while stack:
        module = stack.pop()
        if module is None or module in seen:
            continue
        if module.__class__.named_modules is not plain_named or "named_modules" in module.__dict__:
            return torch.nn.Module.parameters(self, recurse)  # a module that lists its submodules its own way
        seen.add(module)
        own = module._parameters
        if own:
            for param in own.values():
                if param is not None and param not in members:
                    members.add(param)
                    params.append(param)
        children = module._modules
        if children:
            stack.extend(reversed(children.values()))
    return iter(params)
