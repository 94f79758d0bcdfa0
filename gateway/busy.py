"""How busy the receiver is, shared with the background stages' processes, so that they can
stand aside during a burst of C-STOREs.

Why: on a gateway's own machine (and more so when the destination, an Orthanc, runs there too)
every instance forwarded while a modality streams images takes CPU, disk and memory bandwidth
from the receiver. Priorities do not help: measured with ``scripts/bench --forward``, the forward
process and Orthanc at nice 19 slowed the receiver as much as at nice 0 (ingest 0.58 of ingest
alone either way); what costs the modality is the work happening at the same time at all. A
burst is short, a modality's wait is not free, and a copy at the archive a few seconds later
costs nobody: so while the receiver is saturated, forwarding holds each instance back, up to
``hold_s`` after it arrived. Under sustained load every instance leaves ``hold_s`` late and
forwarding still runs at full pace; under ordinary load (half the receiver's capacity and less)
next to nothing is held (measured below).

The remap stage's rewrites yield the same way, up to ``remap.max_defer_s``.

The receiver adds the seconds it spends in each C-STORE handler to a counter in shared memory; a
thread in the stage's process samples it every ``POLL_S`` and calls the receiver saturated when
its share of wall time is at least ``BUSY_SHARE`` in each of the last two ``WINDOW_S``: one C-STORE
that stalls for a few hundred ms (a busy disk, a descheduled VM) fills one window on its own, a
burst fills both. Once in a burst, the receiver stays saturated while the latest window alone is
``STAY_SHARE`` busy: a burst's share dips for a window now and then, and each dip let forwarding
in beside it (ingest 0.77 of ingest alone without this, measured). The share lags the end of a
burst by most of a window, so the receiver also counts as free once no C-STORE has ended for
``QUIET_GAPS`` times the window's usual gap between two (and at least ``QUIET_S``): a burst's last
instance releases the hold within about 60 ms, not 150.

The thresholds come from ``scripts/measure_busy.py`` (2026-12, this project's 2-core machines,
4 runs of 600 CT images of 512x512, other test suites running beside it, load average about 1):
storescu flat out (saturated, 121-165 images/s) and the same storescu through a proxy passing its
bytes at 1/2 and 1/3 of that rate. Share of one 200 ms window, and the smaller of two:

==========  =======================  ============================  =======================
load        one window p5 / p50      two-window min p50 / p95      held with 0.5 / 0.42
==========  =======================  ============================  =======================
saturated   0.44-0.60 / 0.61-0.65    0.58-0.63 / 0.62-0.69         0.89-1.00 of the time
half        0.27-0.31 / 0.30-0.39    0.29-0.37 / 0.34-0.44         0-0.05
third       0.18-0.24 / 0.21-0.27    0.20-0.27 / 0.24-0.29         0
==========  =======================  ============================  =======================

A receiver at half its capacity spends more of each image's time in the handler than a saturated
one (about 4.8 ms against 3.8), so half load reads well over half of saturation. ``BUSY_SHARE``
sits between the half load's 95th percentile of the two-window minimum (at most 0.44) and the
saturated median (at least 0.58); ``STAY_SHARE`` between the half load's median window (at most
0.39) and the saturated 5th percentile (at least 0.44). The previous values (0.4 and 0.3, chosen
by eye) held forwarding back at half load for up to 57% of a run: once in, a half load's windows
(median 0.30-0.39) never fell under 0.3. ``tests/busy_traces.json`` keeps one trace of each
load, which ``tests/test_busy.py`` replays.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Protocol

BUSY_SHARE = 0.5  # entering a burst: both windows (see the table above)
STAY_SHARE = 0.42  # staying in one: the latest window
WINDOW_S = 0.2
POLL_S = 0.05
QUIET_S = 0.05
QUIET_GAPS = 4.0
HELD_POLL_S = 0.01


class LoadReading(Protocol):
    """What a stage reads of the receiver (``ReceiverLoad``, or a test's stand-in)."""

    def seconds(self) -> float: ...

    def count(self) -> int: ...

    def last(self) -> float: ...


class Stopping(Protocol):
    """``threading.Event`` as ``BurstHold.wait`` uses it: a test passes one that advances its
    clock instead of sleeping."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class ReceiverLoad:
    """Created before the stages' processes fork; the receiver adds, the stages read.
    ``monotonic`` must be the clock the readers' ``BurstHold`` uses (``time.monotonic`` is one
    clock for all processes; a test passes its own).

    With several receiver processes (``dicom.workers``) each adds to its own ``slot`` (set with
    ``use_slot`` in the worker), so no two processes ever write one number; readers see the sums
    (and the latest end of any)."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic, slots: int = 1) -> None:
        context = multiprocessing.get_context("fork")
        self._seconds: Any = context.RawArray("d", slots)
        self._count: Any = context.RawArray("q", slots)
        self._last: Any = context.RawArray("d", slots)
        self._slot = 0
        self._monotonic = monotonic
        self._lock = threading.Lock()  # association threads add concurrently

    def use_slot(self, slot: int) -> None:
        """In receiver process ``slot`` of several, before it receives."""
        self._slot = slot

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seconds[self._slot] += seconds
            self._count[self._slot] += 1
            self._last[self._slot] = self._monotonic()

    def seconds(self) -> float:
        return float(sum(self._seconds))

    def count(self) -> int:
        return int(sum(self._count))

    def last(self) -> float:
        """When the last C-STORE handler ended, on the ``monotonic`` clock."""
        return float(max(self._last))


