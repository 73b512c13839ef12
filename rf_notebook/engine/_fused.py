"""Fused steps: the runs that are due share one forward and one backward pass through their shared base.

Each run keeps its own TRL trainer and its own loop (greenlet), as when runs take turns. What changes is where the
base model's work happens. When a run's forward reaches the base's backbone (the decoder stack, under TRL's LM
head and loss), its greenlet parks there with its inputs; once every run of the group has parked, the backbone runs
once over all their rows (each run's batch padded on the right to the longest), and every LoRA layer adds each
run's own adapter to that run's rows only, drawing its dropout from that run's own random stream. Each run then
gets back its rows of the hidden states (cut to its own length) and carries on: TRL's LM head, loss, metrics and
token counts are its own. When it calls `accelerator.backward(loss)`, it parks again with its scaled loss; one
backward over the group's losses gives every adapter its own gradient (the base is frozen and the rows never mix).
Clipping, optimizer step, LR schedule, accumulation and logging then run in each trainer as before. SFT and DPO
runs fuse; a DPO run's reference forward runs without gradients, so it is not parked: it runs in the run's own
turn after its policy forward (shared between runs with the same batch, `trainers.dpo`).

Exactness: a run's rows see the same weights, the same dropout masks and the same loss code as when trained
alone; only the base's matrix products run over more rows (and right padding), which may round differently.
Under bf16 mixed precision the backbone call made for the group runs under the autocast its runs parked under
(runs whose autocast differs are not concatenated); a parked run's autocast is taken off the thread meanwhile
(`_slot`). Anything this cannot reproduce exactly is not fused (`fusable_reason`): fp16 (its loss scaling),
activation checkpointing, base dropout, LoRA variants (DoRA), a model whose adapters cannot be
parked. A forward whose arguments cannot be concatenated runs run by run, still within the group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import greenlet

logger = logging.getLogger(__name__)

__all__ = ["Backward", "Forward", "FusedGroup", "auto_reason", "fusable_reason"]

# At most this many runs share one pass: every member's activations are alive until the group's backward.
MAX_GROUP = 8

# `fuse="auto"` fuses groups of at least this many runs: on a 2-core CPU, 2 fused runs were 0.90-1.13x as fast as
# taking turns, 4 and 8 runs 1.1-1.6x (BENCHMARKS.md, "Fused steps").
AUTO_MIN_GROUP = 3
AUTO_WAITING = "fusable: under fuse='auto' it takes turns while fewer than 3 such runs are in its chunk"

# A fused forward holds every member's activations until the group's backward. The members due at a step go through
# the base together while the activations of their backbone pass (measured, `_SavedBytes`) stay under this share of
# the memory available; the others follow in further passes of the same step, each after the previous one's
# backward. A member that does not fit even alone goes alone, as it would take its turn.
MEMORY_SHARE = 0.5
# A batch this much longer than the one measured is measured again (alone) before it shares a pass: activations per
# token grow with the length where attention keeps its scores.
REMEASURE_LENGTH = 1.5

# Backbone arguments concatenated along the batch; padded on the right with these values.
_PADDED = {"input_ids": 0, "attention_mask": 0, "position_ids": 0}


@dataclasses.dataclass
class Forward:
    """A run parked at its backbone call."""

    args: tuple
    kwargs: dict[str, Any]
    rng: Any = None  # the run's torch random state at this point (its dropout draws)
    autocast: tuple = (False, None)  # the run's autocast at this point (mixed precision): (enabled, dtype)


@dataclasses.dataclass
class _Raise:
    """What a parked run gets back when its part of the group's work failed: raised in its own greenlet, so that
    the run fails through its own stack (and the others go on)."""

    error: BaseException


@dataclasses.dataclass
class Backward:
    """A run parked at `accelerator.backward`, with its loss already scaled as Accelerate scales it."""

    loss: Any


def fusable_reason(trainer: Any, base: Any, adapter: str) -> str | None:
    """Why this run (its adapter named `adapter`) cannot take part in fused steps (None: it can)."""
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear

    args = trainer.args
    if type(trainer).__name__ not in ("SFTTrainer", "DPOTrainer"):
        return f"{type(trainer).__name__} runs are not fused yet (SFT and DPO only)"
    if getattr(args, "use_liger_kernel", False):
        return "Liger kernels (their loss reads the model's hidden states its own way)"
    if getattr(args, "neftune_noise_alpha", None):
        return "NEFTune noise (drawn over the whole padded batch, not per run)"
    if getattr(args, "activation_offloading", False):
        return "activation offloading"
    if getattr(args, "torch_compile", False):
        return "torch_compile"
    if "lomo" in str(args.optim).lower():
        return f"the {args.optim} optimizer (its backward is its step)"
    if len({str(d) for d in (getattr(base.model, "hf_device_map", None) or {}).values()}) > 1:
        return "a base spread over several devices"
    if trainer.compute_loss_func is not None or trainer.label_smoother is not None:
        return "a custom loss or label smoothing (TRL runs the model twice per step for them)"
    config = base.model.config.get_text_config()
    if any(getattr(config, key, None) for key in ("num_experts", "num_local_experts", "output_router_logits")):
        return "a mixture-of-experts base (its routers see every row of the batch)"
    if args.fp16:  # bf16 is fused (tested); fp16's per-run loss scaling in a shared backward is not verified yet
        return "fp16 mixed precision (fused steps are float32 or bf16 for now)"
    if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
        return "activation checkpointing"
    if getattr(args, "padding_free", False) or getattr(args, "packing", False):
        return "packed / padding-free batches"
    if not base.adapters.parking:
        return "the model carries PEFT wrappers whose adapters cannot be parked (modules_to_save, trainable tokens)"
    if _backbone(base) is None:
        return f"{type(base.model).__name__} has no backbone to share"
    for module in base.model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0 and not _is_lora_dropout(module, base):
            return "the base model has dropout of its own (its masks would not be each run's own)"
    if getattr(config, "attention_dropout", 0.0) or getattr(base.model.config, "attention_dropout", 0.0):
        return "the base model has attention dropout"
    backbone = set(_backbone(base).modules())
    if any(layer not in backbone for layer in base.adapters.layer_entries(adapter)):
        # its LM head runs in its own turn after the shared pass, with whichever adapter is in the tree then (TRL
        # 1.x refuses LoRA on lm_head itself, since it reads lm_head.weight directly; a later TRL may not)
        return "LoRA outside the decoder stack (lm_head, ...)"
    for layer in base.adapters.layers:
        if type(layer) is not LoraLinear:
            return f"LoRA on {type(layer).__name__} layers (fused steps handle plain linear layers)"
        if layer.lora_variant:
            return "a LoRA variant (DoRA, ...)"
    return None


def auto_reason(args: Any, model: Any) -> str | None:
    """Why `fuse="auto"` (the default) lets a run take turns that could fuse (None: it fuses). Under "auto" runs fuse
    where fusing was measured to pay and to stay within the exactness contract: float32 runs on float32 weights, on
    a CPU (BENCHMARKS.md, "Fused steps"). So a run takes turns that trains in bf16 mixed precision, or whose base's
    weights are not float32 (a bf16 checkpoint loaded as it is): such fused runs may leave plain TRL by more than
    the contract's 1e-4 on weights (5.3e-4 measured in bf16: a rounding step lost in a loss, carried on by Adam).
    And a run on a GPU takes turns until a GPU benchmark says fusing pays there (the group holds every member's
    activations at once). `fuse=True` fuses all of these."""
    if args.bf16:
        return "bf16 under fuse='auto' (fused bf16 runs may differ from plain TRL past 1e-4; fuse=True fuses them)"
    import torch

    dtypes, devices = set(), set()
    for p in model.parameters():
        devices.add(p.device.type)
        if p.is_floating_point() and p.dtype != torch.float32:
            dtypes.add(p.dtype)
    if dtypes:
        kinds = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        return f"{kinds} weights under fuse='auto' (only float32 runs fuse under 'auto'; fuse=True fuses them)"
    if devices - {"cpu"}:
        where = ", ".join(sorted(devices - {"cpu"}))
        return (
            f"a base on {where} under fuse='auto' (fusing is measured to pay on a CPU only so far; fuse=True fuses "
            "them)"
        )
    return None


def _is_lora_dropout(module: Any, base: Any) -> bool:
    return any(module is d for layer in base.adapters.layers for d in layer.lora_dropout.values())


def _backbone(base: Any) -> Any:
    """The module TRL's fused LM head calls (`model.base_model`: the decoder stack), or None."""
    model = base.model
    backbone = getattr(model, "base_model", None)
    return backbone if backbone is not None and backbone is not model else None


