"""One OpenMP team at full speed: the idle worker pool of the thread that starts or waits on training is released.

    release_thread_pool()   # on the caller's thread, before the scheduler thread trains

PyTorch's CPU kernels fork and join an OpenMP team per op. With GNU OpenMP (libgomp, what the Linux wheels ship)
every thread that has run a parallel region keeps its own pool of worker threads, and while the process holds more
such workers than CPUs, every pool's workers stop spinning between two forks and sleep instead (libgomp's
throttled spin), so each op pays a futex wake-up. The scheduler thread's team is then one pool too many whenever
the notebook's main thread has run a parallel op before (a model built or evaluated in a cell, a plain-TRL
baseline): measured on the demo model with 2 CPUs, the scheduler thread's training steps ran at 1.4 CPUs instead of
2.0 and ~25% slower than the same steps on the main thread, while the main thread sat idle in `wait()`.

The fix is to drop the caller's pool when training starts and when the caller starts waiting (OpenMP 5's
`omp_pause_resource_all`, soft; libgomp frees only the calling thread's pool, never another thread's team): the
scheduler thread's team is then the only one, as plain TRL's is. A parallel op on the main thread during training
builds the pool again (and costs the same contention). Other OpenMP runtimes (LLVM's libomp, Intel's) do not
throttle this way and are left alone, as is everything where libgomp is not loaded.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

logger = logging.getLogger(__name__)

__all__ = ["release_thread_pool"]

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: omp_pause_soft


@functools.cache
def _libgomps() -> tuple[ctypes.CDLL, ...]:
    """Every GNU OpenMP runtime this process has loaded (torch's bundled copy; scikit-learn, xgboost and others may
    bring their own), each with OpenMP 5's pause routine."""
    try:
        with open(f"/proc/{os.getpid()}/maps") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "/libgomp" in line}
    except OSError:  # not Linux: no libgomp
        return ()
    found = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same handle, nothing runs
        except OSError:  # e.g. a "(deleted)" mapping
            continue
        if hasattr(lib, "omp_pause_resource_all"):
            found.append(lib)
    return tuple(found)


def release_thread_pool() -> bool:
    """Free the calling thread's idle OpenMP workers in every libgomp loaded (each call frees only this thread's
    pool, never another thread's team). Returns whether any runtime did it; never raises.

    A Python thread is never inside an OpenMP parallel region, where libgomp would refuse. The pool is rebuilt by
    the next parallel op on this thread."""
    import torch  # noqa: F401  # libgomp is loaded with torch: before it, there is no pool to free

    released = False
    for lib in _libgomps():
        try:
            released = lib.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0 or released
        except Exception:  # pragma: no cover - a runtime without a working pause: leave it as it is
            logger.debug("omp_pause_resource_all failed", exc_info=True)
    return released
