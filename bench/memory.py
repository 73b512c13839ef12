"""Memory: peak resident memory for N runs sharing one base model, vs. N separate model copies.

    python -m bench.memory [--model demo|llama512] [--runs 1 4 8 16]

Each N runs in a fresh child process (peaks only grow within a process): the child loads the base, trains N
adapters a few steps each on it with rf_notebook, and reports its peak RSS (VmHWM), or on a GPU its peak of
allocated GPU memory (the column keeps the name "peak RSS"). The increment per extra run
is compared with what a run must hold: its LoRA weights, their gradients and AdamW's two moments (16 bytes per
adapter parameter in float32); target: at most 10% more. "N copies" is computed: the 1-run figure plus N - 1
times (base weights + a run's share). Writes bench/results/memory-<model>.json and the table in BENCHMARKS.md.
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
        exp.run_fit(sweep(runs, 4, 8), model_fn, arithmetic_dataset("train", n=32), None, num_chunks=2, seed=0)
        exp.wait()
        assert all(r.status.value == "finished" for r in exp.runs())
        out = exp.export(1, Path(workdir) / "adapter")
        with safe_open(out / "adapter_model.safetensors", "pt") as f:
            adapter_params = sum(f.get_tensor(k).numel() for k in f.keys())
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss()
        exp.end()
    return {"runs": runs, "peak_rss": peak, "adapter_params": adapter_params, "base_bytes": base_bytes}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama512")
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
    for r in save(f"memory-{args.model}", result):
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
