"""Time to first comparison: how soon every config has an evaluation at the same data position.

    python -m bench.first_comparison [--model demo|llama512] [--runs 4] [--num-chunks 8] [--repeats 3]

(a) rf_notebook: `run_fit` with an eval set; the figure is the wall time from `run_fit` until every run has logged
its eval at the end of chunk 1. (b) plain TRL, one config after another, each evaluating every chunk length
(`eval_strategy="steps"`); the figure is the wall time until the last config logs its first eval, i.e. the first
moment all configs can be compared at that data position. Both evaluate at every chunk end. Reports a / b and
a / (b_total / num_chunks), whose target is <= 1.1. Writes bench/results/first_comparison-<model>.json and the
table in BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from bench._common import MODELS, header, new_experiment, parse_args, plain_trainer, save, sweep, write_section
from rf_notebook.demo import arithmetic_dataset


def interleaved(model_fn, args, train, evl, workdir) -> tuple[float, float, list[dict], list[int]]:
    exp = new_experiment("first", workdir)
    start = time.time()  # wall clock, as in the store's metric rows
    exp.run_fit(
        sweep(args.runs, args.max_steps, args.batch_size), model_fn, train, evl, num_chunks=args.num_chunks, seed=0
    )
    exp.wait()
    total = time.time() - start
    evals = exp.results().query("metric == 'eval_loss'")
    first_rows = evals.loc[evals.groupby("run_id").step.idxmin()]
    first = float(first_rows.wall_time.max()) - start
    configs = [r.config for r in exp.runs()]
    exp.end()
    return first, total, configs, [int(s) for s in first_rows.step]


def sequential(model_fn, configs, first_steps, train, evl) -> tuple[float, float]:
    from transformers import TrainerCallback

    first_evals: list[float] = []

    class FirstEval(TrainerCallback):
        """Notes when this trainer's first evaluation ends."""

        def __init__(self):
            self.seen = False

        def on_evaluate(self, args, state, control, **kwargs):
            if not self.seen:
                first_evals.append(time.perf_counter())
                self.seen = True

    start = time.perf_counter()
    for config, every in zip(configs, first_steps):
        args = {**config["training_args"], "eval_strategy": "steps", "eval_steps": every}
        plain_trainer(model_fn, args, config["peft_config"], train, evl, callbacks=[FirstEval()]).train()
    return first_evals[-1] - start, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, repeats=3)
    model_fn = MODELS[args.model]
    train = arithmetic_dataset("train", n=args.max_steps * args.batch_size)
    evl = arithmetic_dataset("eval", n=64)
    a_first, a_total, b_first, b_total = [], [], [], []
    with tempfile.TemporaryDirectory() as workdir:
        _, _, configs, first_steps = interleaved(model_fn, args, train, evl, workdir)  # warm-up, and the configs
        for i in range(args.repeats):
            for mode in ("a", "b") if i % 2 == 0 else ("b", "a"):
                if mode == "a":
                    first, total, _, _ = interleaved(model_fn, args, train, evl, workdir)
                    a_first.append(first)
                    a_total.append(total)
                else:
                    first, total = sequential(model_fn, configs, first_steps, train, evl)
                    b_first.append(first)
                    b_total.append(total)
    vs_first = [a / b for a, b in zip(a_first, b_first)]
    vs_share = [a / (bt / args.num_chunks) for a, bt in zip(a_first, b_total)]
    result = {
        **header(f"first_comparison-{args.model}", argv),
        "model": args.model,
        "runs": args.runs,
        "num_chunks": args.num_chunks,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "interleaved_first_s": a_first,
        "interleaved_total_s": a_total,
        "sequential_first_s": b_first,
        "sequential_total_s": b_total,
        "first_ratio_median": statistics.median(vs_first),
        "share_ratio_median": statistics.median(vs_share),
        "share_ratio_min": min(vs_share),
        "share_ratio_max": max(vs_share),
    }
    rows = [
        [
            r["date"],
            r["machine"],
            r["model"],
            f"{r['runs']} x {r['max_steps']} ({r['batch_size']})",
            r["num_chunks"],
            f"{statistics.median(r['interleaved_first_s']):.1f}",
            f"{statistics.median(r['sequential_first_s']):.1f}",
            f"{statistics.median(r['sequential_total_s']):.1f}",
            f"{r['first_ratio_median']:.3f}",
            f"{r['share_ratio_median']:.3f} [{r['share_ratio_min']:.3f}, {r['share_ratio_max']:.3f}]",
            f"`{r['command']}`",
        ]
        for r in save(f"first_comparison-{args.model}", result)
    ]
    write_section(
        "first_comparison",
        "Time to first comparison",
        "Wall time until every config has an eval at the end of chunk 1: rf_notebook (a) vs. plain TRL one config "
        "after another (b, until the last config's first eval at the same position). Both evaluate at every chunk "
        "end. Target: a / (b total / chunks) <= 1.1.",
        [
            "date",
            "machine",
            "model",
            "runs x steps (batch)",
            "chunks",
            "a: first (s)",
            "b: first (s)",
            "b: total (s)",
            "a / b",
            "a / (b total / chunks) median [min, max]",
            "command",
        ],
        rows,
    )
    print(result)
    return result


if __name__ == "__main__":
    main()
