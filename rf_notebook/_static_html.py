"""Static HTML rendering of the live panel's final state.

Front-ends that run no widget JavaScript (GitHub, nbviewer, nbconvert) show the ``text/html`` entry of a
widget's ``_repr_mimebundle_`` instead.  :func:`render_html` turns a panel snapshot (the JSON-friendly dict the
widget syncs: header, runs, series, chunk boundaries, IC ops) into self-contained HTML: a header line, one row of
inline-SVG line charts, a legend, a run table and the last IC ops.

Stdlib only (plus the panel's shared definitions in ``_panel_spec``: colours, limits, downsampling, value
formatting); the output holds no JavaScript, no external resources and no ``<style>`` block (inline ``style=``
attributes only, neutral greys and ``currentColor`` so it reads in light and dark themes).  Every piece of user
text is HTML-escaped and run colours are validated before they reach an attribute.  Deleted runs appear in the
table only, not in the charts or the legend.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rf_notebook._panel_spec import (
    MAX_ERROR_CHARS,
    PALETTE,
    STATIC_MAX_OPS,
    STATIC_MAX_POINTS,
    display_value,
    downsample,
    run_color,
)
from rf_notebook.store import RunStatus

__all__ = ["render_html"]

_FAILED, _DELETED = RunStatus.FAILED.value, RunStatus.DELETED.value
STATUS_COLORS = {  # badge colours; any other status is grey
    RunStatus.TRAINING.value: "#1f77b4",
    RunStatus.STOPPED.value: "#c77c00",
    RunStatus.FINISHED.value: "#2ca02c",
    _FAILED: "#d62728",
}
W, H = 420, 220  # chart size in px
ML, MR, MT, MB = 50, 12, 24, 30  # plot-area margins
_HEX = re.compile(r"#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})")
_CELL = "padding:2px 8px;border-bottom:1px solid rgba(128,128,128,.3);text-align:left;vertical-align:top"
_TABLE = "border-collapse:collapse;margin:6px 0;font-size:12px"
_MUTED = "color:#888"
_SWATCH = "display:inline-block;width:12px;height:3px;margin-right:4px;vertical-align:middle;background:"

Point = tuple[float, float]


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any) -> float | None:
    """``x`` as a finite float, else None (bools, strings, NaN and inf included)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _fmt(x: Any) -> str:
    """Short display text (unescaped), as the live panel shows it; a dash where there is none."""
    return display_value(x) or "—"


def _tick_label(v: float) -> str:
    if abs(v) >= 1000 and v == int(v):
        return f"{v / 1000:g}k"
    return f"{v:.3g}".replace("e+0", "e").replace("e-0", "e-")


def _hms(seconds: Any) -> str:
    s = int(_num(seconds) or 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _color(run: Mapping[str, Any], index: int) -> str:
    """The run's colour from the snapshot if it is a hex colour, else the feed's colour for its id."""
    value, run_id = run.get("color"), run.get("id")
    if isinstance(value, str) and _HEX.fullmatch(value):
        return value
    return run_color(run_id) if type(run_id) is int else PALETTE[index % len(PALETTE)]


def _points(raw: Any) -> list[Point]:
    """Finite ``(x, y)`` pairs of a series; malformed entries, NaN and inf are skipped."""
    out = []
    for p in raw if isinstance(raw, (list, tuple)) else ():
        if isinstance(p, (list, tuple)) and len(p) >= 2:
            x, y = _num(p[0]), _num(p[1])
            if x is not None and y is not None:
                out.append((x, y))
    return out


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if not hi - lo > 1e-12 * max(abs(lo), abs(hi), 1e-300) or not math.isfinite(hi - lo):
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad  # all-equal values: a band around them, never a zero-width range
    return lo, hi


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    """About ``n`` round tick values (steps 1, 2, 2.5, 5 x 10^k) within ``[lo, hi]``."""
    raw = (hi - lo) / n
    if not raw > 0 or not math.isfinite(raw):
        return [lo, hi]
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step) * step
    ticks = [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks]


