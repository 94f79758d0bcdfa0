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
nothing is held.

The remap stage's rewrites yield the same way, up to ``remap.max_defer_s``.

The receiver adds the seconds it spends in each C-STORE handler to a counter in shared memory; a
thread in the stage's process samples it every ``POLL_S`` and calls the receiver saturated when
its share of wall time is at least ``BUSY_SHARE`` in each of the last two ``WINDOW_S``: one C-STORE
that stalls for a few hundred ms (a busy disk, a descheduled VM: seen at 0.9 and 1.5 in one
window of a paced run) fills one window on its own, a burst fills both. Once in a burst, the
receiver stays saturated while the latest window alone is ``STAY_SHARE`` busy: a burst's share
dips below 0.4 for a window now and then, and each dip let forwarding in beside it (ingest 0.77
of ingest alone without this, measured). A saturated receiver measures about 0.6-0.7 here (the
rest is the network and the sender's turnaround); a third of its capacity 0.1-0.3. The share
lags the end of a burst by most of a window, so the receiver also counts as free once no C-STORE
has ended for ``QUIET_GAPS`` times the window's usual gap between two (and at least
``QUIET_S``): a burst's last instance releases the hold within about 60 ms, not 150.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

BUSY_SHARE = 0.4
STAY_SHARE = 0.3  # once in a burst, the latest window alone, and a little less of it
WINDOW_S = 0.2
POLL_S = 0.05
QUIET_S = 0.05
QUIET_GAPS = 4.0
HELD_POLL_S = 0.01


class ReceiverLoad:
    """Created before the stages' processes fork; the receiver adds, the stages read."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self._seconds: Any = context.RawValue("d", 0.0)
        self._count: Any = context.RawValue("q", 0)
        self._last: Any = context.RawValue("d", 0.0)  # time.monotonic(): one clock for all processes
        self._lock = threading.Lock()  # association threads add concurrently

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seconds.value += seconds
            self._count.value += 1
            self._last.value = time.monotonic()

    def seconds(self) -> float:
        return float(self._seconds.value)

    def count(self) -> int:
        return int(self._count.value)

    def last(self) -> float:
        """When the last C-STORE handler ended, on ``time.monotonic``'s clock."""
        return float(self._last.value)


_Sample = tuple[float, float, int]  # monotonic time, handler seconds, handler count


def _share(before: _Sample, after: _Sample) -> float:
    return (after[1] - before[1]) / max(after[0] - before[0], 1e-6)


class BurstHold:
    """In a stage's process: ``wait`` returns once the receiver is not saturated, or once the
    oldest instance in hand has waited ``hold_s``. A thread samples the receiver's counter every
    ``POLL_S``, so that the share is always read over a whole window, never over the first few
    milliseconds of one."""

    def __init__(
        self,
        load: ReceiverLoad,
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
        self._thread = threading.Thread(target=self._sample, name="burst-hold", daemon=True)

    def start(self) -> None:
        if self._hold:
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def wait(self, oldest: datetime, stopping: threading.Event) -> bool:
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
            if len(self._samples) < 3:
                return False
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

    def _sample(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                self._samples.append(
                    (self._monotonic(), self._load.seconds(), self._load.count()))
            self._stopping.wait(POLL_S)
