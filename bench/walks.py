"""The walks of the shared model a trainer makes at every step: torch's vs rf_notebook's (`engine._walks`).

    python -m bench.walks [--model demo|llama512] [--runs 4] [--max-steps 64] [--num-chunks 8] [--repeats 4]

Two measurements in this one process, each alternating torch's walks and rf_notebook's:
  calls: on the shared PEFT model carrying `--runs` adapters (one in the module tree), ms per call of what
    transformers' training loop calls at every step: `model.train()`, `list(model.parameters())` (gradient
    clipping) and `model.zero_grad()` (after setting the active adapter's gradients, as a step leaves them; the
    setting is timed in both); and one adapter switch (`Adapters.use`, rf_notebook's only).
  training: `run_fit` of `--runs` SFT configs taking turns, ms of the scheduler's training time per optimizer
    step, with rf_notebook's walks and with torch's (not installed on the shared model).
Reports torch / rf_notebook for each (median of the repetitions). Writes bench/results/walks-<model>.json and the
table in BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
import tempfile
import timeit
from typing import Any

from bench._common import MODELS, header, new_experiment, parse_args, save, sweep, write_section
from rf_notebook.demo import arithmetic_dataset
from rf_notebook.engine import _walks


def _shared_model(model_fn: Any, runs: int) -> tuple[Any, Any]:
    """The base with `runs` LoRA adapters as rf_notebook holds them (all but one parked)."""
    from peft import LoraConfig, get_peft_model

    from rf_notebook.engine._adapters import Adapters

    model, _ = model_fn(None)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    peft = get_peft_model(model, lora, adapter_name="run0")
    adapters = Adapters(peft)
    for i in range(1, runs):
        adapters.add(f"run{i}", lora)
    adapters.use("run0")
    return peft, adapters


def _uninstall(model: Any) -> None:
    for name in ("train", "parameters"):
        model.__dict__.pop(name, None)


def calls(model_fn: Any, runs: int, repeats: int, number: int = 200) -> dict[str, dict[str, float]]:
    """ms per call of each walk, torch's and rf_notebook's (median of `repeats` alternating rounds)."""
    import torch

    peft, adapters = _shared_model(model_fn, runs)
    params = adapters.parameters("run0")
    grads = [torch.zeros_like(p) for p in params]

    def with_grads() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        peft.zero_grad()

    walks = {
        "train()": lambda: peft.train(),
        "parameters()": lambda: list(peft.parameters()),
        "zero_grad()": with_grads,
    }
    times: dict[str, dict[str, list[float]]] = {name: {"torch": [], "rf_notebook": []} for name in walks}
    for i in range(repeats):
        for mode in ("torch", "rf_notebook") if i % 2 == 0 else ("rf_notebook", "torch"):
            _walks.install(peft) if mode == "rf_notebook" else _uninstall(peft)
            for name, walk in walks.items():
                times[name][mode].append(timeit.timeit(walk, number=number) / number * 1e3)
    names = [f"run{i}" for i in range(runs)]

    def switch() -> None:
        for name in names:
            adapters.use(name)

    use = statistics.median(timeit.timeit(switch, number=number // 4) / (number // 4) / runs * 1e3 for _ in range(3))
    result = {name: {mode: statistics.median(v) for mode, v in t.items()} for name, t in times.items()}
    result["adapter switch"] = {"torch": None, "rf_notebook": use}
    return result


def training(model_fn: Any, args: Any, workdir: str) -> dict[str, Any]:
    """The scheduler's training ms per optimizer step with rf_notebook's walks and with torch's."""
    install = _walks.install
    train = arithmetic_dataset("train", n=args.max_steps * args.batch_size)
    got: dict[str, list[float]] = {"torch": [], "rf_notebook": []}
    try:
        for i in range(args.repeats + 1):  # the first round warms up
            for mode in ("torch", "rf_notebook") if i % 2 == 0 else ("rf_notebook", "torch"):
                _walks.install = install if mode == "rf_notebook" else _uninstall
                exp = new_experiment("walks", workdir)
                exp.run_fit(
                    sweep(args.runs, args.max_steps, args.batch_size),
                    model_fn,
                    train,
                    num_chunks=args.num_chunks,
                    fuse=False,
                )
                exp.wait()
                assert all(r.status.value == "finished" for r in exp.runs()), [r.error for r in exp.runs()]
                if i:
                    got[mode].append(exp.stats()["train_s"] / (args.runs * args.max_steps) * 1e3)
                exp.end()
    finally:
        _walks.install = install
    return {
        "torch_ms": statistics.median(got["torch"]),
        "rf_notebook_ms": statistics.median(got["rf_notebook"]),
        "ratio": statistics.median(t / r for t, r in zip(got["torch"], got["rf_notebook"])),
        "raw": got,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, repeats=4)
    model_fn = MODELS[args.model]
    with tempfile.TemporaryDirectory() as workdir:
        result = {
            **header(f"walks-{args.model}", argv),
            "model": args.model,
            "runs": args.runs,
            "max_steps": args.max_steps,
            "batch_size": args.batch_size,
            "calls": calls(model_fn, args.runs, args.repeats),
            "training": training(model_fn, args, workdir),
        }
    for name, t in result["calls"].items():
        print(f"{name:16s} torch {_ms(t['torch'])} ms  rf_notebook {_ms(t['rf_notebook'])} ms")
    print("training ms/step torch / rf_notebook:", result["training"])
    write_table(save(f"walks-{args.model}", result))
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_table(results: list[dict]) -> None:
    rows = []
    for r in results:
        t = r["training"]
        cells = [f"{_ms(c['torch'])} / {_ms(c['rf_notebook'])}" for c in r["calls"].values()]
        ratio = f"{t['torch_ms']:.1f} / {t['rf_notebook_ms']:.1f} = {t['ratio']:.2f}"
        rows.append([r["date"], r["machine"], r["model"], f"{r['runs']} x {r['max_steps']}", *cells, ratio])
        rows[-1].append(f"`{r['command']}`")
    write_section(
        "walks",
        "Per-step walks of the shared model",
        "What transformers' training loop walks at every step, on the shared PEFT model with N adapters (one in the "
        "tree): ms per call, torch's / rf_notebook's (`engine._walks`), and one adapter switch (rf_notebook's "
        "only); and the scheduler's training ms per optimizer step of N SFT runs taking turns, torch's walks / "
        "rf_notebook's (ratio: median of the repetitions' ratios). Same process, alternating.",
        [
            "date",
            "machine",
            "model",
            "runs x steps",
            "train() ms",
            "parameters() ms",
            "zero_grad() ms",
            "adapter switch ms",
            "training ms/step torch / ours",
            "command",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
