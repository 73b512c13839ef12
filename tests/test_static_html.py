"""Tests for the static HTML fallback of the panel (rf_notebook._static_html)."""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from rf_notebook._feed import Feed
from rf_notebook._panel_spec import LIVE, PALETTE, STATIC_MAX_POINTS, display_value, run_color
from rf_notebook._static_html import render_html
from rf_notebook.store import LIVE_STATUSES, RunRecord, RunStatus, Store

HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"


def _run(rid: int, name: str, status: str = "training", color: str = "#1f77b4", **extra: Any) -> dict[str, Any]:
    run = {
        "id": rid,
        "name": name,
        "status": status,
        "trainer_type": "SFT",
        "step": 40,
        "total_steps": 64,
        "chunks_done": 2,
        "chunks_total": 4,
        "error": None,
        "params": {"peft_config.r": 4 * rid, "training_args.learning_rate": 0.003 / rid},
        "samples_per_step": 16,
        "latest": {"loss": 0.41234, "eval_loss": 0.5278},
        "color": color,
    }
    run.update(extra)
    return run


def _snapshot(n_runs: int = 2, n_points: int = 40) -> dict[str, Any]:
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    return {
        "v": 1,
        "experiment": "demo",
        "cursor": 1234,
        "header": {
            "elapsed_s": 3723.4,
            "eta_s": None,
            "progress": 0.625,
            "done": False,
            "counts": {"training": n_runs},
        },
        "params": ["peft_config.r", "training_args.learning_rate"],
        "runs": [_run(i, f"run-{i}", color=colors[(i - 1) % 4]) for i in range(1, n_runs + 1)],
        "series": {
            str(i): {
                "loss": [[s, 2.5 / (1 + 0.05 * s) + 0.01 * i] for s in range(1, n_points + 1)],
                "eval_loss": [[s, 1.5 / (1 + 0.02 * s)] for s in range(16, n_points + 1, 16)],
            }
            for i in range(1, n_runs + 1)
        },
        "boundaries": {str(i): [16, 32] for i in range(1, n_runs + 1)},
        "ops": [
            {
                "op_id": 1,
                "time": 1764280000.0,
                "origin": "panel",
                "op": "stop",
                "run_id": 1,
                "args": {},
                "outcome": "applied",
                "reason": None,
                "step": 17,
                "new_run_id": None,
            }
        ],
    }


def _polylines(out: str) -> list[str]:
    return re.findall(r'<polyline points="([^"]*)"', out)


def _rows(out: str) -> int:
    """Body rows of the first (run) table."""
    run_table = out.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return run_table.count("<tr>")


def test_structure() -> None:
    out = render_html(_snapshot(n_runs=3))
    assert out.count("<svg") == 2  # loss and eval_loss
    assert ">loss</text>" in out and ">eval_loss</text>" in out
    lines = _polylines(out)
    assert len(lines) == 6  # one per run per chart
    assert all(len(p.split()) >= 2 for p in lines)
    for name in ("run-1", "run-2", "run-3"):
        assert out.count(f">{name}</span>") == 1  # legend entry
    assert 'stroke="#1f77b4"' in out and 'stroke="#ff7f0e"' in out and 'stroke="#2ca02c"' in out  # run colours
    assert _rows(out) == 3
    assert "62%" in out or "63%" in out
    assert "1:02:03" in out  # elapsed h:mm:ss
    assert "training 3" in out
    assert "learning_rate</th>" in out and ">r</th>" in out
    assert "0.412" in out and "0.528" in out  # 3 significant digits
    assert "0.00412" not in out and "0.41234" not in out
    assert out.count('stroke-dasharray="2,3"') == 2 * 2  # boundaries 16 and 32 in both charts
    assert "applied" in out and ">stop" in out  # op log


def test_metrics_override_and_default_fallback() -> None:
    snap = _snapshot()
    out = render_html(snap, metrics=["eval_loss"])
    assert out.count("<svg") == 1 and ">eval_loss</text>" in out and ">loss</text>" not in out
    for s in snap["series"].values():
        s["grad_norm"] = s.pop("loss")
        s["lr"] = s.pop("eval_loss")
    out = render_html(snap)
    assert out.count("<svg") == 2 and ">grad_norm</text>" in out and ">lr</text>" in out


