"""Memory: peak resident memory for N runs sharing one base model, vs. N separate model copies.

    python -m bench.memory [--model demo|llama512] [--runs 1 4 8 16] [--pruned]

Each N runs in a fresh child process (peaks only grow within a process): the child loads the base, trains N
adapters a few steps each on it with rf_notebook, and reports its peak RSS (VmHWM), or on a GPU its peak of
allocated GPU memory (the column keeps the name "peak RSS"). The increment per extra run
is compared with what a run must hold: its LoRA weights, their gradients and AdamW's two moments (16 bytes per
adapter parameter in float32); target: at most 10% more. "N copies" is computed: the 1-run figure plus N - 1
times (base weights + a run's share). Writes bench/results/memory-<model>.json and the table in BENCHMARKS.md.

`--pruned`: what a pruned sweep keeps resident. 32 runs of which successive halving stops 24 at the first chunk
end, vs 8 runs: resident memory (VmRSS after gc and malloc_trim, or allocated GPU memory) once training is over,
with stopped runs unloaded to their checkpoints (the default) and, in the same bench run, with unloading turned off
(how it was before). Writes bench/results/memory-pruned-<model>.json and its table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench._common import MODELS, header, new_experiment, save, sweep, write_section

MIB = 1024 * 1024


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(model: str, runs: int) -> dict:
    import torch
    import transformers
    from safetensors import safe_open

    from rf_notebook.demo import arithmetic_dataset

    transformers.logging.set_verbosity_error()
    model_fn = MODELS[model]
    base, _ = model_fn(None)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    del base
    with tempfile.TemporaryDirectory() as workdir:
        exp = new_experiment("memory", workdir)
        # two chunks: every run is alive (adapter, trainer, optimizer state) at the same time
        exp.run_fit(
            sweep(runs, 4, 8), model_fn, arithmetic_dataset("train", n=32), None, num_chunks=2, seed=0, fuse=False
        )
        exp.wait()
        assert all(r.status.value == "finished" for r in exp.runs())
        out = exp.export(1, Path(workdir) / "adapter")
        with safe_open(out / "adapter_model.safetensors", "pt") as f:
            adapter_params = sum(f.get_tensor(k).numel() for k in f.keys())
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss()
        exp.end()
    return {"runs": runs, "peak_rss": peak, "adapter_params": adapter_params, "base_bytes": base_bytes}


def resident() -> int:
    """Memory held now: allocated GPU memory, or VmRSS after returning freed heap to the OS."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def pruned_child(model: str, runs: int, unload: bool) -> dict:
    """`runs` configs (16 learning rates x lora_dropout), successive halving keeping 8 at the first chunk end."""
    import transformers

    from bench._common import LEARNING_RATES
    from rf_notebook import List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
    from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset
    from rf_notebook.engine import _engine
    from rf_notebook.policies import SuccessiveHalving

    transformers.logging.set_verbosity_error()
    if not unload:
        _engine.Engine._unload_stopped = lambda self, idle: None
    lrs = LEARNING_RATES[: min(runs, 16)]
    group = RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(
                r=8, lora_alpha=16, lora_dropout=List([0.0, 0.05][: max(runs // 16, 1)]), target_modules="all-linear"
            ),
            training_args=RFSFTConfig(learning_rate=List(lrs), per_device_train_batch_size=4, max_steps=8),
        ),
        trainer_type="SFT",
    )
    policy = SuccessiveHalving(eta=runs // 8, min_chunks=1) if runs > 8 else None
    with tempfile.TemporaryDirectory() as workdir:
        exp = new_experiment("memory-pruned", workdir)
        exp.run_fit(
            group,
            MODELS[model],
            arithmetic_dataset("train", n=32),
            arithmetic_dataset("eval", n=8),
            num_chunks=4,
            seed=0,
            policy=policy,
            display=False,
            fuse=False,
        )
        exp.wait()
        statuses = [r.status.value for r in exp.runs()]
        held = resident()
        exp.end()
    return {
        "runs": runs,
        "unload": unload,
        "resident": held,
        "finished": statuses.count("finished"),
        "stopped": statuses.count("stopped"),
    }


def pruned(model: str, argv: list[str] | None) -> dict:
    points = []
    for runs, unload in ((8, True), (32, True), (32, False)):
        out = subprocess.run(
            [sys.executable, "-m", "bench.memory", "--model", model, "--pruned-child", str(runs), str(int(unload))],
            check=True,
            capture_output=True,
            text=True,
        )
        points.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = points[0]["resident"]
    result = {
        **header(f"memory-pruned-{model}", argv),
        "model": model,
        "points": points,
        "ratio_unloaded": points[1]["resident"] / base,
        "ratio_kept": points[2]["resident"] / base,
    }
    rows = []
    for r in [r for r in save(f"memory-pruned-{model}", result) if r["benchmark"].startswith("memory-pruned")]:
        for p in r["points"]:
            rows.append(
                [
                    r["date"],
                    r["machine"],
                    r["model"],
                    f"{p['runs']} ({p['stopped']} stopped)",
                    "yes" if p["unload"] else "no (before)",
                    f"{p['resident'] / MIB:.0f}",
                    f"{p['resident'] / r['points'][0]['resident']:.2f}",
                    f"`{r['command']}`",
                ]
            )
    write_section(
        "memory-pruned",
        "Memory of a pruned sweep",
        "Resident memory once training is over (VmRSS after gc + malloc_trim; on a GPU, allocated memory): 8 runs, "
        "vs 32 runs of which successive halving stopped 24 at the first chunk end, with stopped runs unloaded to "
        "their checkpoints (default) and without (before). Target: 32-pruned-to-8 near 8 runs.",
        ["date", "machine", "model", "runs", "stopped runs unloaded", "resident (MiB)", "vs 8 runs", "command"],
        rows,
    )
    print(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama512")
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--pruned", action="store_true", help="the pruned-sweep rows instead")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pruned-child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pruned_child:
        print(json.dumps(pruned_child(args.model, args.pruned_child[0], bool(args.pruned_child[1]))))
        return {}
    if args.pruned:
        return pruned(args.model, argv)
    if args.child:
        print(json.dumps(child(args.model, args.child)))
        return {}

    points = []
    for n in args.runs:
        out = subprocess.run(
            [sys.executable, "-m", "bench.memory", "--model", args.model, "--child", str(n)],
            check=True,
            capture_output=True,
            text=True,
        )
        points.append(json.loads(out.stdout.strip().splitlines()[-1]))
    one = points[0]
    per_run_needed = one["adapter_params"] * 16
    for p in points:
        extra = p["runs"] - one["runs"]
        p["increment_per_run"] = (p["peak_rss"] - one["peak_rss"]) / extra if extra else None
        p["copies_bytes"] = one["peak_rss"] + extra * (one["base_bytes"] + per_run_needed)
    increments = [p["increment_per_run"] for p in points if p["increment_per_run"] is not None]
    result = {
        **header(f"memory-{args.model}", argv),
        "model": args.model,
        "points": points,
        "needed_per_run_bytes": per_run_needed,
        "worst_increment_ratio": max(increments) / per_run_needed if increments else None,
    }
    rows = []
    for r in [r for r in save(f"memory-{args.model}", result) if not r["benchmark"].startswith("memory-pruned")]:
        for p in r["points"]:
            inc = p["increment_per_run"]
            rows.append(
                [
                    r["date"],
                    r["machine"],
                    r["model"],
                    p["runs"],
                    f"{p['peak_rss'] / MIB:.0f}",
                    f"{p['copies_bytes'] / MIB:.0f}",
                    f"{inc / MIB:.2f}" if inc is not None else "-",
                    f"{r['needed_per_run_bytes'] / MIB:.2f}",
                    f"{inc / r['needed_per_run_bytes']:.2f}" if inc else "-",
                    f"`{r['command']}`",
                ]
            )
    write_section(
        "memory",
        "Memory",
        "Peak RSS of a process training N adapters on one shared base (each N in a fresh process), vs. N separate "
        "copies (computed). Needed per run = LoRA weights + gradients + AdamW moments, float32 (16 B/parameter). "
        "Target: increment per extra run <= 1.1 x needed.",
        [
            "date",
            "machine",
            "model",
            "runs",
            "peak RSS (MiB)",
            "N copies (MiB, computed)",
            "increment / run (MiB)",
            "needed / run (MiB)",
            "increment / needed",
            "command",
        ],
        rows,
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
