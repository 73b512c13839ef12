"""What logging every run to MLflow, TensorBoard and Trackio costs training.

    python -m bench.tracking [--model demo|llama512] [--runs 4] [--num-chunks 8] [--max-steps 64] [--repeats 4]

The same sweep (`--runs` configs x `--max-steps` steps, evaluated every 16 steps) trained twice per repetition in one
process, each time in a fresh experiment: (a) with `trackers=["mlflow", "tensorboard", "trackio"]` (their default
stores: SQLite in the experiment folder, event files in it, Trackio's local store in a temporary TRACKIO_DIR), (b)
without. Modes alternate order between repetitions, after one warm-up of each (the trackers' imports are paid once
per process, not per experiment: reported separately as `import_s`). Each time is `run_fit` to the end of `wait()`,
which includes the trackers catching up with the last values. Reports a / b (median, min, max) and what the trackers
received. Writes bench/results/tracking-<model>.json and its table in BENCHMARKS.md. Target: a / b <= 1.02.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from bench._common import MODELS, Timing, header, new_experiment, parse_args, save, sweep, write_section

TRACKERS = ["mlflow", "tensorboard", "trackio"]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, repeats=4)
    os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="trackio-"))  # before trackio is imported
    t0 = time.perf_counter()
    import mlflow.tracking  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import trackio.sqlite_storage  # noqa: F401

    import_s = time.perf_counter() - t0

    from rf_notebook.demo import arithmetic_dataset

    model_fn = MODELS[args.model]
    train = arithmetic_dataset("train", n=args.max_steps * args.batch_size)
    evl = arithmetic_dataset("eval", n=32)
    workdir = tempfile.mkdtemp()
    search = sweep(args.runs, args.max_steps, args.batch_size, eval_strategy="steps", eval_steps=16)

    def once(trackers: list[str]) -> tuple[float, int]:
        exp = new_experiment("tracking", workdir)
        with Timing() as t:
            exp.run_fit(
                search, model_fn, train, evl, num_chunks=args.num_chunks, seed=0, display=False, trackers=trackers
            )
            assert exp.wait()
        assert all(r.status.value == "finished" for r in exp.runs()), [r.error for r in exp.runs()]
        assert not exp.tracking_errors(), exp.tracking_errors()
        rows = len(exp.store.metrics())
        exp.end()
        return t.wall, rows

    once(TRACKERS)
    once([])  # warm-ups
    times: dict[str, list[float]] = {"a": [], "b": []}
    rows = 0
    for i in range(args.repeats):
        for mode in ("a", "b") if i % 2 == 0 else ("b", "a"):
            wall, rows = once(TRACKERS if mode == "a" else [])
            times[mode].append(wall)
    ratios = [a / b for a, b in zip(times["a"], times["b"])]
    result = {
        **header(f"tracking-{args.model}", argv),
        "model": args.model,
        "runs": args.runs,
        "num_chunks": args.num_chunks,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "trackers": TRACKERS,
        "metric_rows": rows,
        "import_s": import_s,
        "tracked_s": times["a"],
        "untracked_s": times["b"],
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
    write_table(save(f"tracking-{args.model}", result))
    print(result)
    return result


def write_table(results: list[dict]) -> None:
    rows = [
        [
            r["date"],
            r["machine"],
            r["model"],
            f"{r['runs']} x {r['max_steps']} ({r['batch_size']})",
            r["metric_rows"],
            f"{statistics.median(r['tracked_s']):.1f}",
            f"{statistics.median(r['untracked_s']):.1f}",
            f"{r['ratio_median']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]",
            f"{r['import_s']:.1f}",
            f"`{r['command']}`",
        ]
        for r in results
    ]
    write_section(
        "tracking",
        "Tracking overhead (#22)",
        "run_fit to the end of wait() with MLflow, TensorBoard and Trackio all on (a) vs off (b), fresh experiments "
        "in one process, alternating order; median [min, max] of a / b. Target: <= 1.02.",
        [
            "date",
            "machine",
            "model",
            "runs x steps (batch)",
            "metric rows",
            "a (s)",
            "b (s)",
            "a / b",
            "imports (s)",
            "command",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
