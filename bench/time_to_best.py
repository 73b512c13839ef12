"""Time to the best config: rf_notebook with a pruning policy vs the grid run one config after another.

    python -m bench.time_to_best [--seeds 3] [--rows 384] [--num-chunks 8] [--probe-steps N] [--fuse]

The 16-config SFT grid of `bench.pruning` (learning rate x LoRA rank x batch size, one epoch of `--rows` rows,
eval loss on 64 held-out rows). Per seed, in one process:
(a) rf_notebook: `run_fit` of the grid with successive halving (eta=3, its default ranking: eval loss at rung 1,
    an anneal probe from rung 2; `--probe-steps 0` ranks by eval loss only); the figure is the wall time from
    `run_fit` until a run has finished whose final eval loss is within 1% of the grid's best (the eval row's wall
    time in the store). Also reported: when the policy's leader at the latest rung became such a config for good
    (what the panel shows before the runs finish).
(b) plain TRL, the baseline a user has today: each config trained by its own `SFTTrainer` on a fresh base and
    evaluated at the end, one after another, in grid order; the figure is the wall time until a finished config
    is within 1% of the best of all 16 (the grid's best is (b)'s: rf_notebook's runs train exactly as these).
    As grid order is arbitrary, the median over 1000 random orders of (b)'s measured per-config times is reported
    too.
Ratios: (b) / (a) in grid order and in the median order. Target: >= 5x on CPU (>= 10x on a GPU). Writes
bench/results/time_to_best.json and the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from typing import Any

from bench._common import header, new_experiment, plain_trainer, save, write_section
from bench.pruning import search
from rf_notebook.chunking import steps_per_epoch
from rf_notebook.demo import arithmetic_dataset, demo_model_fn
from rf_notebook.policies import SuccessiveHalving
from rf_notebook.policies._base import AUTO_PROBE_STEPS

WITHIN = 0.01  # "the best config": final eval loss within 1% of the grid's best


def with_policy(args: argparse.Namespace, seed: int, train: Any, evl: Any, workdir: str) -> dict:
    """(a): the grid with successive halving; when each run finished and with which final eval loss."""
    exp = new_experiment("ttb", workdir)
    start = time.time()  # wall clock, as in the store's metric rows
    policy = SuccessiveHalving(eta=3, probe_steps="auto" if args.probe_steps is None else args.probe_steps)
    exp.run_fit(
        search(args.configs),
        demo_model_fn,
        train,
        evl,
        num_chunks=args.num_chunks,
        seed=seed,
        policy=policy,
        fuse=args.fuse,
    )
    assert exp.wait(timeout=3600)
    wall = time.time() - start
    ranking = policy.resolved("SFT", has_eval=True)  # as run_fit resolved it
    runs = {r.run_id: r for r in exp.runs()}
    finals, ranked = {}, {}
    for m in exp.store.metrics():
        record = runs[m.run_id]
        if m.name == "eval_loss" and record.status.value == "finished" and m.step == record.step:
            finals[m.run_id] = (m.value, m.wall_time - start)
        if m.name == ranking.ranked_by(m.chunk):
            ranked.setdefault(m.chunk, []).append((m.value, m.run_id, m.wall_time - start))
    configs = [r.config for r in runs.values()]  # (b) trains these, in this order
    stats = exp.stats()
    exp.end()
    steps = sum(r.step for r in runs.values())
    return {
        "wall_s": wall,
        "finished": finals,
        "leaders": [(min(rows)[1], max(t for *_, t in rows)) for _, rows in sorted(ranked.items())],
        "configs": configs,
        "run_ids": list(runs),
        "steps": steps,
        "probe_steps": stats["probe_steps"],
    }


def _row(result: dict) -> list[str]:
    seeds, summary = result["seeds"], result["summary"]
    return [
        result["date"],
        result["machine"],
        f"SH eta=3, {_ranking(result['probe_steps'])}{', fused' if result['fuse'] else ''}",
        " / ".join(f"{s['a_time_s']:.0f}" for s in seeds),
        " / ".join(f"{s['a_leader_s']:.0f}" for s in seeds),
        " / ".join(f"{s['b_grid_s']:.0f}" for s in seeds),
        " / ".join(f"{s['b_median_order_s']:.0f}" for s in seeds),
        f"{summary['found']}/{len(seeds)}",
        f"{summary['steps_ratio_median']:.2f}",
        f"{summary['ratio_grid_median']:.2f}",
        f"{summary['ratio_median_order_median']:.2f}",
        f"{summary['leader_ratio_median_order_median']:.2f}",
        f"`{result['command']}`",
    ]


def _ranking(probe_steps: int | None) -> str:
    if probe_steps is None:
        return f"default (probe {AUTO_PROBE_STEPS} from rung 2)"
    return f"probe {probe_steps} from rung 2" if probe_steps else "eval loss"


def leader_time(leaders: list[tuple[int, float]], good: set[int]) -> float:
    """When the policy's leader (the best run by its metric at the latest rung) became a good config and stayed
    one at every later rung: the time of that rung's last value (inf if the last leader is not good)."""
    when = float("inf")
    for run_id, t in reversed(leaders):
        if run_id not in good:
            break
        when = t
    return when


def sequential(configs: list[dict], train: Any, evl: Any, workdir: str) -> dict:
    """(b): each config alone with plain TRL, one after another; each one's final eval loss and its own time."""
    losses, times = [], []
    for i, config in enumerate(configs):
        args = {**config["training_args"], "output_dir": f"{workdir}/plain-{i}"}
        t0 = time.perf_counter()
        trainer = plain_trainer(demo_model_fn, args, config["peft_config"], train, evl)
        trainer.train()
        losses.append(trainer.evaluate()["eval_loss"])
        times.append(time.perf_counter() - t0)
    steps = sum(steps_per_epoch(len(train), c["training_args"]["per_device_train_batch_size"]) for c in configs)
    return {"losses": losses, "times": times, "steps": steps}


