"""Checkpoint cost: what a durable experiment writes at every chunk end, and how long it takes.

    python -m bench.checkpoint [--model demo|llama512] [--runs 4] [--num-chunks 8] [--max-steps 64] [--repeats 3]

Every run's state (adapter, optimizer moments, LR schedule, trainer state, random state) is written at each of
its rungs, atomically (temporary folder, fsync, rename). Reports, per repetition, the scheduler thread's time
spent checkpointing as a fraction of its training time (`stats()["checkpoint_s"] / stats()["train_s"]`), the time
per checkpoint, and the size of one checkpoint by file. Writes bench/results/checkpoint-<model>.json and the table
in BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from bench._common import MODELS, header, new_experiment, parse_args, save, sweep, write_section
from rf_notebook.demo import arithmetic_dataset


def once(model_fn, args, train, workdir) -> tuple[dict, dict[str, int]]:
    exp = new_experiment("ckpt", workdir)
    exp.run_fit(
        sweep(args.runs, args.max_steps, args.batch_size), model_fn, train, None, num_chunks=args.num_chunks, fuse=False
    )
    exp.wait()
    assert all(r.status.value == "finished" for r in exp.runs()), [r.error for r in exp.runs()]
    stats = exp.stats()
    (folder,) = (exp.path / "runs" / "1" / "checkpoints").iterdir()
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    exp.end()
    return stats, sizes


def main(argv=None) -> dict:
    args = parse_args(__doc__, argv, repeats=3)
    model_fn = MODELS[args.model]
    train = arithmetic_dataset("train", n=args.max_steps * args.batch_size)
    checkpoints = args.runs * args.num_chunks
    fractions, per_checkpoint_ms = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.repeats):
            stats, sizes = once(model_fn, args, train, Path(workdir))
            fractions.append(stats["checkpoint_s"] / stats["train_s"])
            per_checkpoint_ms.append(stats["checkpoint_s"] / checkpoints * 1000)
    result = {
        **header(f"checkpoint-{args.model}", argv),
        "model": args.model,
        "runs": args.runs,
        "num_chunks": args.num_chunks,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "fraction_of_train": fractions,
        "fraction_median": statistics.median(fractions),
        "ms_per_checkpoint_median": statistics.median(per_checkpoint_ms),
        "checkpoint_bytes": sum(sizes.values()),
        "files": sizes,
    }
    write_table(save(f"checkpoint-{args.model}", result))
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
            f"{r['checkpoint_bytes'] / 1024:.0f} KiB",
            ", ".join(f"{name} {size / 1024:.0f}" for name, size in r["files"].items() if size >= 1024),
            f"{r['ms_per_checkpoint_median']:.0f}",
            f"{r['fraction_median']:.3f} [{min(r['fraction_of_train']):.3f}, {max(r['fraction_of_train']):.3f}]",
            f"`{r['command']}`",
        ]
        for r in results
    ]
    write_section(
        "checkpoint",
        "Checkpoint cost",
        "Each run's full state written atomically at every chunk end (adapter, AdamW moments, LR schedule, trainer "
        "and random state; fsync + rename). Fraction: the scheduler thread's checkpoint time over its training "
        "time, per repetition.",
        [
            "date",
            "machine",
            "model",
            "runs x steps (batch)",
            "chunks",
            "one checkpoint",
            "files over 1 KiB (KiB)",
            "ms per checkpoint",
            "checkpoint / train time median [min, max]",
            "command",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
