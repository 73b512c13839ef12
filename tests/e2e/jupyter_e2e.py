"""Real-browser helpers: a JupyterLab 4 / Notebook 7 server subprocess and a Playwright notebook driver.

The fixtures in ``conftest.py`` wire these together; tests normally only use the fixtures
(``jupyter``, ``page``, ``shots``, ``notebook``), but the classes can be imported directly
(``from jupyter_e2e import NotebookDriver``) because pytest puts this folder on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 1000}
KINDS = ("lab", "notebook")

# Lab's "would you like to get Jupyter news?" toast covers the bottom right of every screenshot.
_PAGE_CONFIG = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


# --------------------------------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------------------------------


@dataclass
class JupyterServer:
    """One ``jupyter lab`` or ``jupyter notebook`` subprocess serving ``root`` on ``127.0.0.1:port``."""

    kind: str  # "lab" | "notebook"
    root: Path  # the server's root_dir: notebooks you open must live here
    home: Path  # fresh JUPYTER_CONFIG_DIR / RUNTIME / DATA / IPYTHONDIR live under here
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    startup_s: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def doc_url(self, name: str, workspace: str | None = None) -> str:
        """URL that opens ``name`` (relative to root). Lab: a fresh named workspace so tests don't see each other's tabs."""
        if self.kind == "lab":
            ws = f"/workspaces/{slug(workspace)}" if workspace else ""
            return f"{self.base_url}/lab{ws}/tree/{name}"
        return f"{self.base_url}/notebooks/{name}"

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> JupyterServer:
        assert self.kind in KINDS, self.kind
        self.root.mkdir(parents=True, exist_ok=True)
        dirs = {
            k: self.home / k.lower()
            for k in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "IPYTHONDIR")
        }
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        (dirs["JUPYTER_CONFIG_DIR"] / "labconfig").mkdir(exist_ok=True)
        (dirs["JUPYTER_CONFIG_DIR"] / "labconfig" / "page_config.json").write_text(json.dumps(_PAGE_CONFIG))
        env = dict(os.environ)
        env.update({k: str(v) for k, v in dirs.items()})
        # kernel.json says argv[0]="python": make sure that's the venv's interpreter.
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("JUPYTER_PATH", None)
        app = "LabApp" if self.kind == "lab" else "JupyterNotebookApp"
        cmd = [
            sys.executable,
            "-m",
            "jupyter",
            self.kind,
            "--no-browser",
            f"--port={self.port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.ip=127.0.0.1",
            "--IdentityProvider.token=",
            "--ServerApp.password=",
            "--ServerApp.disable_check_xsrf=True",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.terminals_enabled=False",
            f"--{app}.expose_app_in_browser=True",
            "--LabApp.extension_manager=readonly",  # never query PyPI (Notebook 7 loads the lab extension too)
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")  # CI runs as root
        self.log_path = self.home / "server.log"
        log = open(self.log_path, "wb")  # the subprocess owns the fd; closed below
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter {self.kind} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/api/status", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"jupyter {self.kind} did not answer /api/status in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)
        self.startup_s = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, lines: int = 200) -> str:
        if not self.log_path or not self.log_path.exists():
            return "<no server log>"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    # -- REST --------------------------------------------------------------------------------------
    def api(self, path: str, method: str = "GET", body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base_url}/api/{path.lstrip('/')}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=20) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def put_setting(self, plugin: str, values: dict[str, Any]) -> None:
        """Store the user settings of a JupyterLab plugin (pages opened afterwards read them); {} restores defaults."""
        body = json.dumps({"raw": json.dumps(values)}).encode()
        req = urllib.request.Request(f"{self.base_url}/lab/api/settings/{plugin}", data=body, method="PUT")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=20) as r:
            assert r.status in (200, 204), r.status

    def shutdown_all_sessions(self) -> None:
        """Stop every kernel session (tests share one server; don't let kernels pile up on 2 cores)."""
        try:
            for s in self.api("sessions"):
                self.api(f"sessions/{s['id']}", method="DELETE")
        except Exception:  # best effort cleanup
            pass

    # -- files -------------------------------------------------------------------------------------
    def put_notebook(self, nb: nbformat.NotebookNode | str | os.PathLike, name: str | None = None) -> str:
        """Copy a notebook (a path, or an nbformat node) into the server root; return its name relative to root."""
        if isinstance(nb, nbformat.NotebookNode):
            if name is None:
                raise ValueError("name= is required when passing an in-memory notebook")
            nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
            nbformat.write(nb, self.root / name)
        else:
            src = Path(nb)
            name = name or src.name
            shutil.copyfile(src, self.root / name)
        return name

    def read_notebook(self, name: str) -> nbformat.NotebookNode:
        return nbformat.read(self.root / name, as_version=4)


# --------------------------------------------------------------------------------------------------
# browser side
# --------------------------------------------------------------------------------------------------

# Installed into every page (page.add_init_script) before Jupyter's own scripts run.
# `app.shell.currentWidget` is the NotebookPanel in both JupyterLab 4 and Notebook 7.
INIT_JS = r"""
window.__rfE2E = {
  runs: {},
  next: 1,
  panel(path) {
    const app = window.jupyterapp;
    if (!app || !app.shell) return null;
    const isNb = w => w && w.context && w.content && w.sessionContext && typeof w.content.activeCellIndex === 'number';
    const cur = app.shell.currentWidget;
    if (isNb(cur) && (!path || cur.context.path === path)) return cur;
    for (const w of app.shell.widgets('main')) if (isNb(w) && (!path || w.context.path === path)) return w;
    return null;
  },
  kernelState(path) {
    const p = this.panel(path);
    if (!p) return {panel: false};
    const s = p.sessionContext;
    const k = s.session && s.session.kernel;
    return {
      panel: true, ready: p.context.isReady && s.isReady, kernel: k ? k.status : null,
      connection: k ? k.connectionStatus : null, pending: this.pending(),
    };
  },
  pending() { return Object.values(this.runs).filter(v => v === 'pending').length; },
  track(promise) {
    const t = this.next++;
    this.runs[t] = 'pending';
    Promise.resolve(promise).then(
      r => { this.runs[t] = r === false ? 'failed' : 'ok'; },
      e => { this.runs[t] = 'error: ' + (e && e.message || e); });
    return t;
  },
  // Dispatch a notebook command WITHOUT awaiting it; returns a ticket polled via runs[ticket].
  run(path, command, index) {
    const app = window.jupyterapp;
    const p = this.panel(path);
    if (!p) throw new Error('no notebook panel for ' + path);
    if (app.shell.currentWidget !== p) app.shell.activateById(p.id);
    if (index !== null && index !== undefined) {
      if (index < 0 || index >= p.content.widgets.length) throw new Error('no cell ' + index);
      p.content.activeCellIndex = index;
      p.content.deselectAll();
    }
    return this.track(app.commands.execute(command));
  },
};
"""


class Screenshots:
    """``shots("clicked")`` -> saves ``<folder>/NN-clicked.png`` (NN counts up per test)."""

    def __init__(self, page, folder: Path):
        self.page = page
        self.folder = folder
        self.n = 0
        self.paths: list[Path] = []

    def __call__(self, step: str, **kwargs) -> Path:
        self.n += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.n:02d}-{slug(step)}.png"
        self.page.screenshot(path=str(path), **kwargs)
        self.paths.append(path)
        return path


