"""Interleaving overhead inside a real Jupyter kernel, run the way a person runs a notebook.

    python -m bench.kernel [--model demo|llama512] [--runs 4] [--num-chunks 8] [--repeats 4]

`bench.overhead` measures in a plain Python process; a notebook adds an ipykernel (its IOPub, heartbeat and
control threads, a comm for the panel, the kernel's own OpenMP-using main thread). This benchmark builds a notebook
and executes it with nbclient in a fresh ipykernel, cell by cell as Run All does: per repetition, (a) one cell calls
`run_fit` (the panel is displayed) and the next cell calls `exp.wait()`; (b) one cell trains the same configs one
after another with plain `SFTTrainer.train()` on the kernel's main thread, each on a fresh base. Modes alternate
order between repetitions. The kernel times each mode from the first cell's start to the last cell's end and
reports them in the final cell's output. Reports a / b (median, min, max) and the CPU-time ratio. Writes
bench/results/kernel-<model>.json and the table in BENCHMARKS.md. Target: as bench.overhead, a / b <= 1.03.
"""

from __future__ import annotations

import json
import statistics

from bench._common import header, parse_args, save, write_section

SETUP = """\
import time, tempfile, transformers
transformers.logging.set_verbosity_error()
from bench._common import MODELS, new_experiment, plain_trainer, sweep
from rf_notebook.demo import arithmetic_dataset
model_fn = MODELS[{model!r}]
train = arithmetic_dataset("train", n={max_steps} * {batch})
workdir = tempfile.mkdtemp()
times = {{"a": [], "b": [], "a_cpu": [], "b_cpu": []}}
configs = None
"""
RUN_FIT = """\
t0, c0 = time.perf_counter(), time.process_time()
exp = new_experiment("kernel", workdir)
exp.run_fit(sweep({runs}, {max_steps}, {batch}), model_fn, train, None, num_chunks={chunks}, seed=0, fuse=False)
"""
WAIT = """\
exp.wait()
times["a"].append(time.perf_counter() - t0); times["a_cpu"].append(time.process_time() - c0)
assert all(r.status.value == "finished" for r in exp.runs()), [r.error for r in exp.runs()]
configs = [r.config for r in exp.runs()]
exp.end()
"""
PLAIN = """\
t0, c0 = time.perf_counter(), time.process_time()
for config in configs:
    plain_trainer(model_fn, config["training_args"], config["peft_config"], train).train()
times["b"].append(time.perf_counter() - t0); times["b_cpu"].append(time.process_time() - c0)
"""
REPORT = """\
import json
print("RESULT " + json.dumps(times))
"""


def notebook(args) -> object:
    """The benchmark notebook: set-up, a warm-up experiment, then `repeats` x (a, b) in alternating order."""
    import nbformat

    fill = {"model": args.model, "runs": args.runs, "max_steps": args.max_steps, "batch": args.batch_size}
    fill["chunks"] = args.num_chunks
    a = [RUN_FIT.format(**fill), WAIT]
    b = [PLAIN]
    cells = [SETUP.format(**fill), *a, "times = {key: [] for key in times}  # the warm-up does not count"]
    for i in range(args.repeats):
        cells += a + b if i % 2 == 0 else b + a
    cells.append(REPORT)
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])


def main(argv: list[str] | None = None) -> dict:
    from pathlib import Path

    from nbclient import NotebookClient

    args = parse_args(__doc__, argv, repeats=4)
    nb = notebook(args)
    root = Path(__file__).parents[1]
    # The kernel starts in the source tree (it imports `bench`); the experiments go to a temporary folder.
    NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    report = "".join(out.get("text", "") for out in nb.cells[-1].outputs)
    times = json.loads(report.split("RESULT ", 1)[1])
    ratios = [a / b for a, b in zip(times["a"], times["b"])]
    result = {
        **header(f"kernel-{args.model}", argv),
        "model": args.model,
        "runs": args.runs,
        "num_chunks": args.num_chunks,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "interleaved_s": times["a"],
        "sequential_s": times["b"],
        "interleaved_cpu_s": times["a_cpu"],
        "sequential_cpu_s": times["b_cpu"],
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "cpu_ratio_median": statistics.median(a / b for a, b in zip(times["a_cpu"], times["b_cpu"])),
    }
    write_table(save(f"kernel-{args.model}", result))
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
            f"{statistics.median(r['interleaved_s']):.1f}",
            f"{statistics.median(r['sequential_s']):.1f}",
            f"{r['ratio_median']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]",
            f"{r['cpu_ratio_median']:.3f}",
            f"`{r['command']}`",
        ]
        for r in results
    ]
    write_section(
        "kernel",
        "Interleaving overhead in a Jupyter kernel",
        "The overhead benchmark executed by nbclient in a fresh ipykernel, as Run All runs a notebook: (a) a "
        "`run_fit` cell (panel displayed) then an `exp.wait()` cell; (b) one cell training the same configs one "
        "after another with plain `SFTTrainer.train()` on the kernel's main thread. No evaluation. Target: "
        "a / b <= 1.03.",
        [
            "date",
            "machine",
            "model",
            "runs x steps (batch)",
            "chunks",
            "a: run_fit + wait (s)",
            "b: plain TRL (s)",
            "a / b median [min, max]",
            "CPU time a / b",
            "command",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