class FusedGroup:
    """Drives a group of runs on one shared base through fused steps until each leaves (rung, command, end).

    `switch(slot, value, after_forward)` resumes a run's greenlet with `value` and returns what it parks with next
    (`Forward`, `Backward`) or None once it has left; it restores the run's state before and keeps it after (the
    backend's job). `after_forward`: the run only computes its loss before it parks again (its adapter need not be
    the one in the module tree).
    """

    def __init__(
        self,
        base: Any,
        members: Sequence[Any],
        switch: Callable[[Any, Any, bool], Any],
        token_bytes: dict[Any, tuple[float, int]] | None = None,
    ):
        """`token_bytes`: by base, (bytes of backbone activations per token, at what length) as measured by an
        earlier group (kept by the caller from group to group; this group measures its base's if missing)."""
        self.base, self.members, self.switch = base, list(members), switch
        self.token_bytes = {} if token_bytes is None else token_bytes
        self.memory_splits = 0  # passes through the base cut short to keep the activations within MEMORY_SHARE
        self._remeasure = False  # the next pass (one run alone) measures the activations again: a longer batch
        self.backbone = _backbone(base)
        self.original = self.backbone.forward
        self.failed: dict[int, BaseException] = {}
        self.fused_forwards = 0  # forwards that ran over more than one run's rows
        self.fused_runs: set[int] = set()  # the runs whose rows went through one of them

    def __enter__(self) -> FusedGroup:
        """Members' backbone calls and backward passes park here until `__exit__`."""
        self._patched = self.backbone.__dict__.get("forward")
        self.backbone.forward = self._intercept
        for slot in self.members:
            slot.fused_group = self
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._patched is None:
            self.backbone.__dict__.pop("forward", None)
        else:
            self.backbone.forward = self._patched
        for slot in self.members:
            slot.fused_group = None

    def _intercept(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        current = greenlet.getcurrent()
        if (
            not any(slot.greenlet is current for slot in self.members)
            or not torch.is_grad_enabled()
            or not self.backbone.training
        ):  # not a member's training forward (an evaluation inside train(), a generation): as without fusion
            return self.original(*args, **kwargs)
        device = _device_of(args, kwargs)
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        request = Forward(args, kwargs, rng=_get_rng(device), autocast=autocast)
        out = park(request)
        if isinstance(out, _Raise):
            raise out.error
        _set_rng(device, request.rng)  # where this run's dropout draws left its stream
        return out

    def run(self, first: dict[Any, Any]) -> None:
        """`first`: what each member parked with when it was started (None: it left already)."""
        parked = {slot: request for slot, request in first.items() if request is not None}
        while parked:  # one step of the members due
            due, parked = parked, {}
            while due:
                part = self._next_part(due)
                self._step({slot: due.pop(slot) for slot in part}, parked)

    def _step(self, due: dict[Any, Any], parked: dict[Any, Any]) -> None:
        """Drive the members of `due` (what each parked with) through their forwards and one backward; what each
        parks with next (its next step's forward) goes into `parked`."""
        while due:
            forwards = [slot for slot, request in due.items() if isinstance(request, Forward)]
            if forwards:  # every run first reaches its backward (or parks at another forward)
                outputs = self._forward([(slot, due[slot]) for slot in forwards])
                for slot in forwards:
                    due.pop(slot)
                    self._resume(due, slot, outputs[slot], after_forward=True)
                continue
            answer = None
            try:
                self._backward([request.loss for request in due.values()])
            except Exception as exc:  # every run whose loss was in it fails (no gradient reached any)
                answer = _Raise(exc)
            for slot in list(due):
                due.pop(slot)
                self._resume(parked, slot, answer)

    def _next_part(self, due: dict[Any, Any]) -> list[Any]:
        """The members of `due` that go through the base next, together: all of them while their activations fit
        (`MEMORY_SHARE` of the memory available now), else as many as fit, in `_alike` order (at least one). Before
        this base's activations per token were measured, or when a batch is much longer than the one measured
        (`REMEASURE_LENGTH`), one member goes alone and is measured: one with LoRA dropout (which keeps a copy of
        each adapted layer's input) if any, of the highest rank, or the longest batch. Where the memory available is
        not known (a device other than a CPU or a GPU), nothing is measured and all go together."""
        order = [slot for slot, _ in sorted(due.items(), key=self._order)]
        batches = [slot for slot in order if isinstance(due[slot], Forward) and _tokens(due[slot]) is not None]
        if len(batches) < 2:
            return order
        try:
            available = _available_bytes(_device_of(due[batches[0]].args, due[batches[0]].kwargs))
        except Exception:  # noqa: BLE001 - not knowing means no limit, as on a machine that does not say
            logger.debug("fused steps: the memory available could not be read", exc_info=True)
            available = None
        if available is None:
            return order
        measured = self.token_bytes.get(self.base)
        if measured is None:
            return [max(batches, key=lambda slot: self._cost((slot, due[slot])))]
        per_token, length = measured
        if not per_token:  # it could not be measured (said once): no limit
            return order
        longest_batch = max(batches, key=lambda slot: _tokens(due[slot])[1])
        if _tokens(due[longest_batch])[1] > REMEASURE_LENGTH * length:
            self._remeasure = True
            return [longest_batch]
        part, rows, longest = [], 0, 0
        for slot in order:
            shape = _tokens(due[slot]) if isinstance(due[slot], Forward) else None
            if shape is not None:
                size = (rows + shape[0]) * max(longest, shape[1]) * per_token
                if part and size > MEMORY_SHARE * available:
                    self.memory_splits += 1
                    log = logger.info if self.memory_splits == 1 else logger.debug  # once per group
                    log(
                        "fused steps: %d of %d runs share this pass through the base (the rest follow): their "
                        "activations would pass %.0f%% of the %.1f GiB available",
                        len(part),
                        len(order),
                        100 * MEMORY_SHARE,
                        available / 2**30,
                    )
                    break
                rows, longest = rows + shape[0], max(longest, shape[1])
            part.append(slot)
        return part

    def _cost(self, item: tuple[Any, Forward]) -> tuple:
        """Which run keeps the most per token: LoRA dropout first, then rank, then rows."""
        rows, rank, _, dropout = self._alike(item)
        return dropout, rank, rows

    def _order(self, item: tuple[Any, Any]) -> tuple:
        slot, request = item
        return self._alike(item) if isinstance(request, Forward) else (-1,)

    def _resume(self, parked: dict[Any, Any], slot: Any, value: Any, after_forward: bool = False) -> None:
        try:
            request = self.switch(slot, value, after_forward)
        except Exception as exc:  # this run fails; the others go on
            self.failed[slot.run_id] = exc
            return
        if request is not None:
            parked[slot] = request

    def _backward(self, losses: list[Any]) -> None:
        import torch

        torch.autograd.backward(losses)

    # -- the fused forward ---------------------------------------------------------------------------------------

    def _forward(self, requests: list[tuple[Any, Forward]]) -> dict[Any, Any]:
        """Every parked run's backbone outputs: one call over all their rows where their arguments concatenate,
        else (or if that call fails, e.g. out of memory for all the rows at once) one call per run."""
        requests = sorted(requests, key=self._alike)  # alike adapters side by side: one product for them (_LoraPlan)
        batch = _concatenate([request for _, request in requests]) if len(requests) > 1 else None
        failed = None
        if batch is not None:
            kwargs, rows = batch
            members = [(slot.adapter, request, row) for (slot, request), row in zip(requests, rows)]
            plan = _LoraPlan(self.base, members)
            try:
                with plan, _autocast(requests[0][1], kwargs["input_ids"].device), self._measured(kwargs):
                    out = self.original(**kwargs)
            except Exception as exc:
                failed = f"{type(exc).__name__}: {exc}"
            if failed is None:
                self.fused_forwards += 1
                self.fused_runs.update(slot.run_id for slot, _ in requests)
                hidden = out.last_hidden_state
                outputs = {}
                for (slot, request), (start, stop, length) in zip(requests, rows):
                    request.rng = plan.rng[slot.adapter]
                    outputs[slot] = type(out)(last_hidden_state=hidden[start:stop, :length])
                return outputs
            del plan, kwargs, batch  # the failed attempt's memory goes before the runs' own forwards
            logger.warning("a fused forward failed (%s); its runs' forwards run one by one", failed)
        return {slot: self._alone(slot, request) for slot, request in requests}

    def _measured(self, kwargs: dict[str, Any]) -> Any:
        """Around a backbone call: the bytes it saves for the backward per token of its batch, kept for this base
        (`_next_part`) the first time; a no-op once known."""
        if (self.base in self.token_bytes and not self._remeasure) or _tokens(Forward((), kwargs)) is None:
            return contextlib.nullcontext()
        self._remeasure = False
        return _SavedBytes(self.base, kwargs, self.token_bytes)

    def _alike(self, item: tuple[Any, Forward]) -> tuple:
        """Runs with equal keys have adapters whose deltas may be computed together (same rows, rank, alpha and
        dropout or not: the layers decide, `_batch_key`)."""
        slot, request = item
        config = self.base.adapters.peft.peft_config.get(slot.adapter)
        ids = request.kwargs.get("input_ids")
        rows = ids.shape[0] if hasattr(ids, "shape") else 0
        return (
            rows,
            getattr(config, "r", 0) or 0,
            getattr(config, "lora_alpha", 0) or 0,
            bool(getattr(config, "lora_dropout", 0)),
        )

    def _alone(self, slot: Any, request: Forward) -> Any:
        """One run's backbone call as it would be alone (its own adapter, its own random stream); an error is
        handed back to that run to raise."""
        plan = _LoraPlan(self.base, [(slot.adapter, request, None)])
        try:
            with plan, _autocast(request, _device_of(request.args, request.kwargs)), self._measured(request.kwargs):
                out = self.original(*request.args, **request.kwargs)
        except Exception as exc:
            return _Raise(exc)
        request.rng = plan.rng[slot.adapter]
        return out


def _tokens(request: Forward) -> tuple[int, int] | None:
    """(rows, length) of a parked forward's batch (None: not a batch of token ids)."""
    ids = request.kwargs.get("input_ids")
    shape = getattr(ids, "shape", None)
    return (int(shape[0]), int(shape[1])) if shape is not None and len(shape) == 2 else None


class _SavedBytes:
    """While entered: counts the bytes of the distinct storages autograd saves for the backward that are not the
    base's weights (the activations this backbone call keeps alive until its backward). On exit, keeps in
    `into[base]` (bytes per token of the batch, its length): those, plus 8 bytes per vocabulary entry for what the LM
    head and loss of a run may keep per token (float32 logits and log-probabilities; TRL's chunked SFT loss keeps
    less), and no less than an earlier measurement at a shorter length. A storage that cannot be read (a tensor
    subclass without one) makes it keep 0: no limit, said once."""

    def __init__(self, base: Any, kwargs: dict[str, Any], into: dict[Any, tuple[float, int]]):
        self.base, self.into = base, into
        self.rows, self.length = _tokens(Forward((), kwargs))
        self.seen: set[int] = set()
        self.bytes = 0
        self.failed: BaseException | None = None

    def __enter__(self) -> None:
        import torch

        self.weights: set[int] = set()
        for p in self.base.model.parameters():
            try:
                self.weights.add(p.untyped_storage().data_ptr())
            except Exception as exc:  # noqa: BLE001 - a weight of a tensor subclass: the measure is off
                self.failed = exc
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved)
        self.hooks.__enter__()

    def _pack(self, tensor: Any) -> Any:
        try:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self.weights and key not in self.seen:
                self.seen.add(key)
                self.bytes += storage.nbytes()
        except Exception as exc:  # noqa: BLE001 - never fail the forward over a measurement
            self.failed = exc
        # detached: a graph dropped without its backward (its run failed) holds no cycle through this hook
        return tensor.detach()

    def __exit__(self, kind: Any, *exc: Any) -> None:
        self.hooks.__exit__(kind, *exc)
        if kind is not None or not self.rows * self.length:
            return
        if self.failed is not None:
            logger.warning(
                "fused steps: the activations of a pass could not be measured (%s: %s); fused passes are not kept "
                "within the memory available",
                type(self.failed).__name__,
                self.failed,
            )
            self.into[self.base] = (0.0, self.length)
            return
        per_token = self.bytes / (self.rows * self.length) + 8 * _vocab_size(self.base.model)
        earlier = self.into.get(self.base, (0.0, 0))[0]
        self.into[self.base] = (max(per_token, earlier), self.length)


