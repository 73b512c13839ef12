"""Every run's LoRA adapter on one shared PEFT model, with only the active one in the module tree.

    adapters = Adapters(peft_model)   # after get_peft_model(model, lora, adapter_name="run1")
    adapters.add("run2", lora)        # a fresh adapter; it becomes the active one
    adapters.use("run1")              # run1's adapter back in the tree, run2's parked outside it
    adapters.remove("run2")

PEFT keeps every adapter in each LoRA layer's dictionaries (`lora_A`, `lora_B`, `lora_dropout`, `scaling`, ...), so
everything that walks the model (the trainer's `model.parameters()` in gradient clipping, `zero_grad`, FLOP
counting, `state_dict`, PEFT's own `set_adapter`) costs more with every run added: measured with 32 adapters on the
demo model, a training step of the active one was ~1.3x, `set_adapter` ~10x, a parameter walk ~11x what it is with
one. Here the inactive adapters' entries are moved out of those dictionaries into a plain dict (the tensors do not
move or copy), so the module tree always looks as a lone `SFTTrainer(peft_config=...)` sees it, and switching runs
is O(LoRA layers), independent of the number of runs.

Which attributes hold an adapter is read off each layer (every dict-like attribute keyed by the adapter's name), so
PEFT additions such as `lora_variant` move with the rest. Models whose adapters live anywhere else (PEFT's
`modules_to_save` / trainable-token wrappers, tuners other than the ones built on `BaseTunerLayer`) keep every
adapter in the tree and switch with PEFT's `set_adapter`, as before. Scheduler thread only.
"""

from __future__ import annotations

from typing import Any

from rf_notebook.engine._walks import plain_setattr

__all__ = ["Adapters"]


