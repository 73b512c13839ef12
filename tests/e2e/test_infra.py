"""Proves the e2e infrastructure: an anywidget round-trip in real JupyterLab 4 and Notebook 7 pages.

Browser -> kernel: a click sends a custom message, the kernel's on_msg bumps a synced trait.
Kernel -> browser: a background thread in the kernel sends custom messages every 0.2 s.
"""

from __future__ import annotations

import re
import time

import nbformat
from jupyter_e2e import outputs_text
from playwright.sync_api import expect

WIDGET_CELL = '''
import threading, time
import anywidget, traitlets

class Probe(anywidget.AnyWidget):
    _esm = """
    function render({ model, el }) {
      const btn = document.createElement("button");
      btn.className = "probe";
      btn.textContent = "probe";
      const count = document.createElement("span");
      count.className = "probe-count";
      const ticks = document.createElement("span");
      ticks.className = "probe-ticks";
      const seen = [];
      const show = () => { count.textContent = `count=${model.get("count")}`; };
      show();
      model.on("change:count", show);
      model.on("msg:custom", (msg) => {
        if (msg && msg.type === "tick") {
          seen.push(msg.i);
          ticks.textContent = `ticks=${seen.length} last=${msg.i}`;
          (window.__probeTicks = window.__probeTicks || []).push([msg.i, performance.now()]);
        }
      });
      btn.addEventListener("click", () => model.send({ type: "click" }));
      el.append(btn, " ", count, " ", ticks);
    }
    export default { render };
    """
    count = traitlets.Int(0).tag(sync=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.on_msg(self._on_msg)

    def _on_msg(self, widget, content, buffers):
        if content.get("type") == "click":
            self.count += 1

w = Probe()
w
'''

TICKER_CELL = """
N_TICKS = 12
def _tick():
    for i in range(N_TICKS):
        w.send({"type": "tick", "i": i})
        time.sleep(0.2)
ticker = threading.Thread(target=_tick, daemon=True)
ticker.start()
"""

REPORT_CELL = """
ticker.join(10)
print(f"count={w.count} ticker_alive={ticker.is_alive()}")
"""

SLEEP_CELL = "time.sleep(1.0); print('slept')"
ERROR_CELL = "raise ValueError('boom')"


def make_probe_notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(src.strip())
        for src in (WIDGET_CELL, TICKER_CELL, REPORT_CELL, SLEEP_CELL, ERROR_CELL)
    ]
    return nb


def test_anywidget_roundtrip(notebook, jupyter, page, shots):
    t0 = time.perf_counter()
    name = notebook.open(make_probe_notebook(), name=f"probe-{jupyter.kind}.ipynb")
    t_open = time.perf_counter() - t0
    shots("opened")

    # cell 0: display the widget (dispatched without awaiting, then waited on)
    ticket = notebook.run_cell(0)
    assert notebook.wait_done(ticket) == "ok"
    button = notebook.output(0).locator("button.probe")
    counter = notebook.output(0).locator(".probe-count")
    expect(counter).to_have_text("count=0", timeout=15_000)
    shots("widget-rendered")

    # browser -> kernel -> browser: click, on_msg bumps a synced trait
    t_clicks = []
    for n in (1, 2, 3):
        t1 = time.perf_counter()
        button.click()
        expect(counter).to_have_text(f"count={n}", timeout=2_000)
        t_clicks.append(time.perf_counter() - t1)
    shots("clicked-3x")

    # kernel background thread -> browser custom messages
    notebook.run_cell(1)
    ticks = notebook.output(0).locator(".probe-ticks")
    expect(ticks).to_have_text(re.compile(r"ticks=([3-9]|1[0-2]) "), timeout=5_000)
    shots("ticks-arriving")
    expect(ticks).to_have_text("ticks=12 last=11", timeout=10_000)
    shots("ticks-done")
    arrivals = page.evaluate("window.__probeTicks")
    assert [i for i, _ in arrivals] == list(range(12))
    spread_s = (arrivals[-1][1] - arrivals[0][1]) / 1000
    assert spread_s > 1.5, f"thread messages arrived in a burst ({spread_s:.2f}s), not streamed"

    # a click still round-trips after the thread traffic
    button.click()
    expect(counter).to_have_text("count=4", timeout=2_000)

    assert notebook.wait_done(notebook.run_cell(2)) == "ok"
    expect(notebook.output(2)).to_contain_text("count=4 ticker_alive=False")
    assert notebook.wait_done() == "ok"
    shots("report")

    # run_cell returns while the kernel is still busy; wait_done reports a raising cell as "failed"
    t1 = time.perf_counter()
    ticket = notebook.run_cell(3)
    assert time.perf_counter() - t1 < 0.5 and notebook.run_status(ticket) == "pending"
    assert notebook.wait_done(ticket) == "ok"
    assert notebook.run_cell_and_wait(4) == "failed"
    notebook.scroll_to_cell(4)
    shots("error-cell")

    saved = notebook.save()
    assert saved.cells[0].outputs, "widget output not saved"
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in saved.cells[0].outputs)
    assert "count=4 ticker_alive=False" in outputs_text(saved, 2)
    assert "slept" in outputs_text(saved, 3) and "ValueError" in outputs_text(saved, 4)
    assert [c.execution_count for c in saved.cells] == [1, 2, 3, 4, 5]
    shots("saved")

    # run all: stops at the raising last cell, everything before it re-ran
    assert notebook.wait_done(notebook.run_all(), timeout=60) == "failed"
    assert notebook.execution_counts() == [6, 7, 8, 9, 10]
    expect(notebook.output(0).locator(".probe-count")).to_have_text("count=0")
    shots("run-all")
    print(
        f"\n[e2e] {jupyter.kind}: open+kernel {t_open:.2f}s, click round-trips "
        + ", ".join(f"{t * 1000:.0f}ms" for t in t_clicks)
        + f", ticks streamed over {spread_s:.2f}s, saved {name}"
    )
