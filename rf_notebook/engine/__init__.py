"""The training engine: one background thread that owns the shared base models, adapters and trainers."""

from rf_notebook.engine._engine import Engine
from rf_notebook.engine._torch import PreparedRun, TorchBackend

__all__ = ["Engine", "PreparedRun", "TorchBackend"]
