"""IC-op latency and warm-start cost on the demo model.

    python -m bench.ic_ops [--trials 5]

Each trial starts two runs, lets run 1 train a few steps, then (1) calls `exp.stop(1)` and measures the delay
in optimizer steps between the last step logged when `stop` was called and the step at which the op took effect,
and the wall time until the op was applied; (2) calls `exp.clone_modify(2, {}, warm_start=True)` and measures the
wall time until the clone exists, and the bytes of parent state written for it (adapter, optimizer, LR schedule,
trainer and random state). Writes bench/results/ic_ops.json and the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

from bench._common import header, new_experiment, save, sweep, write_section
from rf_notebook import Experiment
from rf_notebook.demo import arithmetic_dataset, demo_model_fn


def last_step(exp: Experiment, run_id: int) -> int:
    # the store directly (not the results() DataFrame), so that polling costs the training thread nothing
    return max((m.step for m in exp.store.metrics(run_id) if m.name == "loss"), default=0)


def settle(exp: Experiment, op_id: int) -> dict:
    """Block (on the store's condition, no polling) until op `op_id` is applied or refused."""
    exp.store.wait_until(lambda runs, ops: ops[op_id - 1].outcome != "pending", timeout=60)
    return dataclasses.asdict(exp.store.ic_log()[op_id - 1])


def trial(workdir: str, at_step: int) -> dict:
    exp = new_experiment("ic", workdir)
    exp.run_fit(sweep(2, 64, 16), demo_model_fn, arithmetic_dataset("train"), None, num_chunks=4, seed=0)
    while last_step(exp, 1) < at_step:
        time.sleep(0.005)
    before = last_step(exp, 1)
    start = time.perf_counter()
    op = exp.stop(1)
    stopped = settle(exp, op)
    stop_ms = (time.perf_counter() - start) * 1000
    while last_step(exp, 2) < 2:
        time.sleep(0.005)
    start = time.perf_counter()
    clone = exp.clone_modify(2, {}, warm_start=True)
    cloned = settle(exp, len(exp.ic_log()))
    clone_ms = (time.perf_counter() - start) * 1000
    assert cloned["outcome"] == "applied", cloned
    folder = exp.path / "runs" / str(clone) / "warm-start"
    copied = sum(p.stat().st_size for p in folder.iterdir())
    exp.end()
    return {
        "stop_delay_steps": int(stopped["step"]) - before,
        "stop_ms": stop_ms,
        "clone_ms": clone_ms,
        "clone_bytes": copied,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as workdir:
        trials = [trial(workdir, at_step=3 + 2 * i) for i in range(args.trials)]
    result = {
        **header("ic_ops", argv),
        "trials": trials,
        "stop_delay_steps_max": max(t["stop_delay_steps"] for t in trials),
        "stop_ms_median": statistics.median(t["stop_ms"] for t in trials),
        "clone_ms_median": statistics.median(t["clone_ms"] for t in trials),
        "clone_bytes": statistics.median(t["clone_bytes"] for t in trials),
    }
    rows = [
        [
            r["date"],
            r["machine"],
            len(r["trials"]),
            r["stop_delay_steps_max"],
            f"{r['stop_ms_median']:.0f}",
            f"{r['clone_ms_median']:.0f}",
            f"{r['clone_bytes'] / 1024:.0f}",
            f"`{r['command']}`",
        ]
        for r in save("ic_ops", result)
    ]
    write_section(
        "ic_ops",
        "IC-op latency and warm-start cost (demo model)",
        "Stop: optimizer steps between the last step logged when `exp.stop()` was called and the step at which the "
        "op took effect (max over trials), and wall time until applied. Warm start: wall time from "
        "`clone_modify(..., warm_start=True)` until the clone exists, and the bytes of parent state written for it.",
        [
            "date",
            "machine",
            "trials",
            "stop delay (steps, max)",
            "stop (ms, median)",
            "warm clone (ms, median)",
            "warm clone state (KiB)",
            "command",
        ],
        rows,
    )
    print(result)
    return result


if __name__ == "__main__":
    main()
