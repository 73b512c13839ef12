"""Where a training step's time goes: rf_notebook vs. plain TRL, piece by piece.

    python -m bench.profile [--model demo|llama512] [--runs 4] [--num-chunks 8] [--max-steps 64] [--repeats 2]

The pieces of transformers' training loop (forward + backward, gradient clipping, optimizer step, LR schedule,
zero_grad, FLOP counting, fetching batches, callbacks) are timed by wrapping them at class level while the benchmark
runs, in both modes, alternating: (a) `Experiment.run_fit` with N runs interleaved in chunks, (b) the same configs
one after another with plain `SFTTrainer.train()`, each on a fresh base. rf_notebook's own work outside the
trainer comes from `exp.stats()` (setup, switching runs, evaluation, chunk-end checkpoints, clean-up); the time a
run spends suspended inside its callback (the other runs training) is taken out of "callbacks". "other" is what is
left of the wall time: the trainer's loop itself, base loading and trainer construction in (b). Prints ms per
optimizer step; writes bench/results/profile-<model>.json and the table in BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from bench._common import MODELS, Timing, header, new_experiment, parse_args, plain_trainer, save, sweep, write_section
from rf_notebook.demo import arithmetic_dataset

# (piece, module, class, method) timed in both modes
TRAINER_PIECES = [
    ("forward + backward", "transformers.trainer", "Trainer", "training_step"),
    ("clip gradients", "transformers.trainer", "Trainer", "_clip_grad_norm"),
    ("optimizer step", "accelerate.optimizer", "AcceleratedOptimizer", "step"),
    ("LR schedule", "torch.optim.lr_scheduler", "LRScheduler", "step"),
    ("zero_grad", "torch.nn.modules.module", "Module", "zero_grad"),
    ("FLOP count", "transformers.trainer", "Trainer", "floating_point_ops"),
    ("fetch batches", "transformers.trainer", "Trainer", "get_batch_samples"),
    ("callbacks", "transformers.trainer_callback", "CallbackHandler", "call_event"),
    ("suspended", "rf_notebook.engine._slot", "RunSlot", "suspend"),
]
ENGINE_PIECES = {
    "setup": "setup_s",
    "switch runs": "switch_s",
    "evaluate": "eval_s",
    "checkpoint": "checkpoint_s",
    "clean-up": "cleanup_s",
}


class Pieces:
    """Seconds spent in each wrapped method (outermost calls only, so a recursive call is not counted twice)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._depth: dict[str, int] = {}

    @contextlib.contextmanager
    def wrapped(self) -> Iterator[None]:
        import importlib

        originals = []
        for piece, module, cls_name, method in TRAINER_PIECES:
            cls = getattr(importlib.import_module(module), cls_name)
            original = cls.__dict__[method]
            originals.append((cls, method, original))
            setattr(cls, method, self._timed(piece, original))
        try:
            yield
        finally:
            for cls, method, original in originals:
                setattr(cls, method, original)

    def _timed(self, piece: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = self._depth.get(piece, 0)
            self._depth[piece] = depth + 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[piece] = depth
                if depth == 0:
                    self.seconds[piece] = self.seconds.get(piece, 0.0) + time.perf_counter() - start

        return timed

    def take(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {}
        return seconds


def profile_rf(model_fn, args, train, workdir: str, pieces: Pieces) -> dict[str, float]:
    exp = new_experiment("profile", workdir)
    with Timing() as timing:
        exp.run_fit(
            sweep(args.runs, args.max_steps, args.batch_size),
            model_fn,
            train,
            None,
            num_chunks=args.num_chunks,
            seed=0,
            fuse=False,
        )
        exp.wait()
    stats = exp.stats()
    exp.end()
    seconds = pieces.take()
    seconds["callbacks"] = seconds.get("callbacks", 0.0) - seconds.pop("suspended", 0.0)
    seconds.update({piece: stats[key] for piece, key in ENGINE_PIECES.items()})
    seconds["total"] = timing.wall
    return seconds


def profile_plain(model_fn, configs, train, pieces: Pieces) -> dict[str, float]:
    with Timing() as timing:
        for config in configs:
            plain_trainer(model_fn, config["training_args"], config["peft_config"], train).train()
    seconds = pieces.take()
    seconds.pop("suspended", None)
    seconds["total"] = timing.wall
    return seconds


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, repeats=2)
    model_fn = MODELS[args.model]
    train = arithmetic_dataset("train", n=args.max_steps * args.batch_size)
    pieces = Pieces()
    runs: dict[str, list[dict[str, float]]] = {"rf_notebook": [], "plain TRL": []}
    with tempfile.TemporaryDirectory() as workdir, pieces.wrapped():
        exp = new_experiment("warm-up", workdir)
        exp.run_fit(
            sweep(args.runs, args.max_steps, args.batch_size), model_fn, train, None, num_chunks=1, seed=0, fuse=False
        )
        exp.wait()
        configs = [r.config for r in exp.runs()]
        exp.end()
        pieces.take()
        for i in range(args.repeats):
            for mode in ("rf_notebook", "plain TRL") if i % 2 == 0 else ("plain TRL", "rf_notebook"):
                if mode == "rf_notebook":
                    runs[mode].append(profile_rf(model_fn, args, train, workdir, pieces))
                else:
                    runs[mode].append(profile_plain(model_fn, configs, train, pieces))
    steps = args.runs * args.max_steps
    names = [piece for piece, *_ in TRAINER_PIECES if piece != "suspended"] + list(ENGINE_PIECES)
    ms: dict[str, dict[str, float]] = {}
    for mode, measured in runs.items():
        ms[mode] = {name: 1000 * statistics.median(m.get(name, 0.0) for m in measured) / steps for name in names}
        ms[mode]["total"] = 1000 * statistics.median(m["total"] for m in measured) / steps
        ms[mode]["other"] = ms[mode]["total"] - sum(ms[mode][name] for name in names)
    result = {
        **header(f"profile-{args.model}", argv),
        "model": args.model,
        "runs": args.runs,
        "num_chunks": args.num_chunks,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "ms_per_step": ms,
        "raw_s": runs,
    }
    save(f"profile-{args.model}", result)
    write_table(result)
    for name in [*names, "other", "total"]:
        rf, plain = ms["rf_notebook"][name], ms["plain TRL"][name]
        print(f"{name:20s} {rf:8.2f} {plain:8.2f} {rf - plain:+8.2f}")
    return result


def write_table(result: dict) -> None:
    ms = result["ms_per_step"]
    rows = [
        [
            name,
            f"{ms['rf_notebook'][name]:.2f}",
            f"{ms['plain TRL'][name]:.2f}",
            f"{ms['rf_notebook'][name] - ms['plain TRL'][name]:+.2f}",
        ]
        for name in ms["rf_notebook"]
    ]
    write_section(
        f"profile-{result['model']}",
        f"Where a step's time goes ({result['model']})",
        f"{result['date']}, {result['machine']}: {result['runs']} runs x {result['max_steps']} steps (batch "
        f"{result['batch_size']}), {result['num_chunks']} chunks; median of {result['repeats']} alternating "
        f"repetitions, ms per optimizer step. `{result['command']}`",
        ["piece", "rf_notebook", "plain TRL", "difference"],
        rows,
    )


if __name__ == "__main__":
    main()
