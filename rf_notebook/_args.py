"""The checks of `Experiment(...)` and `run_fit(...)`'s own arguments, on the caller's thread, before anything is
loaded: each error names the value and what was expected. (A run's config is checked where it is prepared.)"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from rf_notebook.search import Search

__all__ = ["Fit", "check_cluster", "check_experiment", "check_fit", "check_num_gpus"]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclasses.dataclass(frozen=True)
class Fit:
    """run_fit's checked arguments."""

    num_chunks: int
    seed: int
    display: bool | None
    policy: Any
    resume: bool
    on_nonfinite: str
    precision: str | None
    fuse: bool | str = "auto"  # True, False or "auto" (`engine._fused.AUTO_MIN_GROUP`, `auto_reason`)


def check_experiment(name: Any, mode: Any, experiments_dir: Any, experiment_path: Any, num_gpus: Any) -> str | Path:
    """`Experiment(...)`'s arguments; returns the folder that holds experiments."""
    check_num_gpus(num_gpus)
    if mode != "fit":
        raise ValueError(
            f"`mode` is {mode!r}, but rf_notebook runs fine-tuning experiments only: use mode='fit' "
            "(RapidFire AI's 'evals' mode has no counterpart here)"
        )
    if experiment_path is not None:  # RapidFire AI's name for the folder that holds experiments
        if experiments_dir != "rf_experiments":
            raise ValueError(
                f"both `experiments_dir` ({experiments_dir!r}) and `experiment_path` ({experiment_path!r}) are "
                "given; they are the same setting: pass one"
            )
        experiments_dir = experiment_path
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise ValueError(
            f"experiment name {name!r} is not a safe directory name: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if not isinstance(experiments_dir, (str, Path)):
        raise TypeError(f"`experiments_dir` is {experiments_dir!r}, but must be a path (str or pathlib.Path)")
    return experiments_dir


def check_fit(
    param_config: Any,
    create_model_fn: Any,
    *,
    num_chunks: Any,
    num_shards: Any,
    num_gpus: Any,
    seed: Any,
    policy: Any,
    display: Any,
    resume: Any,
    on_nonfinite: Any,
    precision: Any,
    fuse: Any = "auto",
) -> Fit:
    """`run_fit(...)`'s own arguments (not the runs' configs)."""
    from rf_notebook.policies import Policy

    if not isinstance(param_config, Search):
        raise TypeError(f"run_fit takes an RFGridSearch or RFRandomSearch, but got {type(param_config).__name__}")
    if num_shards is not None:
        if num_chunks is not None and num_chunks != num_shards:
            raise ValueError(
                f"`num_chunks` is {num_chunks!r} and `num_shards` is {num_shards!r}: they are the same setting "
                "(num_shards is its newer name); pass one"
            )
        num_chunks = num_shards
    num_chunks = 4 if num_chunks is None else num_chunks
    check_num_gpus(num_gpus)
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"`num_chunks` is {num_chunks!r}, but must be an int >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` is {seed!r}, but must be an int")
    if create_model_fn is not None and not callable(create_model_fn):
        raise TypeError(f"`create_model_fn` is {create_model_fn!r}, but must be callable or None")
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(
            f"`policy` is {policy!r}, but must be None or a policy such as SuccessiveHalving(), MedianOfPeers() "
            "or PBT() from rf_notebook.policies"
        )
    if display is not None and not isinstance(display, bool):
        raise TypeError(f"`display` is {display!r}, but must be True, False or None (show it in a notebook)")
    if not isinstance(resume, bool):
        raise TypeError(f"`resume` is {resume!r}, but must be True or False")
    if on_nonfinite not in ("fail", "continue"):
        raise ValueError(f"`on_nonfinite` is {on_nonfinite!r}, but must be 'fail' or 'continue'")
    if precision not in (None, "bf16", "fp16", "fp32"):
        raise ValueError(f"`precision` is {precision!r}, but must be None, 'bf16', 'fp16' or 'fp32'")
    if precision == "fp16":
        from rf_notebook.control.prepare import on_gpu

        if not on_gpu():
            raise ValueError(
                "`precision` is 'fp16', but this machine has no GPU (fp16 mixed precision needs one); use 'bf16' "
                "(CPU autocast) or 'fp32'"
            )
    if not isinstance(fuse, bool) and fuse != "auto":
        raise ValueError(f"`fuse` is {fuse!r}, but must be True, False or 'auto'")
    return Fit(num_chunks, seed, display, policy, resume, on_nonfinite, precision, fuse=fuse)


