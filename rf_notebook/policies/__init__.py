"""Automatic decisions at chunk rungs: `run_fit(..., policy=SuccessiveHalving())`.

A chunk end is a natural synchronous rung: every live run has seen the same examples when the policy looks.
Decisions are IC ops in the log (origin "policy", with the reason); a user can resume a pruned run.
"""

from rf_notebook.policies._base import Decision, Policy, RunAtRung
from rf_notebook.policies.median import MedianOfPeers
from rf_notebook.policies.pbt import PBT
from rf_notebook.policies.successive_halving import SuccessiveHalving

__all__ = ["Decision", "Policy", "RunAtRung", "SuccessiveHalving", "MedianOfPeers", "PBT"]
