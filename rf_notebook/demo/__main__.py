"""`python -m rf_notebook.demo`: a 4-config SFT sweep on the embedded model, then a leaderboard.

LoRA rank {4, 16} x learning rate {3e-3, 3e-4}, trained interleaved in chunks on one shared base, evaluated
at every chunk boundary (eval loss and exact-match accuracy of the greedy answer). Runs offline on a CPU.
"""

from __future__ import annotations

import argparse
import logging
import time

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import (
    DEMO_MODEL,
    GREEDY_ANSWER,
    answer_exact_match,
    arithmetic_dataset,
    demo_model_fn,
    greedy_exact_match,
)


def sweep(max_steps: int) -> RFGridSearch:
    return RFGridSearch(
        RFModelConfig(
            model_name=DEMO_MODEL,
            peft_config=RFLoraConfig(r=List([4, 16]), lora_alpha=16, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=List([3e-3, 3e-4]), per_device_train_batch_size=16, max_steps=max_steps
            ),
            compute_metrics=answer_exact_match,  # the greedy answer, generated at every chunk end
            generation_config=GREEDY_ANSWER,
        ),
        trainer_type="SFT",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=256, help="optimizer steps per run (default 256)")
    parser.add_argument("--num-chunks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experiments-dir", default="rf_experiments")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    start = time.time()
    evl = arithmetic_dataset("eval")
    base = greedy_exact_match(*demo_model_fn(None), evl)
    # A fresh experiment each time (an existing name would be reopened, with its earlier runs).
    exp = Experiment(time.strftime("demo-sweep-%Y%m%d-%H%M%S"), experiments_dir=args.experiments_dir)
    exp.run_fit(
        sweep(args.max_steps),
        demo_model_fn,
        arithmetic_dataset("train"),
        evl,
        num_chunks=args.num_chunks,
        seed=args.seed,
    )
    exp.wait()  # one live progress line in a terminal
    board = exp.leaderboard(metric="eval_loss", mode="min")
    print(f"\n4-config SFT sweep on {DEMO_MODEL}: {time.time() - start:.0f} s\n")
    print(f"{'rank':<5} {'run':<16} {'status':<9} {'eval loss':>9} {'exact match':>11}")
    for i, row in board.iterrows():
        print(
            f"{i + 1:<5} {row['run']:<16} {row['status']:<9} {row.get('eval_loss', float('nan')):>9.4f} "
            f"{row.get('eval_exact_match', float('nan')):>11.1%}"
        )
    print(f"{'-':<5} {'base model':<16} {'':<9} {'':>9} {base:>11.1%}   (no adapter, greedy decoding)")
    exp.end()


if __name__ == "__main__":
    main()