def time_to_good(times: list[float], good: list[bool]) -> float:
    """Wall time of configs run in this order until the first good one has finished."""
    total = 0.0
    for t, ok in zip(times, good):
        total += t
        if ok:
            return total
    return float("inf")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--num-chunks", type=int, default=8)
    parser.add_argument("--probe-steps", type=int, help="anneal probe steps (0: rank by eval loss; default: auto)")
    parser.add_argument("--fuse", action="store_true", help="run_fit(fuse=True)")
    parser.add_argument("--configs", type=int, default=16, help="the first N configs of the 16 (smoke tests)")
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    train, evl = arithmetic_dataset("train", n=args.rows), arithmetic_dataset("eval", n=64)
    seeds = []
    with tempfile.TemporaryDirectory() as workdir:
        # warm-up: one-time costs (imports, first tokenizer load) stay out of both
        warm = {"output_dir": f"{workdir}/w", "max_steps": 1, "use_cpu": True, "report_to": "none", "bf16": False}
        plain_trainer(demo_model_fn, warm, {"r": 4, "target_modules": "all-linear"}, train).train()
        for seed in range(args.seeds):
            a = with_policy(args, seed, train, evl, workdir)
            b = sequential(a["configs"], train, evl, workdir)
            best = min(b["losses"])
            good = [loss <= best * (1 + WITHIN) for loss in b["losses"]]
            found = [t for loss, t in a["finished"].values() if loss <= best * (1 + WITHIN)]
            a_time = min(found, default=float("inf"))
            b_grid = time_to_good(b["times"], good)
            rng = random.Random(seed)
            orders = []
            for _ in range(1000):
                order = rng.sample(range(len(good)), len(good))
                orders.append(time_to_good([b["times"][i] for i in order], [good[i] for i in order]))
            b_median = statistics.median(orders)
            a_best = min(loss for loss, _ in a["finished"].values())
            a_leader = leader_time(a["leaders"], {run_id for run_id, ok in zip(a["run_ids"], good) if ok})
            entry = {
                "seed": seed,
                "a_time_s": a_time,
                "a_leader_s": a_leader,
                "a_wall_s": a["wall_s"],
                "a_steps": a["steps"] + a["probe_steps"],
                "a_best_gap": a_best / best - 1,
                "b_grid_s": b_grid,
                "b_median_order_s": b_median,
                "b_total_s": sum(b["times"]),
                "b_steps": b["steps"],
                "good_configs": sum(good),
                "ratio_grid": b_grid / a_time,
                "ratio_median_order": b_median / a_time,
                "leader_ratio_median_order": b_median / a_leader,
                "b_losses": b["losses"],
            }
            seeds.append(entry)
            print(
                f"seed {seed}: rf_notebook {a_time:.1f} s (leader {a_leader:.1f} s, all done {a['wall_s']:.1f} s), "
                f"plain TRL grid order "
                f"{b_grid:.1f} s, median order {b_median:.1f} s, all {entry['b_total_s']:.1f} s; good configs "
                f"{sum(good)}/{len(good)}",
                flush=True,
            )
    summary = {
        "ratio_grid_median": statistics.median(s["ratio_grid"] for s in seeds),
        "ratio_median_order_median": statistics.median(s["ratio_median_order"] for s in seeds),
        "leader_ratio_median_order_median": statistics.median(s["leader_ratio_median_order"] for s in seeds),
        "found": sum(s["a_time_s"] != float("inf") for s in seeds),
        "steps_ratio_median": statistics.median(s["a_steps"] / s["b_steps"] for s in seeds),
    }
    result = {
        **header("time_to_best", argv),
        "rows": args.rows,
        "num_chunks": args.num_chunks,
        "probe_steps": args.probe_steps,
        "fuse": args.fuse,
        "seeds": seeds,
        "summary": summary,
    }
    variant = {None: "default", 0: "eval"}.get(args.probe_steps, f"probe{args.probe_steps}")
    rows = [_row(r) for r in save(f"time_to_best-{variant}{'-fused' if args.fuse else ''}", result)]
    write_section(
        "time_to_best",
        "Time to the best config (16-config SFT grid, demo model)",
        "Wall seconds until a finished config's final eval loss is within 1% of the grid's best: (a) rf_notebook "
        "running the grid with successive halving, from `run_fit`; (b) plain TRL training the configs one after "
        "another (a fresh base and `SFTTrainer` each, evaluated at its end), in grid order and the median over 1000 "
        "random orders of its measured per-config times. (a) leader: when the policy's leader (the best run by its "
        "metric at the latest rung) became a good config and stayed one, the moment the panel shows it (inf: the last "
        "leader is not good). Per seed (a / b / c ...), one process. Found: seeds where (a) finished a good config. "
        "Steps: (a)'s optimizer steps (probes included) / (b)'s. Ratio: (b) / (a), median over seeds. Target: "
        ">= 5x on CPU (>= 10x on a GPU).",
        [
            "date",
            "machine",
            "rf_notebook policy",
            "(a) s",
            "(a) leader s",
            "(b) grid order s",
            "(b) median order s",
            "found",
            "steps (a)/(b)",
            "ratio, grid order",
            "ratio, median order",
            "leader ratio, median order",
            "command",
        ],
        rows,
    )
    print(summary)
    return result


if __name__ == "__main__":
    main()
