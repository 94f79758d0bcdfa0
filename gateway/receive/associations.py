"""The association ledger: one row per association request, opened on accept, closed at the end.

A ledger failure never decides an association's fate: if the database is down the association is
still accepted (each C-STORE then answers 0xA700 by itself) and the failure is logged.

Both writes are single Core statements, not ORM sessions: they run while the peer waits (the
A-ASSOCIATE-AC and the A-RELEASE-RP follow them), and the ORM's unit of work cost about a
millisecond of each, holding the interpreter the network thread needs to answer.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine, insert, update
from sqlalchemy.exc import SQLAlchemyError

from gateway.db.models import AssociationRecord

log = logging.getLogger(__name__)
_INSERT = insert(AssociationRecord).returning(AssociationRecord.id)


@dataclass
class AssociationStats:
    """Counts for one open association; written to its ledger row when it ends."""

    record_id: int | None
    instances: int = 0
    duplicates: int = 0
    bytes: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, status: str, kept_bytes: int, duplicate: bool) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.instances += status == "0x0000" and not duplicate
            self.duplicates += duplicate
            self.bytes += kept_bytes


class AssociationLedger:
    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._engine = engine
        self._clock = clock

    def opened(
        self,
        calling_ae: str,
        called_ae: str,
        peer: tuple[str, int],
        rejected_reason: str | None = None,
    ) -> int | None:
        now = self._clock()
        values = {
            "calling_ae": calling_ae,
            "called_ae": called_ae,
            "peer_host": peer[0],
            "peer_port": peer[1],
            "started_at": now,
            "ended_at": now if rejected_reason else None,
            "result": "rejected" if rejected_reason else "accepted",
            "reason": rejected_reason,
            "end_state": "rejected" if rejected_reason else None,
            "instances": 0,
            "duplicates": 0,
            "bytes": 0,
            "statuses": "{}",
        }
        try:
            with self._engine.begin() as connection:
                return connection.execute(_INSERT, values).scalar_one()
        except SQLAlchemyError as exc:
            log.error("association ledger unavailable (%s); association not recorded",
                      type(exc).__name__)
            return None

    def closed(self, stats: AssociationStats, end_state: str) -> None:
        if stats.record_id is None:
            return
        with stats.lock:
            values = {
                "ended_at": self._clock(),
                "end_state": end_state,
                "instances": stats.instances,
                "duplicates": stats.duplicates,
                "bytes": stats.bytes,
                "statuses": json.dumps(dict(sorted(stats.statuses.items()))),
            }
        try:
            with self._engine.begin() as connection:
                connection.execute(
                    update(AssociationRecord)
                    .where(AssociationRecord.id == stats.record_id)
                    .values(**values)
                )
        except SQLAlchemyError as exc:
            log.error("association ledger unavailable (%s); end of association %s not recorded",
                      type(exc).__name__, stats.record_id)
