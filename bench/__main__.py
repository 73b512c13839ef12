"""`python -m bench` (or `make bench`): every CPU benchmark, one after another, on a quiet machine (~25 min).

Each writes bench/results/<name>.json and regenerates its table in BENCHMARKS.md. Run them one at a time: a
benchmark sharing the CPU with anything else measures the other thing. bench/gpu.sh is the GPU counterpart.
"""

from __future__ import annotations

from bench import (
    checkpoint,
    first_comparison,
    first_step,
    fused,
    ic_ops,
    kernel,
    memory,
    overhead,
    profile,
    pruning,
    ray_scale,
    reference,
    scale,
    search,
    thread,
    time_to_best,
    tracking,
    walks,
)

RUNS = [
    (overhead.main, ["--model", "llama512", "--runs", "4", "--repeats", "3"]),
    (overhead.main, ["--model", "llama512", "--runs", "8", "--max-steps", "32", "--repeats", "3"]),
    (overhead.main, ["--model", "demo", "--repeats", "5"]),
    (kernel.main, ["--model", "demo", "--repeats", "4"]),
    (tracking.main, ["--model", "demo", "--repeats", "3"]),
    (profile.main, ["--model", "demo"]),
    (walks.main, ["--model", "demo"]),
    (scale.main, ["--model", "demo"]),
    (fused.main, ["--model", "demo"]),
    (reference.main, ["--model", "demo"]),
    (ray_scale.main, ["--model", "demo"]),
    (fused.main, ["--model", "llama512", "--sizes", "4", "8", "--batches", "4"]),
    (thread.main, ["--model", "demo", "--repeats", "6"]),
    (first_comparison.main, ["--model", "llama512", "--repeats", "3"]),
    (first_step.main, ["--repeats", "4"]),
    (memory.main, ["--model", "llama512"]),
    (memory.main, ["--model", "llama512", "--pruned"]),
    (thread.main, ["--model", "llama512", "--repeats", "4"]),
    (ic_ops.main, ["--trials", "5"]),
    (checkpoint.main, ["--model", "demo"]),
    (checkpoint.main, ["--model", "llama512"]),
    (pruning.main, ["--seeds", "5", "--rows", "384"]),
    (search.main, ["--seeds", "5"]),
    (time_to_best.main, ["--seeds", "3"]),
    (time_to_best.main, ["--seeds", "3", "--probe-steps", "0"]),
]

if __name__ == "__main__":
    for main, argv in RUNS:
        main(argv)
