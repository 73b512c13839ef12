"""Fused steps vs taking turns: N SFT runs on one base, tokens per second and peak memory.

    python -m bench.fused [--model demo|llama512|qwen05] [--sizes 2 4 8] [--batches 4 16] [--max-steps 16]
                          [--num-chunks 2] [--repeats 2]

For each N and per-run batch size, the same N configs (learning rates differ; ranks 8 and 16 alternate) are trained
by `run_fit(fuse=True)` and `run_fit(fuse=False)` in this one process, alternating which goes first. Tokens per
second = the tokens the runs trained (TRL's `num_tokens`) / the scheduler thread's training time (`stats()`:
evaluation and setup excluded, the same in both). Peak memory: on a GPU, `torch.cuda.max_memory_allocated` over the
training; on a CPU, the peak resident set size sampled every 5 ms above the level before `run_fit`. Reports
fused / turns for each. Targets (issue #21): >= 1.5x tokens/s at N=4, batch 4 on the demo model; >= 1.2x on
llama512 at batch 4; on a GPU >= 2x at N=8, batch 4. Writes bench/results/fused-<model>.json and the table in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading

import transformers

from bench._common import LEARNING_RATES, MODELS, header, new_experiment, save, write_section
from rf_notebook import List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset


def search(n_runs: int, max_steps: int, batch: int) -> RFGridSearch:
    return RFGridSearch(
        List(
            [
                RFModelConfig(
                    model_name=DEMO_MODEL,
                    peft_config=RFLoraConfig(r=8 * (1 + i % 2), lora_alpha=16, target_modules="all-linear"),
                    training_args=RFSFTConfig(
                        learning_rate=LEARNING_RATES[i % len(LEARNING_RATES)],
                        per_device_train_batch_size=batch,
                        max_steps=max_steps,
                    ),
                )
                for i in range(n_runs)
            ]
        ),
        trainer_type="SFT",
    )


class PeakMemory:
    """Peak memory of a `with` block above its start: CUDA allocations, else the process's resident set."""

    def __enter__(self) -> PeakMemory:
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            import ctypes
            import gc

            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # what earlier runs freed is given back first
            self.start = self.peak = _rss()
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self._done.set()
            self._thread.join()
            self.mb = (max(self.peak, _rss()) - self.start) / 2**20


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(model_fn, n_runs: int, batch: int, fuse: bool, args, train, workdir: str) -> dict[str, float]:
    exp = new_experiment("fused", workdir)
    with PeakMemory() as memory:
        exp.run_fit(
            search(n_runs, args.max_steps, batch),
            model_fn,
            train,
            num_chunks=args.num_chunks,
            seed=0,
            fuse=fuse,
            precision="fp32",  # fused steps are float32 only for now (a GPU's default is bf16): both modes alike
        )
        exp.wait()
    runs = exp.runs()
    assert all(r.status.value == "finished" for r in runs), [r.error for r in runs]
    stats = exp.stats()
    if fuse:
        assert set(stats["fusion"].values()) == {"fused"}, stats["fusion"]
    results = exp.results()
    tokens = results[results.metric == "num_tokens"].groupby("run_id").value.max().sum()
    exp.end()
    return {"tokens_per_s": float(tokens) / stats["train_s"], "peak_mb": memory.mb, "train_s": stats["train_s"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--num-chunks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    model_fn = MODELS[args.model]
    train = arithmetic_dataset("train", n=args.max_steps * max(args.batches))
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        measure(model_fn, 2, args.batches[0], True, args, train, workdir)  # warm-up
        for n in args.sizes:
            for batch in args.batches:
                got: dict[bool, list[dict[str, float]]] = {True: [], False: []}
                for i in range(args.repeats):
                    for fuse in (True, False) if i % 2 == 0 else (False, True):
                        got[fuse].append(measure(model_fn, n, batch, fuse, args, train, workdir))
                fused = {k: statistics.median(m[k] for m in got[True]) for k in got[True][0]}
                turns = {k: statistics.median(m[k] for m in got[False]) for k in got[False][0]}
                rows.append(
                    {
                        "runs": n,
                        "batch": batch,
                        "fused": fused,
                        "turns": turns,
                        "speedup": fused["tokens_per_s"] / turns["tokens_per_s"],
                        "raw": {"fused": got[True], "turns": got[False]},
                    }
                )
                print(n, batch, f"{rows[-1]['speedup']:.3f}", fused, turns, flush=True)
    result = {
        **header(f"fused-{args.model}", argv),
        "model": args.model,
        "max_steps": args.max_steps,
        "num_chunks": args.num_chunks,
        "rows": rows,
    }
    write_table(save(f"fused-{args.model}", result))
    return result


def write_table(results: list[dict]) -> None:
    rows = [
        [
            r["date"],
            r["machine"],
            r["model"],
            f"{row['runs']} x {r['max_steps']} ({row['batch']})",
            f"{row['fused']['tokens_per_s']:.0f}",
            f"{row['turns']['tokens_per_s']:.0f}",
            f"{row['speedup']:.2f}",
            f"{row['fused']['peak_mb']:.0f} / {row['turns']['peak_mb']:.0f}",
            f"`{r['command']}`",
        ]
        for r in results
        for row in r["rows"]
    ]
    write_section(
        "fused",
        "Fused steps",
        "N SFT runs on one base (ranks 8 / 16 alternating, learning rates differ) trained with `run_fit(fuse=True)` "
        "vs taking turns (`fuse=False`), same process, alternating order, median of the repeats. Tokens/s: tokens "
        "trained / the scheduler's training time. Peak memory above the level before `run_fit` (GPU: allocated; "
        "CPU: resident set, sampled). Targets: >= 1.5x at N=4, batch 4 on demo; >= 1.2x on llama512 at batch 4; "
        ">= 2x at N=8, batch 4 on a GPU.",
        [
            "date",
            "machine",
            "model",
            "runs x steps (batch)",
            "fused tokens/s",
            "turns tokens/s",
            "fused / turns",
            "peak MB fused / turns",
            "command",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
