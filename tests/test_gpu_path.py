"""The GPU path, tested without a GPU: mixed precision per run (Accelerate's bf16 autocast runs on CPUs too),
activation checkpointing on the shared base, the thread state every run's greenlet shares, the process-wide
settings, the GPU defaults (bf16 fallback, device index) and what a single-GPU checkpoint must hold (the CUDA
random state in transformers' layout, the fp16 loss scale), with CUDA faked where only the GPU has it."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn

TRAIN = arithmetic_dataset("train", n=48)


def sweep(max_steps=6, **args):
    return RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
            training_args=RFSFTConfig(
                learning_rate=List([2e-3, 5e-4]), max_steps=max_steps, per_device_train_batch_size=8, **args
            ),
        ),
        trainer_type="SFT",
    )


def watched_model_fn(seen):
    """The demo model, with a hook on one attention projection that records, at every training forward, the
    adapter active there, whether CPU autocast is on, and the dtype the projection computes in."""

    def create(model_config):
        model, tokenizer = demo_model_fn(model_config)

        def hook(module, inputs, output):
            if torch.is_grad_enabled():
                lora_layer = model.model.layers[0].self_attn.q_proj  # PEFT's wrapper once adapters are added
                active = tuple(getattr(lora_layer, "active_adapters", ()))
                seen.append((active, torch.is_autocast_enabled("cpu"), output.dtype))

        model.model.layers[0].self_attn.q_proj.register_forward_hook(hook)
        return model, tokenizer

    return create


def plain_trl(config):
    """The same resolved config trained alone by a plain SFTTrainer: the exactness tests' reference."""
    from test_exactness import _train_alone

    return _train_alone(config, TRAIN)


def test_every_interleaved_run_trains_under_its_own_autocast_as_plain_trl_does(tmp_path):
    """Accelerate marks the model object it prepares and installs its autocast wrapper only once per object: on the
    shared base, only the first run trained in bf16 and the others in float32 (and activating a run removed the
    first run's wrapper). Each run now carries its own wrapper and mark: every run's LoRA layers compute in bf16
    under autocast, and each run ends with plain TRL's bf16 result for its config."""
    seen = []
    exp = Experiment("bf16", experiments_dir=tmp_path)
    exp.run_fit(sweep(), watched_model_fn(seen), TRAIN, None, num_chunks=3, precision="bf16", display=False)
    assert exp.wait(timeout=300)
    exp.end(wait=False)
    runs = exp.runs()
    assert [(r.status.value, r.step) for r in runs] == [("finished", 6), ("finished", 6)]
    assert all(r.config["training_args"]["bf16"] is True for r in runs)
    assert Counter(seen) == {(("run1",), True, torch.bfloat16): 6, (("run2",), True, torch.bfloat16): 6}
    results = exp.results()
    for run in runs:
        weights, losses = plain_trl(run.config)
        exported = tmp_path / f"export-{run.run_id}"
        exp.export(run.run_id, exported)
        from safetensors.torch import load_file

        ours = load_file(exported / "adapter_model.safetensors")
        ours_losses = results[(results.run_id == run.run_id) & (results.metric == "loss")].value.tolist()
        # The same operations in the same order on the same values: bf16 rounds both sides alike, so the
        # results agree to float32 round-off (bf16's own resolution, 2^-8 relative, is far coarser than this).
        assert ours_losses == pytest.approx(losses, rel=1e-5, abs=1e-6)
        for name, value in weights.items():
            key = name.replace(".default", "")
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_is_one_switch_on_the_base_with_one_embedding_hook(tmp_path):
    """Two runs asking for activation checkpointing on one base: the base's layers checkpoint and its embedding
    carries one require-grad hook (TRL's constructor and transformers' train() each added one per run, and none
    was ever removed: four here, all run at every forward)."""
    models = []

    def model_fn(model_config):
        models.append(demo_model_fn(model_config))
        return models[-1]

    exp = Experiment("ckpt", experiments_dir=tmp_path)
    exp.run_fit(sweep(activation_checkpointing=True), model_fn, TRAIN, None, num_chunks=3, display=False)
    assert exp.wait(timeout=300)
    exp.end(wait=False)
    assert [(r.status.value, r.step) for r in exp.runs()] == [("finished", 6), ("finished", 6)]
    ((model, _),) = models
    assert model.is_activation_checkpointing and len(model.get_input_embeddings()._forward_hooks) == 1


