"""Interleaving overhead: N configs trained by rf_notebook in chunks vs. one after another with plain TRL.

    python -m bench.overhead [--model demo|llama512] [--runs 4] [--num-chunks 8] [--repeats 3]

Both modes run in this one process on the same data, alternating (a) interleaved and (b) sequential repetitions
so that machine noise hits both alike. (a) is `Experiment.run_fit` + `wait` (base loaded once, N adapters on it);
(b) is, per config, a fresh base plus `SFTTrainer(peft_config=...).train()`. Neither evaluates, so both do the
same training compute. Reports the wall-time ratio a/b (median, min, max) and the overhead per chunk switch,
(a - b) / switches. Writes bench/results/overhead-<model>.json and the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn

RESULTS = Path(__file__).with_name("results")
LEARNING_RATES = [3e-3, 1e-3, 3e-4, 1e-4, 2e-3, 5e-4, 2e-4, 5e-5]


def llama512_fn(model_config=None):
    """A Llama-style model larger than the demo one (hidden 512, 4 layers), random init, demo tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = demo_model_fn(None)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config), tokenizer


MODELS = {"demo": demo_model_fn, "llama512": llama512_fn}


def group(n_runs: int, max_steps: int, batch: int) -> RFGridSearch:
    return RFGridSearch(
        RFModelConfig(
            model_name=DEMO_MODEL,
            peft_config=RFLoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=List(LEARNING_RATES[:n_runs]), per_device_train_batch_size=batch, max_steps=max_steps
            ),
        ),
        trainer_type="SFT",
    )


def interleaved(model_fn, n_runs, max_steps, batch, num_chunks, train, workdir) -> tuple[float, list[dict]]:
    exp = Experiment("bench", experiments_dir=workdir)
    start = time.perf_counter()
    exp.run_fit(group(n_runs, max_steps, batch), model_fn, train, None, num_chunks=num_chunks, seed=0)
    exp.wait()
    wall = time.perf_counter() - start
    configs = [r.config for r in exp.runs()]
    assert all(r.status.value == "finished" for r in exp.runs()), [r.error for r in exp.runs()]
    exp.end()
    return wall, configs


def sequential(model_fn, configs, train) -> float:
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    for config in configs:
        model, tokenizer = model_fn(None)
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**config["training_args"]),
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=LoraConfig(**config["peft_config"]),
        )
        trainer.train()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--num-chunks", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    model_fn = MODELS[args.model]
    train = arithmetic_dataset("train", n=args.max_steps * args.batch_size)
    a_times, b_times = [], []
    with tempfile.TemporaryDirectory() as workdir:
        interleaved(model_fn, 1, 4, args.batch_size, 1, train, workdir)  # warm-up: imports, kernels, caches
        for _ in range(args.repeats):
            a, configs = interleaved(
                model_fn, args.runs, args.max_steps, args.batch_size, args.num_chunks, train, workdir
            )
            b = sequential(model_fn, configs, train)
            a_times.append(a)
            b_times.append(b)
    ratios = [a / b for a, b in zip(a_times, b_times)]
    switches = args.runs * args.num_chunks
    result = {
        "benchmark": "overhead",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
        "command": "python -m bench.overhead " + " ".join(argv or []),
        "model": args.model,
        "runs": args.runs,
        "num_chunks": args.num_chunks,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "interleaved_s": a_times,
        "sequential_s": b_times,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "switches": switches,
        "overhead_per_switch_ms": statistics.median((a - b) / switches * 1000 for a, b in zip(a_times, b_times)),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"overhead-{args.model}.json").write_text(json.dumps(result, indent=2))
    write_table()
    print(json.dumps(result, indent=2))
    return result


def write_table() -> None:
    """Regenerate the overhead section of BENCHMARKS.md from every bench/results/overhead-*.json."""
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("overhead-*.json"))]
    lines = [
        "| date | machine | model | runs x steps (batch) | chunks | interleaved (s) | sequential (s) "
        "| ratio a/b median [min, max] | overhead / switch (ms) | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['date']} | {r['machine']} | {r['model']} | {r['runs']} x {r['max_steps']} ({r['batch_size']}) | "
            f"{r['num_chunks']} | {statistics.median(r['interleaved_s']):.1f} | "
            f"{statistics.median(r['sequential_s']):.1f} | "
            f"{r['ratio_median']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}] | "
            f"{r['overhead_per_switch_ms']:.0f} | `{r['command'].strip()}` |"
        )
    path = Path(__file__).parents[1] / "BENCHMARKS.md"
    start, end = "<!-- overhead:start -->", "<!-- overhead:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n" + "\n".join(lines) + f"\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text += (
            "\n## Interleaving overhead\n\nN SFT configs trained interleaved in chunks by rf_notebook (a) vs. one "
            "after another with plain `SFTTrainer.train()` (b), same process, alternating repetitions, no "
            "evaluation in either. Overhead per switch = (a - b) / (runs x chunks).\n\n" + block + "\n"
        )
    path.write_text(text)


if __name__ == "__main__":
    main()
