"""The training engine: one background thread that owns the shared base models, adapters and trainers."""

from rf_notebook.engine._engine import Engine, PreparedRun

__all__ = ["Engine", "PreparedRun"]
