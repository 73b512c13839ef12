"""One small module per TRL trainer type; `TRAINERS` maps `trainer_type` to it. No registries, no factories.

Each module fulfils `_base.TrainerType`, the written contract between trainer types and the rest of rf_notebook.
"""

from __future__ import annotations

from rf_notebook.trainers import dpo, grpo, rloo, sft
from rf_notebook.trainers._base import TrainerType

TRAINERS: dict[str, TrainerType] = {"SFT": sft, "DPO": dpo, "GRPO": grpo, "RLOO": rloo}

__all__ = ["TRAINERS", "TrainerType"]
