"""The burst hold's reading of the receiver: a burst holds forwarding back, one stalled C-STORE
at moderate load does not."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from gateway.busy import BurstHold, ReceiverLoad
from tests.conftest import PacedReceiver


def _observe(hold: BurstHold, seconds: float) -> list[bool]:
    """saturated() every 10 ms for ``seconds``."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(hold.saturated())
        time.sleep(0.01)
    return seen


def _hold(load: ReceiverLoad) -> BurstHold:
    hold = BurstHold(load, hold_s=5.0, clock=lambda: datetime.now(UTC))
    hold.start()
    return hold


def test_one_stalled_c_store_at_moderate_load_is_not_a_burst() -> None:
    load = ReceiverLoad()
    hold = _hold(load)
    try:
        with PacedReceiver(load, 0.17, every_s=0.06):
            time.sleep(0.5)
            load.add(0.35)  # one handler that took 350 ms: more than a whole window's worth
            seen = _observe(hold, 0.6)
    finally:
        hold.stop()
    assert not any(seen), f"saturated in {sum(seen)} of {len(seen)} looks after one stall"


def test_a_sustained_burst_is_saturated_and_its_end_releases_within_a_fraction_of_a_second() -> None:
    load = ReceiverLoad()
    hold = _hold(load)
    try:
        with PacedReceiver(load, 0.7) as receiver:
            time.sleep(0.5)
            during = _observe(hold, 0.3)
            receiver.stop()
            ended = time.monotonic()
            while hold.saturated() and time.monotonic() - ended < 2.0:
                time.sleep(0.005)
            released_after = time.monotonic() - ended
    finally:
        hold.stop()
    assert sum(during) >= 0.9 * len(during), f"saturated in {sum(during)} of {len(during)} looks"
    assert released_after < 0.3, f"still held {released_after:.2f} s after the last C-STORE"


def test_a_dip_of_one_window_inside_a_burst_does_not_release_it() -> None:
    load = ReceiverLoad()
    hold = _hold(load)
    try:
        with PacedReceiver(load, 0.7) as receiver:
            time.sleep(0.6)
            assert hold.saturated(), "a sustained burst did not read as saturated"
            receiver.share = 0.35  # for a window: images still ending every 5 ms
            during_dip = _observe(hold, 0.2)
            receiver.share = 0.7
            after = _observe(hold, 0.2)
    finally:
        hold.stop()
    assert all(during_dip), f"released in {len(during_dip) - sum(during_dip)} looks of the dip"
    assert all(after)
