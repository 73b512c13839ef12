"""What the panel's renderers share: run colours, size limits, downsampling and how a value is shown.

The feed (`_feed.py`) and the static HTML (`_static_html.py`) both take these from here; the JavaScript
(js/src) gets what it needs through the feed's messages (`live_statuses`, each run's `color`), see js/README.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from rf_notebook.configs import format_value
from rf_notebook.store import LIVE_STATUSES, RunStatus

__all__ = [
    "LIVE",
    "MAX_ERROR_CHARS",
    "MAX_OPS",
    "PALETTE",
    "SNAPSHOT_MAX_POINTS",
    "STATIC_MAX_OPS",
    "STATIC_MAX_POINTS",
    "display_value",
    "downsample",
    "run_color",
]

# Bokeh's Category10 then the light half of Category20: one stable colour per run id.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip

# The live statuses as the messages spell them, in the enum's order ("queued", "training").
LIVE = tuple(s.value for s in RunStatus if s in LIVE_STATUSES)

SNAPSHOT_MAX_POINTS = 500  # per curve in a snapshot (a delta carries every new point)
STATIC_MAX_POINTS = 300  # per polyline in the static HTML
MAX_OPS = 200  # the latest IC ops in every snapshot and delta
STATIC_MAX_OPS = 20  # of those, the static HTML lists only the last few
MAX_ERROR_CHARS = 300  # of a failed run's error in the static HTML: the tail, which names the exception


def run_color(run_id: int) -> str:
    return PALETTE[(run_id - 1) % len(PALETTE)]


T = TypeVar("T")


def downsample(points: list[T], max_points: int) -> list[T]:
    """At most `max_points` of `points`, evenly spaced, always keeping the first and the last."""
    if len(points) <= max_points:
        return points
    stride = (len(points) - 1) / (max_points - 1)
    return [points[round(i * stride)] for i in range(max_points)]


def display_value(value: Any) -> str:
    """A value as a table cell shows it: 3e-4, 0.1, 16, cosine, "q, v" for a list, "" for None.

    The browser's copy of this rule is `formatValue` in js/src/format.js.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"  # as JSON (and the browser) spell them
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(display_value(v) for v in value)
    return format_value(value)
