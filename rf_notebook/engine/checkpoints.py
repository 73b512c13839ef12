"""Writing a run's checkpoint without holding up training.

At a chunk end the training thread takes a `Snapshot`: every tensor of the run's state (adapter weights,
optimizer moments, GRPO's buffered generations) copied to host memory, on a GPU into pinned buffers with
non-blocking copies and one synchronisation for all of them, and the rest (LR schedule, trainer state, random
state, loss scale) as plain values; and it serializes it (`encode`: Python work, which on another thread would
contend for the GIL with training). A `CheckpointWriter` thread then writes the files in transformers' checkpoint
layout into a temporary folder, fsyncs them, renames the folder into place and removes the run's older
checkpoints, one job at a time in the order they were taken. A checkpoint folder is complete or absent; a write
that fails (disk full) is raised by the next call on the writer, on the training thread, where the engine pauses
the experiment. Anything that reads a run's checkpoints (a reload, an export, a resume, the experiment's end)
waits for the writer first.

This module is the one owner of the on-disk layout of a run's folder (`<experiment>/runs/<run id>/`):
`checkpoints/step-<N>/` (the newest chunk end's state), `warm-start/` (a warm clone's starting state), and what
rf_notebook adds to transformers' checkpoint files (trainer counters, GRPO's buffered generations).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointWriter",
    "Snapshot",
    "Encoded",
    "encode",
    "to_host",
    "write_snapshot",
    "replace_checkpoint",
    "fsync_dir",
    "checkpoints_of",
    "latest_checkpoint",
    "resume_point",
    "export_checkpoint",
    "restore_counters",
    "rng_payload",
    "TRAINER_COUNTERS",
    "WARM_START",
]

# GRPO / RLOO's generations still to be trained on (steps_per_generation > 1 or num_iterations > 1), kept with a
# state written in the middle of a generation cycle (a warm start, or a run unloaded where it was stopped).
GENERATION_BUFFER = "rf_generation_buffer.pt"
# TRL trainer attributes that transformers' checkpoints do not keep: tokens seen (the `num_tokens` metric) and
# GRPO / RLOO's micro-step counter (which buffered generation batch a step uses).
TRAINER_COUNTERS = ("_total_train_tokens", "_step")
COUNTERS = "rf_trainer_counters.json"
WARM_START = "warm-start"  # a warm clone's starting state, in its run folder


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A run's whole state at one optimizer step, detached from the live run (host copies and plain values)."""

    adapter: dict[str, Any]  # PEFT state dict of the run's adapter, contiguous host tensors
    adapter_config: Any  # peft.LoraConfig, with base_model_name_or_path set
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    trainer_state: str  # TrainerState as transformers writes trainer_state.json
    rng: dict[str, Any]  # rng_state.pth, transformers' layout
    scaler: dict[str, Any] | None  # the fp16 loss scaler's state
    counters: dict[str, Any]  # TRL trainer attributes transformers' checkpoints do not keep
    generation_buffer: Any = None