def test_a_run_that_leaves_autocast_grad_mode_or_saved_tensor_hooks_behind_is_stopped_there():
    from rf_notebook.engine._slot import _check_neutral

    _check_neutral("idle")  # the neutral state passes
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="x: cpu autocast is on"):
        _check_neutral("x")
    with torch.no_grad(), pytest.raises(RuntimeError, match="grad mode is off"):
        _check_neutral("x")
    with torch.autograd.graph.save_on_cpu(), pytest.raises(RuntimeError, match="saved-tensor hooks are installed"):
        _check_neutral("x")
    _check_neutral("idle again")


# -- the GPU defaults, decided before anything trains (CUDA faked) -------------------------------------------


def fitted(monkeypatch, user_args, model_kwargs=None, on_gpu=True, bf16_gpu=True, precision=None, tmp_path="."):
    from rf_notebook.control import prepare

    monkeypatch.setattr(prepare, "gpu_has_bf16", lambda: bf16_gpu)
    preparer = prepare.Preparer(Path(tmp_path) / "gpu-defaults")
    mc = RFModelConfig(DEMO_MODEL, model_kwargs=dict(model_kwargs or {}))
    args, mc = preparer.fit_device(dict(user_args), mc, on_gpu=on_gpu, precision=precision)
    return args, dict(mc.model_kwargs), list(preparer.device_changes)


def test_a_gpu_without_bfloat16_trains_in_fp16_unless_asked_otherwise(monkeypatch, tmp_path):
    """A T4 / V100 (Colab's free GPU) only emulates bfloat16: TRL's bf16 default falls back to fp16 there (float32
    where the run said fp16=False), with a bfloat16 base loaded in float16. A run that asks for bf16 keeps it."""
    args, kwargs, said = fitted(monkeypatch, {}, {"torch_dtype": torch.bfloat16}, bf16_gpu=False, tmp_path=tmp_path)
    assert (args["bf16"], args["fp16"]) == (False, True) and kwargs["torch_dtype"] == "float16"
    assert said == [
        "bf16 (TRL's default; this GPU has no bfloat16: fp16 mixed precision)",
        "model_kwargs torch_dtype=bfloat16 (this GPU has no bfloat16: the base is loaded in float16)",
    ]
    args, _, said = fitted(monkeypatch, {"fp16": False}, bf16_gpu=False, tmp_path=tmp_path)
    assert (args["bf16"], args["fp16"]) == (False, False) and "no bfloat16: float32" in said[0]
    for user in ({"bf16": True}, {"bf16": False}, {"fp16": True}):  # asked for: kept
        args, _, said = fitted(monkeypatch, user, bf16_gpu=False, tmp_path=tmp_path)
        assert args == user and said == []
    args, kwargs, said = fitted(monkeypatch, {}, {"torch_dtype": "bfloat16"}, bf16_gpu=True, tmp_path=tmp_path)
    assert args == {} and kwargs == {"torch_dtype": "bfloat16"} and said == []  # an A100 / H100: TRL's default


def test_precision_sets_every_run_and_fp16_needs_a_gpu(monkeypatch, tmp_path):
    args, _, said = fitted(monkeypatch, {"fp16": True}, on_gpu=False, precision="bf16", tmp_path=tmp_path)
    assert (args["bf16"], args["fp16"]) == (True, False) and said == []
    args, _, _ = fitted(monkeypatch, {"bf16": True}, on_gpu=True, precision="fp32", tmp_path=tmp_path)
    assert (args["bf16"], args["fp16"]) == (False, False)
    exp = Experiment("p", experiments_dir=tmp_path)
    with pytest.raises(ValueError, match=r"`precision` is 'fp16', but this machine has no GPU"):
        exp.run_fit(sweep(), demo_model_fn, TRAIN, precision="fp16", display=False)
    with pytest.raises(ValueError, match=r"`precision` is 'half', but must be None, 'bf16', 'fp16' or 'fp32'"):
        exp.run_fit(sweep(), demo_model_fn, TRAIN, precision="half", display=False)


