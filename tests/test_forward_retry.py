"""Retry policy and circuit breaker: pure functions of attempts and time, tested without sleeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.config import BreakerConfig, RetryPolicy
from gateway.forward.retry import Breaker, next_attempt

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(first_delay_s=2, max_delay_s=60, max_attempts=100, max_age_h=72)
    delays = []
    for attempts in range(1, 10):
        low = next_attempt(policy, attempts, T0, T0, rand=lambda: 0.0)
        high = next_attempt(policy, attempts, T0, T0, rand=lambda: 1.0)
        assert low is not None and high is not None
        delays.append(((low - T0).total_seconds(), (high - T0).total_seconds()))
    assert delays[:4] == [(1, 2), (2, 4), (4, 8), (8, 16)]
    assert delays[-1] == (30, 60)  # capped: half fixed, half random


def test_too_many_attempts_or_too_old_is_a_dead_letter() -> None:
    policy = RetryPolicy(first_delay_s=1, max_delay_s=10, max_attempts=5, max_age_h=1)
    assert next_attempt(policy, 4, T0, T0) is not None
    assert next_attempt(policy, 5, T0, T0) is None
    assert next_attempt(policy, 1, T0, T0 + timedelta(hours=1, seconds=1)) is None


def test_breaker_opens_after_failures_in_a_row_and_probes_once_per_interval() -> None:
    now = [100.0]
    breaker = Breaker(BreakerConfig(failures_to_open=3, probe_interval_s=5), lambda: now[0])
    assert breaker.failed("refused") is None
    assert breaker.succeeded() is None  # a success in between resets the count
    assert breaker.failed("refused") is None and breaker.failed("refused") is None
    change = breaker.failed("refused")
    assert change is not None and change.state == "open" and breaker.is_open
    assert breaker.failed("refused") is None  # already open: no second change
    assert not breaker.probe_due()
    now[0] += 5
    assert breaker.probe_due() and not breaker.probe_due()  # one prober per interval
    closed = breaker.succeeded()
    assert closed is not None and closed.state == "closed" and not breaker.is_open


def test_stow_answers_are_read_per_instance() -> None:
    """PS3.18 10.5.3: stored instances are in Referenced SOP Sequence, refused ones in Failed SOP
    Sequence with a reason; 0xA7xx (out of resources) may pass later, other reasons will not."""
    from pathlib import Path

    from gateway.forward.destinations.dicomweb import _per_instance
    from gateway.forward.outbox import Delivered, Failed, Outgoing

    def job(uid: str) -> Outgoing:
        return Outgoing(1, 1, Path("x.dcm"), "1.2", "1.2.840.10008.1.2.1", "1.3", "1.4", uid, 0, T0)

    def item(uid: str, reason: int | None = None) -> dict[str, object]:
        found: dict[str, object] = {"00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            found["00081197"] = {"vr": "US", "Value": [reason]}
        return found

    answer = {"00081199": {"vr": "SQ", "Value": [item("1.1")]},
              "00081198": {"vr": "SQ", "Value": [item("1.2", 0xA700), item("1.3", 0x0110)]}}
    results = _per_instance([job("1.1"), job("1.2"), job("1.3"), job("1.4")], answer,
                            unnamed_permanent=False)
    assert isinstance(results[0], Delivered)
    assert [(r.permanent, r.reason) for r in results[1:] if isinstance(r, Failed)] == [
        (False, "STOW-RS failure reason 0xA700"),
        (True, "STOW-RS failure reason 0x0110"),
        (False, "STOW-RS answer did not name this instance"),
    ]
    refused = _per_instance([job("1.1"), job("1.9")], answer, unnamed_permanent=True)
    assert isinstance(refused[0], Delivered) and isinstance(refused[1], Failed)
    assert refused[1].permanent  # a 400 that stored some parts: the rest were refused
