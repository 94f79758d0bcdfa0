"""Senders: per destination, ``concurrency`` threads that drain the outbox.

Each loop: when the breaker is open, probe now and then and send nothing; otherwise claim a batch
(one study's oldest ready jobs), hold it while a burst saturates the receiver (``gateway.busy``),
send it over one association or HTTP session, settle the results. The C-STORE handler only wakes
the senders (``notify``); it never waits on a destination.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from gateway.busy import BurstHold
from gateway.config import ForwardConfig
from gateway.errors import GatewayError, RetriableError
from gateway.forward.counters import ForwardCounters
from gateway.forward.destinations.base import Destination
from gateway.forward.outbox import Delivered, Failed, Outbox, Outgoing
from gateway.forward.retry import Breaker, BreakerChange, next_attempt

log = logging.getLogger(__name__)
IDLE_WAIT_S = 1.0


class DestinationSenders:
    def __init__(
        self,
        destination: Destination,
        concurrency: int,
        batch_size: int,
        config: ForwardConfig,
        outbox: Outbox,
        counters: ForwardCounters,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        hold: BurstHold | None = None,
        drained: Callable[[], None] = lambda: None,
    ) -> None:
        self.destination = destination
        self._hold = hold
        self._drained = drained
        self._sent_since_drained = False  # threads race on it harmlessly: at worst a spare check
        self.breaker = Breaker(config.breaker, time.monotonic)
        self._concurrency = concurrency
        self._batch_size = batch_size
        self._config = config
        self._outbox = outbox
        self._counters = counters
        self._clock = clock
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        # A new process starts with its breaker closed: say so where `gateway queue` and the
        # metrics read it, or a breaker open when the last process stopped would show open
        # until the next change.
        self._outbox.save_breaker(self.destination.name, "closed", 0, None)
        self._counters.breaker(self.destination.name, False)
        for n in range(self._concurrency):
            thread = threading.Thread(
                target=self._run, name=f"forward-{self.destination.name}-{n}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the batches in flight (bounded by the destination's timeouts), then return;
        a batch cut short is queued again at the next start."""
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.destination.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                worked = self._step()
            except Exception:  # a bug or the database: keep the sender alive, say so, back off
                log.exception("forward to %s: unexpected error", self.destination.name)
                worked = False
            if not worked:
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()

    def _step(self) -> bool:
        """One round; False when there was nothing to do (the loop then waits)."""
        if self.breaker.is_open:
            if self.breaker.probe_due():
                self._probe()
            return False
        batch = self._outbox.claim(self.destination.name, self._batch_size)
        if not batch:
            if self._sent_since_drained:  # once per drain: an idle sender looks every second
                self._sent_since_drained = False
                self._drained()  # the proof of delivery need not wait for its next round
            return False
        held = self._hold is not None and self._hold.wait(
            min(job.created_at for job in batch), self._stopping
        )
        if len(batch) < self._batch_size and not held:
            # Caught up with the receiver: let a batch gather before the next claim, so that a
            # stream of images costs one claim and one settlement per batch, not per image.
            self._stopping.wait(self._config.batch_wait_s)
        started = time.monotonic()
        try:
            results = self.destination.send(batch)
        except RetriableError as exc:
            results = [Failed(batch[0], str(exc), permanent=False)]
        except GatewayError as exc:
            results = [Failed(job, str(exc), permanent=True) for job in batch]
        done = {r.job.job_id for r in results}
        untried = [job for job in batch if job.job_id not in done]
        dead = self._outbox.settle(results, untried, self._retry_at)
        self._sent_since_drained = True  # after settling: the last thread to settle wakes
        self._count(results, dead, time.monotonic() - started)
        return True

    def _retry_at(self, job: Outgoing) -> datetime | None:
        return next_attempt(self._config.retry, job.attempts + 1, job.created_at, self._clock())

    def _count(self, results: list[Delivered | Failed], dead: list[Failed], elapsed_s: float) -> None:
        name = self.destination.name
        delivered = sum(isinstance(r, Delivered) for r in results)
        retriable = [r for r in results if isinstance(r, Failed) and not r.permanent]
        if delivered:
            self._counters.forwarded(name, delivered, elapsed_s)
        for failed in (r for r in results if isinstance(r, Failed)):
            self._counters.failed(name, "permanent" if failed.permanent else "retriable")
        for failed in dead:
            self._counters.dead(name)
            log.warning("forward to %s: instance %s dead-lettered: %s", name, failed.job.sop_uid,
                        failed.reason)
        if retriable:
            log.warning("forward to %s failed, will retry: %s", name, retriable[0].reason)
            self._breaker_changed(self.breaker.failed(retriable[0].reason))
        elif delivered:
            self._breaker_changed(self.breaker.succeeded())

    def _probe(self) -> None:
        try:
            self.destination.probe()
        except GatewayError as exc:
            log.debug("forward to %s: probe failed (%s)", self.destination.name, exc)
            return
        self._breaker_changed(self.breaker.succeeded())
        self._outbox.retry_now(self.destination.name)
        self._wake.set()

    def _breaker_changed(self, change: BreakerChange | None) -> None:
        if change is None:
            return
        name = self.destination.name
        self._counters.breaker(name, change.state == "open")
        if change.state == "open":
            log.warning("forward to %s: %d failures in a row, breaker open; probing every %g s",
                        name, change.failures, self._config.breaker.probe_interval_s)
        else:
            log.info("forward to %s: destination answers again, breaker closed", name)
        self._outbox.save_breaker(name, change.state, change.failures, change.error)
