"""When a failed send is tried again, and when a destination is left alone: pure policy.

Backoff is exponential with jitter (half fixed, half random), so that the jobs that failed
together during an outage do not all come back in the same second.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.config import BreakerConfig, RetryPolicy


def next_attempt(
    policy: RetryPolicy, attempts: int, created_at: datetime, now: datetime,
    rand: Callable[[], float] = random.random,
) -> datetime | None:
    """``attempts`` counts the failure just recorded; None: give up (dead letter)."""
    if attempts >= policy.max_attempts or now - created_at > timedelta(hours=policy.max_age_h):
        return None
    delay = min(policy.max_delay_s, policy.first_delay_s * 2 ** (attempts - 1))
    return now + timedelta(seconds=delay / 2 + rand() * delay / 2)


@dataclass(frozen=True)
class BreakerChange:
    state: str  # closed | open
    failures: int
    error: str | None


class Breaker:
    """Closed: send. Open after ``failures_to_open`` failures in a row: only probe, every
    ``probe_interval_s``; the first probe that answers closes it. Thread-safe: a destination's
    senders share one."""

    def __init__(self, config: BreakerConfig, now: Callable[[], float]) -> None:
        self._config = config
        self._now = now
        self._lock = threading.Lock()
        self._failures = 0
        self._open = False
        self._next_probe = 0.0

    @property
    def is_open(self) -> bool:
        return self._open

    def failed(self, error: str) -> BreakerChange | None:
        with self._lock:
            self._failures += 1
            if self._open or self._failures < self._config.failures_to_open:
                return None
            self._open = True
            self._next_probe = self._now() + self._config.probe_interval_s
            return BreakerChange("open", self._failures, error)

    def succeeded(self) -> BreakerChange | None:
        with self._lock:
            was_open = self._open
            self._failures = 0
            self._open = False
            return BreakerChange("closed", 0, None) if was_open else None

    def probe_due(self) -> bool:
        """True for one caller per interval: only one sender probes."""
        with self._lock:
            if not self._open or self._now() < self._next_probe:
                return False
            self._next_probe = self._now() + self._config.probe_interval_s
            return True