class NotebookDriver:
    """Drives one notebook document in a JupyterLab 4 or Notebook 7 page.

    All waits poll the live frontend objects (``window.jupyterapp``), not DOM heuristics.
    """

    def __init__(self, page, server: JupyterServer, shots: Screenshots | None = None, workspace: str | None = None):
        self.page = page
        self.server = server
        self.shots = shots
        self.workspace = workspace
        self.name: str | None = None

    # -- helpers -----------------------------------------------------------------------------------
    def _js(self, body: str, arg: Any = None) -> Any:
        """Evaluate ``body`` as a function of (e2e, path, arg); e2e is window.__rfE2E."""
        return self.page.evaluate(f"([path, arg]) => {{ const e2e = window.__rfE2E; {body} }}", [self.name, arg])

    def _wait(self, body: str, arg: Any = None, timeout: float = 60.0, what: str = "condition") -> Any:
        fn = f"([path, arg]) => {{ const e2e = window.__rfE2E; if (!e2e) return false; {body} }}"
        try:
            return self.page.wait_for_function(
                fn, arg=[self.name, arg], timeout=timeout * 1000, polling=50
            ).json_value()
        except Exception as exc:
            state = self.state()
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}; frontend state: {state}") from exc

    def state(self) -> dict:
        try:
            return self._js("return e2e ? e2e.kernelState(path) : {noHelper: true};")
        except Exception as exc:
            return {"error": str(exc)}

    def kernel_property(self, name: str) -> Any:
        """A property of the frontend's kernel connection (e.g. "commsOverSubshells")."""
        return self._js(
            "const k = e2e.panel(path).sessionContext.session.kernel; return k ? k[arg] ?? null : null;", name
        )

    def screenshot(self, step: str) -> Path | None:
        return self.shots(step) if self.shots else None

    # -- open / kernel -----------------------------------------------------------------------------
    def open(
        self, nb: nbformat.NotebookNode | str | os.PathLike, name: str | None = None, timeout: float = 60.0
    ) -> str:
        """Copy ``nb`` into the server root, open it in the page and wait for an idle kernel. Returns its name."""
        self.name = self.server.put_notebook(nb, name)
        self.page.goto(self.server.doc_url(self.name, self.workspace), wait_until="domcontentloaded")
        self._wait(
            "return !!e2e.panel(path) && e2e.panel(path).context.isReady;", timeout=timeout, what="notebook panel"
        )
        self.wait_kernel_idle(timeout=timeout)
        return self.name

    def wait_kernel_idle(self, timeout: float = 60.0) -> None:
        """Wait until the session is ready, the kernel connected and reporting ``idle``."""
        self._wait(
            "const s = e2e.kernelState(path); return s.ready && s.connection === 'connected' && s.kernel === 'idle';",
            timeout=timeout,
            what="kernel idle",
        )

    # -- running -----------------------------------------------------------------------------------
    def run_cell(self, index: int) -> int:
        """Start running cell ``index`` (``notebook:run-cell``) and return at once with a ticket for ``wait_done``."""
        return self._js("return e2e.run(path, 'notebook:run-cell', arg);", index)

    def run_all(self) -> int:
        """Start ``notebook:run-all-cells`` and return at once with a ticket."""
        return self._js("return e2e.run(path, 'notebook:run-all-cells', null);")

    def run_status(self, ticket: int) -> str:
        """'pending' | 'ok' | 'failed' (a cell raised) | 'error: ...' (the command itself threw)."""
        return self._js("return e2e.runs[arg];", ticket)

    def wait_done(self, ticket: int | None = None, timeout: float = 60.0) -> str:
        """Wait until ``ticket`` (default: every run dispatched in this page) finished and the kernel is idle.

        Returns that run's status; for ``ticket=None``: "ok", or the first non-ok status of any run so far.
        """
        self._wait(
            "const s = e2e.kernelState(path);"
            "const done = arg === null ? e2e.pending() === 0 : e2e.runs[arg] !== 'pending';"
            "return done && s.kernel === 'idle';",
            ticket,
            timeout=timeout,
            what=f"run {ticket if ticket is not None else '(all)'} to finish",
        )
        if ticket is None:
            bad = self._js("return Object.values(e2e.runs).filter(v => v !== 'ok');")
            return "ok" if not bad else bad[0]
        return self.run_status(ticket)

    def run_cell_and_wait(self, index: int, timeout: float = 60.0) -> str:
        return self.wait_done(self.run_cell(index), timeout=timeout)

    # -- DOM ---------------------------------------------------------------------------------------
    def cell(self, index: int):
        """Locator of the cell node ``index`` (cells in DOM order inside the current notebook)."""
        return self.page.locator(".jp-NotebookPanel:visible .jp-Notebook .jp-Cell").nth(index)

    def output(self, index: int):
        return self.cell(index).locator(".jp-OutputArea")

    def cell_count(self) -> int:
        return self._js("return e2e.panel(path).content.widgets.length;")

    def execution_counts(self) -> list[int | None]:
        """Execution count of every cell as the frontend sees it (None: not run / markdown)."""
        return self._js("return e2e.panel(path).content.widgets.map(c => c.model.executionCount ?? null);")

    def scroll_to_cell(self, index: int) -> None:
        """Make cell ``index`` the active cell and scroll it into view (handy before a screenshot)."""
        self._js("const p = e2e.panel(path); p.content.activeCellIndex = arg; return null;", index)
        self.cell(index).scroll_into_view_if_needed()

    # -- save / read -------------------------------------------------------------------------------
    def save(self, timeout: float = 30.0) -> nbformat.NotebookNode:
        """``docmanager:save`` (awaited), wait until not dirty, then return the .ipynb as read from disk."""
        self._js(
            "const app = window.jupyterapp; const p = e2e.panel(path);"
            "if (app.shell.currentWidget !== p) app.shell.activateById(p.id);"
            "return app.commands.execute('docmanager:save').then(() => true);"
        )
        self._wait("const p = e2e.panel(path); return !p.context.model.dirty;", timeout=timeout, what="save")
        return self.read_saved()

    def read_saved(self) -> nbformat.NotebookNode:
        return self.server.read_notebook(self.name)


def outputs_text(nb: nbformat.NotebookNode, index: int) -> str:
    """All stream text + text/plain of code cell ``index`` in a saved notebook."""
    parts = []
    for o in nb.cells[index].get("outputs", []):
        if o.output_type == "stream":
            parts.append(o.text)
        elif "data" in o:
            parts.append(o.data.get("text/plain", ""))
        elif o.output_type == "error":
            parts.append("\n".join(o.traceback))
    return "".join(parts)