def test_escaping_of_user_text() -> None:
    snap = _snapshot()
    snap["experiment"] = HOSTILE
    snap["runs"][0]["name"] = HOSTILE
    snap["runs"][1].update(status="failed", error="Traceback\n" + HOSTILE)
    snap["runs"][0]["params"]["training_args.learning_rate"] = HOSTILE
    snap["params"].append('training_args.<b onmouseover="x">')
    snap["ops"][0].update(reason=HOSTILE, args={"k": HOSTILE})
    snap["series"]["1"][HOSTILE] = [[1, 1.0], [2, 2.0]]
    out = render_html(snap, metrics=["loss", HOSTILE])
    assert "<img" not in out
    assert "<b " not in out and "&lt;b onmouseover=&quot;x&quot;&gt;" in out
    # experiment, legend, table name, param, error, op reason, op args (1 each);
    # SVG: run tooltip in the loss chart (1), run+metric tooltip in the hostile chart (2), its <title> and heading (2)
    assert out.count(HOSTILE_ESCAPED) == 12
    assert f"<title>{HOSTILE_ESCAPED}: loss</title>" in out
    assert f"<title>{HOSTILE_ESCAPED}</title>" in out  # chart title of the hostile metric


def test_no_script_and_no_external_resources() -> None:
    snap = _snapshot(n_runs=4)
    snap["runs"][2].update(status="failed", error="RuntimeError: CUDA out of memory")
    out = render_html(snap).lower()
    assert "<script" not in out
    assert "http" not in out
    assert "<link" not in out and "<img" not in out and "<style" not in out and "javascript:" not in out


def test_downsampling_bound() -> None:
    snap = _snapshot(n_runs=1)
    snap["series"]["1"]["loss"] = [[s, 1.0 / s] for s in range(1, 10_001)]
    out = render_html(snap, metrics=["loss"])
    (points,) = _polylines(out)
    coords = [tuple(map(float, p.split(","))) for p in points.split()]
    assert 2 <= len(coords) <= STATIC_MAX_POINTS
    xs = [x for x, _ in coords]
    assert xs == sorted(xs)
    assert min(xs) == coords[0][0] and max(xs) == coords[-1][0]  # first and last kept: x spans the full plot width
    assert math.isclose(coords[0][0], 50.0) and math.isclose(coords[-1][0], 420 - 12)
    assert len(out) < 40_000


def test_nan_inf_and_empty_series() -> None:
    snap = _snapshot(n_runs=3)
    nan, inf = float("nan"), float("inf")
    snap["series"]["1"]["loss"] = [[1, nan], [2, 1.0], [3, inf], [4, 0.5], [nan, 0.7], [5, -inf], [6], None, "x"]
    snap["series"]["2"] = {}
    del snap["series"]["3"]
    snap["runs"][0]["latest"] = {"loss": nan, "eval_loss": None}
    out = render_html(snap)
    assert "nan" not in "".join(_polylines(out)).lower()
    assert "inf" not in "".join(_polylines(out)).lower()
    (loss_line, eval_line) = _polylines(out)
    assert len(loss_line.split()) == 2  # only (2, 1.0) and (4, 0.5) survive
    assert _rows(out) == 3
    # nothing at all to plot
    empty = _snapshot(n_runs=1)
    empty["series"] = {}
    empty["boundaries"] = {}
    out = render_html(empty, metrics=["loss"])
    assert "no data" in out and not _polylines(out)
    assert render_html({}).startswith("<div")  # a bare snapshot does not crash


