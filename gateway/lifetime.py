"""Worker processes end with the gateway, however it ends.

A gateway killed with SIGKILL runs no cleanup; without this its forward process would keep
sending, and its rewrite workers (children of multiprocessing's fork server, which waits for them)
would stay behind forever, holding files open.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading

CHECK_S = 1.0
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def die_with_parent() -> None:
    """For a direct child: the kernel kills it when its parent ends (Linux); elsewhere, poll."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
            return
    except (OSError, AttributeError):
        pass
    exit_when_gone(os.getppid())


def name_process(name: str) -> None:
    """The name ``top``, ``ps -o comm`` and ``/proc/PID/comm`` show (Linux, 15 bytes): tells a
    receiver process from the forward stage at a glance, and lets ``scripts/bench_parallel.py``
    split the CPU by role. Nothing happens elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def exit_when_gone(pid: int) -> None:
    """For any process: exit as soon as process ``pid`` no longer exists (checked every
    second), e.g. a pool worker whose parent is the fork server rather than the gateway."""

    def watch() -> None:
        while True:
            threading.Event().wait(CHECK_S)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass  # it exists, under another user: still alive

    threading.Thread(target=watch, name="exit-when-gone", daemon=True).start()