def _chart(metric: str, lines: list[tuple[str, str, list[Point]]], bounds: list[float]) -> str:
    """One SVG chart: ``lines`` are ``(name, colour, points)``; ``bounds`` are x positions of dotted lines."""
    out = [
        f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" style="font:10px sans-serif">',
        f'<title>{_e(metric)}</title><text x="{ML}" y="14" fill="currentColor" font-size="12" font-weight="600">'
        f"{_e(metric)}</text>",
    ]
    all_pts = [p for _, _, pts in lines for p in pts]
    if not all_pts:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" fill="#888">no data</text></svg>')
        return "".join(out)
    (x0, x1), (y0, y1) = _span([p[0] for p in all_pts]), _span([p[1] for p in all_pts])
    pw, ph = W - ML - MR, H - MT - MB

    def sx(x: float) -> float:
        return ML + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return MT + (1 - (y - y0) / (y1 - y0)) * ph

    grid = 'stroke="currentColor" stroke-opacity=".15"'
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{ML}" x2="{ML + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" {grid}/>')
        out.append(f'<text x="{ML - 4}" y="{sy(t) + 3:.1f}" text-anchor="end" fill="#888">{_tick_label(t)}</text>')
    for t in _ticks(x0, x1):
        out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{MT + ph}" y2="{MT + ph + 4}" stroke="#888"/>')
        out.append(f'<text x="{sx(t):.1f}" y="{MT + ph + 15}" text-anchor="middle" fill="#888">{_tick_label(t)}</text>')
    out.append(f'<text x="{ML + pw}" y="{H - 2}" text-anchor="end" fill="#888">step</text>')
    out.append(f'<path d="M{ML},{MT}V{MT + ph}H{ML + pw}" fill="none" stroke="#888"/>')
    for b in bounds:
        if x0 <= b <= x1:
            out.append(
                f'<line x1="{sx(b):.1f}" x2="{sx(b):.1f}" y1="{MT}" y2="{MT + ph}" stroke="#888" '
                'stroke-width=".8" stroke-dasharray="2,3"/>'
            )
    for name, color, pts in lines:
        tip = f"<title>{_e(name)}: {_e(metric)}</title>"
        if len(pts) == 1:
            out.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{color}">{tip}</circle>')
        elif pts:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in downsample(pts, STATIC_MAX_POINTS))
            out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5">{tip}</polyline>')
    out.append("</svg>")
    return "".join(out)


def _metric_names(series: Mapping[str, Any]) -> list[str]:
    """Metric names in order of first appearance, with ``loss`` then ``eval_loss`` first when present."""
    found = list(dict.fromkeys(str(m) for s in series.values() if isinstance(s, Mapping) for m in s))
    preferred = [m for m in ("loss", "eval_loss") if m in found]
    return (preferred + [m for m in found if m not in preferred])[:2]


def _badge(status: str) -> str:
    c = STATUS_COLORS.get(status, "#888888")
    style = f"color:{c};border:1px solid {c};border-radius:8px;padding:0 6px;font-size:11px;white-space:nowrap"
    return f'<span style="{style}">{_e(status)}</span>'


def _table(head: Sequence[str], rows: list[list[str]]) -> str:
    """``head`` is plain text (escaped here); ``rows`` hold already-escaped cell HTML."""
    th = "".join(f'<th style="{_CELL};font-weight:600">{_e(h)}</th>' for h in head)
    body = "".join("<tr>" + "".join(f'<td style="{_CELL}">{c}</td>' for c in r) + "</tr>" for r in rows)
    return f'<table style="{_TABLE}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _name(run: Mapping[str, Any]) -> str:
    return str(run.get("name") or run.get("id"))


def _swatch(color: str) -> str:
    return f'<span style="{_SWATCH}{color}"></span>'


def _run_row(run: Mapping[str, Any], color: str, params: list[str]) -> list[str]:
    values = run.get("params") if isinstance(run.get("params"), Mapping) else {}
    total = run.get("total_steps")
    return [
        _swatch(color) + _e(_name(run)),
        _badge(str(run.get("status", ""))),
        f"{_e(run.get('chunks_done', 0))}/{_e(run.get('chunks_total', '?'))}",
        _e(run.get("step", "")) + ("" if total is None else f" / {_e(total)}"),
        _latest(run, "loss"),
        _latest(run, "eval_loss"),
        *(_e(_fmt(values.get(p))) for p in params),
        _error_cell(run),
    ]


def _latest(run: Mapping[str, Any], key: str) -> str:
    latest = run.get("latest")
    return _e(_fmt(latest.get(key))) if isinstance(latest, Mapping) else "—"