def check_cluster(cluster: Any, workers: Any, ray_address: Any) -> None:
    """`Experiment(cluster=..., workers=..., ray_address=...)`; Ray itself is imported when training starts."""
    if cluster not in (None, "ray"):
        raise ValueError(f"`cluster` is {cluster!r}, but must be None (this process) or 'ray'")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"`workers` is {workers!r}, but must be None (one per GPU of the cluster) or an int >= 1")
    if ray_address is not None and not isinstance(ray_address, str):
        raise TypeError(f"`ray_address` is {ray_address!r}, but must be None or a string such as '10.0.0.1:6379'")
    if cluster is None and (workers is not None or ray_address is not None):
        raise ValueError(
            f"`workers` / `ray_address` are {workers!r} / {ray_address!r}, but they apply only with cluster='ray'"
        )
    if cluster == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ImportError("cluster='ray' needs Ray: pip install 'rf_notebook[ray]'")


def check_num_gpus(num_gpus: Any) -> None:
    """RapidFire AI's devices per run: here every run shares the process's one device."""
    if num_gpus is not None and (isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus != 1):
        raise ValueError(
            f"`num_gpus` is {num_gpus!r}, but rf_notebook trains every run on the process's one device: use "
            "num_gpus=1 or leave it unset"
        )


def resolve_probe(policy: Any, trainer_type: str, eval_dataset: Any) -> Any:
    """The policy for these runs (`probe_steps="auto"` resolved); a policy that ranks by anneal probes needs runs
    with a loss on data rows and an eval data set."""
    from rf_notebook.policies._base import PROBE_TRAINERS

    if policy is None:
        return None
    policy = policy.resolved(trainer_type, eval_dataset is not None)
    if not policy.probe_steps:
        return policy
    if trainer_type not in PROBE_TRAINERS:
        raise ValueError(
            f"`policy` is {policy!r}, which ranks runs by anneal probes, but the runs are {trainer_type} runs: a "
            f"probe trains on data rows with the run's loss, which only {' and '.join(PROBE_TRAINERS)} runs have; "
            "use probe_steps=0 for reward-trained runs"
        )
    if eval_dataset is None:
        raise ValueError(
            f"`policy` is {policy!r}, which ranks runs by the eval loss after an anneal probe, but `eval_dataset` is "
            "None: pass an eval data set, or use probe_steps=0"
        )
    return policy


def check_study(search: Any, eval_dataset: Any, policy: Any) -> None:
    """An `RFOptunaSearch` scores its trials by a metric the runs will log (an eval metric needs an eval data set),
    and fills the slots a stopping policy frees (PBT's warm clones would be runs outside the study)."""
    from rf_notebook.optuna_search import RFOptunaSearch
    from rf_notebook.policies import PBT

    if not isinstance(search, RFOptunaSearch):
        return
    if isinstance(policy, PBT):
        raise ValueError(
            f"`policy` is {policy!r} with an RFOptunaSearch: PBT replaces runs with warm clones, which the study "
            "cannot score as its configs; use SuccessiveHalving or MedianOfPeers (the sampler fills freed slots)"
        )
    if eval_dataset is None and search.metric.startswith("eval_"):
        raise ValueError(
            f"`param_config` is {search!r}, which scores each config by {search.metric!r}, but `eval_dataset` is None: "
            "pass an eval data set, or score by a training metric (metric='loss')"
        )
