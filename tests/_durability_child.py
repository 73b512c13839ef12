"""A process that runs (or resumes) a 4-config demo experiment and SIGKILLs itself at a chosen point.

    python tests/_durability_child.py DIR start|resume [POINT:N] [--policy sh|pbt] [--trackers mlflow,...] [--fuse]
        [--optuna]

--optuna: the configs come from an RFOptunaSearch (4 at a time, 7 in all) that fills the slots the policy frees.

POINT is where the N-th occurrence (counted in this process) kills it, with a real SIGKILL:
  step        inside an optimizer step (after forward and backward, before the optimizer update)
  eval        inside an evaluation (after its first prediction batch)
  ckpt-save   in the middle of writing a checkpoint (one of its files written, the next not)
  ckpt-rename a checkpoint fully written but not yet renamed into place
  ckpt-clean  a new checkpoint in place, the older one not yet removed
  between     between two chunks (a run about to be put back on the model)
  rung        a rung completed, its policy not yet asked
  deciding    the policy deciding: an op logged, the rung not yet marked decided (N counts logged ops)
  apply       a decided op about to be applied (N counts applied ops; with PBT, between a clone and its stop)
Exit code 0: the experiment ran to its end without reaching the point.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys

import torch
from transformers import Trainer
from trl import SFTTrainer

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig, store
from rf_notebook.control.ops import Control
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn
from rf_notebook.engine import _engine
from rf_notebook.engine import torch_backend as backend_module
from rf_notebook.policies import PBT, SuccessiveHalving

POLICIES = {
    "sh": lambda: SuccessiveHalving(eta=2),
    "pbt": lambda: PBT(quantile=0.25, perturb={"learning_rate": (0.5, 2.0)}),
}

NUM_CHUNKS, MAX_STEPS, SEED = 4, 16, 3


def search() -> RFGridSearch:
    return RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=List([4, 8]), lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=List([3e-3, 1e-3]),
                per_device_train_batch_size=8,
                max_steps=MAX_STEPS,
                lr_scheduler_type="cosine",
            ),
        ),
        trainer_type="SFT",
    )


def optuna_search():
    from rf_notebook import Range, RFOptunaSearch

    return RFOptunaSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=List([4, 8]), lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=Range(1e-4, 3e-3, log=True),
                per_device_train_batch_size=8,
                max_steps=MAX_STEPS,
                lr_scheduler_type="cosine",
            ),
        ),
        trainer_type="SFT",
        num_runs=4,
        budget=7,
        seed=SEED,
    )


def data():
    return arithmetic_dataset("train", n=96), arithmetic_dataset("eval", n=16)


def kill_at(point: str, n: int) -> None:
    count = 0

    def hit() -> None:
        nonlocal count
        count += 1
        if count == n:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name, before=True):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if before:
                hit()
            result = original(*args, **kwargs)
            if not before:
                hit()
            return result

        setattr(owner, name, wrapper)

    if point == "step":
        wrap(Trainer, "training_step", before=False)
    elif point == "eval":
        wrap(SFTTrainer, "prediction_step", before=False)
    elif point == "ckpt-save":
        wrap(torch, "save")  # the optimizer file of a checkpoint: the adapter is already written
    elif point == "ckpt-rename":
        wrap(backend_module.os, "rename")
    elif point == "ckpt-clean":
        wrap(shutil, "rmtree")
    elif point == "between":
        wrap(backend_module.TorchBackend, "activate")
    elif point == "rung":
        wrap(Control, "policy_step")
    elif point == "deciding":
        wrap(store.Store, "log_op", before=False)
    elif point == "apply":
        wrap(_engine.Engine, "_apply")
    else:
        raise SystemExit(f"unknown point {point!r}")


def main() -> None:
    args = sys.argv[1:]
    policy = None
    if "--policy" in args:
        i = args.index("--policy")
        policy = POLICIES[args[i + 1]]()
        del args[i : i + 2]
    trackers = None
    if "--trackers" in args:
        i = args.index("--trackers")
        trackers = args[i + 1].split(",")
        del args[i : i + 2]
    fuse = "--fuse" in args
    if fuse:
        args.remove("--fuse")
    optuna = "--optuna" in args
    if optuna:
        args.remove("--optuna")
    directory, mode = args[0], args[1]
    if len(args) > 2:
        point, n = args[2].split(":")
        kill_at(point, int(n))
    exp = Experiment("crash", experiments_dir=directory)
    exp.run_fit(
        optuna_search() if optuna else search(),
        demo_model_fn,
        *data(),
        num_chunks=NUM_CHUNKS,
        seed=SEED,
        display=False,
        resume=mode == "resume",
        policy=policy,
        trackers=trackers,
        fuse=fuse,
    )
    exp.wait()
    exp.end(wait=False)
    statuses = sorted({r.status.value for r in exp.runs()})
    print("statuses", statuses, "stats", exp.stats())


if __name__ == "__main__":
    main()
