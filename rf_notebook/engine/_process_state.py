"""Process-wide state that belongs to the run that is training: captured at suspension, restored at resume.

- Random streams (Python, NumPy, torch CPU and CUDA): LoRA dropout, data shuffling and RL sampling draw from
  them, so an interleaved run stays exact only if it sees its own stream back at every switch.
- Accelerate's `GradientState`, a singleton shared by every trainer's `Accelerator`. The training loop sets
  `sync_gradients` per micro-batch; a run suspended in the middle of gradient accumulation leaves it False, and
  the next run's optimizer step would then be skipped silently.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

__all__ = ["ProcessState", "capture", "restore"]


@dataclasses.dataclass(frozen=True)
class ProcessState:
    python: Any
    numpy: Any
    torch_cpu: Any
    torch_cuda: Any  # list of per-device states, or None without CUDA
    gradient_state: dict[str, Any]


def capture() -> ProcessState:
    import numpy as np
    import torch
    from accelerate.state import GradientState

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    gradient_state = {k: list(v) if isinstance(v, list) else v for k, v in GradientState._shared_state.items()}
    return ProcessState(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda, gradient_state)


def restore(state: ProcessState) -> None:
    import numpy as np
    import torch
    from accelerate.state import GradientState

    random.setstate(state.python)
    np.random.set_state(state.numpy)
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda is not None:
        torch.cuda.set_rng_state_all(state.torch_cuda)
    shared = GradientState._shared_state  # every GradientState instance's __dict__: update it in place
    shared.clear()
    shared.update({k: list(v) if isinstance(v, list) else v for k, v in state.gradient_state.items()})
