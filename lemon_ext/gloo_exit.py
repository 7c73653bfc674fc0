"""Keep torch's gloo worker threads from aborting a DDP process at exit.

What happens (gdb on the dev VM, torch 2.13.0+cpu, DDP over gloo on 2 processes): a
``pt_gloo_runloop`` thread of ProcessGroupGloo drops its reference to a finished allreduce only
after the caller's wait has returned. When that reference is the last one, ``~AsyncWork`` destroys
the ThreadLocalState captured with DDP's work, which holds a Python object, and takes the GIL to
decref it. If the main thread has reached interpreter finalization by then, ``take_gil`` ends the
worker with ``pthread_exit``, whose forced unwind crosses a noexcept frame: ``terminate called
without an active exception`` and SIGABRT, after the script has finished its work.
``destroy_process_group`` does not join those threads, so calling it does not help.

Measured on the dev VM: 3 of 12 bare 2-process DDP runs and 7-8 of 15 runs of docs/training.md's
accelerate block aborted (with and without ``accelerator.end_training()``); 0 of 16 when the main
thread slept 50 ms after the last collective; plain ``all_reduce`` without DDP 0 of 16. Upstream
tried an atexit ``destroy_process_group`` (pytorch/pytorch#179291, closed unmerged), which would not
cover this case.

The guard: an atexit hook (atexit runs before finalization, while other threads can still take the
GIL) that sleeps briefly with the GIL released when this process has gloo worker threads, so their
pending decrefs finish while the interpreter is alive. Processes without gloo pay nothing.
"""
from __future__ import annotations

import atexit
import os
import sys
import time

__all__ = ["GRACE_S", "gloo_worker_threads", "install"]

# 50 ms: the sleep measured to clear the race (0 of 16 aborts); a runloop thread that already
# finished its collective needs one GIL hand-off, microseconds, so this is a wide margin.
GRACE_S = 0.05
_GLOO_THREAD_NAMES = ("pt_gloo_runloop", "gloo_tcp_loop")
_installed = False


def gloo_worker_threads() -> int | None:
    """Number of this process's gloo worker threads, or None where /proc cannot tell (not Linux)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    count = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                count += f.read().strip() in _GLOO_THREAD_NAMES
        except OSError:
            continue  # the thread ended while we listed
    return count


def _grace_at_exit() -> None:
    if "torch.distributed" not in sys.modules:
        return  # no process group was ever made in this process
    threads = gloo_worker_threads()
    if threads is None or threads > 0:
        time.sleep(GRACE_S)


def install() -> None:
    """Register the exit grace once per process (``import lemon_ext`` does it)."""
    global _installed
    if not _installed:
        atexit.register(_grace_at_exit)
        _installed = True
