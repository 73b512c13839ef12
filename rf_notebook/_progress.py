"""One live progress line for `Experiment.wait()` outside a notebook (a script, `python -m rf_notebook.demo`, a
terminal IPython), where no panel shows how far the runs are:

    demo-sweep  41%|████▉       | chunks 7/16 · 4 training [00:37<00:53]

A tqdm bar over the optimizer steps still planned (a stopped or deleted run counts for what it did), with the chunks
done of total and the runs by status after it. tqdm computes elapsed time and ETA; it ships with transformers.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection
from typing import IO, Any

from rf_notebook.store import Store

__all__ = ["ProgressLine", "wanted"]

REFRESH_S = 0.5
_FORMAT = "{desc} {percentage:3.0f}%|{bar:12}| {postfix} [{elapsed}<{remaining}]"


def wanted(progress: bool | None, in_kernel: bool, stream: IO[str] | None = None) -> bool:
    """`progress=None` means: a line where a person watches a terminal (not in a kernel, stderr a TTY)."""
    if progress is not None:
        return bool(progress)
    stream = sys.stderr if stream is None else stream
    return not in_kernel and bool(getattr(stream, "isatty", lambda: False)())


class ProgressLine:
    """A tqdm line fed from the store; `wrap(step)` refreshes it while `step` waits."""

    def __init__(self, store: Store, name: str, run_ids: Callable[[], Collection[int]], file: IO[str] | None = None):
        from tqdm.auto import tqdm

        self.store, self.run_ids = store, run_ids
        done, total, runs = self._measure()
        # the terminal's size as the shell sees it (tqdm's own probe reads 0 x 0 on a pty without a size, e.g. under
        # `script` or some CI runners, and then hides the bar)
        size = shutil.get_terminal_size()
        desc = name if len(name) <= 24 else name[:23] + "…"
        self.bar = tqdm(
            total=total,
            initial=done,
            desc=desc,
            bar_format=self._format(runs),
            file=file,
            ncols=size.columns,
            nrows=size.lines,
        )

    def _measure(self) -> tuple[int, int, list[Any]]:
        ids = set(self.run_ids())
        runs = [r for r in self.store.runs() if r.run_id in ids]
        planned = [r.total_steps if r.status.is_live else r.step for r in runs]
        done = sum(min(r.step, p) for r, p in zip(runs, planned))
        return done, sum(planned), runs

    @staticmethod
    def _format(runs: list[Any]) -> str:
        chunks = sum(r.chunks_done for r in runs), sum(r.chunks_total for r in runs)
        counts = Counter(r.status.value for r in runs)
        by_status = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        text = f"chunks {chunks[0]}/{chunks[1]} · {by_status or 'no runs'}"
        return _FORMAT.replace("{postfix}", text.replace("{", "{{").replace("}", "}}"))

    def refresh(self) -> None:
        done, total, runs = self._measure()
        self.bar.total = max(total, 1)
        self.bar.bar_format = self._format(runs)
        if done >= self.bar.n:
            self.bar.update(done - self.bar.n)  # through update(), so tqdm's rate (and ETA) follows the steps
        else:
            self.bar.n = done
        self.bar.refresh()

    def wrap(self, step: Callable[[float | None], bool]) -> Callable[[float | None], bool]:
        """`step(seconds)` waiting in slices of REFRESH_S, with the line refreshed after each."""

        def waiting(seconds: float | None) -> bool:
            deadline = None if seconds is None else time.monotonic() + seconds
            while True:
                left = REFRESH_S if deadline is None else min(REFRESH_S, deadline - time.monotonic())
                finished = step(max(left, 0.0))
                self.refresh()
                if finished:
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return False

        return waiting

    def close(self) -> None:
        self.refresh()
        self.bar.close()

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
