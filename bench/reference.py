"""DPO runs sharing the reference forward: N runs on one base that see the same batches, with the shared
reference forward (rf_notebook's default) and with each run doing its own inside TRL's loss.

    python -m bench.reference [--model demo|llama512] [--runs 4] [--num-chunks 4] [--max-steps 32] [--repeats 3]

The runs differ in beta and learning rate and share the seed and batch size, so every run sees the same batches. The
modes alternate within each repetition, in one process. Reports the scheduler's training time of each mode (median),
their ratio (shared / own: below 1 is faster), and the reference forwards done (`compute_ref_log_probs` calls, and
for the own mode the run-steps that each did one). No evaluation. Writes bench/results/reference-<model>.json and
the table in BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
import tempfile

from bench._common import MODELS, header, new_experiment, parse_args, save, write_section
from rf_notebook import List, RFDPOConfig, RFGridSearch, RFLoraConfig, RFModelConfig
from rf_notebook.demo import DEMO_MODEL, preference_dataset

BETAS = [0.05, 0.1, 0.2, 0.5, 0.02, 0.3, 0.4, 0.8]
LEARNING_RATES = [3e-3, 1e-3, 3e-4, 1e-4, 2e-3, 5e-4, 2e-4, 5e-5]


def sweep(n_runs: int, max_steps: int, batch: int) -> RFGridSearch:
    configs = [
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
            training_args=RFDPOConfig(
                beta=BETAS[i], learning_rate=LEARNING_RATES[i], per_device_train_batch_size=batch, max_steps=max_steps
            ),
        )
        for i in range(n_runs)
    ]
    return RFGridSearch(List(configs), trainer_type="DPO")


def run(args, train, workdir, *, shared: bool) -> tuple[float, int]:
    """The scheduler's training seconds, and the reference forwards done for the cache."""
    from trl import DPOTrainer

    from rf_notebook.trainers import dpo

    calls = [0]
    original_compute, original_share = DPOTrainer.compute_ref_log_probs, dpo.share_reference_forward

    def counting(self, model, inputs):
        calls[0] += 1
        return original_compute(self, model, inputs)

    DPOTrainer.compute_ref_log_probs = counting
    if not shared:
        dpo.share_reference_forward = lambda trainer: None
    try:
        exp = new_experiment("reference", workdir)
        search = sweep(args.runs, args.max_steps, args.batch_size)
        exp.run_fit(
            search, MODELS[args.model], train, None, num_chunks=args.num_chunks, seed=0, display=False, fuse=False
        )
        exp.wait()
        failed = [r.error for r in exp.runs() if r.status.value != "finished"]
        if failed:
            raise RuntimeError(f"runs failed: {failed}")
        train_s = exp.stats()["train_s"]
        exp.end()
    finally:
        DPOTrainer.compute_ref_log_probs, dpo.share_reference_forward = original_compute, original_share
    return train_s, calls[0]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, repeats=3, max_steps=32, num_chunks=4)
    train = preference_dataset("train", n=args.max_steps * args.batch_size)
    times: dict[str, list[float]] = {"shared": [], "own": []}
    forwards: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as workdir:
        run(args, train, workdir, shared=True)  # warm-up: imports, first loads
        for i in range(args.repeats):
            for mode in ("shared", "own") if i % 2 == 0 else ("own", "shared"):
                seconds, calls = run(args, train, workdir, shared=mode == "shared")
                times[mode].append(seconds)
                forwards[mode] = calls
    ratios = [a / b for a, b in zip(times["shared"], times["own"])]
    result = {
        **header(f"reference-{args.model}", argv),
        "model": args.model,
        "runs": args.runs,
        "num_chunks": args.num_chunks,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "shared_train_s": times["shared"],
        "own_train_s": times["own"],
        "reference_forwards_shared": forwards["shared"],
        "reference_forwards_own": args.runs * args.max_steps,  # one in every run's every step, inside TRL's loss
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
    rows = [
        [
            r["date"],
            r["machine"],
            r["model"],
            f"{r['runs']} x {r['max_steps']} ({r['batch_size']})",
            f"{statistics.median(r['shared_train_s']):.1f}",
            f"{statistics.median(r['own_train_s']):.1f}",
            f"{r['ratio_median']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]",
            f"{r['reference_forwards_shared']} / {r['reference_forwards_own']}",
            f"`{r['command']}`",
        ]
        for r in save(f"reference-{args.model}", result)
    ]
    write_section(
        "reference",
        "DPO: one reference forward per batch",
        "N DPO runs on one base with the same seed and batch size (so the same batches), beta and learning rate "
        "differing, no evaluation: the scheduler's training time with the shared reference forward (rf_notebook's "
        "default) and with each run doing its own inside TRL's loss, alternating in one process, median of the "
        "repetitions. Reference forwards: done with sharing / done without.",
        [
            "date",
            "machine",
            "model",
            "runs x steps (batch)",
            "shared s",
            "own s",
            "shared / own",
            "ref forwards",
            "command",
        ],
        rows,
    )
    return result


if __name__ == "__main__":
    main()
