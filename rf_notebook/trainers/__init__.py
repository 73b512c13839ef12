"""One small module per TRL trainer type; `TRAINERS` maps `trainer_type` to it. No registries, no factories."""

from __future__ import annotations

from rf_notebook.trainers import dpo, grpo, rloo, sft

TRAINERS = {"SFT": sft, "DPO": dpo, "GRPO": grpo, "RLOO": rloo}

__all__ = ["TRAINERS"]
