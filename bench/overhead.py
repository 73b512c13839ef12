"""Interleaving overhead: N configs trained by rf_notebook in chunks vs. one after another with plain TRL.

    python -m bench.overhead [--model demo|llama512] [--runs 4] [--num-chunks 8] [--repeats 4]

Three modes run in this one process on the same data, in rotating order within each repetition so that machine
noise hits all alike:
  (a) `Experiment.run_fit` + `wait` with `num_chunks` chunks (base loaded once, N adapters on it);
  (a1) the same with one chunk (runs one after another inside rf_notebook, no switch mid-run);
  (b) per config, a fresh base plus a plain `SFTTrainer(peft_config=...).train()`.
None evaluates, so all do the same training compute. Reports the wall-time ratios a/b and a1/b (median, min,
max), the same for the process's CPU time (all threads: a busy-waiting thread shows up there), and the marginal
cost of one chunk switch, (a - a1) / (runs x (num_chunks - 1)).
Writes bench/results/overhead-<model>.json and the table in BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
import tempfile

from bench._common import (
    MODELS,
    Timing,
    header,
    new_experiment,
    parse_args,
    plain_trainer,
    save,
    sweep,
    write_section,
)
from rf_notebook.demo import arithmetic_dataset


def interleaved(model_fn, n_runs, max_steps, batch, num_chunks, train, workdir) -> tuple[Timing, list[dict], dict]:
    exp = new_experiment("bench", workdir)
    with Timing() as timing:
        exp.run_fit(sweep(n_runs, max_steps, batch), model_fn, train, None, num_chunks=num_chunks, seed=0, fuse=False)
        exp.wait()
    configs = [r.config for r in exp.runs()]
    assert all(r.status.value == "finished" for r in exp.runs()), [r.error for r in exp.runs()]
    stats = exp.stats()
    exp.end()
    return timing, configs, stats


def sequential(model_fn, configs, train) -> Timing:
    with Timing() as timing:
        for config in configs:
            plain_trainer(model_fn, config["training_args"], config["peft_config"], train).train()
    return timing


def main(argv=None) -> dict:
    args = parse_args(__doc__, argv, repeats=4)
    model_fn = MODELS[args.model]
    train = arithmetic_dataset("train", n=args.max_steps * args.batch_size)
    times: dict[str, list[Timing]] = {"a": [], "a1": [], "b": []}
    with tempfile.TemporaryDirectory() as workdir:
        warmup = interleaved(model_fn, args.runs, args.max_steps, args.batch_size, 1, train, workdir)
        configs = warmup[1]
        switch_ms: list[float] = []

        def chunked() -> Timing:
            timing, _, stats = interleaved(
                model_fn, args.runs, args.max_steps, args.batch_size, args.num_chunks, train, workdir
            )
            switch_ms.append(stats["switch_s"] / stats["switches"] * 1000)
            return timing

        modes = {
            "a": chunked,
            "a1": lambda: interleaved(model_fn, args.runs, args.max_steps, args.batch_size, 1, train, workdir)[0],
            "b": lambda: sequential(model_fn, configs, train),
        }
        order = list(modes)
        for i in range(args.repeats):
            for mode in order[i % 3 :] + order[: i % 3]:
                times[mode].append(modes[mode]())
    wall = {mode: [t.wall for t in ts] for mode, ts in times.items()}
    cpu = {mode: [t.cpu for t in ts] for mode, ts in times.items()}
    ratios = [a / b for a, b in zip(wall["a"], wall["b"])]
    ratios1 = [a / b for a, b in zip(wall["a1"], wall["b"])]
    switches = args.runs * (args.num_chunks - 1)
    result = {
        **header(f"overhead-{args.model}-n{args.runs}", argv),
        "model": args.model,
        "runs": args.runs,
        "num_chunks": args.num_chunks,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "interleaved_s": wall["a"],
        "one_chunk_s": wall["a1"],
        "sequential_s": wall["b"],
        "interleaved_cpu_s": cpu["a"],
        "one_chunk_cpu_s": cpu["a1"],
        "sequential_cpu_s": cpu["b"],
        "cpu_ratio_median": statistics.median(a / b for a, b in zip(cpu["a"], cpu["b"])),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "one_chunk_ratio_median": statistics.median(ratios1),
        "extra_switches": switches,
        "scheduler_ms_per_switch": statistics.median(switch_ms),
        "ms_per_switch": statistics.median((a - a1) / switches * 1000 for a, a1 in zip(wall["a"], wall["a1"])),
    }
    write_table(save(f"overhead-{args.model}-n{args.runs}", result))
    print(result)
    return result


def write_table(results: list[dict]) -> None:
    rows = [
        [
            r["date"],
            r["machine"],
            r["model"],
            f"{r['runs']} x {r['max_steps']} ({r['batch_size']})",
            r["num_chunks"],
            f"{statistics.median(r['interleaved_s']):.1f}",
            f"{statistics.median(r['one_chunk_s']):.1f}",
            f"{statistics.median(r['sequential_s']):.1f}",
            f"{r['ratio_median']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]",
            f"{r['one_chunk_ratio_median']:.3f}",
            f"{r['cpu_ratio_median']:.3f}" if "cpu_ratio_median" in r else "-",
            f"{r['scheduler_ms_per_switch']:.1f} / {r['ms_per_switch']:.0f}",
            f"`{r['command']}`",
        ]
        for r in results
    ]
    write_section(
        "overhead",
        "Interleaving overhead",
        "N SFT configs trained by rf_notebook interleaved in chunks (a) and in one chunk (a1) vs. one after another "
        "with plain `SFTTrainer.train()` (b); same process, rotating order, no evaluation in any. ms per switch: "
        "*measured* is the scheduler thread's own time per switch (activating a run's adapter, forward patches, RNG "
        "and Accelerate state; recording progress); *by difference* is (a - a1) / (runs x (chunks - 1)), which "
        "also carries the machine's noise. CPU time: the whole process's, all threads. Target: a / b <= 1.03.",
        [
            "date",
            "machine",
            "model",
            "runs x steps (batch)",
            "chunks",
            "a: interleaved (s)",
            "a1: 1 chunk (s)",
            "b: plain TRL (s)",
            "a / b median [min, max]",
            "a1 / b",
            "CPU time a / b",
            "ms per switch: measured / by difference",
            "command",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
