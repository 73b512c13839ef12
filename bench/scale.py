"""Cost per step and per switch as the number of runs grows: N = 4, 16, 32, 64 runs on one base.

    python -m bench.scale [--model demo|llama512] [--sizes 4 16 32 64] [--max-steps 16] [--num-chunks 4] [--rounds 4]

Each N trains N SFT runs (learning rates cycled, the same compute per run) interleaved in `num_chunks` chunks in
this one process. A smaller N is repeated (fresh experiments) until it has trained as many steps as the largest, so
every figure averages the same number of steps. Every round measures each N once, smallest first in odd rounds and
largest first in even ones, so that drift hits both ends alike; a ratio (largest N / smallest) is taken within each
round, and the result is the median of the rounds' ratios, with their range (one slow minute on a shared machine
moves one round, not the verdict). From `exp.stats()`: the scheduler thread's time per optimizer step, all of it
(training, switching, chunk-end checkpoints, clean-up; no evaluation here) and training alone (everything inside the
trainers), its time per switch (activating a run's adapter, forward patches and process state; recording progress)
and per chunk-end checkpoint (snapshot and serialization; the files are written on another thread), and setup per
run (building its adapter and trainer), and the time from calling `run_fit` to the first optimizer step (the first
logged loss; a run's trainer is built at its first turn, so this should not grow with N). Memory per run is
`bench.memory`'s job. Target: per-step time (all of it) at the largest N within 5% of the smallest. Writes
bench/results/scale-<model>.json and the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import transformers

from bench._common import LEARNING_RATES, MODELS, header, new_experiment, save, write_section
from rf_notebook import List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset


def search(n_runs: int, max_steps: int, batch: int) -> RFGridSearch:
    rates = [LEARNING_RATES[i % len(LEARNING_RATES)] * (1 + i // len(LEARNING_RATES)) for i in range(n_runs)]
    return RFGridSearch(
        RFModelConfig(
            model_name=DEMO_MODEL,
            peft_config=RFLoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=List(rates), per_device_train_batch_size=batch, max_steps=max_steps
            ),
        ),
        trainer_type="SFT",
    )


def measure(model_fn, n_runs: int, repeats: int, args, train, workdir: str) -> dict[str, float]:
    totals = {"all_s": 0.0, "train_s": 0.0, "switch_s": 0.0, "checkpoint_s": 0.0, "setup_s": 0.0}
    steps = switches = 0
    first_steps = []
    for _ in range(repeats):
        exp = new_experiment("scale", workdir)
        called = time.time()
        exp.run_fit(
            search(n_runs, args.max_steps, args.batch_size),
            model_fn,
            train,
            num_chunks=args.num_chunks,
            seed=0,
            fuse=False,
        )
        exp.wait()
        runs = exp.runs()
        assert all(r.status.value == "finished" for r in runs), [r.error for r in runs]
        stats = exp.stats()
        results = exp.results()
        first_steps.append(results[results.metric == "loss"].wall_time.min() - called)
        exp.end()
        steps += sum(r.step for r in runs)
        switches += stats["switches"]
        stats["all_s"] = sum(stats[k] for k in ("train_s", "switch_s", "checkpoint_s", "eval_s", "cleanup_s"))
        for key in totals:
            totals[key] += stats[key]
    return {
        "ms_per_step": 1000 * totals["all_s"] / steps,
        "ms_per_step_training": 1000 * totals["train_s"] / steps,
        "ms_per_switch": 1000 * totals["switch_s"] / switches,
        "ms_per_checkpoint": 1000 * totals["checkpoint_s"] / switches,
        "setup_s_per_run": totals["setup_s"] / (n_runs * repeats),
        "s_to_first_step": statistics.median(first_steps),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 32, 64])
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--num-chunks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="measurements of each N (default 4)")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    model_fn = MODELS[args.model]
    train = arithmetic_dataset("train", n=args.max_steps * args.batch_size)
    sizes = sorted(args.sizes)
    measured: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory() as workdir:
        measure(model_fn, sizes[0], 1, args, train, workdir)  # warm-up
        for round_ in range(args.rounds):
            for n in sizes if round_ % 2 == 0 else sizes[::-1]:
                measured[n].append(measure(model_fn, n, math.ceil(sizes[-1] / n), args, train, workdir))
    rows = {
        n: {key: statistics.median(m[key] for m in ms) for key in ms[0]} | {"raw": ms} for n, ms in measured.items()
    }

    def ratio(key: str) -> float:
        return statistics.median(ratios(key))

    def ratios(key: str) -> list[float]:
        return [last[key] / first[key] for first, last in zip(measured[sizes[0]], measured[sizes[-1]])]

    result = {
        **header(f"scale-{args.model}", argv),
        "model": args.model,
        "max_steps": args.max_steps,
        "num_chunks": args.num_chunks,
        "batch_size": args.batch_size,
        "sizes": {str(n): row for n, row in rows.items()},
        "rounds": args.rounds,
        "step_ratio_largest_to_smallest": ratio("ms_per_step"),
        "step_ratio_rounds": ratios("ms_per_step"),
        "training_step_ratio_largest_to_smallest": ratio("ms_per_step_training"),
        "switch_ratio_largest_to_smallest": ratio("ms_per_switch"),
    }
    write_table(save(f"scale-{args.model}", result))
    print(result)
    return result


def write_table(results: list[dict]) -> None:
    def cell(row: dict, key: str, digits: int) -> str:
        return f"{row[key]:.{digits}f}" if key in row else "-"

    rows = []
    for r in results:
        spread = r.get("step_ratio_rounds")
        spread = f"{len(spread)} rounds, range [{min(spread):.3f}, {max(spread):.3f}]" if spread else ""
        for n, row in r["sizes"].items():
            rows.append(
                [
                    r["date"],
                    r["machine"],
                    r["model"],
                    n,
                    cell(row, "ms_per_step", 1),
                    cell(row, "ms_per_step_training", 1),
                    cell(row, "ms_per_switch", 2),
                    cell(row, "ms_per_checkpoint", 2),
                    cell(row, "setup_s_per_run", 2),
                    cell(row, "s_to_first_step", 2),
                    f"`{r['command']}`",
                ]
            )
        rows.append(
            [
                r["date"],
                "",
                "",
                "largest / smallest",
                cell(r, "step_ratio_largest_to_smallest", 3),
                cell(r, "training_step_ratio_largest_to_smallest", 3),
                cell(r, "switch_ratio_largest_to_smallest", 3),
                "",
                "",
                "",
                "; ".join(filter(None, [spread, r.get("note", "")])),
            ]
        )
    write_section(
        "scale",
        "Cost as the number of runs grows",
        "N SFT runs on one base, interleaved, same process, each N measured once per round (smallest first, then "
        "largest first in the next), a smaller N repeated until it trained as many steps as the largest; the ratio "
        "largest / smallest is the median of the rounds' ratios (earlier results: of two measurements); the "
        "scheduler thread's own accounting (`exp.stats()`): its time per optimizer step (all: training, switching, "
        "chunk-end checkpoints, clean-up) and training alone, time per switch, per chunk-end checkpoint (snapshot and "
        "serialization), setup per run (loading the base, building each run's adapter and trainer), and seconds from "
        "`run_fit` to the first optimizer step's logged loss (median over the experiments). Target: per-step time "
        "(all) at the largest N within 5% of the smallest.",
        [
            "date",
            "machine",
            "model",
            "runs",
            "ms per step (all)",
            "ms per step (training)",
            "ms per switch",
            "ms per checkpoint",
            "setup s per run",
            "s to first step",
            "command",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
