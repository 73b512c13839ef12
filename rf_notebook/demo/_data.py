"""The demo task: two-digit addition asked in chat form, with an exact-match metric.

`arithmetic_dataset(split)` returns a `datasets.Dataset` in TRL's conversational prompt/completion format:

    {"prompt": [{"role": "user", "content": "23+58"}], "completion": [{"role": "assistant", "content": "81"}]}

The train and eval splits are drawn from disjoint sets of (a, b) pairs, so eval measures generalisation.
Two ways to score the answers at every evaluation:

- `answer_exact_match` with `generation_config=GREEDY_ANSWER` on the model config: the run's adapter generates an
  answer for every eval prompt and the metric compares the texts (what the notebooks and `python -m
  rf_notebook.demo` use; the generation-based path of `RFModelConfig`).
- `exact_match_metrics`: a `compute_metrics` on the trainer's logits, the same number from one teacher-forced
  forward pass (a completion counts when the argmax is right at every completion token). TRL >= 1.16 deprecates
  logits for metrics (a FutureWarning at every evaluation), so it is kept for comparing with plain TRL.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = [
    "GREEDY_ANSWER",
    "answer_exact_match",
    "arithmetic_dataset",
    "arithmetic_pairs",
    "exact_match_metrics",
    "greedy_exact_match",
]

_PAIR_SEED = 1234
_EVAL_POOL = 512  # the first pairs of the fixed shuffle are reserved for eval
SPLIT_SIZES = {"train": 1024, "eval": 128}
# generate() arguments for scoring the demo's answers: greedy, the longest sum (198) and the end-of-turn token.
GREEDY_ANSWER = {"max_new_tokens": 4, "do_sample": False}


def arithmetic_pairs(split: str) -> list[tuple[int, int]]:
    """All (a, b) pairs with 0 <= a, b < 100 of a split, in a fixed pseudo-random order."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(_PAIR_SEED).shuffle(pairs)
    if split == "eval":
        return pairs[:_EVAL_POOL]
    if split == "train":
        return pairs[_EVAL_POOL:]
    raise ValueError(f"`split` is {split!r}, but must be 'train' or 'eval'")


def arithmetic_dataset(split: str = "train", n: int | None = None):
    """The demo SFT data set: `n` addition problems (default 1024 for train, 128 for eval)."""
    import datasets

    pairs = arithmetic_pairs(split)
    n = SPLIT_SIZES[split] if n is None else n
    if not 1 <= n <= len(pairs):
        raise ValueError(f"`n` is {n}, but must be between 1 and {len(pairs)} for split {split!r}")
    rows = [
        {
            "prompt": [{"role": "user", "content": f"{a}+{b}"}],
            "completion": [{"role": "assistant", "content": str(a + b)}],
        }
        for a, b in pairs[:n]
    ]
    return datasets.Dataset.from_list(rows)


def answer_exact_match(eval_pred: tuple[list[str], list[str]]) -> dict[str, float]:
    """Generation-based `compute_metrics`: share of generated answers equal to the reference answer.

    Takes `(predictions, references)`, the decoded texts `RFModelConfig(generation_config=...)` evaluation passes,
    and returns `{"exact_match": ...}`.
    """
    predictions, references = eval_pred
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return {"exact_match": hits / max(len(references), 1)}


def exact_match_metrics(eval_pred: Any) -> dict[str, float]:
    """`compute_metrics` for SFT: share of completions whose every token is the model's greedy choice.

    Takes the trainer's `EvalPrediction` (logits or token ids as predictions, unshifted labels with -100 on
    prompt and padding positions) and returns `{"exact_match": ..., "token_accuracy": ...}`.
    """
    import numpy as np

    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(predictions, tuple):
        predictions = predictions[0]
    predictions = np.asarray(predictions)
    if predictions.ndim == 3:
        predictions = predictions.argmax(-1)
    labels = np.asarray(labels)
    # position t predicts token t + 1
    predicted, target = predictions[:, :-1], labels[:, 1:]
    scored = target != -100
    correct = (predicted == target) | ~scored
    has_target = scored.any(axis=1)
    exact = correct.all(axis=1) & has_target
    n_rows = max(int(has_target.sum()), 1)
    n_tokens = max(int(scored.sum()), 1)
    return {
        "exact_match": float(exact.sum()) / n_rows,
        "token_accuracy": float(((predicted == target) & scored).sum()) / n_tokens,
    }


def greedy_exact_match(model: Any, tokenizer: Any, dataset: Any, max_new_tokens: int = 6) -> float:
    """Share of rows whose greedy generation is exactly the completion followed by the end-of-turn token.

    The slow, obvious way to score a model; `exact_match_metrics` gives the same number from one forward pass.
    """
    import torch

    hits = 0
    model.eval()
    for row in dataset:
        ids = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=False
        )
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answer = tokenizer.decode(out[0, ids.shape[1] :])
        hits += answer.startswith(row["completion"][0]["content"] + tokenizer.eos_token)
    return hits / len(dataset)
