"""Compute to the best config: a 16-config SFT sweep on the demo model, exhaustive vs each pruning policy.

    python -m bench.pruning [--seeds 5] [--num-chunks 8] [--rows 512] [--probe-steps 4] [--policies TEXT]

The sweep is learning rate {3e-3, 1e-3, 3e-4, 1e-4} x LoRA rank {4, 16} x batch size {8, 16}, one epoch of
`--rows` rows (bs 8 takes twice the optimizer steps of bs 16), eval loss on 64 held-out rows at every chunk end.
For each seed it runs (a) every config to the end, then (b) the same sweep with each policy. Reported, per policy:
optimizer steps and wall time of (b) / (a), in how many seeds (b)'s best final eval loss is within 1% of (a)'s,
and (from the exhaustive runs) Kendall's tau between the ranking at each rung and the final ranking, by eval loss
and by the anneal probe's result (`probe_steps`; the exhaustive sweep is probed at rungs 1-3, which leaves its runs
unchanged: checked), in a second run of it, so that (a) is the sweep as a user runs it).
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
from rf_notebook.policies import PBT, MedianOfPeers, Policy, SuccessiveHalving
from rf_notebook.policies._base import AUTO_PROBE_STEPS

PROBE_STEPS = AUTO_PROBE_STEPS  # the anneal probe's length (`--probe-steps`)


def policies(probe_steps: int) -> dict[str, Any]:
    return {
        "successive halving (eta=3, eval loss)": lambda: SuccessiveHalving(eta=3, probe_steps=0),
        "successive halving (eta=4, eval loss)": lambda: SuccessiveHalving(eta=4, probe_steps=0),
        f"successive halving (eta=3, probe {probe_steps} from rung 2)": lambda: SuccessiveHalving(
            eta=3, probe_steps=probe_steps
        ),
        f"successive halving (eta=4, probe {probe_steps} from rung 2)": lambda: SuccessiveHalving(
            eta=4, probe_steps=probe_steps
        ),
        "median of peers (warmup 1)": lambda: MedianOfPeers(warmup_chunks=1),
        "PBT (quantile 0.25, every 2 chunks)": lambda: PBT(
            quantile=0.25, perturb={"learning_rate": (0.8, 1.25)}, interval=2
        ),
    }


class Observe(Policy):
    """Decides nothing; probes every run at the first `rungs` rungs (the exhaustive sweep's probe ranking). The
    probes leave the runs bit for bit as without them (tests/test_probe.py), so one sweep gives both rankings."""

    def __init__(self, probe_steps: int, rungs: int):
        super().__init__(probe_steps=probe_steps, probe_from=1)
        self.rungs = rungs

    def decides_at(self, rung: int) -> bool:
        return rung <= self.rungs

    def decide(self, rung: int, runs: Any) -> list:
        return []


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
    probes: dict[int, dict[int, float]] = {}
    for m in exp.store.metrics():
        if m.name in ("eval_loss", "probe_eval_loss"):
            (evals if m.name == "eval_loss" else probes).setdefault(m.run_id, {})[m.chunk] = m.value
    finished = {r.run_id: evals[r.run_id][r.chunks_total] for r in runs if r.status.value == "finished"}
    stats = exp.stats()
    exp.end()
    return {
        "wall_s": wall,
        "probe_s": stats["probe_s"],
        # every optimizer step trained, the probes' included: they are compute the policy spent
        "steps": sum(r.step for r in runs) + stats["probe_steps"],
        "probe_steps": stats["probe_steps"],
        "best_final_eval_loss": min(finished.values()),
        "best_run": min(finished, key=finished.get),
        "eval_loss_by_rung": {str(k): v for k, v in evals.items()},
        "probe_eval_loss_by_rung": {str(k): v for k, v in probes.items()},
        "policy_ops": sum(op.origin == "policy" for op in exp.store.ic_log()),
    }


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a between two score lists (pairs tied in either count as neither)."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    score = sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs) - sum(
        (a[i] - a[j]) * (b[i] - b[j]) < 0 for i, j in pairs
    )
    return score / len(pairs)


def rung_taus(evals: dict[str, dict[int, float]], final: dict[str, dict[int, float]] | None = None) -> list[float]:
    """Tau between each rung's values (eval losses, or probe results) and the final eval losses, over all runs of
    an exhaustive sweep."""
    last = {run: values[max(values)] for run, values in (final or evals).items()}
    rungs = sorted({k for values in evals.values() for k in values})
    taus = []
    for k in rungs:
        runs = sorted(r for r in evals if k in evals[r])  # a run without a value there (a failed probe) sits out
        taus.append(kendall_tau([evals[r][k] for r in runs], [last[r] for r in runs]))
    return taus


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--num-chunks", type=int, default=8)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--configs", type=int, default=16, help="the first N configs of the 16 (smoke tests)")
    parser.add_argument("--probe-steps", type=int, default=PROBE_STEPS, help="the anneal probe's optimizer steps")
    parser.add_argument("--policies", default="", help="only the policies whose name contains this text")
    args = parser.parse_args(argv)
    chosen = {name: make for name, make in policies(args.probe_steps).items() if args.policies in name}

    import transformers

    transformers.logging.set_verbosity_error()
    seeds = []
    with tempfile.TemporaryDirectory() as workdir:
        run(1, 0, 32, 1, None, workdir)  # warm-up: one-time costs (imports, first tokenizer load) stay out
        for seed in range(args.seeds):
            full = run(args.configs, seed, args.rows, args.num_chunks, None, workdir)
            # the same sweep probed at rungs 1-3 (its runs train exactly as unprobed): the probe's ranking there
            observed = run(args.configs, seed, args.rows, args.num_chunks, Observe(args.probe_steps, 3), workdir)
            assert observed["eval_loss_by_rung"] == full["eval_loss_by_rung"], "a probe changed a run"
            entry = {
                "seed": seed,
                "exhaustive": full,
                "taus": rung_taus(full["eval_loss_by_rung"]),
                "probe_taus": rung_taus(observed["probe_eval_loss_by_rung"], full["eval_loss_by_rung"]),
            }
            for name, make in chosen.items():
                pruned = run(args.configs, seed, args.rows, args.num_chunks, make(), workdir)
                pruned["steps_ratio"] = pruned["steps"] / full["steps"]
                pruned["wall_ratio"] = pruned["wall_s"] / full["wall_s"]
                gap = pruned["best_final_eval_loss"] / full["best_final_eval_loss"] - 1
                pruned["best_gap"] = gap
                pruned["within_1pct"] = gap <= 0.01
                entry[name] = pruned
            seeds.append(entry)
            print(f"seed {seed}: " + ", ".join(f"{n}: {entry[n]['steps_ratio']:.2f}" for n in chosen), flush=True)

    taus = [statistics.mean(s["taus"][k] for s in seeds) for k in range(len(seeds[0]["taus"]))]
    probe_taus = [statistics.mean(s["probe_taus"][k] for s in seeds) for k in range(len(seeds[0]["probe_taus"]))]
    summary = {
        name: {
            "steps_ratio_median": statistics.median(s[name]["steps_ratio"] for s in seeds),
            "wall_ratio_median": statistics.median(s[name]["wall_ratio"] for s in seeds),
            "within_1pct": sum(s[name]["within_1pct"] for s in seeds),
            "best_gap_max": max(s[name]["best_gap"] for s in seeds),
        }
        for name in chosen
    }
    result = {
        **header("pruning", argv),
        "configs": args.configs,
        "rows": args.rows,
        "num_chunks": args.num_chunks,
        "seeds": seeds,
        "probe_steps": args.probe_steps,
        "summary": summary,
        "tau_by_rung": taus,
        "probe_tau_by_rung": probe_taus,
    }
    latest = save("pruning", result)[-1]
    tau_text = " ".join(f"{t:.2f}" for t in latest["tau_by_rung"])
    probe_text = " ".join(f"{t:.2f}" for t in latest["probe_tau_by_rung"])
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
            probe_text,
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
        "over seeds); probe tau: the same for the anneal probe's result at rungs 1-3 (probe N: the policy ranks by "
        "an anneal probe of N optimizer steps from rung 2 on, the default; steps (b) count the probes' steps). "
        "Target: successive halving within 1% in >= 4 of 5 seeds using <= 30% of the steps.",
        [
            "date",
            "policy",
            "seeds",
            "steps (b)/(a)",
            "wall (b)/(a)",
            "within 1%",
            "worst gap",
            "tau by rung",
            "probe tau",
            "command",
        ],
        rows,
    )
    print(result["summary"], taus, probe_taus)
    return result


if __name__ == "__main__":
    main()
