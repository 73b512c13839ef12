"""Every notebook in notebooks/ runs top to bottom on the embedded demo model, writes nothing to stderr, and its
saved outputs show the result without a kernel: nbconvert's HTML of the executed quickstart, opened offline in
headless chromium, draws the curves, with the widget state nbclient stores and without it."""

from __future__ import annotations

import concurrent.futures
import copy
import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
CHROMIUM = "/usr/bin/chromium"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def outputs(nb, kind=None):
    found = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    return [o for o in found if kind is None or o.output_type == kind]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    shutil.copy(path, tmp_path / path.name)
    nb = nbformat.read(tmp_path / path.name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert not outputs(nb, "error")
    stderr = [o.text for o in outputs(nb, "stream") if o.name == "stderr"]
    assert not stderr, f"the notebook wrote to stderr:\n{''.join(stderr)}"
    assert (tmp_path / "quickstart-winner" / "adapter_model.safetensors").exists() or path.stem != "quickstart"
    panels = [o for o in outputs(nb) if "rfnb-static" in o.get("data", {}).get("text/html", "")]
    assert len(panels) == 2, "the notebook shows no panel, or not the two it should (run_fit's and exp.panel()'s)"
    for panel in panels:  # what GitHub / nbconvert show: the finished curves and the run table
        html = panel.data["text/html"]
        assert "<svg" in html and html.count("<polyline") >= 4 and "finished" in html
        # nothing ran the widget's JavaScript here, so the saved output is the picture alone: nbconvert would pick a
        # widget view over it whenever widget state is stored, and draw it blank offline
        assert WIDGET_VIEW not in panel.data
    if path.stem == "quickstart":
        nbformat.write(nb, tmp_path / "executed.ipynb")
        if not os.path.exists(CHROMIUM):
            pytest.skip(f"{CHROMIUM} missing (apt-get install chromium)")
        # on a thread of its own: Playwright's sync API refuses a thread with an asyncio loop, and the e2e tests'
        # browser (a session fixture) keeps one on the main thread
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(check_html_offline, tmp_path / "executed.ipynb", tmp_path).result()


def only_the_file(route) -> None:
    """No network: every request but the page's own file is refused (nbconvert's CDN scripts included)."""
    if route.request.url.startswith("file:"):
        route.continue_()
    else:
        route.abort()


def check_html_offline(executed: Path, folder: Path) -> None:
    """`jupyter nbconvert --to html` of the executed notebook, with and without its stored widget state, opened in
    headless chromium with every request but the file itself refused: both panels' curves are visible."""
    from nbconvert import HTMLExporter
    from playwright.sync_api import sync_playwright

    nb = nbformat.read(executed, as_version=4)
    assert "widgets" in nb.metadata, "nbclient stored no widget state: the case under test is gone"
    stateless = copy.deepcopy(nb)
    del stateless.metadata["widgets"]
    pages = {}
    for name, notebook in (("with-state", nb), ("without-state", stateless)):
        body, _ = HTMLExporter().from_notebook_node(notebook)
        pages[name] = folder / f"{name}.html"
        pages[name].write_text(body)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            for name, page_path in pages.items():
                context = browser.new_context(offline=True)
                context.route("**/*", only_the_file)
                page = context.new_page()
                page.goto(page_path.as_uri(), wait_until="load")
                charts = page.locator(".rfnb-static svg")
                assert charts.count() == 4, f"{name}: {charts.count()} charts, expected 2 panels x 2"
                for i in range(charts.count()):
                    box = charts.nth(i).bounding_box()
                    assert charts.nth(i).is_visible() and box and box["width"] > 100 and box["height"] > 100, name
                assert page.locator(".rfnb-static polyline").count() >= 8, name
                context.close()
        finally:
            browser.close()