_Sample = tuple[float, float, int]  # monotonic time, handler seconds, handler count


def _share(before: _Sample, after: _Sample) -> float:
    return (after[1] - before[1]) / max(after[0] - before[0], 1e-6)


class BurstHold:
    """In a stage's process: ``wait`` returns once the receiver is not saturated, or once the
    oldest instance in hand has waited ``hold_s``. A thread calls ``sample`` every ``POLL_S``, so
    that the share is always read over a whole window, never over the first few milliseconds of
    one. Every clock is passed in (``clock`` for the instances' wall-clock arrival times,
    ``monotonic`` for the receiver's), so that tests drive it without sleeping."""

    def __init__(
        self,
        load: LoadReading,
        hold_s: float,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._hold = timedelta(seconds=hold_s)
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._in_burst = False
        self._samples: deque[_Sample] = deque(maxlen=2 * round(WINDOW_S / POLL_S) + 1)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._sample_every_poll, name="burst-hold",
                                        daemon=True)

    def start(self) -> None:
        if self._hold:
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def wait(self, oldest: datetime, stopping: Stopping) -> bool:
        """True when it held anything back."""
        held = False
        while (
            self._hold
            and not stopping.is_set()
            and self._clock() - oldest < self._hold
            and self.saturated()
        ):
            held = True
            stopping.wait(HELD_POLL_S)
        return held

    def saturated(self) -> bool:
        with self._lock:
            if len(self._samples) < (self._samples.maxlen or 0):
                return False  # not two whole windows yet (a stage that just started)
            first, middle, last = (
                self._samples[0], self._samples[len(self._samples) // 2], self._samples[-1])
            if self._in_burst:  # a dip of one window inside a burst does not end it
                busy = _share(middle, last) >= STAY_SHARE
            else:
                busy = min(_share(first, middle), _share(middle, last)) >= BUSY_SHARE
            (then, _, count_then), (now, _, count_now) = first, last
            usual_gap = (now - then) / max(count_now - count_then, 1)
            quiet = self._monotonic() - self._load.last() >= max(QUIET_S, QUIET_GAPS * usual_gap)
            self._in_burst = busy and not quiet
            return self._in_burst

    def sample(self) -> None:
        """Read the receiver's counter now (the thread does, every ``POLL_S``)."""
        with self._lock:
            self._samples.append((self._monotonic(), self._load.seconds(), self._load.count()))

    def _sample_every_poll(self) -> None:
        while not self._stopping.is_set():
            self.sample()
            self._stopping.wait(POLL_S)
