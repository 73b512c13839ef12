"""Writing a run's checkpoint without holding up training.

At a chunk end the training thread only takes a `Snapshot`: every tensor of the run's state (adapter weights,
optimizer moments, GRPO's buffered generations) copied to host memory, on a GPU into pinned buffers with
non-blocking copies and one synchronisation for all of them, and the rest (LR schedule, trainer state, random
state, loss scale) as plain values. A `CheckpointWriter` thread then writes the files in transformers' checkpoint
layout into a temporary folder, fsyncs them, renames the folder into place and removes the run's older
checkpoints, one job at a time in the order they were taken. A checkpoint folder is complete or absent; a write
that fails (disk full) is raised by the next call on the writer, on the training thread, where the engine pauses
the experiment. Anything that reads a run's checkpoints (a reload, an export, a resume, the experiment's end)
waits for the writer first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["CheckpointWriter", "Snapshot", "to_host", "write_snapshot", "fsync_dir"]

GENERATION_BUFFER = "rf_generation_buffer.pt"  # GRPO / RLOO generations still to be trained on


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


def write_snapshot(snapshot: Snapshot, path: Path) -> None:
    """Write `snapshot` into folder `path` in transformers' checkpoint layout (what
    `train(resume_from_checkpoint=path)` reads), each file fsync'ed."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(snapshot.adapter, os.fspath(path / "adapter_model.safetensors"))
    snapshot.adapter_config.save_pretrained(os.fspath(path))
    torch.save(snapshot.optimizer, path / "optimizer.pt")
    torch.save(snapshot.scheduler, path / "scheduler.pt")
    (path / "trainer_state.json").write_text(snapshot.trainer_state, encoding="utf-8")
    torch.save(snapshot.rng, path / "rng_state.pth")
    if snapshot.scaler is not None:  # fp16: a resumed run or warm clone goes on at the parent's loss scale
        torch.save(snapshot.scaler, path / "scaler.pt")
    (path / "rf_trainer_counters.json").write_text(json.dumps(snapshot.counters))
    if snapshot.generation_buffer is not None:
        torch.save(snapshot.generation_buffer, path / GENERATION_BUFFER)
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


def replace_checkpoint(snapshot: Snapshot, folder: Path, step: int) -> Path:
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