def test_single_point_and_all_equal_values() -> None:
    snap = _snapshot(n_runs=2)
    snap["series"]["1"]["loss"] = [[5, 0.3]]
    snap["series"]["2"]["loss"] = [[5, 0.3]]
    out = render_html(snap, metrics=["loss"])
    assert out.count("<circle") == 2 and not _polylines(out)
    assert "nan" not in out.lower()
    flat = _snapshot(n_runs=1)
    flat["series"]["1"]["loss"] = [[s, 2.0] for s in range(1, 50)]
    out = render_html(flat, metrics=["loss"])
    (line,) = _polylines(out)
    ys = {float(p.split(",")[1]) for p in line.split()}
    assert len(ys) == 1 and 24 < ys.pop() < 190  # drawn inside the plot area, not at an edge or NaN


def test_colour_validation() -> None:
    snap = _snapshot(n_runs=4)
    bad = ['red" onmouseover="x', "url(#a)", "#12345g", "#abc"]
    for run, color in zip(snap["runs"], bad):
        run["color"] = color
    out = render_html(snap)
    assert "onmouseover" not in out and "url(" not in out and "#12345g" not in out
    assert f'stroke="{PALETTE[0]}"' in out and f'stroke="{PALETTE[1]}"' in out and f'stroke="{PALETTE[2]}"' in out
    assert 'stroke="#abc"' in out  # short hex is valid


def test_missing_colour_falls_back_to_the_feeds_colour_for_the_run_id() -> None:
    snap = _snapshot(n_runs=1)
    snap["runs"][0].update(id=7, color=None)
    snap["series"] = {"7": snap["series"]["1"]}
    out = render_html(snap, metrics=["loss"])
    assert f'stroke="{run_color(7)}"' in out and run_color(7) == PALETTE[6]


def test_values_are_shown_as_in_the_live_panel() -> None:
    # the same cases as js/test/panel.test.js "formats values briefly"
    assert [display_value(v) for v in (3e-4, 0.1, 16, "cosine", None)] == ["3e-4", "0.1", "16", "cosine", ""]
    assert display_value(["q_proj", "v_proj"]) == "q_proj, v_proj" and display_value(True) == "true"
    snap = _snapshot(n_runs=1)
    out = render_html(snap)
    assert ">3e-3</td>" in out  # the learning rate, as in the run's name and the live table


def test_a_feed_snapshot_carries_the_live_statuses_and_renders() -> None:
    store = Store()
    store.add_run(RunRecord(3, "lr=1e-3", "SFT", {}, params={"training_args.learning_rate": 1e-3}, total_steps=4))
    store.log_metrics(3, 1, 1, {"loss": 2.0})
    store.log_metrics(3, 2, 1, {"loss": 1.0})
    snap = Feed(store, "exp").snapshot()
    assert snap["live_statuses"] == ["queued", "training"] == list(LIVE)
    assert {RunStatus(s) for s in snap["live_statuses"]} == LIVE_STATUSES
    assert f'stroke="{run_color(3)}"' in render_html(snap)


def test_failed_run_shows_error_truncated() -> None:
    snap = _snapshot()
    long_error = "Traceback (most recent call last):\n" + "  frame\n" * 200 + "ValueError: bad rank"
    snap["runs"][1].update(status="failed", error=long_error)
    snap["runs"][0]["error"] = "should not show"  # not failed: no error column text
    out = render_html(snap)
    assert "ValueError: bad rank" in out
    assert "should not show" not in out
    assert "Traceback (most recent call last)" not in out  # truncated to the tail
    pre = re.search(r"<pre[^>]*>(.*?)</pre>", out, re.S)
    assert pre is not None and len(pre.group(1)) <= 310
    assert "color:#d62728" in out  # failed badge


def test_op_log_keeps_last_20() -> None:
    snap = _snapshot()
    snap["ops"] = [
        {"op_id": i, "time": 1764280000.0 + i, "origin": "api", "op": f"op{i}", "run_id": 1, "outcome": "applied"}
        for i in range(30)
    ]
    out = render_html(snap)
    assert ">op29" in out and ">op10" in out and ">op9<" not in out and ">op0<" not in out
    assert re.search(r">\d\d:\d\d:\d\d<", out)


def test_input_not_mutated() -> None:
    snap = _snapshot()
    before = copy.deepcopy(snap)
    render_html(snap)
    assert snap == before
