"""The callbacks the engine adds to every run's TRL trainer, beside the run's own (`_slot.RunSlot.callbacks`).

- `ApplyOverrides`: a warm clone's own learning rate and weight decay, put into its parent's optimizer and schedule.
- `FailOnNonFinite`: a NaN / inf training loss or gradient norm ends the run (`on_nonfinite="fail"`).
- `TolerantMetrics`: a user's `compute_metrics` that raises costs its metrics, never the run.
- `GenerationMetrics`: RapidFire AI's generation-based evaluation.

All run on the scheduler thread, inside the run's `train()`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from transformers import TrainerCallback

from rf_notebook.configs import GENERATION_OWN_KEYS

logger = logging.getLogger(__name__)

__all__ = ["ApplyOverrides", "FailOnNonFinite", "GenerationMetrics", "NonFiniteLoss", "TolerantMetrics"]


class ApplyOverrides(TrainerCallback):
    """For a warm start: once the parent's optimizer and LR schedule are loaded, put the clone's own learning
    rate and weight decay in them, so that they apply from the next step on."""

    def __init__(self, learning_rate: float | None, weight_decay: float | None):
        self.learning_rate, self.weight_decay = learning_rate, weight_decay

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        groups = optimizer.param_groups
        if self.weight_decay is not None:
            for group in groups:
                if group.get("weight_decay", 0.0) != 0.0:
                    group["weight_decay"] = self.weight_decay
        if self.learning_rate is None:
            return
        for group in groups:
            group["initial_lr"] = self.learning_rate
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # Accelerate wraps it
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [self.learning_rate] * len(groups)
        if hasattr(scheduler, "lr_lambdas"):  # the schedules transformers builds: lr = base_lr x factor(step)
            for group, factor in zip(groups, scheduler.lr_lambdas):
                group["lr"] = self.learning_rate * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in groups]
        else:
            for group in groups:
                group["lr"] = self.learning_rate


class NonFiniteLoss(FloatingPointError):
    """A run's training loss became NaN or infinite."""


class FailOnNonFinite(TrainerCallback):
    """Ends the run (marked failed by the engine) once its logged training loss or gradient norm is NaN or
    infinite: the weights are then no longer numbers either."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NonFiniteLoss(
                    f"the training {key.replace('_', ' ')} is {value} at step {state.global_step} "
                    "(on_nonfinite='fail'; a lower learning rate usually helps)"
                )


class TolerantMetrics:
    """A user's `compute_metrics` that raises (an offline `evaluate.load`, a bug): its traceback logged once per
    run and kept on the run's record for the panel, that evaluation's user metrics skipped, and training goes on
    (RapidFire AI's behaviour). A reward function that raises still fails its GRPO run: it cannot go on without."""

    def __init__(self, fn: Callable[[Any], Any], report: Callable[[str], None], run_name: str):
        self.fn, self.report, self.run_name = fn, report, run_name
        self.seen: set[str] = set()  # exception types already logged for this run

    def __call__(self, eval_pred: Any) -> Any:
        try:
            return self.fn(eval_pred)
        except Exception as exc:
            kind = type(exc).__name__
            if kind not in self.seen:  # once per run (and per kind of failure, should it change)
                name = getattr(self.fn, "__name__", "compute_metrics")
                logger.warning(
                    "run %r: %s raised; its metrics are skipped, training goes on", self.run_name, name, exc_info=True
                )
                if not self.seen:
                    self.report(f"{name} raised {kind}: {exc} (its metrics are skipped)")
                self.seen.add(kind)
            return {}


class GenerationMetrics(TrainerCallback):
    """Generation-based evaluation (RapidFire AI's): after each evaluation of the run, its adapter generates an
    answer for every eval prompt with the model config's `generation_config`, and
    `compute_metrics((predictions, references))` gets the decoded texts; its values are logged as eval_<name>.

    Prompts: a chat `prompt` (through the chat template, with the generation prompt) or a text `prompt`;
    references: the `completion` (its last message's content for chat). Random state is forked, so sampling here
    never changes the training that follows.
    """

    def __init__(self, slot: Any, tokenizer: Any, dataset: Any, model_config: Any, args: Any, sink: Any):
        self.slot, self.tokenizer, self.sink = slot, tokenizer, sink
        self.compute_metrics = model_config.compute_metrics
        config = dict(model_config.generation_config)
        own = {k: config.pop(k) for k in GENERATION_OWN_KEYS if k in config}
        self.generate_kwargs = config
        self.max_input_length = own.get("max_input_length")
        self.add_generation_prompt = own.get("add_generation_prompt", True)
        self.truncation_side = own.get("truncation_side", "left")
        self.use_cache = own.get("use_cache", True)
        self.batch_size = args.per_device_eval_batch_size
        if dataset is not None and not {"prompt", "completion"} <= set(dataset.column_names):
            raise ValueError(
                f"generation-based evaluation needs eval rows with 'prompt' and 'completion' (after formatting_func), "
                f"but the eval data set has columns {dataset.column_names}"
            )
        self.dataset = dataset
        self._pairs: tuple[list[str], list[str]] | None = None  # rendered at the first evaluation, not at build

    @property
    def pairs(self) -> tuple[list[str], list[str]]:
        """The eval prompts (chat ones through the chat template) and their reference answers."""
        if self._pairs is None:
            prompts, references = [], []
            for row in self.dataset if self.dataset is not None else ():
                prompt, completion = row["prompt"], row["completion"]
                if isinstance(prompt, list):  # chat messages
                    prompt = self.tokenizer.apply_chat_template(
                        prompt, tokenize=False, add_generation_prompt=self.add_generation_prompt
                    )
                if isinstance(completion, list):
                    completion = completion[-1]["content"]
                prompts.append(prompt)
                references.append(completion)
            self._pairs = prompts, references
        return self._pairs

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        import torch

        prompts, references = self.pairs
        if not prompts:
            return
        tokenizer = self.tokenizer
        sides = tokenizer.padding_side, tokenizer.truncation_side
        tokenizer.padding_side, tokenizer.truncation_side = "left", self.truncation_side
        was_training = model.training
        model.eval()
        predictions = []
        devices = [model.device] if model.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                for i in range(0, len(prompts), self.batch_size):
                    batch = tokenizer(
                        prompts[i : i + self.batch_size],
                        return_tensors="pt",
                        padding=True,
                        truncation=self.max_input_length is not None,
                        max_length=self.max_input_length,
                        add_special_tokens=False,
                    ).to(model.device)
                    out = model.generate(
                        **batch, pad_token_id=tokenizer.pad_token_id, use_cache=self.use_cache, **self.generate_kwargs
                    )
                    new = out[:, batch["input_ids"].shape[1] :]
                    predictions += tokenizer.batch_decode(new, skip_special_tokens=True)
        finally:
            tokenizer.padding_side, tokenizer.truncation_side = sides
            model.train(was_training)
        values = self.compute_metrics((predictions, list(references)))
        if not isinstance(values, Mapping):
            raise TypeError(f"compute_metrics returned {values!r}, but must return a dict of metric name -> number")
        self.sink(self.slot, state.global_step, {f"eval_{k}": float(v) for k, v in values.items()})
