"""The Jupyter kernel around an experiment: whether there is one, and keeping the panel's buttons alive while a
cell blocks (Run All reaches `exp.wait()` while training runs).

ipykernel 7 reads every shell message on a thread of its own and hands it to the main thread, or to the thread of
a kernel subshell when the message names one. Two ways keep a click from waiting behind a blocked cell:

- Subshells. JupyterLab >= 4.4 and Notebook >= 7.4 send widget messages on a subshell (their setting
  "commsOverSubshells", on by default). ipykernel 7.4 then sends a comm's messages to the shell of the last message
  that comm sent, which for a panel shown from a cell (and fed by a writer thread) is the main shell, the very one
  the blocked cell holds. `route_to_subshell(comm)` keeps the front end's choice, so the click is handled on the
  subshell's thread while the main thread waits. The panel's handler only validates, enqueues and replies under
  its own lock, so any thread may run it.
- A serving wait. Where clicks reach the main shell (VS Code, Colab, subshells switched off), `wait` drains the
  main shell's queue every 50 ms from inside the blocking call: comm messages are handled there, every other
  message (the next cells' execute requests) is put back, in order, when the wait returns or is interrupted.
  ipykernel 7 (the shell channel thread's inproc stream to the main thread) and ipykernel 6 (Colab's kernel: the
  shell stream on the main thread and the kernel's message queue) each get their own small server.

Both reach into ipykernel's internals (read against 7.4 and 6.29: the streams, `dispatch_shell`, the comm handler,
`Comm._reply_subshell_for`); where those are missing this module does nothing and the wait is a plain blocking one.
We do not use jupyter-ui-poll (the same technique): it replays the deferred cells itself after the blocked one and
swaps ipykernel 7's main-thread asyncio lock for a null context, while here the kernel gets its own messages back,
in order, and runs them as it would have.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["in_kernel", "route_to_subshell", "serves_while_blocked", "wait"]

SERVE_INTERVAL_S = 0.05


def kernel() -> Any:
    """The running ipykernel kernel, or None (a script, plain IPython)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None)


def in_kernel() -> bool:
    """True inside a Jupyter kernel (where a widget can be shown), False in scripts and plain IPython."""
    return kernel() is not None


def route_to_subshell(comm: Any) -> None:
    """Have the kernel handle `comm`'s incoming messages on the subshell the front end sent them on."""
    if callable(getattr(comm, "_reply_subshell_for", None)):
        comm._reply_subshell_for = lambda data, default: default


def serves_while_blocked() -> bool:
    """Whether `wait`, called here (a kernel's main thread), serves the panel's clicks while it blocks."""
    return _Server.here() is not None


