"""The forward stage put together: senders per destination, and one housekeeping thread that
verifies stable studies (proof of delivery) and applies retention.

Built by ``gateway.app`` only; ingest calls ``notify`` after it commits an instance with jobs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from gateway.busy import BurstHold, ReceiverLoad
from gateway.config import DicomwebDestination, DimseDestination, GatewayConfig, OrthancDestination
from gateway.db.engine import make_engine
from gateway.forward.confirm import Confirmer
from gateway.forward.counters import ForwardCounters, QueuedCounters
from gateway.forward.destinations.base import Destination
from gateway.forward.destinations.dicomweb import Dicomweb
from gateway.forward.destinations.dimse import Dimse
from gateway.forward.destinations.orthanc import Orthanc
from gateway.forward.outbox import Outbox
from gateway.forward.retention import Retention
from gateway.forward.worker import DestinationSenders
from gateway.receive.spool import Spool

log = logging.getLogger(__name__)


def build_destination(
    config: OrthancDestination | DicomwebDestination | DimseDestination, calling_ae: str
) -> Destination:
    if isinstance(config, OrthancDestination):
        return Orthanc(config)
    if isinstance(config, DicomwebDestination):
        return Dicomweb(config)
    return Dimse(config, calling_ae)


class Forwarder:
    def __init__(
        self,
        config: GatewayConfig,
        outbox: Outbox,
        retention: Retention,
        counters: ForwardCounters,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        hold: BurstHold | None = None,
    ) -> None:
        forward = config.forward
        self._outbox = outbox
        self._retention = retention
        self._check_s = forward.check_interval_s
        self._retention_s = config.retention.check_interval_s
        self.destinations = destinations = [
            build_destination(d, config.dicom.ae_title) for d in forward.destinations
        ]
        self._check_now = threading.Event()
        self.senders = [
            DestinationSenders(dest, cfg.concurrency, cfg.batch_size, forward, outbox, counters,
                               clock, hold, drained=self._drained)
            for dest, cfg in zip(destinations, forward.destinations, strict=True)
        ]
        open_breakers = {s.destination.name: s.breaker for s in self.senders}
        self.confirmer = Confirmer(destinations, outbox, forward.stable_after_s, counters, clock,
                                   unavailable=lambda name: open_breakers[name].is_open,
                                   max_verify_misses=forward.max_verify_misses)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._housekeeping, name="forward-check", daemon=True)
        self._hold = hold

    def start(self) -> None:
        requeued = self._outbox.requeue_interrupted()
        if requeued:
            log.warning("queued again %d forward jobs interrupted by the previous stop", requeued)
        if self._hold is not None:
            self._hold.start()
        for senders in self.senders:
            senders.start()
        self._thread.start()

    def wake(self) -> None:
        for senders in self.senders:
            senders.notify()

    def _drained(self) -> None:
        """A destination's queue just emptied: its last studies may be stable already (they
        are, after a burst longer than ``stable_after_s``), so check now, not at the next round."""
        self._check_now.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        self._check_now.set()
        for senders in self.senders:
            senders.stop(timeout_s)
        if self._hold is not None:
            self._hold.stop()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _housekeeping(self) -> None:
        next_retention = time.monotonic()
        while not self._stopping.is_set():
            self._check_now.wait(self._check_s)
            self._check_now.clear()
            if self._stopping.is_set():
                return
            try:
                self.confirmer.run_once()
                if time.monotonic() >= next_retention:
                    self._retention.run_once()
                    next_retention = time.monotonic() + self._retention_s
            except SQLAlchemyError as exc:
                log.warning("forward checks skipped, database unavailable: %s", type(exc).__name__)
            except Exception:
                log.exception("forward checks failed")


def forward_stage(
    config: GatewayConfig, spool: Spool, load: ReceiverLoad | None = None
) -> Callable[[Any], Forwarder]:
    """What the forward process builds, in the child: its own engines, metrics over the queue.

    Job progress commits without fsync there (a lost update means an idempotent resend; the job
    itself was made durable with the instance, by the receiver); retention's commits stay durable.
    """

    def build(messages: Any) -> Forwarder:
        url, busy = config.database.url, config.database.busy_timeout_s
        outbox = Outbox(make_engine(url, busy, durable=False), spool.root, config.forward.node_name)
        retention = Retention(make_engine(url, busy), spool, config.retention,
                              node=config.forward.node_name)
        hold = None
        if load is not None:
            hold = BurstHold(load, config.forward.burst_hold_s, lambda: datetime.now(UTC))
        return Forwarder(config, outbox, retention, QueuedCounters(messages), hold=hold)

    return build