def _vocab_size(model: Any) -> int:
    """The model's vocabulary size (0 where its config does not say)."""
    try:
        config = model.config
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        return int(getattr(text, "vocab_size", 0) or 0)
    except Exception:  # noqa: BLE001 - a config that cannot say: no term for the LM head
        return 0


def _available_bytes(device: Any) -> int | None:
    """Memory a fused batch may take on `device` now: free device memory plus what torch's CUDA cache holds unused;
    on a CPU, the system's available memory (Linux: MemAvailable). None where unknown (no limit is applied)."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    system = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    system = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        try:
            import psutil

            system = int(psutil.virtual_memory().available)
        except ImportError:
            pass
    limits = [value for value in (system, _cgroup_available()) if value is not None]
    return min(limits) if limits else None


def _cgroup_available() -> int | None:
    """What this process's cgroup (its container, a Slurm job, a systemd slice) and the cgroups above it may still
    allocate, the page cache they can reclaim (inactive files) not counted as used: the lowest headroom found, None
    where none sets a limit. A container's limit is below what the host's /proc/meminfo reports."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            root, names = "/sys/fs/cgroup", ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # cgroup v1
            root = "/sys/fs/cgroup/memory"
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts), -1, -1):  # this cgroup, then each one above it (a namespace shows its root)
            folder = "/".join([root, *parts[:depth]])
            headroom = _cgroup_headroom(folder, *names)
            if headroom is not None:
                found.append(headroom)
    return min(found) if found else None