class Adapters:
    """The adapters of one `PeftModel`; see the module docstring."""

    def __init__(self, peft: Any):
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self.peft = peft
        self._layer_type = BaseTunerLayer
        self._parking = not any(isinstance(m, AuxiliaryTrainingWrapper) for m in peft.modules())
        self._find_layers()
        self._parked: dict[str, dict[Any, dict[str, Any]]] = {}  # adapter -> layer -> attribute -> entry
        # adapter -> (layer, attribute, container) for each container that holds its entries while it is in the tree
        self._homes: dict[str, list[tuple[Any, str, Any]]] = {}
        self._active: str | None = None
        self._trainable: set[str] = set()  # adapters PEFT's set_adapter has made trainable (see `use`)
        self.use(peft.active_adapter)

    @property
    def parking(self) -> bool:
        """Whether inactive adapters are kept outside the module tree (False: PEFT's own multi-adapter model)."""
        return self._parking

    @property
    def active(self) -> str | None:
        return self._active

    def in_tree(self) -> list[str]:
        """The adapters whose weights are in the module tree now (one while parking)."""
        return [name for name in self.peft.peft_config if name not in self._parked]

    @property
    def layers(self) -> list[Any]:
        """The model's adapter layers (PEFT tuner layers)."""
        return self._layers

    def layer_entries(self, name: str) -> dict[Any, dict[str, Any]]:
        """Adapter `name`'s entries in each layer it targets, parked or in the tree: layer -> {attribute: entry}
        (`lora_A`, `lora_B`, `lora_dropout`, `scaling`, ...)."""
        if name in self._parked:
            return self._parked[name]
        found = {}
        for layer in self._layers:
            entries = {attribute: container[name] for attribute, container in self._keyed(layer, name)}
            if entries:
                found[layer] = entries
        return found

    def parameters(self, name: str) -> list[Any]:
        """Adapter `name`'s parameters, parked or in the tree."""
        if name in self._parked:
            holders = [entry for entries in self._parked[name].values() for entry in entries.values()]
        else:
            holders = [c[name] for layer in self._layers for _, c in self._keyed(layer, name)]
        params = []
        for holder in holders:
            if hasattr(holder, "parameters"):
                params.extend(holder.parameters())
            elif getattr(holder, "requires_grad", None) is not None:  # a ParameterDict's entry
                params.append(holder)
        return params

    def add(self, name: str, lora: Any) -> None:
        """Add a freshly initialised adapter `name` (PEFT's initialisation, from the current random state) and make it
        the active one."""
        from peft.utils.other import AuxiliaryTrainingWrapper

        self._park_active()
        self.peft.add_adapter(name, lora)
        if self._parking and any(isinstance(m, AuxiliaryTrainingWrapper) for m in self.peft.modules()):
            self._stop_parking()
        self._find_layers()  # a config with other target modules adds layers (and layers may hold new containers)
        self._active = None
        self._trainable.clear()  # layers may be new: every adapter goes through set_adapter again once
        self.use(name)

    def use(self, name: str) -> None:
        """Make `name` the active adapter: in the tree, trainable, the one every forward applies."""
        if name not in self.peft.peft_config:
            raise KeyError(f"no adapter {name!r} on this model (adapters: {sorted(self.peft.peft_config)})")
        if not self._parking:
            self.peft.set_adapter(name)
            self._active = name
            return
        if name != self._active:
            self._park_active()
            parked = self._parked.pop(name, None)
            if parked is not None:
                for layer, attribute, container in self._homes[name]:  # back where `_park_active` took them from
                    _put(container, name, parked[layer][attribute])
            self._active = name
        if name in self._trainable:
            # PEFT's set_adapter has made this adapter trainable already, and nothing turns that off while it is
            # parked (only one adapter is ever in the tree): naming it the layers' active adapter is all that is
            # left of it (~5 ms saved per switch with 28 LoRA layers; fused steps switch at every micro-step).
            for layer in self._layers:
                if plain_setattr(type(layer), "_active_adapter"):
                    layer.__dict__["_active_adapter"] = [name]  # where Module.__setattr__ puts a list
                else:
                    layer._active_adapter = [name]
        else:
            for layer in self._layers:  # one adapter in each: trainable, and the one the forward applies
                layer.set_adapter(name)
            self._trainable.add(name)
        self.peft.active_adapter = self.peft.base_model.active_adapter = name  # as PeftModel.set_adapter sets them

    def remove(self, name: str) -> None:
        """Delete adapter `name` (parked or active) and its config; another adapter becomes active if one is left."""
        if not self._parking:
            others = [other for other in self.peft.peft_config if other != name]
            if others and name in self.peft.active_adapters:
                self.peft.set_adapter(others[0])
            self.peft.delete_adapter(name)
            self._active = self.peft.active_adapter if others else None
            return
        if name == self._active:
            self._park_active()
        self._parked.pop(name, None)
        self._homes.pop(name, None)
        self._trainable.discard(name)
        self.peft.peft_config.pop(name, None)
        remaining = list(self.peft.peft_config)
        if self._active is None and remaining:
            self.use(remaining[0])
        elif not remaining:  # no adapter left: none active, as PEFT's delete_adapter leaves it (a later add works)
            for layer in self._layers:
                layer.set_adapter([])
            self.peft.active_adapter = self.peft.base_model.active_adapter = []

    # -- inside --------------------------------------------------------------------------------------------------

    def _find_layers(self) -> None:
        """The adapter layers, and which of each layer's attributes are containers keyed by adapter name (every
        public dict, ModuleDict or ParameterDict: looked up once here, not at every switch)."""
        self._layers = [m for m in self.peft.modules() if isinstance(m, self._layer_type)]
        self._containers = {
            layer: tuple(
                attribute
                for attribute, value in (*vars(layer).items(), *layer._modules.items())
                if not attribute.startswith("_") and hasattr(value, "keys") and hasattr(value, "pop")
            )
            for layer in self._layers
        }

    def _keyed(self, layer: Any, name: str) -> list[tuple[str, Any]]:
        """(attribute, container) for each container of `layer` with an entry for `name`."""
        found = []
        for attribute in self._containers[layer]:
            container = layer._modules.get(attribute)
            if container is None:
                container = vars(layer)[attribute]
            if name in container:
                found.append((attribute, container))
        return found

    def _park_active(self) -> None:
        """Move the active adapter's entries out of every layer."""
        name, self._active = self._active, None
        if name is None or not self._parking:
            return
        homes = self._homes.get(name)
        if homes is None or any(name not in container for _, _, container in homes):
            # where its entries are is looked up once: they stay there (PEFT adds, never moves; checked anyway)
            homes = [(layer, a, container) for layer in self._layers for a, container in self._keyed(layer, name)]
            self._homes[name] = homes
        parked: dict[Any, dict[str, Any]] = {}
        for layer, attribute, container in homes:
            entries = parked.get(layer)
            if entries is None:
                entries = parked[layer] = {}
            entries[attribute] = _take(container, name)
        self._parked[name] = parked

    def _stop_parking(self) -> None:
        """Put every parked adapter back in the tree (a wrapper this class cannot park was added)."""
        for name in list(self._parked):
            for layer, entries in self._parked.pop(name).items():
                for attribute, entry in entries.items():
                    getattr(layer, attribute)[name] = entry
        self._parking = False


def _take(container: Any, name: str) -> Any:
    """`container.pop(name)`."""
    if type(container) is dict:
        return container.pop(name)
    import torch

    if type(container) is torch.nn.ModuleDict:
        return container._modules.pop(name)  # all that ModuleDict.pop does, minus two method calls
    return container.pop(name)


def _put(container: Any, name: str, entry: Any) -> None:
    """`container[name] = entry`, where `entry` was taken from there (`_take`)."""
    if type(container) is dict:
        container[name] = entry
        return
    import torch
    from torch.nn.modules import module

    if type(container) is torch.nn.ModuleDict and not module._global_module_registration_hooks:
        container._modules[name] = entry  # what add_module does with a name and module it held before (no hooks)
    else:
        container[name] = entry
