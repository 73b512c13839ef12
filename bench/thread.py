"""Background-thread cost: the same plain TRL training on the main thread vs. in a worker thread.

    python -m bench.thread [--model demo|llama512] [--max-steps 64] [--repeats 5]

rf_notebook trains in one background thread so that the notebook stays responsive; OpenMP thread pools and the
GIL could make a step there slower than on the main thread. Each repetition trains one fresh adapter with a plain
`SFTTrainer.train()` on the main thread and once in a `threading.Thread` (order alternating), timing `train()`
only. Reports the per-step ratio thread / main (median, min, max). Writes bench/results/thread-<model>.json and
the table in BENCHMARKS.md. Target: <= 1.05.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time

from bench._common import MODELS, header, parse_args, plain_trainer, save, write_section
from rf_notebook.demo import arithmetic_dataset


def train_once(model_fn, train, max_steps: int, batch: int, workdir: str, in_thread: bool) -> float:
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

    if in_thread:
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    else:
        run()
    return elapsed[0]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, runs=False, repeats=5)
    model_fn = MODELS[args.model]
    train = arithmetic_dataset("train", n=args.max_steps * args.batch_size)
    main_s, thread_s = [], []
    with tempfile.TemporaryDirectory() as workdir:
        train_once(model_fn, train, 4, args.batch_size, workdir, in_thread=False)  # warm-up
        for i in range(args.repeats):
            for in_thread in (i % 2 == 0, i % 2 == 1):
                took = train_once(model_fn, train, args.max_steps, args.batch_size, workdir, in_thread)
                (thread_s if in_thread else main_s).append(took)
    ratios = [t / m for t, m in zip(thread_s, main_s)]
    result = {
        **header(f"thread-{args.model}", argv),
        "model": args.model,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "main_s": main_s,
        "thread_s": thread_s,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
    rows = [
        [
            r["date"],
            r["machine"],
            r["model"],
            f"{r['max_steps']} ({r['batch_size']})",
            f"{1000 * statistics.median(r['main_s']) / r['max_steps']:.1f}",
            f"{1000 * statistics.median(r['thread_s']) / r['max_steps']:.1f}",
            f"{r['ratio_median']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]",
            f"`{r['command']}`",
        ]
        for r in save(f"thread-{args.model}", result)
    ]
    write_section(
        "thread",
        "Background-thread cost",
        "One plain `SFTTrainer.train()` on the main thread vs. in a worker thread, same process, alternating; "
        "time of `train()` only. Target: thread / main <= 1.05.",
        [
            "date",
            "machine",
            "model",
            "steps (batch)",
            "main ms/step",
            "thread ms/step",
            "thread / main median [min, max]",
            "command",
        ],
        rows,
    )
    print(result)
    return result


if __name__ == "__main__":
    main()