def _cgroup_headroom(folder: str, limit_name: str, usage_name: str, inactive_name: str) -> int | None:
    try:
        with open(f"{folder}/{limit_name}") as f:
            limit = f.read().strip()
        if limit == "max" or int(limit) >= 2**60:  # no limit (v1 writes a huge number)
            return None
        with open(f"{folder}/{usage_name}") as f:
            used = int(f.read().strip())
        inactive = 0
        with open(f"{folder}/memory.stat") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == inactive_name:
                    inactive = int(value)
    except (OSError, ValueError):
        return None
    return max(int(limit) - used + inactive, 0)


def _concatenate(requests: list[Forward]) -> tuple[dict[str, Any], list[tuple[int, int, int]]] | None:
    """The runs' backbone arguments as one batch, padded on the right: (kwargs, [(start, stop, length)]); None when
    they cannot be (positional arguments, other keys, other values)."""
    import torch

    keys = set(requests[0].kwargs)
    if any(r.args or set(r.kwargs) != keys for r in requests) or "input_ids" not in keys:
        return None
    if any(r.autocast != requests[0].autocast for r in requests):  # each in its own precision
        return None
    tensors = [k for k in keys if k in _PADDED]
    others = {k: requests[0].kwargs[k] for k in keys - set(tensors)}
    if any(isinstance(r.kwargs[k], torch.Tensor) for r in requests for k in others):
        return None  # a tensor argument this does not know how to pad
    if any(r.kwargs[k] is not v and r.kwargs[k] != v for r in requests for k, v in others.items()):
        return None
    first = requests[0].kwargs["input_ids"]
    for r in requests:
        for key in tensors:
            value = r.kwargs[key]
            if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape != r.kwargs["input_ids"].shape:
                return None
            if value.device != first.device:
                return None
    longest = max(r.kwargs["input_ids"].shape[1] for r in requests)
    rows, start = [], 0
    for r in requests:
        size, length = r.kwargs["input_ids"].shape
        rows.append((start, start + size, length))
        start += size
    kwargs = dict(others)
    if "attention_mask" not in keys:  # padding needs a mask; a run without one attends to all of its tokens
        tensors.append("attention_mask")
        for r in requests:
            r.kwargs["attention_mask"] = torch.ones_like(r.kwargs["input_ids"])
    for key in tensors:
        parts = [r.kwargs[key] for r in requests]
        kwargs[key] = torch.cat(
            [torch.nn.functional.pad(p, (0, longest - p.shape[1]), value=_PADDED[key]) for p in parts]
        )
    return kwargs, rows


