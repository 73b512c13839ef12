"""The training engine: one background thread that owns the shared base models, adapters and trainers.

`Engine` (the scheduler loop) and the `Backend` contract need no torch; the torch backend is
`rf_notebook.engine.torch_backend.TorchBackend`, imported where training starts.
"""

from rf_notebook.engine._engine import Engine
from rf_notebook.engine.backend import Backend, PreparedRun, Slot

__all__ = ["Backend", "Engine", "PreparedRun", "Slot"]