def wait(step: Callable[[float], bool], timeout: float | None) -> bool:
    """Call `step(seconds)` (wait at most that long; True once done) until it is done or `timeout` ran out, serving
    the panel's messages in between when this is a kernel's main thread. Returns whether it is done."""
    server = _Server.here()
    if server is None:
        return step(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    with server:
        while True:
            server.serve()
            left = SERVE_INTERVAL_S if deadline is None else min(SERVE_INTERVAL_S, deadline - time.monotonic())
            if step(max(left, 0.0)):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False


class _Server:
    """Handles the comm messages waiting for a blocked main thread; defers the rest (see the module docstring)."""

    def __init__(self, kernel: Any, stream: Any):
        self.kernel, self.stream = kernel, stream
        self.deferred: list[Any] = []

    @classmethod
    def here(cls) -> _Server | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        k = kernel()
        if k is None:
            return None
        for kind in (_Server7, _Server6):
            stream = kind.stream_of(k)
            if stream is not None:
                return kind(k, stream)
        return None  # an ipykernel whose internals moved: a plain wait

    def __enter__(self) -> _Server:
        self.callback, self.copy = self.stream._recv_callback, self.stream._recv_copy
        self.parent = self._current_parent()
        return self

    def serve(self) -> None:
        import zmq

        try:  # (an interrupt anywhere in here still leaves the kernel's own callback installed)
            self.stream.on_recv(self._take, copy=self.copy)
            self.stream.flush(zmq.POLLIN)
        finally:
            self.stream.on_recv(self.callback, copy=self.copy)

    def _take(self, frames: Any) -> None:
        k = self.kernel
        try:
            _, rest = k.session.feed_identities(frames, copy=False)
            msg_type = k.session.deserialize(rest, content=False, copy=False)["header"]["msg_type"]
        except Exception:  # not ours to judge: the kernel reports it when it gets it back
            msg_type = None
        except BaseException:  # an interrupt: the message is the kernel's again, not lost
            self.deferred.append(frames)
            raise
        if msg_type != "comm_msg":
            self.deferred.append(frames)
            return
        try:
            self._handle_comm(frames)
        except Exception:
            logger.exception("handling a panel message while waiting")
        finally:
            self._restore_parent()  # what the blocked cell prints stays in its own output

    def __exit__(self, *exc: Any) -> None:
        self.stream.on_recv(self.callback, copy=self.copy)
        interrupted = None
        while self.deferred:  # first in, first out, ahead of anything newer; an interrupt here must not lose one
            try:
                self._give_back(self.deferred[0])
                self.deferred.pop(0)
            except KeyboardInterrupt as exc:  # finish handing them back first (quick: no waiting in here)
                interrupted = exc
        self._restore_parent()
        if interrupted is not None:
            raise interrupted

    # -- what differs between kernel generations -------------------------------------------------------------------

    @staticmethod
    def stream_of(k: Any) -> Any:
        raise NotImplementedError

    def _current_parent(self) -> Any:
        raise NotImplementedError

    def _restore_parent(self) -> None:
        raise NotImplementedError

    def _handle_comm(self, frames: Any) -> None:
        raise NotImplementedError

    def _give_back(self, frames: Any) -> None:
        raise NotImplementedError


class _Server7(_Server):
    """ipykernel 7: the shell channel thread forwards main-shell messages to the main thread over an inproc stream."""

    @staticmethod
    def stream_of(k: Any) -> Any:
        try:
            stream = k.shell_channel_thread.manager._shell_channel_to_main.to_stream
            k.dispatch_shell, k.session.feed_identities, k.set_parent, k._get_shell_context_var  # noqa: B018
        except AttributeError:
            return None
        return stream

    def _current_parent(self) -> Any:
        return self.kernel._get_shell_context_var(self.kernel._shell_parent_ident), self.kernel.get_parent()

    def _restore_parent(self) -> None:
        self.kernel.set_parent(*self.parent, channel="shell")

    def _handle_comm(self, frames: Any) -> None:
        # concurrent: as ipykernel itself handles comms during a running async cell (no busy/idle of its own, no
        # pre/post handler hooks, which would swap the kernel's saved SIGINT handler under the blocked cell)
        handling = self.kernel.dispatch_shell(frames, subshell_id=None, concurrent=True)
        try:
            handling.send(None)  # the panel's handler never awaits: it runs to the end here
        except StopIteration:
            pass
        else:
            handling.close()
            logger.warning("a comm message handler awaited while a cell was blocked; its rest was dropped")

    def _give_back(self, frames: Any) -> None:
        self.stream._run_callback(self.callback, frames)


class _Server6(_Server):
    """ipykernel 6 (Colab's kernel): the main thread reads the shell stream into the kernel's message queue, whose
    `dispatch_shell` coroutine would first wait for the control thread; a comm message goes straight to the
    kernel's comm handler instead, and a deferred message back into the queue, behind those already there."""

    @staticmethod
    def stream_of(k: Any) -> Any:
        try:
            stream, handler = k.shell_stream, k.shell_handlers["comm_msg"]
            k.msg_queue.put_nowait, k._message_counter, k._parent_ident, k.get_parent  # noqa: B018
            stream._recv_callback  # noqa: B018
        except (AttributeError, KeyError):
            return None
        return stream if callable(handler) else None

    def _current_parent(self) -> Any:
        return self.kernel._parent_ident.get("shell"), self.kernel.get_parent("shell")

    def _restore_parent(self) -> None:
        _flush_output()  # ipykernel 6's output streams follow the one kernel-wide parent: flush under each
        self.kernel.set_parent(*self.parent, channel="shell")

    def _handle_comm(self, frames: Any) -> None:
        k = self.kernel
        idents, rest = k.session.feed_identities(frames, copy=False)
        msg = k.session.deserialize(rest, content=True, copy=False)
        _flush_output()  # what the blocked cell printed so far goes out under that cell
        k.set_parent(idents, msg, channel="shell")
        k.shell_handlers["comm_msg"](self.stream, idents, msg)

    def _give_back(self, frames: Any) -> None:
        k = self.kernel
        k.msg_queue.put_nowait((next(k._message_counter), k.dispatch_shell, (frames,)))


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or odd stream: nothing to keep
            pass
