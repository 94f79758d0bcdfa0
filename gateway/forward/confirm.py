"""Proof of delivery: a study is confirmed at a destination only once the destination is asked and
holds every instance that was forwarded to it.

A study is checked once it is stable: nothing left to send to that destination and no instance
received for ``stable_after_s``. What the destination lacks is queued again at once; what it holds
moves to ``confirmed`` with its time, which is what retention waits for. What it still lacks after
``max_verify_misses`` verifications goes to the dead letters, counted and logged: a destination
that stores under other UIDs, or drops what it stores, would otherwise get the instance again
every round, forever.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from gateway.errors import GatewayError
from gateway.forward.counters import ForwardCounters
from gateway.forward.destinations.base import Destination
from gateway.forward.outbox import Outbox

log = logging.getLogger(__name__)


class Confirmer:
    def __init__(
        self,
        destinations: list[Destination],
        outbox: Outbox,
        stable_after_s: float,
        counters: ForwardCounters,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        unavailable: Callable[[str], bool] = lambda name: False,
        max_verify_misses: int = 3,
    ) -> None:
        self._max_misses = max_verify_misses
        self._unavailable = unavailable
        self._destinations = destinations
        self._outbox = outbox
        self._quiet = timedelta(seconds=stable_after_s)
        self._counters = counters
        self._clock = clock

    def run_once(self) -> int:
        """Check every stable study once; returns how many instances were confirmed."""
        confirmed = 0
        for destination in self._destinations:
            if self._unavailable(destination.name):
                continue  # its breaker is open: the senders' probe says when it is back
            for study in self._outbox.stable_studies(destination.name, self._quiet):
                try:
                    confirmed += self._check(destination, study)
                except GatewayError as exc:
                    log.info("verify at %s failed, will try again: %s", destination.name, exc)
                    break
        return confirmed

    def _check(self, destination: Destination, study: str) -> int:
        sent = self._outbox.forwarded(destination.name, study)
        if not sent:
            return 0
        held = destination.holds(sent[0].study_uid, sent)
        present = [s for s in sent if s.sop_uid in held]
        missing = [s for s in sent if s.sop_uid not in held]
        gave_up = self._outbox.confirm(present, missing, destination.name, self._max_misses)
        now = self._clock()
        self._counters.confirmed(destination.name,
                                 [(now - s.created_at).total_seconds() for s in present])
        again = len(missing) - len(gave_up)
        if again:
            self._counters.requeued(destination.name, again)
            log.warning("verify at %s: study %s lacks %d of %d forwarded instances; sending again",
                        destination.name, study, again, len(sent))
        if gave_up:
            self._counters.verify_gave_up(destination.name, len(gave_up))
            for s in gave_up:
                log.warning("verify at %s: instance %s still missing after %d verifications; "
                            "dead-lettered, not sent again (does the destination change UIDs?)",
                            destination.name, s.sop_uid, self._max_misses)
        return len(present)
