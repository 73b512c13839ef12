"""Demo tasks for preference and RL training on the same arithmetic problems as the SFT demo.

- `preference_dataset(split)`: DPO pairs in TRL's conversational format, the right sum as `chosen` and a near
  miss as `rejected` (off by one, by ten, or with its digits swapped: the mistakes a small model makes).
- `prompt_dataset(split)`: prompts with an `answer` column, for GRPO / RLOO; TRL passes `answer` to every reward
  function as a keyword argument.
- `exact_match_reward` (1 for the right answer) and `digit_reward` (the share of right digits, in place, with a
  penalty for a wrong length): plain Python reward functions with TRL's signature.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from rf_notebook.demo._data import SPLIT_SIZES, arithmetic_pairs

__all__ = ["preference_dataset", "prompt_dataset", "exact_match_reward", "digit_reward", "near_miss"]


def near_miss(a: int, b: int) -> str:
    """A plausible wrong answer to a + b, fixed per pair."""
    total = a + b
    rng = random.Random(a * 100 + b)
    swapped = str(total)[::-1]
    options = [total + 1, total - 1, total + 10, total - 10]
    if swapped != str(total) and not swapped.startswith("0"):
        options.append(int(swapped))
    wrong = [o for o in options if o >= 0 and o != total]
    return str(rng.choice(wrong))


def _pairs(split: str, n: int | None) -> list[tuple[int, int]]:
    pairs = arithmetic_pairs(split)
    n = SPLIT_SIZES[split] if n is None else n
    if not 1 <= n <= len(pairs):
        raise ValueError(f"`n` is {n}, but must be between 1 and {len(pairs)} for split {split!r}")
    return pairs[:n]


def preference_dataset(split: str = "train", n: int | None = None):
    """DPO pairs: {"prompt": [user], "chosen": [assistant: right sum], "rejected": [assistant: near miss]}."""
    import datasets

    return datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"{a}+{b}"}],
                "chosen": [{"role": "assistant", "content": str(a + b)}],
                "rejected": [{"role": "assistant", "content": near_miss(a, b)}],
            }
            for a, b in _pairs(split, n)
        ]
    )


def prompt_dataset(split: str = "train", n: int | None = None):
    """GRPO / RLOO prompts: {"prompt": [user], "answer": "81"}."""
    import datasets

    return datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"{a}+{b}"}], "answer": str(a + b)} for a, b in _pairs(split, n)]
    )


def _text(completion: Any) -> str:
    """A completion as text: TRL passes conversational completions as [{"role": ..., "content": ...}]."""
    if isinstance(completion, list):
        return "".join(message.get("content", "") for message in completion)
    return str(completion)


def exact_match_reward(completions: Sequence[Any], answer: Sequence[str], **_: Any) -> list[float]:
    """1.0 where the completion is exactly the answer (surrounding spaces ignored), else 0.0."""
    return [float(_text(c).strip() == a) for c, a in zip(completions, answer)]


def digit_reward(completions: Sequence[Any], answer: Sequence[str], **_: Any) -> list[float]:
    """Partial credit: the share of the answer's digits that are right, in place, minus 0.5 for a wrong length."""
    rewards = []
    for c, a in zip(completions, answer):
        text = _text(c).strip()
        right = sum(x == y for x, y in zip(text, a)) / len(a)
        rewards.append(right - (0.5 if len(text) != len(a) else 0.0))
    return rewards
