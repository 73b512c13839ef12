"""The live panel: an anywidget in the cell's output with every run's curves, a run table and IC-op buttons.

`Experiment.run_fit` shows it in a notebook; `exp.panel()` shows the same panel again in another cell. One panel
model per experiment; the protocol with the JavaScript side (js/src) is written down in js/README.md.

Threads: the panel is created and displayed on the kernel's main thread. One writer thread sends deltas (at most
5 a second, only when the store changed) and, when the experiment ends or pauses, writes the complete state into
the synced `snapshot` trait and refreshes the static HTML of every display, so a saved notebook shows the result.
Where no view ever asked for the state (nbclient, papermill, a terminal: nothing runs the widget's JavaScript),
that refresh replaces the widget by the static picture alone: nbconvert shows a widget view whenever the notebook
stores widget state, and offline (its widget script comes from a CDN) that view is blank.
Button clicks arrive as custom messages on the main thread; the handler validates them and submits the op to the
experiment's IC-op service (`control.ops.Control`, origin "panel"), the same path as the Python API and the
policies, and replies accepted / refused. It never touches a model.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anywidget
import traitlets

from rf_notebook import _kernel
from rf_notebook._feed import Feed
from rf_notebook.commands import OP_NAMES, RUN_OPS

if TYPE_CHECKING:
    from rf_notebook.control.ops import Control

__all__ = ["Panel"]

logger = logging.getLogger(__name__)

_STATIC = Path(__file__).parent / "static"
PUSH_INTERVAL_S = 0.2  # at most 5 deltas a second


def _default_mode() -> str:
    """Pull in Colab (pushes from a background thread stall there until another cell runs), push elsewhere."""
    forced = os.environ.get("RF_NOTEBOOK_PANEL_MODE")
    if forced in ("push", "pull"):
        return forced
    return "pull" if "google.colab" in sys.modules else "push"


def _headline_metrics(snapshot: dict[str, Any]) -> list[str] | None:
    """The two curves a static picture shows: the losses, or what RL / preference runs are judged by."""
    logged = {name for curves in snapshot.get("series", {}).values() for name in curves}
    for pair in (["reward", "eval_reward"], ["loss", "eval_rewards/accuracies"]):
        if pair[0] in logged and pair[1] in logged:
            return pair
    return None  # the renderer's default: loss and eval loss


class Panel(anywidget.AnyWidget):
    """The panel of one experiment (its IC-op service `control`). Create it with `Experiment.panel()`."""

    _esm = _STATIC / "widget.js"
    _css = _STATIC / "widget.css"

    snapshot = traitlets.Dict().tag(sync=True)  # the complete state when the experiment last ended or paused
    mode = traitlets.Unicode("push").tag(sync=True)  # "push": deltas from the writer; "pull": the view polls

    def __init__(self, control: Control, mode: str | None = None):
        super().__init__(mode=mode or _default_mode())
        self._control, self._store = control, control.store
        self._feed = Feed(control.store, control.name)
        self.snapshot = self._feed.snapshot()
        self._cursor = self.snapshot["cursor"]  # metric rows pushed so far (push mode)
        self._display_ids: list[str] = []
        self._final_version: int | None = None  # store version of the last final snapshot written
        self._refreshed: dict[str, tuple[int, bool]] = {}  # display id -> (store version, static only) it shows
        self._viewed = False  # a view has sent a message: some front end runs the widget
        self._lock = threading.Lock()  # one writer at a time: the thread and the message handler
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self.on_msg(self._on_message)
        _kernel.route_to_subshell(self.comm)  # clicks are handled on their subshell while a cell blocks

    # -- showing -----------------------------------------------------------------------------------------------

    def show(self) -> None:
        """Display the panel in the current cell's output (main thread only)."""
        from IPython.display import display

        display_id = uuid.uuid4().hex
        self._display_ids.append(display_id)
        display(self, display_id=display_id)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """The widget, plus a static HTML rendering for places that run no widget JavaScript."""
        bundle = super()._repr_mimebundle_(**kwargs)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
        return {**data, **self._static_bundle()}, metadata

    def _static_bundle(self) -> dict[str, str]:
        from rf_notebook._static_html import render_html

        header = self.snapshot.get("header", {})
        text = f"rf_notebook panel: experiment {self._control.name!r}, {len(self.snapshot.get('runs', []))} runs"
        if header.get("done"):
            text += ", done"
        return {"text/plain": text, "text/html": render_html(self.snapshot, _headline_metrics(self.snapshot))}

    def training_started(self) -> None:
        """Called by `run_fit` (main thread): restart the clock and make sure the writer runs."""
        self._feed.restart_clock()
        self._final_version = None
        if self._writer is None or not self._writer.is_alive():
            self._stop.clear()
            self._writer = threading.Thread(target=self._write_loop, name="rf-notebook-panel", daemon=True)
            self._writer.start()

    def stop_writer(self) -> None:
        """Write the final state and stop the writer thread (`Experiment.end`)."""
        self._stop.set()
        if self._writer is not None and self._writer is not threading.current_thread():
            self._writer.join(timeout=5)
        self._write_final(ended=True)

    # -- the one writer ----------------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        sent_version = -1
        while not self._stop.wait(PUSH_INTERVAL_S):
            try:
                version = self._store.version
                if version == sent_version:
                    continue
                sent_version = version
                if self.mode == "push":
                    with self._lock:  # a sync answered meanwhile is cut at the same cursor
                        delta = self._feed.delta(since=self._cursor)
                        if self._feed.stale(self._cursor):  # rows the views show were dropped (also meanwhile)
                            state = self._feed.snapshot()
                            self._cursor = state["cursor"]
                            self._emit({"type": "snapshot", "state": state})
                        else:
                            self._cursor = delta["to"]
                            self._emit(delta)
                if self._feed.done():
                    self._write_final()
            except Exception:  # the panel must never take training down
                logger.exception("panel update failed")

    def _push(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._emit(message)

    def _emit(self, message: dict[str, Any]) -> None:
        """The one place a message leaves for the views (callers hold `_lock`)."""
        super().send(message)

    def _write_final(self, ended: bool = False) -> None:
        """The complete state into the synced trait, and the static HTML of every display refreshed. When the
        experiment `ended` and no front end ever showed the widget, the displays become the static picture alone
        (a live view that speaks up later gets the widget back)."""
        version = self._store.version
        if version != self._final_version:
            self._final_version = version
            with self._lock:
                self.snapshot = self._feed.snapshot()
        static = ended and not self._viewed
        for display_id in list(self._display_ids):
            if self._refreshed.get(display_id) == (version, static):
                continue
            self._refreshed[display_id] = (version, static)
            try:
                from IPython.display import update_display

                if static:
                    update_display(self._static_bundle(), display_id=display_id, raw=True)
                else:
                    update_display(self, display_id=display_id)
            except Exception:  # outside a kernel there is nothing to update
                logger.debug("could not refresh display %s", display_id, exc_info=True)

    # -- messages from the view --------------------------------------------------------------------------------

    def _on_message(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if not isinstance(content, dict):
            return
        if not self._viewed:
            self._viewed = True
            if any(static for _, static in self._refreshed.values()):  # shown static too early: the widget again
                self._write_final()
        kind, request_id = content.get("type"), content.get("id")
        if kind == "sync":
            with self._lock:  # in push mode, cut where the writer's next delta starts: no gap, no overlap
                until = self._cursor if self.mode == "push" else None
                self._emit({"type": "snapshot", "id": request_id, "state": self._feed.snapshot(until=until)})
        elif kind == "pull":
            since = content.get("since")
            delta = self._feed.delta(since=since) if isinstance(since, int) and not isinstance(since, bool) else None
            if delta is not None and 0 <= since and not self._feed.stale(since):  # stale read after: none missed
                self._push({**delta, "id": request_id})
            else:
                self._push({"type": "snapshot", "id": request_id, "state": self._feed.snapshot()})
            if self._feed.done():
                self._write_final()
        elif kind == "op":
            self._push({"type": "reply", "id": request_id, **self.handle_op(content)})

    def handle_op(self, request: dict[str, Any]) -> dict[str, Any]:
        """Validate and enqueue one op from the view; the answer says accepted or refused, and why."""
        control = self._control
        op, run_id = request.get("op"), request.get("run_id")
        try:
            if op == "stop_all":
                op_ids = control.stop_all(origin="panel")
                return {"ok": True, "message": f"stopping {len(op_ids)} runs", "op_ids": op_ids}
            if isinstance(run_id, bool) or not isinstance(run_id, int):
                raise ValueError(f"run_id is {run_id!r}, but must be an int")
            if op in RUN_OPS:
                return {"ok": True, "op_id": control.submit(op, run_id, origin="panel")}
            if op == "clone_modify":
                overrides, warm_start = request.get("overrides", {}), request.get("warm_start", False)
                if not isinstance(overrides, dict):
                    raise ValueError(f"overrides is {overrides!r}, but must be an object of field name -> value")
                if not isinstance(warm_start, bool):
                    raise ValueError(f"warm_start is {warm_start!r}, but must be true or false")
                new_id = control.clone_modify(run_id, overrides, warm_start, origin="panel")[1]
                return {"ok": True, "run_id": new_id}
            raise ValueError(f"unknown op {op!r}; expected {', '.join(OP_NAMES)} or stop_all")
        except (KeyError, TypeError, ValueError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            return {"ok": False, "message": str(message)}
