"""Background-thread cost: the same plain TRL training on the main thread vs. in a worker thread.

    python -m bench.thread [--model demo|llama512] [--max-steps 64] [--repeats 5]

rf_notebook trains in one background thread so that the notebook stays responsive; OpenMP thread pools and the
GIL could make a step there slower than on the main thread. Each repetition trains one fresh adapter with a plain
`SFTTrainer.train()` three ways, in rotating order, timing `train()` only: on the main thread; in a plain
`threading.Thread` (the main thread's OpenMP pool, built by the main-thread runs, left as it is); and in a thread
started as rf_notebook starts its scheduler (the caller's idle OpenMP pool released first, `engine._openmp`).
Reports the per-step ratios thread / main (median, min, max). Writes bench/results/thread-<model>.json and the
table in BENCHMARKS.md. Target: rf_notebook's thread / main <= 1.05.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time

from bench._common import MODELS, header, parse_args, plain_trainer, save, write_section
from rf_notebook.demo import arithmetic_dataset
from rf_notebook.engine._openmp import release_thread_pool

MODES = ["main", "thread", "rf_thread"]


def train_once(model_fn, train, max_steps: int, batch: int, workdir: str, mode: str) -> float:
    args = {
        "output_dir": workdir,
        "max_steps": max_steps,
        "per_device_train_batch_size": batch,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "activation_checkpointing": False,
        "disable_tqdm": True,
        "seed": 0,
    }
    trainer = plain_trainer(model_fn, args, {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}, train)
    elapsed: list[float] = []

    def run() -> None:
        start = time.perf_counter()
        trainer.train()
        elapsed.append(time.perf_counter() - start)

    if mode != "main":
        if mode == "rf_thread":
            release_thread_pool()
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    else:
        run()
    return elapsed[0]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, runs=False, repeats=5, num_chunks=0)
    model_fn = MODELS[args.model]
    train = arithmetic_dataset("train", n=args.max_steps * args.batch_size)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as workdir:
        train_once(model_fn, train, 4, args.batch_size, workdir, "main")  # warm-up
        for i in range(args.repeats):
            for mode in MODES[i % 3 :] + MODES[: i % 3]:
                times[mode].append(train_once(model_fn, train, args.max_steps, args.batch_size, workdir, mode))
    ratios = [t / m for t, m in zip(times["rf_thread"], times["main"])]
    plain_ratios = [t / m for t, m in zip(times["thread"], times["main"])]
    result = {
        **header(f"thread-{args.model}", argv),
        "model": args.model,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "main_s": times["main"],
        "thread_s": times["rf_thread"],
        "plain_thread_s": times["thread"],
        "plain_thread_ratio_median": statistics.median(plain_ratios),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
    write_table(save(f"thread-{args.model}", result))
    print(result)
    return result


def write_table(results: list[dict]) -> None:
    rows = [
        [
            r["date"],
            r["machine"],
            r["model"],
            f"{r['max_steps']} ({r['batch_size']})",
            f"{1000 * statistics.median(r['main_s']) / r['max_steps']:.1f}",
            f"{1000 * statistics.median(r['thread_s']) / r['max_steps']:.1f}",
            f"{r['ratio_median']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]",
            f"{r['plain_thread_ratio_median']:.3f}" if "plain_thread_ratio_median" in r else "-",
            f"`{r['command']}`",
        ]
        for r in results
    ]
    write_section(
        "thread",
        "Background-thread cost",
        "One plain `SFTTrainer.train()` on the main thread vs. in a worker thread started as rf_notebook starts its "
        "scheduler (the caller's idle OpenMP pool released) vs. in a plain `threading.Thread`; same process, rotating "
        "order; time of `train()` only. Rows before 2026-11-30 had no release. Target: thread / main <= 1.05.",
        [
            "date",
            "machine",
            "model",
            "steps (batch)",
            "main ms/step",
            "thread ms/step",
            "thread / main median [min, max]",
            "plain thread / main",
            "command",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
