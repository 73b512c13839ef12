"""Time to first step: how soon after `run_fit` the first optimizer step of a sweep is logged.

    python -m bench.first_step [--max-steps 256] [--num-chunks 4] [--repeats 4]

The demo sweep (`python -m rf_notebook.demo`: 4 SFT configs on the demo model, its 1,024 chat rows, 128 eval rows
with generation-based exact match), measured from the call to its first logged loss, in three modes that rotate
within each repetition: (cold) nothing prepared in this process, as in a fresh kernel once torch and TRL are
imported; (again) a new experiment on the same data after one has run, as a user's next `run_fit` (the prepared
data is found, not tokenized again); (plain) plain TRL for the sweep's first config alone: a fresh base,
`SFTTrainer(peft_config=...)` with the same data, and its first logged step. Each experiment is ended right after its
first step. Writes bench/results/first_step-demo.json and the table in BENCHMARKS.md. Target (#19): within 1 s.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from bench._common import header, new_experiment, parse_args, plain_trainer, save, write_section
from rf_notebook.demo import arithmetic_dataset, demo_model_fn
from rf_notebook.demo.__main__ import sweep

POLL_S = 0.02


def rf_notebook_first_step(args, train, evl, workdir, *, cold: bool) -> tuple[float, dict]:
    """Seconds from `run_fit` to the first logged loss; the first run's resolved config."""
    if cold:
        exp = new_experiment("first-step", workdir)  # forgets what earlier experiments prepared
    else:
        from rf_notebook import Experiment

        exp = Experiment("first-step", experiments_dir=tempfile.mkdtemp(dir=workdir))
    start = time.time()  # wall clock, as in the store's metric rows
    exp.run_fit(sweep(args.max_steps), demo_model_fn, train, evl, num_chunks=args.num_chunks, seed=0, display=False)
    while not any(run.step > 0 or run.status.is_terminal for run in exp.runs()):
        time.sleep(POLL_S)
    losses = exp.results().query("metric == 'loss'")
    runs = exp.runs()
    exp.end(wait=False)
    if losses.empty:
        raise RuntimeError(f"no step was logged: {[run.error for run in runs]}")
    return float(losses.wall_time.min()) - start, runs[0].config


def plain_first_step(config: dict, train, evl) -> float:
    """Seconds from loading a fresh base to the first logged loss of plain TRL on `config`."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        at: float | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in (logs or {}) and self.at is None:
                self.at = time.time()
                control.should_training_stop = True

    first = FirstStep()
    start = time.time()
    plain_trainer(demo_model_fn, config["training_args"], config["peft_config"], train, evl, [first]).train()
    return first.at - start


def main(argv: list[str] | None = None) -> dict:
    import datasets

    args = parse_args(__doc__, argv, runs=False, repeats=4, max_steps=256, num_chunks=4)
    datasets.disable_progress_bar()  # rf_notebook shows none while it prepares data: nor does plain TRL here
    train, evl = arithmetic_dataset("train"), arithmetic_dataset("eval")
    times: dict[str, list[float]] = {"cold": [], "again": [], "plain": []}
    with tempfile.TemporaryDirectory() as workdir:
        _, config = rf_notebook_first_step(args, train, evl, workdir, cold=True)  # warm-up: imports, first loads
        config = {**config, "training_args": {**config["training_args"], "output_dir": workdir}}
        plain_first_step(config, train, evl)
        order = list(times)
        for i in range(args.repeats):
            for mode in order[i % 3 :] + order[: i % 3]:
                if mode == "plain":
                    times[mode].append(plain_first_step(config, train, evl))
                else:
                    times[mode].append(rf_notebook_first_step(args, train, evl, workdir, cold=mode == "cold")[0])
    result = {
        **header("first_step-demo", argv),
        "model": "demo",
        "max_steps": args.max_steps,
        "num_chunks": args.num_chunks,
        **{f"{mode}_s": values for mode, values in times.items()},
        **{f"{mode}_median_s": statistics.median(values) for mode, values in times.items()},
    }

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"

    rows = [
        [
            r["date"],
            r["machine"],
            f"{r['max_steps']} steps, {r['num_chunks']} chunks",
            cell(r["cold_s"]),
            cell(r["again_s"]),
            cell(r["plain_s"]),
            f"`{r['command']}`",
        ]
        for r in save("first_step-demo", result)
    ]
    write_section(
        "first_step",
        "Time to first step",
        "Seconds from `run_fit` to the first logged loss of the demo sweep (4 SFT configs, 1,024 chat rows, eval "
        "with generation), median [min, max] over the repetitions: a first `run_fit` in the process (cold), a "
        "later one on the same data (again), and plain TRL for the sweep's first config alone (a fresh base, its "
        "constructor, its first step). Modes rotate within each repetition. Target: within 1 s.",
        ["date", "machine", "sweep", "cold", "again", "plain TRL, 1 config", "command"],
        rows,
    )
    return result


if __name__ == "__main__":
    main()
