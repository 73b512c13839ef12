"""GRPO runs: `trl.GRPOTrainer` on one named LoRA adapter of the shared base model (see `_online` for what
GRPO and RLOO share: sampled groups of completions, rewards, the reference model)."""

from __future__ import annotations

import functools

from rf_notebook.configs import RFGRPOConfig
from rf_notebook.trainers import _online
from rf_notebook.trainers._common import MODULE_SURFACE

__all__ = list(MODULE_SURFACE)

CONFIG = RFGRPOConfig
check_dataset = functools.partial(_online.check_dataset, trainer_type="GRPO")
resolve_args = functools.partial(_online.resolve_args, spec=CONFIG)
steps_per_epoch = _online.steps_per_epoch
rows_per_step = _online.rows_per_step
rung_multiple = _online.rung_multiple
prepared_rows = _online.prepared_rows
build_trainer = functools.partial(_online.build_trainer, "GRPOTrainer")
