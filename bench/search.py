"""Search at an equal budget: random search vs Optuna TPE, both with successive halving, on a 32-config space.

    python -m bench.search [--seeds 5] [--rows 384] [--num-chunks 8] [--num-runs 8] [--budget 24]

The space is learning rate {3e-3, 1e-3, 3e-4, 1e-4} x LoRA rank {4, 16} x batch size {8, 16} x schedule {linear,
cosine}: 32 SFT configs on the demo model, one epoch of `--rows` rows, eval loss on 64 held-out rows at every chunk
end. For each seed: (a) the exhaustive grid, every config to the end; then `RFOptunaSearch` with the same
`--num-runs` at a time and the same `--budget` of configs in all, under `SuccessiveHalving()` (its defaults), once
with a `RandomSampler` and once with the default `TPESampler`: each freed slot gets a new proposal.
Reported per sampler: optimizer steps used / (a)'s (probes included), the best final eval loss reached vs (a)'s
best, in how many seeds it is within 1%, and the steps trained (the runs' own, in the order they ran) until a
finished run within 1% of (a)'s best existed. Writes bench/results/search-b<budget>.json and the table (a row per
budget).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

from bench._common import header, new_experiment, save, write_section
from rf_notebook import List, RFGridSearch, RFLoraConfig, RFModelConfig, RFOptunaSearch, RFSFTConfig
from rf_notebook.demo import arithmetic_dataset, demo_model_fn
from rf_notebook.policies import SuccessiveHalving

SEARCHED = (
    "training_args.learning_rate",
    "peft_config.r",
    "training_args.per_device_train_batch_size",
    "training_args.lr_scheduler_type",
)


def space() -> RFModelConfig:
    return RFModelConfig(
        "rf-demo/tiny-arith",
        peft_config=RFLoraConfig(r=List([4, 16]), lora_alpha=16, target_modules="all-linear"),
        training_args=RFSFTConfig(
            learning_rate=List([3e-3, 1e-3, 3e-4, 1e-4]),
            per_device_train_batch_size=List([8, 16]),
            lr_scheduler_type=List(["linear", "cosine"]),
            num_train_epochs=1,
        ),
    )


def samplers(seed: int, num_runs: int) -> dict[str, Any]:
    import optuna

    return {
        "random": optuna.samplers.RandomSampler(seed=seed),
        "TPE": None,  # RFOptunaSearch's default: TPESampler(seed=seed, n_startup_trials=num_runs)
    }


def run(search: Any, seed: int, rows: int, num_chunks: int, policy: Any, workdir: str) -> dict[str, Any]:
    exp = new_experiment("search", workdir)
    train, evl = arithmetic_dataset("train", n=rows), arithmetic_dataset("eval", n=64)
    start = time.perf_counter()
    exp.run_fit(search, demo_model_fn, train, evl, num_chunks=num_chunks, seed=seed, policy=policy)
    assert exp.wait(timeout=7200)
    wall = time.perf_counter() - start
    runs = exp.runs()
    metrics = exp.store.metrics()
    final: dict[int, tuple[float, float]] = {}  # finished run -> (final eval loss, when it was logged)
    steps_at: dict[int, list[tuple[float, int]]] = {}  # run -> (wall time, step) of every training step
    for m in metrics:
        if m.name == "loss":
            steps_at.setdefault(m.run_id, []).append((m.wall_time, m.step))
    for r in runs:
        if r.status.value == "finished":
            (value, when) = next(
                (m.value, m.wall_time) for m in reversed(metrics) if m.run_id == r.run_id and m.name == "eval_loss"
            )
            final[r.run_id] = (value, when)
    stats = exp.stats()
    exp.end()
    return {
        "wall_s": wall,
        "configs": len(runs),
        "steps": sum(r.step for r in runs) + stats["probe_steps"],
        "probe_steps": stats["probe_steps"],
        "final": {str(k): v for k, v in final.items()},
        "steps_at": {str(k): v for k, v in steps_at.items()},
        "best_final_eval_loss": min(v for v, _ in final.values()),
        "params": {str(r.run_id): {k: r.params.get(k) for k in SEARCHED} for r in runs},
    }


def steps_until(result: dict[str, Any], target: float) -> int | None:
    """The runs' steps trained until a finished run with a final eval loss <= target was logged (None: never)."""
    hits = [when for value, when in result["final"].values() if value <= target]
    if not hits:
        return None
    t = min(hits)
    return sum(sum(1 for when, _ in steps if when <= t) for steps in result["steps_at"].values())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--num-chunks", type=int, default=8)
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--num-runs", type=int, default=8, help="configs training at once")
    parser.add_argument("--budget", type=int, default=24, help="configs proposed in all, per search")
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    seeds = []
    with tempfile.TemporaryDirectory() as workdir:
        for seed in range(args.seeds):
            grid = run(RFGridSearch(space(), "SFT"), seed, args.rows, args.num_chunks, None, workdir)
            best = grid["best_final_eval_loss"]
            del grid["steps_at"]
            entry: dict[str, Any] = {"seed": seed, "exhaustive": grid}
            for name, sampler in samplers(seed, args.num_runs).items():
                search = RFOptunaSearch(
                    space(), "SFT", num_runs=args.num_runs, budget=args.budget, sampler=sampler, seed=seed
                )
                got = run(search, seed, args.rows, args.num_chunks, SuccessiveHalving(), workdir)
                got["steps_ratio"] = got["steps"] / grid["steps"]
                got["best_gap"] = got["best_final_eval_loss"] / best - 1
                got["within_1pct"] = got["best_gap"] <= 0.01
                reached = steps_until(got, best * 1.01)
                got["steps_to_1pct_ratio"] = None if reached is None else reached / grid["steps"]
                del got["steps_at"]  # every step's time: only for steps_until
                entry[name] = got
            seeds.append(entry)
            print(
                f"seed {seed}: "
                + ", ".join(
                    f"{n}: gap {entry[n]['best_gap']:+.3%} steps {entry[n]['steps_ratio']:.2f}"
                    for n in ("random", "TPE")
                ),
                flush=True,
            )
    names = ("random", "TPE")
    summary = {}
    for name in names:
        reached = [s[name]["steps_to_1pct_ratio"] for s in seeds if s[name]["steps_to_1pct_ratio"] is not None]
        summary[name] = {
            "steps_ratio_median": statistics.median(s[name]["steps_ratio"] for s in seeds),
            "within_1pct": sum(s[name]["within_1pct"] for s in seeds),
            "best_gap_median": statistics.median(s[name]["best_gap"] for s in seeds),
            "best_gap_max": max(s[name]["best_gap"] for s in seeds),
            "steps_to_1pct_median": statistics.median(reached) if reached else None,
            "configs_median": statistics.median(s[name]["configs"] for s in seeds),
        }
    name = f"search-b{args.budget}"  # one result per budget, all in the table
    result = {
        **header(name, argv),
        "rows": args.rows,
        "num_chunks": args.num_chunks,
        "num_runs": args.num_runs,
        "budget": args.budget,
        "seeds": seeds,
        "summary": summary,
    }
    results = save(name, result)
    rows = [
        [
            r["date"],
            f"{sampler} + successive halving",
            f"{r['num_runs']} at once, {r['budget']} in all",
            f"{s['steps_ratio_median']:.2f}",
            f"{s['within_1pct']}/{len(r['seeds'])}",
            f"{s['best_gap_median'] * 100:+.2f}% / {s['best_gap_max'] * 100:+.2f}%",
            "never" if s["steps_to_1pct_median"] is None else f"{s['steps_to_1pct_median']:.2f}",
            f"`{r['command']}`",
        ]
        for r in results
        for sampler, s in r["summary"].items()
    ]
    write_section(
        "search",
        "Search at an equal budget: random vs TPE proposals, both with successive halving (32-config space)",
        f"The demo model's 32-config SFT space (lr x rank x batch size x schedule), {result['num_chunks']} chunks of "
        "one epoch, per seed: (a) every config to the end; (b) RFOptunaSearch with a RandomSampler or the default "
        "TPESampler, the same configs at once and in all, under SuccessiveHalving() (its defaults, anneal probes "
        "included), each freed slot refilled. Steps: (b)/(a), probes included, median over seeds. Within 1%: seeds "
        "where (b)'s best final eval loss is within 1% of (a)'s; gap: median / worst. Steps to 1%: the runs' steps "
        "until a finished run within 1% of (a)'s best existed, / (a)'s steps, median over the seeds that got there. "
        "Target: TPE within 1% in >= 4 of 5 seeds with <= 0.5 of (a)'s steps.",
        ["date", "proposals", "configs", "steps (b)/(a)", "within 1%", "gap median / worst", "steps to 1%", "command"],
        rows,
    )
    print(summary)
    return result


if __name__ == "__main__":
    main()
