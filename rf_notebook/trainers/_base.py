"""The contract every trainer type's module fulfils (`sft`, `dpo`, `grpo`, `rloo`): what the engine and the
preparation of runs may ask of a trainer type, and all of it. Anything that differs between trainer types lives
behind these names, never in the engine."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from rf_notebook.trainers._prepared import PreparedData

__all__ = ["TrainerType"]


class TrainerType(Protocol):
    """A trainer type: a module with these names (`TRAINERS` maps "SFT", "DPO", "GRPO", "RLOO" to one)."""

    CONFIG: type  # the spec of its arguments (RFSFTConfig, ...)

    def check_dataset(self, dataset: Any, role: str, formatting_func: Callable | None) -> None:
        """Refuse a data set whose columns this trainer cannot train on (`role`: "train" or "eval"), before
        anything trains."""

    def resolve_args(self, user: Mapping[str, Any], *, output_dir: str, seed: int, on_gpu: bool) -> dict[str, Any]:
        """The run's trainer keyword arguments: the user's values over rf_notebook's defaults and owned fields."""

    def steps_per_epoch(self, num_rows: int, args: Any) -> int:
        """Optimizer steps in one epoch of `num_rows` rows."""

    def rows_per_step(self, args: Any) -> float:
        """Data set rows one optimizer step consumes (the panel's samples axis)."""

    def rung_multiple(self, args: Any) -> int:
        """Chunk ends fall on multiples of this many optimizer steps."""

    def prepared_rows(
        self,
        tokenizer: Any,
        args: Any,
        train_dataset: Any,
        eval_dataset: Any,
        formatting_func: Any,
        prepared: PreparedData,
    ) -> int | None:
        """The number of rows the run's trainer will train on, where that is known without building it (the data
        set another run's trainer already prepared in the same way, in `prepared`); None: only building the trainer
        tells. The run's chunk plan is made from it, and its trainer is then built at its first turn."""

    def build_trainer(
        self,
        model: Any,
        tokenizer: Any,
        args: Any,
        train_dataset: Any,
        eval_dataset: Any,
        model_config: Any,
        callbacks: Sequence[Any],
        *,
        load_reference: Callable[[Any], Any],
        prepared: PreparedData,
    ) -> Any:
        """The one TRL trainer a run keeps for its whole life, on the shared PEFT `model` (its adapter active).
        `load_reference(model_config)` gives the reference model the config names (loaded once per experiment,
        None: the shared base with adapters disabled), for trainer types that compare against one. `prepared` is
        the experiment's cache of data sets already prepared for a trainer (`_prepared.PreparedData`), for trainer
        types that share them."""
