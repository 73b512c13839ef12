"""What logging every run to MLflow, TensorBoard and Trackio costs training, on the demo sweep.

    python -m bench.tracking [--model demo|llama512] [--num-chunks 4] [--max-steps 256] [--repeats 3]

The demo sweep (`python -m rf_notebook.demo`: 4 SFT configs x 256 steps in 4 chunks, exact match generated at each
chunk end) trained twice per repetition in one process, each time in a fresh experiment: (a) with
`trackers=["mlflow", "tensorboard", "trackio"]` (their default stores: SQLite in the experiment folder, event files in
it, Trackio's local store in a temporary TRACKIO_DIR), (b) without. Modes alternate order between repetitions, after
one warm-up of each (the trackers' imports are paid once per process, not per experiment: reported separately as
`import_s`). Each time is `run_fit` to the end of `wait()`, which includes the trackers catching up with the last
values. Reports a / b (median, min, max), each tracker thread's CPU seconds and their share of the process's CPU
time (a figure the machine's noise moves far less than wall times). Writes bench/results/tracking-<model>.json and its
table in BENCHMARKS.md. Target: a / b <= 1.02.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from bench._common import MODELS, Timing, header, new_experiment, parse_args, save, write_section

TRACKERS = ["mlflow", "tensorboard", "trackio"]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, runs=False, repeats=3, max_steps=256, num_chunks=4)
    if args.batch_size != 16:
        raise SystemExit("--batch-size: the demo sweep's is 16")
    os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="trackio-"))  # before trackio is imported
    t0 = time.perf_counter()
    import mlflow.tracking  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import trackio.sqlite_storage  # noqa: F401

    import_s = time.perf_counter() - t0

    from rf_notebook.demo import arithmetic_dataset
    from rf_notebook.demo.__main__ import sweep

    model_fn = MODELS[args.model]
    train, evl = arithmetic_dataset("train"), arithmetic_dataset("eval")
    workdir = tempfile.mkdtemp()
    search = sweep(args.max_steps)

    def once(trackers: list[str]) -> tuple[float, float, dict[str, float], int]:
        exp = new_experiment("tracking", workdir)
        with Timing() as t:
            exp.run_fit(
                search, model_fn, train, evl, num_chunks=args.num_chunks, seed=0, display=False, trackers=trackers
            )
            assert exp.wait()
        assert all(r.status.value == "finished" for r in exp.runs()), [r.error for r in exp.runs()]
        assert not exp.tracking_errors(), exp.tracking_errors()
        metrics = exp.store.metrics()
        tail = time.time() - max(m.wall_time for m in metrics)  # from the last value logged to wait()'s return
        rows = len(metrics)
        busy = exp.stats().get("tracking_s", {})  # each tracker thread's CPU seconds
        exp.end()
        tails[bool(trackers)].append(tail)
        return t.wall, t.cpu, busy, rows

    tails: dict[bool, list[float]] = {True: [], False: []}
    once(TRACKERS)
    once([])  # warm-ups
    tails = {True: [], False: []}  # the warm-ups' do not count
    times: dict[str, list[float]] = {"a": [], "b": []}
    shares: list[float] = []  # the trackers' CPU seconds / the whole process's, in the tracked runs
    busy_by_tracker: dict[str, list[float]] = {name: [] for name in TRACKERS}
    rows = 0
    for i in range(args.repeats):
        for mode in ("a", "b") if i % 2 == 0 else ("b", "a"):
            wall, cpu, busy, rows = once(TRACKERS if mode == "a" else [])
            times[mode].append(wall)
            if mode == "a":
                shares.append(sum(busy.values()) / cpu)
                for name in TRACKERS:
                    busy_by_tracker[name].append(busy[name])
    ratios = [a / b for a, b in zip(times["a"], times["b"])]
    result = {
        **header(f"tracking-{args.model}", argv),
        "model": args.model,
        "runs": len(search.expand()),
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
        "tracker_cpu_s": {name: statistics.median(v) for name, v in busy_by_tracker.items()},
        "tracker_cpu_share": statistics.median(shares),
        "tail_s": {"tracked": statistics.median(tails[True]), "untracked": statistics.median(tails[False])},
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
            ", ".join(f"{k} {v:.2f}" for k, v in r["tracker_cpu_s"].items()) if "tracker_cpu_s" in r else "",
            f"{100 * r['tracker_cpu_share']:.1f}%" if "tracker_cpu_share" in r else "",
            f"{r['tail_s']['tracked']:.2f} / {r['tail_s']['untracked']:.2f}" if "tail_s" in r else "",
            f"{r['import_s']:.1f}",
            f"`{r['command']}`",
        ]
        for r in results
    ]
    write_section(
        "tracking",
        "Tracking overhead (#22)",
        "The demo sweep (`python -m rf_notebook.demo`'s), run_fit to the end of wait(), with MLflow, TensorBoard and "
        "Trackio all on (a) vs off (b), fresh experiments in one process, alternating order; median [min, max] of "
        "a / b. Target: <= 1.02. Tracker CPU: each tracker thread's CPU seconds per experiment (median; TensorBoard's "
        "own writer thread not included), and their sum as a share of the process's CPU time. Tail: from the last "
        "value logged to wait()'s return (the trackers' final catch-up), median.",
        [
            "date",
            "machine",
            "model",
            "runs x steps (batch)",
            "metric rows",
            "a (s)",
            "b (s)",
            "a / b",
            "tracker CPU (s)",
            "tracker CPU share",
            "tail a / b (s)",
            "imports (s)",
            "command",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
