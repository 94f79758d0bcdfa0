"""Forking a receiver or stage process from the supervisor while its other threads run.

The supervisor forks at start, before any thread, but also later: a receiver process that died is
started again by a watch thread, and a configuration reload (``gateway.reload``) starts new
receiver and stage processes, while the HTTP server, the acceptor, the scheduler and the heartbeat
run. ``fork()`` copies only the calling thread: a lock another thread holds at that instant stays
held for ever in the child, and the child hangs on its first use of it.

The locks a child uses from the supervisor's memory, found by reading what a child runs:

- prometheus-client's: in multiprocess mode (``dicom.workers`` > 1) one process-wide lock guards
  every value (``values.MultiProcessValue``'s closure); each labelled metric has its own lock for
  its children (``labels()``). The supervisor increments metrics from several threads (the
  forward stage's counters, receiver restarts, reloads, job runs), and every receiver process
  increments them on each association. Measured: a child forked while another thread holds the
  values lock hangs on its first ``inc()`` for ever (``tests/test_forksafe.py``).
- logging's: CPython re-creates every handler's lock in the child and takes the module lock
  around ``fork()`` itself (``logging._at_fork_reinit``).
- SQLAlchemy's pools: never used in a child; each child disposes of the copied pools without
  closing the supervisor's connections (``Engine.dispose(close=False)``) and makes its own engines.
- ours: a child builds its own (``Receiver``, ``SlotAdmissions``, ``Spool``, engines); the
  counts shared with the supervisor (``WorkerBoard``, ``Doorbell``) take no lock by design, and
  ``ReceiverLoad``'s thread lock is taken by receiving threads only: in a receiver process, or in
  the supervisor of a single-process gateway, whose stage children only read it, lock-free.
- CPython's own (the import lock, ``threading``'s, ``concurrent.futures``' shutdown lock) are
  re-created in the child by CPython.

Why hold the locks around the fork (``os.register_at_fork``: take them before, release them after
in both processes), as CPython does for logging's module lock, rather than (b) a single-threaded
"zygote" forked at start, or (c) spawn/forkserver: taking the locks makes the fork wait the
microseconds another thread needs to finish its update, so the child gets the values in a
consistent state too (re-creating a lock in the child would not: a half-written mmap entry would
stay half-written). A zygote would need every reloaded configuration sent to it, and its
children would not be the supervisor's (no ``waitpid``, no exit codes for the watch threads); spawn
or forkserver would need everything a child is built from to be picklable (a test's injected free
space function, the shared-memory counts, the wake-up pipes) and cost an interpreter start (about
0.3 s here) per process. Every lock here is a leaf or taken in one order (a metric's lock, then
the values lock inside ``labels()``), and they are taken in that order, so no deadlock is added.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import values
from prometheus_client.metrics import MetricWrapperBase

# Objects whose metrics' locks are held around every fork; weak, so that a stopped gateway (a
# test's) is not kept alive by this list
_guarded: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_registered = False


def guard(metrics: object) -> None:
    """Hold the locks of every prometheus metric that is an attribute of ``metrics`` (and the
    multiprocess values lock) around every ``os.fork()`` of this process from now on."""
    global _registered
    with _lock:
        _guarded.add(metrics)
        if not _registered:
            os.register_at_fork(before=_acquire, after_in_parent=_release,
                                after_in_child=_release)
            _registered = True


def _metric_locks() -> Iterator[Any]:
    for owner in list(_guarded):
        for value in vars(owner).values():
            if isinstance(value, MetricWrapperBase) and hasattr(value, "_lock"):
                yield value._lock


def _values_lock() -> Any | None:
    """prometheus-client's process-wide lock of multiprocess mode, held in the closure of the
    value class's methods (``values.MultiProcessValue``); None in single-process mode."""
    cells = getattr(values.ValueClass.inc, "__closure__", None) or ()
    lock_type = type(threading.Lock())
    for cell in cells:
        if isinstance(cell.cell_contents, lock_type):
            return cell.cell_contents
    return None


_held: list[Any] = []


def _acquire() -> None:
    _lock.acquire()
    locks = list(_metric_locks())
    shared = _values_lock()
    if shared is not None:
        locks.append(shared)
    for lock in locks:
        lock.acquire()
    _held[:] = locks


def _release() -> None:
    locks, _held[:] = list(_held), []
    for lock in reversed(locks):
        lock.release()
    _lock.release()