def test_the_base_goes_to_the_trainers_device_not_the_notebook_threads(monkeypatch, tmp_path):
    """`torch.cuda.set_device(1)` in the notebook moved the base to cuda:1 while every trainer used cuda:0."""
    import accelerate

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(accelerate, "PartialState", lambda *a, **k: SimpleNamespace(device=torch.device("cuda", 0)))
    _, kwargs, said = fitted(monkeypatch, {}, {"device_map": "auto"}, tmp_path=tmp_path)
    assert kwargs["device_map"] == {"": 0} and "device_map='auto' (the base model stays whole on the GPU" in said[0]


# -- what a single-GPU checkpoint holds (CUDA faked) ---------------------------------------------------------


def test_the_cuda_random_state_is_saved_as_one_gpus_loader_reads_it():
    """A per-device list is the multi-GPU layout; transformers' single-GPU resume cannot set it back ("Didn't manage
    to set back the RNG states"), so dropout diverged after a restart."""
    from transformers.trainer_pt_utils import set_rng_state_for_device
    from transformers.training_args import ParallelMode

    from rf_notebook.engine._process_state import capture
    from rf_notebook.engine.checkpoints import rng_payload

    devices = [torch.full((8,), i, dtype=torch.uint8) for i in range(2)]
    state = capture()
    state = type(state)(state.python, state.numpy, state.torch_cpu, devices, state.gradient_state)
    args = SimpleNamespace(parallel_mode=ParallelMode.NOT_DISTRIBUTED, device=torch.device("cuda", 1))
    payload = rng_payload(state, args)
    assert torch.equal(payload["cuda"], devices[1])
    set_back = []
    fake_cuda = SimpleNamespace(random=SimpleNamespace(set_rng_state=lambda s: set_back.append(s.clone())))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_rng_state_for_device("CUDA", fake_cuda, payload, is_distributed=False)
    assert len(set_back) == 1 and torch.equal(set_back[0], devices[1])
    distributed = SimpleNamespace(parallel_mode=ParallelMode.DISTRIBUTED, device=torch.device("cuda", 0))
    assert rng_payload(state, distributed)["cuda"] is devices


def test_a_checkpoint_keeps_the_fp16_loss_scale(tmp_path, monkeypatch):
    """Without it a resumed run or warm clone restarted at scale 65536 and skipped steps; transformers reads
    scaler.pt back when train() resumes from the folder. (Every trainer here gets a loss scaler, as fp16 on a GPU
    would give it: torch's CPU GradScaler.)"""
    from transformers.trainer import SCALER_NAME

    from rf_notebook.engine.torch_backend import TorchBackend

    build = TorchBackend._build_slot

    def with_scaler(self, *args, **kwargs):
        slot = build(self, *args, **kwargs)
        slot.trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        return slot

    monkeypatch.setattr(TorchBackend, "_build_slot", with_scaler)
    exp = Experiment("scaler", experiments_dir=tmp_path)
    exp.run_fit(sweep(max_steps=4), demo_model_fn, TRAIN, None, num_chunks=2, display=False)
    assert exp.wait(timeout=300)
    exp.end(wait=False)
    for run in exp.runs():
        checkpoint = tmp_path / "scaler" / "runs" / str(run.run_id) / "checkpoints" / "step-4"
        assert SCALER_NAME == "scaler.pt" and torch.load(checkpoint / "scaler.pt")["scale"] == 1024.0


def test_a_second_run_fit_in_another_precision_trains(tmp_path):
    """Accelerate holds one mixed-precision mode per process: a second experiment in another precision failed
    with "AcceleratorState has already been initialized". Each run_fit now sets its own (one trains at a time)."""
    for name, precision in (("first", "bf16"), ("second", "fp32"), ("third", "bf16")):
        exp = Experiment(name, experiments_dir=tmp_path)
        exp.run_fit(sweep(max_steps=2), demo_model_fn, TRAIN, None, num_chunks=1, precision=precision, display=False)
        assert exp.wait(timeout=300)
        exp.end(wait=False)
        assert [r.status.value for r in exp.runs()] == ["finished", "finished"], [r.error for r in exp.runs()]


class SyncCounter:
    """Counts the calls that make the host wait for the device (class-level patches, so every caller counts)."""

    NAMES = ((torch.Tensor, "item"), (torch.Tensor, "cpu"), (torch.Tensor, "tolist"), (torch.cuda, "synchronize"))

    def __init__(self, monkeypatch):
        self.count = 0
        for owner, name in self.NAMES:
            original = getattr(owner, name)

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(owner, name, counted)