class _LoraPlan:
    """While entered, every LoRA layer of the base adds each run's adapter to that run's rows only."""

    def __init__(self, base: Any, members: list[tuple[str, Forward, tuple[int, int, int] | None]]):
        self.base, self.members = base, members
        self.rng = {adapter: request.rng for adapter, request, _ in members}
        self.entries = {adapter: base.adapters.layer_entries(adapter) for adapter, _, _ in members}
        rows = [r for _, _, r in members]
        self.longest = None if rows[0] is None else max(length for _, _, length in rows)
        self._layouts: dict[Any, list[list[int]]] = {}

    def __enter__(self) -> _LoraPlan:
        self.patched = {layer: layer.__dict__.get("forward") for layer in self.base.adapters.layers}
        for layer in self.patched:
            layer.forward = self._forward_of(layer)
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer, forward in self.patched.items():
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward

    def _forward_of(self, layer: Any) -> Callable[..., Any]:
        import torch

        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            result = layer.base_layer(x, *args, **kwargs)
            dtype = result.dtype
            if self.longest is None:  # one run's own call
                delta = self._delta(layer, self.members[0][0], x)
                return (result if delta is None else result + delta).to(dtype)
            # The runs' deltas on their own rows, one tensor of all of them (zeros where a run's adapter does not
            # target this layer) added at once: on each run's own positions elementwise the same sum as its own
            # `result + delta`, with a backward of one split and one concatenation. (Padding positions get zeros,
            # or what a batched product computes there: never read, `_group_delta`.)
            deltas, targeted = [], False
            for group in self._layout(layer):
                delta = self._group_delta(layer, group, x)
                if delta is None:
                    rows = self.members[group[-1]][2][1] - self.members[group[0]][2][0]
                    delta = result.new_zeros((rows, *result.shape[1:]))
                else:
                    targeted = True
                deltas.append(delta)
            if not targeted:
                return result
            return (result + torch.cat(deltas)).to(dtype)

        return forward

    def _layout(self, layer: Any) -> list[list[int]]:
        """The members (indices, in row order) in groups whose deltas at `layer` one batched product computes:
        consecutive members with the same number of rows whose adapters have an A and a B of the same shapes and
        types here (plain, bias-free linear layers), the same scaling and both dropout or neither. Consecutive
        members whose adapters do not target the layer form a group too (no delta)."""
        layout = self._layouts.get(layer)
        if layout is None:
            layout, last = [], None
            for index, (adapter, _, (start, stop, _)) in enumerate(self.members):
                key = _batch_key(self.entries[adapter].get(layer), stop - start)
                if key is not None and key == last:
                    layout[-1].append(index)
                else:
                    layout.append([index])
                last = key
            self._layouts[layer] = layout
        return layout

    def _group_delta(self, layer: Any, group: list[int], x: Any) -> Any:
        """The deltas of a group's members at `layer` over their rows, padded to the longest (None: untargeted).

        Several members: one batched product per LoRA matrix over their rows as they are in the batch, padding
        included (what the padding positions get is never read: each run keeps its own length, and its tokens do
        not attend to later positions), dropout drawn per run on its own rows, as alone."""
        import torch

        entries = [self.entries[self.members[i][0]].get(layer) for i in group]
        if entries[0] is None:
            return None
        if len(group) == 1:
            delta = self._delta(layer, self.members[group[0]][0], self._own_rows(x, group[0]))
            return _pad_length(delta, self.longest)
        start, stop = self.members[group[0]][2][0], self.members[group[-1]][2][1]
        dtype = entries[0]["lora_A"].weight.dtype
        if isinstance(entries[0]["lora_dropout"], torch.nn.Identity):
            xs = layer._cast_input_dtype(x[start:stop], dtype)
        else:
            parts = []
            for index, entry in zip(group, entries):
                xi = layer._cast_input_dtype(self._own_rows(x, index), dtype)
                with _random_stream(self.rng, self.members[index][0], xi.device):
                    parts.append(_pad_length(entry["lora_dropout"](xi), self.longest))
            xs = torch.cat(parts)
        xs = xs.reshape(len(group), -1, xs.shape[-1])
        a = torch.stack([entry["lora_A"].weight for entry in entries])
        b = torch.stack([entry["lora_B"].weight for entry in entries])
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)) * entries[0]["scaling"]
        return delta.reshape(stop - start, self.longest, -1)

    def _own_rows(self, x: Any, index: int) -> Any:
        """Member `index`'s rows of `x`, cut to its own length, contiguous as its own activations are (CUDA's dropout
        kernel draws differently otherwise)."""
        start, stop, length = self.members[index][2]
        rows = x[start:stop]
        return (rows[:, :length] if length != self.longest else rows).contiguous()

    def _delta(self, layer: Any, adapter: str, x: Any) -> Any:
        """What run `adapter`'s LoRA adds to this layer's output for input `x` (None: it does not target it)."""
        import torch

        entry = self.entries[adapter].get(layer)
        if entry is None:
            return None
        x = layer._cast_input_dtype(x, entry["lora_A"].weight.dtype)
        dropout = entry["lora_dropout"]
        if isinstance(dropout, torch.nn.Identity):  # draws nothing
            return entry["lora_B"](entry["lora_A"](x)) * entry["scaling"]
        with _random_stream(self.rng, adapter, x.device):
            return entry["lora_B"](entry["lora_A"](dropout(x))) * entry["scaling"]