def to_host(value: Any) -> Any:
    """`value` with every tensor copied to host memory (nested dicts, lists and tuples rebuilt, other values
    kept). CUDA tensors go to pinned buffers with non-blocking copies and one synchronisation for all of them."""
    import torch

    on_device = []

    def copy(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            item = item.detach()
            if item.device.type == "cuda":
                host = torch.empty(item.shape, dtype=item.dtype, pin_memory=True)
                host.copy_(item, non_blocking=True)
                on_device.append(host)
                return host
            if item.device.type != "cpu":  # another accelerator (MPS, XPU): a plain blocking copy
                return item.to("cpu", copy=True).contiguous()
            return item.clone(memory_format=torch.contiguous_format)
        if isinstance(item, dict):
            return {k: copy(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(copy(v) for v in item)
        return item

    copied = copy(value)
    if on_device:
        torch.cuda.synchronize()
    return copied


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A snapshot serialized: each checkpoint file's bytes, and the adapter's PEFT config (which writes its own
    JSON). What the checkpoint writer thread gets: writing it is mostly file I/O, which runs without the GIL."""

    files: dict[str, bytes]
    adapter_config: Any


def encode(snapshot: Snapshot) -> Encoded:
    """Serialize `snapshot` into its files' bytes, on the calling thread.

    The training thread does this at a chunk end rather than the writer thread: serializing is Python work under
    the GIL (pickling the optimizer state is ~30 us per tensor), and done on another thread it stalls the next
    run's training step for longer than it takes (measured on the demo model with 2 CPUs: the first step after
    each chunk end took ~13 ms longer, and more the more runs the experiment had, because fewer of the writes
    fell into the waits before a rung's decisions)."""
    import torch
    from safetensors.torch import save as safetensors_bytes

    def pickled(value: Any) -> bytes:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.getvalue()

    files = {
        "adapter_model.safetensors": safetensors_bytes(snapshot.adapter),
        "optimizer.pt": pickled(snapshot.optimizer),
        "scheduler.pt": pickled(snapshot.scheduler),
        "trainer_state.json": snapshot.trainer_state.encode("utf-8"),
        "rng_state.pth": pickled(snapshot.rng),
        COUNTERS: json.dumps(snapshot.counters).encode("utf-8"),
    }
    if snapshot.scaler is not None:  # fp16: a resumed run or warm clone goes on at the parent's loss scale
        files["scaler.pt"] = pickled(snapshot.scaler)
    if snapshot.generation_buffer is not None:
        files[GENERATION_BUFFER] = pickled(snapshot.generation_buffer)
    return Encoded(files, snapshot.adapter_config)


def write_snapshot(encoded: Encoded, path: Path) -> None:
    """Write an encoded snapshot into folder `path` in transformers' checkpoint layout (what
    `train(resume_from_checkpoint=path)` reads), each file fsync'ed."""
    path.mkdir(parents=True, exist_ok=True)
    for name, data in encoded.files.items():
        (path / name).write_bytes(data)
    encoded.adapter_config.save_pretrained(os.fspath(path))
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriter:
    """One background thread that runs write jobs in the order they were submitted.

    A job's `OSError` is kept and raised by the next `submit` or `flush` (on the training thread: the engine turns
    it into a paused experiment, as a failed write there did); any other error is logged and raised the same way,
    as an `OSError` naming it. At most two snapshots wait (each holds a run's adapter and optimizer state in host
    memory): a third `submit` waits for the disk."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=2)
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job` (always: a snapshot is never dropped), then raise an earlier job's failure, if any."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="rf_notebook-checkpoints", daemon=True)
            self._thread.start()
        self._jobs.put(job)
        self._raise()

    def wait(self) -> None:
        """Wait until every submitted job is done, leaving a failure to be raised on the training thread (any
        thread may wait: a reader of the checkpoints)."""
        if self._thread is not None:
            self._jobs.join()

    def flush(self) -> None:
        """Wait until every submitted job is done; raise the first failure since the last raise."""
        self.wait()
        self._raise()

    def close(self) -> None:
        """Flush, then end the thread."""
        try:
            self.flush()
        finally:
            if self._thread is not None and self._thread.is_alive():
                self._jobs.put(None)
                self._thread.join()
            self._thread = None

    def _raise(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                job()
            except OSError as exc:  # kept without its traceback, whose frames hold the snapshot
                if self._error is None:
                    self._error = OSError(exc.errno, exc.strerror, exc.filename) if exc.errno else OSError(str(exc))
            except Exception as exc:  # a bug in writing: reported like a failed write, the thread goes on
                logger.exception("writing a checkpoint failed")
                self._error = self._error or OSError(f"writing a checkpoint failed: {exc!r}")
            finally:
                job = None  # the snapshot it holds is freed now, not when the next one arrives
                self._jobs.task_done()


def replace_checkpoint(snapshot: Encoded, folder: Path, step: int) -> Path:
    """Write `snapshot` as `<folder>/step-<step>` atomically (a temporary folder renamed into place) and remove the
    run's other checkpoints (step-N, unfinished .tmp-step-N; nothing else in the folder)."""
    final = folder / f"step-{step}"
    tmp = folder / f".tmp-step-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_snapshot(snapshot, tmp)
    if final.exists():  # the same step again (a resumed run re-reaching its rung): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(folder)
    for old in folder.iterdir():
        name = old.name.removeprefix(".tmp-")
        if old != final and name.startswith("step-") and name.removeprefix("step-").isdigit():
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints_of(output_dir: str | Path) -> Path:
    """The folder of a run's chunk-end checkpoints."""
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> tuple[int, Path] | None:
    """A run's newest complete checkpoint (step, folder), or None. Unfinished temporary folders are ignored."""
    folder = checkpoints_of(output_dir)
    found = []
    for path in folder.glob("step-*") if folder.is_dir() else ():
        suffix = path.name.removeprefix("step-")
        if suffix.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(suffix), path))
    return max(found) if found else None


def resume_point(output_dir: str | Path) -> tuple[int, str] | None:
    """Where a run that is not in memory continues: (step, folder) of its newest checkpoint, else of the warm
    start it was cloned with (a warm clone before its first chunk end), else None (from scratch)."""
    point = latest_checkpoint(output_dir)
    warm = Path(output_dir) / WARM_START
    if point is None and (warm / "trainer_state.json").is_file():
        point = (json.loads((warm / "trainer_state.json").read_text())["global_step"], warm)
    return None if point is None else (point[0], os.fspath(point[1]))


def export_checkpoint(output_dir: str | Path, path: str | Path, record: Mapping[str, Any]) -> Path:
    """Copy the adapter of a run's newest checkpoint to `path` as a PEFT folder, with rf_config.json."""
    point = latest_checkpoint(output_dir)
    if point is None:
        raise RuntimeError(
            f"run {record['run_id']} has no checkpoint in {str(output_dir)!r} (it never finished a chunk), and no "
            "live model to export from"
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copyfile(point[1] / name, out / name)
    (out / "rf_config.json").write_text(json.dumps(dict(record), indent=2, default=str))
    return out


def restore_counters(trainer: Any, folder: str | Path) -> None:
    """Put back into a rebuilt trainer what transformers' `resume_from_checkpoint` does not: the trainer counters
    and GRPO / RLOO's buffered generations written with the state in `folder`."""
    folder = Path(folder)
    counters = folder / COUNTERS
    for key, value in (json.loads(counters.read_text()) if counters.is_file() else {}).items():
        if key in TRAINER_COUNTERS:
            setattr(trainer, key, value)
    buffer = folder / GENERATION_BUFFER
    if buffer.is_file():
        import torch

        trainer._buffered_inputs = torch.load(buffer, weights_only=True, map_location=trainer.args.device)


def rng_payload(state: Any, args: Any) -> dict[str, Any]:
    """A run's random state (`_process_state.ProcessState`) in transformers' `rng_state.pth` layout, which
    `train(resume_from_checkpoint=...)` reads: on one GPU the CUDA state of the trainer's device alone (a
    per-device list is the multi-GPU layout, and one GPU's loader cannot set it back: transformers logs "Didn't
    manage to set back the RNG states")."""
    rng = {"python": state.python, "numpy": state.numpy, "cpu": state.torch_cpu}
    if state.torch_cuda is not None:
        from transformers.training_args import ParallelMode

        if args.parallel_mode == ParallelMode.DISTRIBUTED:
            rng["cuda"] = state.torch_cuda
        else:
            rng["cuda"] = state.torch_cuda[args.device.index or 0]
    return rng
