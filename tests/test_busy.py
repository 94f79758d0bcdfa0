"""The burst hold's reading of the receiver: a burst holds forwarding back, one stalled C-STORE
at moderate load does not."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from gateway.busy import BurstHold, ReceiverLoad


def _observe(hold: BurstHold, seconds: float) -> list[bool]:
    """saturated() every 10 ms for ``seconds``."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(hold.saturated())
        time.sleep(0.01)
    return seen


def _paced(load: ReceiverLoad, stop: threading.Event, every_s: float, share: list[float]) -> None:
    last = time.monotonic()
    while not stop.wait(every_s):
        now = time.monotonic()
        load.add(share[0] * (now - last))  # exact whatever the scheduler does to the wait
        last = now


def _receiving(
    every_s: float, share: list[float]
) -> tuple[ReceiverLoad, BurstHold, threading.Event, threading.Thread]:
    """A receiver ending a C-STORE every ``every_s``, busy ``share[0]`` of the time (changed as
    it runs), and a hold reading it."""
    load, stop = ReceiverLoad(), threading.Event()
    hold = BurstHold(load, hold_s=5.0, clock=lambda: datetime.now(UTC))
    hold.start()
    pacer = threading.Thread(target=_paced, args=(load, stop, every_s, share), daemon=True)
    pacer.start()
    return load, hold, stop, pacer


def test_one_stalled_c_store_at_moderate_load_is_not_a_burst() -> None:
    load, hold, stop, _ = _receiving(0.06, [0.17])
    try:
        time.sleep(0.5)
        load.add(0.35)  # one handler that took 350 ms: more than a whole window's worth
        seen = _observe(hold, 0.6)
    finally:
        stop.set()
        hold.stop()
    assert not any(seen), f"saturated in {sum(seen)} of {len(seen)} looks after one stall"


def test_a_sustained_burst_is_saturated_and_its_end_releases_within_a_fraction_of_a_second() -> None:
    _, hold, stop, pacer = _receiving(0.005, [0.7])
    try:
        time.sleep(0.5)
        during = _observe(hold, 0.3)
        stop.set()
        pacer.join()
        ended = time.monotonic()
        while hold.saturated() and time.monotonic() - ended < 2.0:
            time.sleep(0.005)
        released_after = time.monotonic() - ended
    finally:
        stop.set()
        hold.stop()
    assert sum(during) >= 0.9 * len(during), f"saturated in {sum(during)} of {len(during)} looks"
    assert released_after < 0.3, f"still held {released_after:.2f} s after the last C-STORE"


def test_a_dip_of_one_window_inside_a_burst_does_not_release_it() -> None:
    share = [0.7]
    _, hold, stop, _ = _receiving(0.005, share)
    try:
        time.sleep(0.6)
        assert hold.saturated(), "a sustained burst did not read as saturated"
        share[0] = 0.35  # for a window: images still ending every 5 ms
        during_dip = _observe(hold, 0.2)
        share[0] = 0.7
        after = _observe(hold, 0.2)
    finally:
        stop.set()
        hold.stop()
    assert all(during_dip), f"released in {len(during_dip) - sum(during_dip)} looks of the dip"
    assert all(after)
