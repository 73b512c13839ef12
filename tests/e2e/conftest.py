"""Fixtures for real-browser tests: Debian's chromium (Playwright, sync API) against real Jupyter servers.

    jupyter   session, params ["lab", "notebook"]: a running server (jupyter_e2e.JupyterServer)
    browser   session: headless /usr/bin/chromium (Playwright gives each launch a fresh temp profile)
    page      function: a fresh browser context + page, 1400x1000, console captured
    shots     function: shots("step") -> <artifacts>/<test>/NN-step.png
    notebook  function: jupyter_e2e.NotebookDriver bound to page + jupyter + shots

Restrict a test to one frontend with ``@pytest.mark.parametrize("jupyter", ["lab"], indirect=True)``.
Screenshots go to $RF_E2E_ARTIFACTS or <repo>/test-artifacts/e2e; the folder is printed in the terminal summary.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from jupyter_e2e import (
    CHROMIUM,
    CHROMIUM_ARGS,
    INIT_JS,
    KINDS,
    VIEWPORT,
    JupyterServer,
    NotebookDriver,
    Screenshots,
    slug,
)

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("RF_E2E_ARTIFACTS") or REPO / "test-artifacts" / "e2e").resolve()

_console_key = pytest.StashKey[list]()
_shots_key = pytest.StashKey[Screenshots]()
_used_key = pytest.StashKey[list]()


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", params=KINDS)
def jupyter(request, tmp_path_factory) -> JupyterServer:
    """A real ``jupyter lab`` / ``jupyter notebook`` server, shared by all tests of that kind in the session."""
    kind = request.param
    base = tmp_path_factory.mktemp(f"jupyter-{kind}")
    server = JupyterServer(kind=kind, root=base / "root", home=base / "home")
    server.start()
    print(f"\n[e2e] jupyter {kind} on {server.base_url} started in {server.startup_s:.1f}s (root {server.root})")
    yield server
    server.stop()  # its log is attached to the report of every failing test that used it


@pytest.fixture(scope="session")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium); never `playwright install`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, request):
    """A fresh context (no cookies/storage shared between tests) with window.__rfE2E helpers preinstalled."""
    context = browser.new_context(viewport=VIEWPORT)
    context.add_init_script(INIT_JS)
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    console: list[str] = []
    t0 = time.monotonic()
    pg.on("console", lambda m: console.append(f"{time.monotonic() - t0:7.2f}s [{m.type}] {m.text}"))
    pg.on("pageerror", lambda e: console.append(f"{time.monotonic() - t0:7.2f}s [pageerror] {e}"))
    request.node.stash[_console_key] = console
    yield pg
    context.close()


@pytest.fixture
def console_messages(page, request) -> list[str]:
    """Console lines of ``page`` so far ("  1.23s [log] text"); printed automatically when a test fails."""
    return request.node.stash[_console_key]


@pytest.fixture
def shots(page, request) -> Screenshots:
    folder = ARTIFACTS / slug(f"{request.node.path.stem}.{request.node.name}")
    shutil.rmtree(folder, ignore_errors=True)
    s = Screenshots(page, folder)
    request.node.stash[_shots_key] = s
    request.config.stash.setdefault(_used_key, []).append(folder)
    return s


@pytest.fixture
def notebook(page, jupyter, shots, request) -> NotebookDriver:
    """Driver for one notebook in ``page``; kernels of the shared server are shut down afterwards."""
    yield NotebookDriver(page, jupyter, shots, workspace=f"{request.node.name}-{time.time_ns()}")
    jupyter.shutdown_all_sessions()


# --------------------------------------------------------------------------------------------------
# reporting: console + server log on failure, artifact folder in the terminal summary
# --------------------------------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "teardown" or not report.failed:
        return
    shots = item.stash.get(_shots_key, None)
    if shots is not None:
        try:
            shots("FAILED")
        except Exception as exc:
            report.sections.append(("e2e failure screenshot", f"could not take: {exc}"))
    console = item.stash.get(_console_key, None)
    if console is not None:
        report.sections.append(("browser console", "\n".join(console[-300:]) or "<empty>"))
    driver = getattr(item, "funcargs", {}).get("notebook")
    if isinstance(driver, NotebookDriver):
        report.sections.append(("frontend state", repr(driver.state())))
    server = getattr(item, "funcargs", {}).get("jupyter")
    if isinstance(server, JupyterServer):
        report.sections.append((f"jupyter {server.kind} server log", server.log_tail(150)))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    used = config.stash.get(_used_key, [])
    if used:
        n = sum(len(list(f.glob("*.png"))) for f in used if f.exists())
        terminalreporter.write_line(f"e2e screenshots ({n} PNGs, {len(used)} tests): {ARTIFACTS}")
