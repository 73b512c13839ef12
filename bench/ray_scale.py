"""Scale-out on Ray: the same sweep on 1 and on 2 workers (`Experiment(cluster="ray", workers=...)`).

    python -m bench.ray_scale [--model demo|llama512] [--runs 8] [--workers 1 2] [--max-steps 32] [--rounds 2]

A local Ray (started here, no dashboard), CPU workers of one thread each. Each round trains the `runs`-config SFT
sweep (learning rates differ, the same compute per run) once per worker count, in alternating order. Figures: the
time from `run_fit` returning (every worker started and its runs built) to the end of `wait()` (training, chunk-end
evaluations are off, checkpoints on), and the time `run_fit` took (starting the workers: each imports torch and
TRL and loads the base). Scaling: time on 1 worker / time on N (median of the rounds' ratios; target >= 1.7 for 2
workers here). Writes bench/results/ray_scale-<model>.json and the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import transformers

from bench._common import MODELS, header, save, sweep, write_section
from rf_notebook.demo import arithmetic_dataset


def measure(args, workers: int, model_fn, train, workdir: str) -> tuple[float, float]:
    """(seconds of training, seconds `run_fit` took)."""
    from rf_notebook import Experiment

    exp = Experiment("ray-scale", experiments_dir=tempfile.mkdtemp(dir=workdir), cluster="ray", workers=workers)
    start = time.perf_counter()
    search = sweep(args.runs, args.max_steps, args.batch_size)
    exp.run_fit(search, model_fn, train, None, num_chunks=args.num_chunks, seed=0, display=False)
    started = time.perf_counter()
    exp.wait()
    done = time.perf_counter()
    failed = [r.error for r in exp.runs() if r.status.value != "finished"]
    exp.end()
    if failed:
        raise RuntimeError(f"runs failed: {failed}")
    return done - started, started - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-steps", type=int, default=32)
    parser.add_argument("--num-chunks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    from rf_notebook.engine.ray_backend import connect

    ray = connect()
    model_fn = MODELS[args.model]
    train = arithmetic_dataset("train", n=args.max_steps * args.batch_size)
    counts = sorted(args.workers)
    training: dict[int, list[float]] = {n: [] for n in counts}
    starting: dict[int, list[float]] = {n: [] for n in counts}
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for round_ in range(args.rounds):
                for n in counts if round_ % 2 == 0 else counts[::-1]:
                    seconds, start = measure(args, n, model_fn, train, workdir)
                    training[n].append(seconds)
                    starting[n].append(start)
    finally:
        ray.shutdown()
    speedups = {n: [a / b for a, b in zip(training[counts[0]], training[n])] for n in counts}
    result = {
        **header(f"ray_scale-{args.model}", argv),
        "model": args.model,
        "runs": args.runs,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "num_chunks": args.num_chunks,
        "workers": counts,
        "training_s": {str(n): training[n] for n in counts},
        "run_fit_s": {str(n): starting[n] for n in counts},
        "speedup": {str(n): statistics.median(speedups[n]) for n in counts},
        "speedup_range": {str(n): [min(speedups[n]), max(speedups[n])] for n in counts},
    }
    rows = [
        [
            r["date"],
            r["machine"],
            r["model"],
            f"{r['runs']} x {r['max_steps']} ({r['batch_size']})",
            str(n),
            f"{statistics.median(r['training_s'][str(n)]):.1f}",
            f"{statistics.median(r['run_fit_s'][str(n)]):.1f}",
            f"{r['speedup'][str(n)]:.2f} [{r['speedup_range'][str(n)][0]:.2f}, {r['speedup_range'][str(n)][1]:.2f}]",
            f"`{r['command']}`",
        ]
        for r in save(f"ray_scale-{args.model}", result)
        for n in r["workers"]
    ]
    write_section(
        "ray_scale",
        "Scale-out on Ray",
        "The same SFT sweep on 1 and on N Ray workers (local Ray, CPU workers of one thread each), alternating, median "
        "of the rounds: training time (from `run_fit` returning to the end of `wait()`), `run_fit` time (starting the "
        "workers, which import torch and TRL and load the base), and the speedup of training over 1 worker. Target: "
        ">= 1.7 on 2 workers here.",
        [
            "date",
            "machine",
            "model",
            "runs x steps (batch)",
            "workers",
            "training s",
            "run_fit s",
            "speedup",
            "command",
        ],
        rows,
    )
    return result


if __name__ == "__main__":
    main()
