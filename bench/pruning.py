"""Compute to the best config: a 16-config SFT sweep on the demo model, exhaustive vs each pruning policy.

    python -m bench.pruning [--seeds 5] [--num-chunks 8] [--rows 512]

The sweep is learning rate {3e-3, 1e-3, 3e-4, 1e-4} x LoRA rank {4, 16} x batch size {8, 16}, one epoch of
`--rows` rows (bs 8 takes twice the optimizer steps of bs 16), eval loss on 64 held-out rows at every chunk end.
For each seed it runs (a) every config to the end, then (b) the same sweep with each policy. Reported, per policy:
optimizer steps and wall time of (b) / (a), in how many seeds (b)'s best final eval loss is within 1% of (a)'s,
and (from the exhaustive runs) Kendall's tau between the ranking at each rung and the final ranking.
Writes bench/results/pruning.json and the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from typing import Any

from bench._common import header, new_experiment, save, write_section
from rf_notebook import List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import arithmetic_dataset, demo_model_fn
from rf_notebook.policies import PBT, MedianOfPeers, SuccessiveHalving

POLICIES = {
    "successive halving (eta=3)": lambda: SuccessiveHalving(eta=3),
    "successive halving (eta=4)": lambda: SuccessiveHalving(eta=4),
    "median of peers (warmup 1)": lambda: MedianOfPeers(warmup_chunks=1),
    "PBT (quantile 0.25, every 2 chunks)": lambda: PBT(
        quantile=0.25, perturb={"learning_rate": (0.8, 1.25)}, interval=2
    ),
}


def search(n_configs: int) -> RFGridSearch:
    configs = [
        RFModelConfig(
            "rf-demo/tiny-arith",
            peft_config=RFLoraConfig(r=r, lora_alpha=16, target_modules="all-linear"),
            training_args=RFSFTConfig(learning_rate=lr, per_device_train_batch_size=bs, num_train_epochs=1),
        )
        for lr, r, bs in itertools.product([3e-3, 1e-3, 3e-4, 1e-4], [4, 16], [8, 16])
    ]
    return RFGridSearch(List(configs[:n_configs]), trainer_type="SFT")


def run(n_configs: int, seed: int, rows: int, num_chunks: int, policy: Any, workdir: str) -> dict[str, Any]:
    exp = new_experiment("prune", workdir)
    train, evl = arithmetic_dataset("train", n=rows), arithmetic_dataset("eval", n=64)
    start = time.perf_counter()
    exp.run_fit(search(n_configs), demo_model_fn, train, evl, num_chunks=num_chunks, seed=seed, policy=policy)
    assert exp.wait(timeout=3600)
    wall = time.perf_counter() - start
    runs = exp.runs()
    evals: dict[int, dict[int, float]] = {}
    for m in exp.store.metrics():
        if m.name == "eval_loss":
            evals.setdefault(m.run_id, {})[m.chunk] = m.value
    finished = {r.run_id: evals[r.run_id][r.chunks_total] for r in runs if r.status.value == "finished"}
    exp.end()
    return {
        "wall_s": wall,
        "steps": sum(r.step for r in runs),
        "best_final_eval_loss": min(finished.values()),
        "best_run": min(finished, key=finished.get),
        "eval_loss_by_rung": {str(k): v for k, v in evals.items()},
        "policy_ops": sum(op.origin == "policy" for op in exp.store.ic_log()),
    }


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a between two score lists (pairs tied in either count as neither)."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    score = sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs) - sum(
        (a[i] - a[j]) * (b[i] - b[j]) < 0 for i, j in pairs
    )
    return score / len(pairs)


def rung_taus(evals: dict[str, dict[int, float]]) -> list[float]:
    """Tau between each rung's eval losses and the final ones, over all runs of an exhaustive sweep."""
    final = {run: values[max(values)] for run, values in evals.items()}
    rungs = sorted({k for values in evals.values() for k in values})
    runs = sorted(evals)
    return [kendall_tau([evals[r][k] for r in runs], [final[r] for r in runs]) for k in rungs]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--num-chunks", type=int, default=8)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--configs", type=int, default=16, help="the first N configs of the 16 (smoke tests)")
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    seeds = []
    with tempfile.TemporaryDirectory() as workdir:
        run(1, 0, 32, 1, None, workdir)  # warm-up: one-time costs (imports, first tokenizer load) stay out
        for seed in range(args.seeds):
            full = run(args.configs, seed, args.rows, args.num_chunks, None, workdir)
            entry = {"seed": seed, "exhaustive": full, "taus": rung_taus(full["eval_loss_by_rung"])}
            for name, make in POLICIES.items():
                pruned = run(args.configs, seed, args.rows, args.num_chunks, make(), workdir)
                pruned["steps_ratio"] = pruned["steps"] / full["steps"]
                pruned["wall_ratio"] = pruned["wall_s"] / full["wall_s"]
                gap = pruned["best_final_eval_loss"] / full["best_final_eval_loss"] - 1
                pruned["best_gap"] = gap
                pruned["within_1pct"] = gap <= 0.01
                entry[name] = pruned
            seeds.append(entry)
            print(f"seed {seed}: " + ", ".join(f"{n}: {entry[n]['steps_ratio']:.2f}" for n in POLICIES), flush=True)

    taus = [statistics.mean(s["taus"][k] for s in seeds) for k in range(len(seeds[0]["taus"]))]
    summary = {
        name: {
            "steps_ratio_median": statistics.median(s[name]["steps_ratio"] for s in seeds),
            "wall_ratio_median": statistics.median(s[name]["wall_ratio"] for s in seeds),
            "within_1pct": sum(s[name]["within_1pct"] for s in seeds),
            "best_gap_max": max(s[name]["best_gap"] for s in seeds),
        }
        for name in POLICIES
    }
    result = {
        **header("pruning", argv),
        "configs": args.configs,
        "rows": args.rows,
        "num_chunks": args.num_chunks,
        "seeds": seeds,
        "summary": summary,
        "tau_by_rung": taus,
    }
    latest = save("pruning", result)[-1]
    tau_text = " ".join(f"{t:.2f}" for t in latest["tau_by_rung"])
    rows = [
        [
            latest["date"],
            name,
            f"{len(latest['seeds'])}",
            f"{s['steps_ratio_median']:.2f}",
            f"{s['wall_ratio_median']:.2f}",
            f"{s['within_1pct']}/{len(latest['seeds'])}",
            f"{s['best_gap_max'] * 100:+.2f}%",
            tau_text,
            f"`{latest['command']}`",
        ]
        for name, s in latest["summary"].items()
    ]
    write_section(
        "pruning",
        f"Pruning at chunk rungs: compute to the best config ({latest['configs']}-config SFT sweep, demo model)",
        f"Each policy's sweep (b) against the same sweep run exhaustively (a), per seed, {latest['num_chunks']} "
        "chunks of one epoch, eval loss at every chunk end. Steps / wall: (b) / (a), median over seeds. Within 1%: "
        "seeds where (b)'s best final eval loss is within 1% of (a)'s; worst gap: the largest (b)/(a) - 1. "
        "Tau: Kendall's tau between the exhaustive runs' ranking at rung 1, 2, ... and their final ranking (mean "
        "over seeds). Target: successive halving within 1% in >= 4 of 5 seeds using <= 30% of the steps.",
        [
            "date",
            "policy",
            "seeds",
            "steps (b)/(a)",
            "wall (b)/(a)",
            "within 1%",
            "worst gap",
            "tau by rung",
            "command",
        ],
        rows,
    )
    print(result["summary"], taus)
    return result


if __name__ == "__main__":
    main()