_UNTARGETED = "untargeted"


def _batch_key(entry: dict[str, Any] | None, rows: int) -> Any:
    """What must be equal for two members' deltas to be one batched product (None: never batched)."""
    import torch

    if entry is None:
        return _UNTARGETED
    a, b = entry["lora_A"], entry["lora_B"]
    for linear in (a, b):
        if type(linear) is not torch.nn.Linear or linear.bias is not None:
            return None
        if _hooked(linear):  # its own forward must run
            return None
    dropout = isinstance(entry["lora_dropout"], torch.nn.Identity)
    return rows, a.weight.shape, b.weight.shape, a.weight.dtype, b.weight.dtype, entry["scaling"], dropout


def _hooked(module: Any) -> bool:
    """Whether calling `module` runs hooks (its own or every module's), which a batched product would skip."""
    from torch.nn.modules import module as modules

    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    every = (
        modules._global_forward_hooks,
        modules._global_forward_pre_hooks,
        modules._global_backward_hooks,
        modules._global_backward_pre_hooks,
    )
    return any(own) or any(every)


def _pad_length(tensor: Any, length: int) -> Any:
    """`tensor` ([rows, its length, ...]) padded with zeros to `length` positions."""
    import torch

    missing = length - tensor.shape[1]
    return torch.nn.functional.pad(tensor, (0, 0, 0, missing)) if missing else tensor


