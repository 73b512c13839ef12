"""`rf_notebook.info()` / `python -m rf_notebook info`: the versions, device and kernel facts that decide what
rf_notebook does here, and what it will do about them. The first thing to paste into a bug report."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import IO, Any

from rf_notebook import _kernel, _versions

__all__ = ["facts", "info"]

_TRACKERS = ("mlflow", "tensorboard", "trackio")
_LIBRARIES = (*_versions.CHECKED, "anywidget", "ipywidgets", "ipykernel", "bokeh", "bitsandbytes", *_TRACKERS)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def facts() -> dict[str, Any]:
    """Everything `info()` prints, as data."""
    import rf_notebook

    versions = {name: _version(name) for name in _LIBRARIES}
    required = _versions.requirements()
    found: dict[str, Any] = {
        "rf_notebook": rf_notebook.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "version_problems": _versions.problems({n: versions.get(n) for n in required}, required),
        "colab": "google.colab" in sys.modules,
        "in_kernel": _kernel.in_kernel(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    found.update(_device())
    found.update(_behaviour(found))
    return found


def _device() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"torch_threads": None, "cuda": None, "gpus": [], "bf16": None}
    device: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        device["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        device["bf16"] = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        device["gpus"], device["bf16"] = [], None
    return device


def _behaviour(found: dict[str, Any]) -> dict[str, str]:
    """What rf_notebook does about these facts."""
    from rf_notebook.widget import _default_mode

    if not found["gpus"]:
        precision = (
            "CPU: float32 (a config's bf16 / fp16 is turned off, said once); run_fit(precision='bf16') autocasts"
        )
    elif found["bf16"]:
        precision = f"GPU {found['gpus'][0]}: TRL's default bf16 mixed precision"
    else:
        precision = f"GPU {found['gpus'][0]} has no bfloat16: fp16 mixed precision by default (a run may ask for bf16)"
    mode = _default_mode()
    panel = f"{mode} mode" + (
        " (Colab: the view polls, pushes from a background thread stall there)" if mode == "pull" else ""
    )
    if not found["in_kernel"]:
        clicks = "not in a Jupyter kernel: run rf_notebook.info() in a notebook cell for the kernel's facts"
    elif _kernel.serves_while_blocked():
        clicks = "while a cell blocks (exp.wait()), clicks arrive on a subshell or are served by the wait itself"
    else:
        clicks = "this ipykernel's internals are not the ones rf_notebook knows: clicks wait for a blocked cell"
    bnb = found["versions"].get("bitsandbytes")
    if bnb is None:
        qlora = "bitsandbytes not installed: a quantization_config base is refused (pip install 'rf_notebook[qlora]')"
    else:
        qlora = f"bitsandbytes {bnb}: a quantized base is loaded once, prepared once and shared by every run"
    have = [name for name in _TRACKERS if found["versions"].get(name)]
    trackers = (f"run_fit(trackers=...) can log to {', '.join(have)}" if have else "no tracker installed") + (
        ""
        if len(have) == len(_TRACKERS)
        else " (pip install 'rf_notebook[tracking]' adds MLflow, TensorBoard, Trackio)"
    )
    return {"precision": precision, "panel": panel, "clicks": clicks, "qlora": qlora, "trackers": trackers}


def info(file: IO[str] | None = None) -> None:
    """Print the facts, one per line."""
    found = facts()
    out = file or sys.stdout
    print(f"rf_notebook {found['rf_notebook']}, Python {found['python']} on {found['platform']}", file=out)
    print(
        "versions: " + ", ".join(f"{name} {found['versions'][name] or '-'}" for name in _LIBRARIES),
        file=out,
    )
    for problem in found["version_problems"]:
        print(f"  NOT SUPPORTED: {problem}", file=out)
    gpus = ", ".join(found["gpus"]) or "none"
    print(
        f"device: GPUs {gpus} (CUDA {found['cuda'] or '-'}); {found['cpu_count']} CPUs, torch threads "
        f"{found['torch_threads']}, OMP_NUM_THREADS={found['omp_num_threads'] or 'unset'}",
        file=out,
    )
    kernel = "Colab" if found["colab"] else "Jupyter kernel" if found["in_kernel"] else "no kernel"
    print(f"front end: {kernel}; panel in {found['panel']}", file=out)
    print(f"precision: {found['precision']}", file=out)
    print(f"buttons: {found['clicks']}", file=out)
    print(f"QLoRA: {found['qlora']}", file=out)
    print(f"trackers: {found['trackers']}", file=out)
