"""rf_notebook: many LoRA fine-tuning configs trained side by side on one GPU, inside a Jupyter kernel.

    from rf_notebook import Experiment, RFModelConfig, RFLoraConfig, RFSFTConfig, RFGridSearch, List

Importing this package is cheap: torch, transformers and TRL load when a config is built or training starts.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


class _OptionalKernelNotice(logging.Filter):
    """bitsandbytes (which PEFT and transformers import when it is installed) warns, on CPUs with AVX512-BF16, that
    an optional faster kernel it would fetch from the Hugging Face Hub is missing, and then uses its own: a line on
    stderr in every notebook, about nothing the user asked for or can act on offline. It is logged at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())

_EXPORTS = {
    "Experiment": "rf_notebook.api",
    "info": "rf_notebook._info",
    "List": "rf_notebook.space",
    "Range": "rf_notebook.space",
    "RFModelConfig": "rf_notebook.configs",
    "RFLoraConfig": "rf_notebook.configs",
    "RFSFTConfig": "rf_notebook.configs",
    "LegacyFieldWarning": "rf_notebook.fields",
    "RFDPOConfig": "rf_notebook.configs",
    "RFGRPOConfig": "rf_notebook.configs",
    "RFRLOOConfig": "rf_notebook.configs",
    "RFGridSearch": "rf_notebook.search",
    "RFRandomSearch": "rf_notebook.search",
    "RFOptunaSearch": "rf_notebook.optuna_search",
}

__all__ = [
    "info",
    "LegacyFieldWarning",
    "Experiment",
    "List",
    "Range",
    "RFModelConfig",
    "RFLoraConfig",
    "RFSFTConfig",
    "RFDPOConfig",
    "RFGRPOConfig",
    "RFRLOOConfig",
    "RFGridSearch",
    "RFRandomSearch",
    "RFOptunaSearch",
]

if TYPE_CHECKING:
    from rf_notebook._info import info
    from rf_notebook.api import Experiment
    from rf_notebook.configs import (
        RFDPOConfig,
        RFGRPOConfig,
        RFLoraConfig,
        RFModelConfig,
        RFRLOOConfig,
        RFSFTConfig,
    )
    from rf_notebook.fields import LegacyFieldWarning
    from rf_notebook.optuna_search import RFOptunaSearch
    from rf_notebook.search import RFGridSearch, RFRandomSearch
    from rf_notebook.space import List, Range


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rf_notebook' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__ + ["__version__"])