class _random_stream:
    """Draw from one run's torch random stream (kept in `streams[name]`), then keep where it got to."""

    def __init__(self, streams: dict[str, Any], name: str, device: Any):
        self.streams, self.name, self.device = streams, name, device

    def __enter__(self) -> None:
        self.saved = _get_rng(self.device)
        _set_rng(self.device, self.streams[self.name])

    def __exit__(self, *exc: Any) -> None:
        self.streams[self.name] = _get_rng(self.device)
        _set_rng(self.device, self.saved)


def install_backward(slot: Any, accelerator: Any) -> None:
    """Make the run's `accelerator.backward(loss)` park its scaled loss while it trains in a fused group (the group
    runs one backward for all); otherwise, and for anything but a plain single-process backward, it is Accelerate's."""
    from accelerate.utils import DistributedType

    original = accelerator.backward

    def backward(loss: Any, **kwargs: Any) -> Any:
        group = getattr(slot, "fused_group", None)
        if (
            group is None
            or greenlet.getcurrent() is not slot.greenlet
            or kwargs
            or accelerator.scaler is not None
            or accelerator.distributed_type != DistributedType.NO
        ):
            return original(loss, **kwargs)
        answer = park(Backward(loss / accelerator.gradient_accumulation_steps))  # as Accelerate scales it
        if isinstance(answer, _Raise):
            raise answer.error
        return None

    accelerator.backward = backward


def _autocast(request: Forward, device: Any) -> Any:
    """The autocast the run's forward was under when it parked (Accelerate's, with mixed precision), for the
    backbone call made on its behalf: the driver runs it outside the run's own context."""
    import torch

    enabled, dtype = request.autocast
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def _device_of(args: tuple, kwargs: dict) -> Any:
    import torch

    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def _get_rng(device: Any) -> Any:
    import torch

    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng(device: Any, state: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def park(request: Any) -> Any:
    """Inside a run's greenlet: hand `request` to the group's driver and wait for its answer."""
    return greenlet.getcurrent().parent.switch(request)