def _error_cell(run: Mapping[str, Any]) -> str:
    err = run.get("error")
    if run.get("status") != _FAILED or not err:
        return ""
    text = str(err).rstrip()
    text = text if len(text) <= MAX_ERROR_CHARS else "…" + text[-MAX_ERROR_CHARS:]  # the tail names the exception
    style = "margin:0;white-space:pre-wrap;font-size:11px;max-width:480px;color:#d62728"
    return f'<pre style="{style}">{_e(text)}</pre>'


def _op_row(op: Mapping[str, Any]) -> list[str]:
    t = _num(op.get("time"))
    args = op.get("args")
    args_text = json.dumps(args, default=str, sort_keys=True)[:120] if args else ""
    run = "" if op.get("run_id") is None else f"#{op.get('run_id')}"
    if op.get("new_run_id") is not None:
        run += f" → #{op.get('new_run_id')}"
    return [
        time.strftime("%H:%M:%S", time.localtime(t)) if t is not None else "",
        _e(op.get("op", "")) + (f' <span style="{_MUTED}">{_e(args_text)}</span>' if args_text else ""),
        _e(run),
        _e(op.get("origin") or ""),
        _e(op.get("outcome") or ""),
        _e(op.get("reason") or ""),
    ]


def render_html(snapshot: Mapping[str, Any], metrics: Sequence[str] | None = None) -> str:
    """Static HTML (inline SVG, no JavaScript) for a panel snapshot; ``metrics`` overrides the charted metrics."""
    header = snapshot.get("header") or {}
    runs = [r for r in snapshot.get("runs") or [] if isinstance(r, Mapping)]
    series = snapshot.get("series") or {}
    params = [str(p) for p in snapshot.get("params") or []]
    colors = {str(r.get("id")): _color(r, i) for i, r in enumerate(runs)}
    shown = [r for r in runs if r.get("status") != _DELETED]
    names = list(metrics) if metrics is not None else _metric_names(series)

    counts = header.get("counts") or {}
    parts = [f"{_e(k)} {_e(v)}" for k, v in counts.items() if v]
    progress = (_num(header.get("progress")) or 0.0) * 100
    eta = _num(header.get("eta_s"))
    state = "done" if header.get("done") else (f"ETA {_hms(eta)}" if eta is not None else "")
    out = [
        '<div class="rfnb-static" style="font-family:system-ui,-apple-system,Segoe UI,sans-serif;font-size:13px">',
        f'<div style="margin:4px 0"><b>{_e(snapshot.get("experiment") or "experiment")}</b> '
        f'<span style="{_MUTED}">· {progress:.0f}% · elapsed {_hms(header.get("elapsed_s"))}'
        f"{' · ' + state if state else ''}{' · ' + ', '.join(parts) if parts else ''}</span></div>",
    ]

    first = str(runs[0].get("id")) if runs else None
    bounds = [b for b in ((snapshot.get("boundaries") or {}).get(first) or []) if _num(b) is not None]
    charts = []
    for metric in names:
        lines = []
        for r in shown:
            s = series.get(str(r.get("id")))
            pts = _points(s.get(metric)) if isinstance(s, Mapping) else []
            lines.append((_name(r), colors[str(r.get("id"))], pts))
        charts.append(_chart(str(metric), lines, [float(b) for b in bounds]))
    if charts:
        out.append(f'<div style="display:flex;flex-wrap:wrap;gap:12px">{"".join(charts)}</div>')
    legend = "".join(
        f'<span style="margin-right:12px;white-space:nowrap">{_swatch(colors[str(r.get("id"))])}{_e(_name(r))}</span>'
        for r in shown
    )
    out.append(f'<div style="margin:4px 0;font-size:12px">{legend}</div>')

    rows = [_run_row(r, colors[str(r.get("id"))], params) for r in runs]
    head = ["run", "status", "chunks", "step", "loss", "eval_loss", *(p.rsplit(".", 1)[-1] for p in params), "error"]
    out.append(_table(head, rows))

    ops = [o for o in snapshot.get("ops") or [] if isinstance(o, Mapping)][-STATIC_MAX_OPS:]
    if ops:
        out.append(
            f'<div style="margin-top:6px;font-weight:600">IC ops <span style="{_MUTED}">(last {len(ops)})</span></div>'
        )
        out.append(_table(["time", "op", "run", "origin", "outcome", "reason"], [_op_row(o) for o in ops]))
    out.append("</div>")
    return "".join(out)