def test_rf_notebook_adds_no_host_device_synchronisation_per_step(tmp_path, monkeypatch):
    """On a GPU every `.item()` / `.cpu()` / synchronize stalls the host until the device catches up. Counted in one
    run of N steps trained by rf_notebook and by plain TRL with the same resolved arguments: the difference is the
    same for N = 4 and N = 8 (a constant per run: the checkpoint at its chunk end), so nothing is added per step."""
    counter = SyncCounter(monkeypatch)
    extra = {}
    for steps in (4, 8):
        group = RFGridSearch(
            RFModelConfig(
                DEMO_MODEL,
                peft_config=RFLoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                training_args=RFSFTConfig(max_steps=steps, per_device_train_batch_size=4),
            ),
            trainer_type="SFT",
        )
        exp = Experiment(f"sync{steps}", experiments_dir=tmp_path)
        counter.count = 0
        exp.run_fit(group, demo_model_fn, TRAIN, None, num_chunks=1, display=False)
        assert exp.wait(timeout=300)
        ours = counter.count
        exp.end(wait=False)
        counter.count = 0
        plain_trl(exp.runs()[0].config)
        extra[steps] = ours - counter.count
    assert extra[4] == extra[8], extra


def test_a_resume_names_a_different_precision(tmp_path):
    exp = Experiment("resume-precision", experiments_dir=tmp_path)
    exp.run_fit(sweep(max_steps=2), demo_model_fn, TRAIN, None, num_chunks=1, precision="bf16", display=False)
    exp.end(wait=False)  # stopped where it was: there is something to resume
    again = Experiment("resume-precision", experiments_dir=tmp_path)
    with pytest.raises(ValueError, match=r"`precision` is None, but it was started with 'bf16'"):
        again.run_fit(sweep(max_steps=2), demo_model_fn, TRAIN, None, num_chunks=1, resume=True, display=False)
    again.end(wait=False)


def test_chunk_end_checkpoints_are_written_off_the_training_thread(tmp_path, monkeypatch):
    """At a chunk end the training thread copies the run's state to host memory (on a GPU: pinned buffers, one
    synchronisation) and serializes it (Python work under the GIL: on the writer thread it stalled the next run's
    step for longer than it took); the files are written and fsync'ed by the checkpoint writer thread, which the
    GPU does not wait for. Every checkpoint is on disk, complete, once the experiment's runs are done."""
    import os
    import threading

    synced, serialized = [], []
    fsync, save = os.fsync, torch.save

    def recorded(fd):
        synced.append(threading.current_thread().name)
        return fsync(fd)

    def recorded_save(obj, f, *args, **kwargs):
        serialized.append(threading.current_thread().name)
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recorded)
    monkeypatch.setattr(torch, "save", recorded_save)
    exp = Experiment("async-ckpt", experiments_dir=tmp_path)
    exp.run_fit(sweep(max_steps=4), demo_model_fn, TRAIN, None, num_chunks=2, display=False)
    assert exp.wait(timeout=300)
    exp.end(wait=False)
    assert serialized and set(serialized) == {"rf_notebook-scheduler"}, Counter(serialized)
    assert synced and set(synced) == {"rf_notebook-checkpoints"}, Counter(synced)
    for run in exp.runs():
        folder = tmp_path / "async-ckpt" / "runs" / str(run.run_id) / "checkpoints"
        assert [p.name for p in folder.iterdir()] == ["step-4"]
        files = {p.name for p in (folder / "step-4").iterdir()}
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files


def test_a_failed_checkpoint_write_is_raised_on_the_training_thread_and_no_snapshot_is_dropped():
    """The writer keeps a failed write's OSError for the next `submit` / `flush` (where the engine pauses the
    experiment); the job submitted at that moment is queued all the same; a reader's `wait` leaves the error."""
    import errno

    from rf_notebook.engine.checkpoints import CheckpointWriter

    writer, done = CheckpointWriter(), []

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "/exp/runs/1/checkpoints/.tmp-step-4")

    writer.submit(full_disk)
    writer.wait()  # a reader: the error stays for the training thread
    with pytest.raises(OSError, match="No space left on device: '/exp/runs/1/checkpoints"):
        writer.submit(lambda: done.append("run 2"))
    writer.flush()  # raised once; run 2's checkpoint was written anyway
    assert done == ["run 2"]
    writer.close()
