"""Retention: a spool file goes only after every destination confirmed it.

Two triggers, one rule. Files older than ``keep_days`` go; when free space falls below
``cleanup_below_free_mb``, confirmed files go early, oldest first, until there is room again.
An instance with any job not confirmed (queued, sending, forwarded, dead, purged), or with no job
at all (the gateway is then the only copy), is never removed. The row stays, with
``spool_removed_at`` set: the ledger keeps the history, and query/retrieve knows where to look.
The row is marked before the file is unlinked, so a crash can leave a stray file, never a row that
claims a file the spool no longer has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, exists, select, update

from gateway.cluster.holder import held_by
from gateway.config import RetentionConfig
from gateway.db.models import ForwardJob, Instance
from gateway.receive.spool import Spool

log = logging.getLogger(__name__)
BATCH = 200
MIB = 1024 * 1024


class Retention:
    def __init__(
        self,
        engine: Engine,
        spool: Spool,
        config: RetentionConfig,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        node: str | None = None,
    ) -> None:
        """``node``: only files this node holds are removed (another node's are on its disk)."""
        self._node = node
        self._engine = engine
        self._spool = spool
        self._config = config
        self._clock = clock

    def run_once(self) -> int:
        removed = self._remove(self._clock() - timedelta(days=self._config.keep_days))
        floor = self._config.cleanup_below_free_mb * MIB
        while floor and self._spool.free_bytes() < floor:
            early = self._remove(None)
            if not early:
                log.warning("spool below cleanup_below_free_mb and nothing confirmed to remove")
                break
            removed += early
        if removed:
            log.info("retention removed %d confirmed instances from the spool", removed)
        return removed

    def _remove(self, received_before: datetime | None) -> int:
        """One batch, oldest first; ``None`` means regardless of age."""
        unconfirmed = exists().where(
            ForwardJob.instance_id == Instance.id, ForwardJob.state != "confirmed"
        )
        any_job = exists().where(ForwardJob.instance_id == Instance.id)
        query = (
            select(Instance.id, Instance.spool_path)
            .where(Instance.spool_removed_at.is_(None), any_job, ~unconfirmed,
                   held_by(self._node))
            .order_by(Instance.received_at)
            .limit(BATCH)
        )
        if received_before is not None:
            query = query.where(Instance.received_at < received_before)
        with self._engine.begin() as c:
            chosen = c.execute(query).all()
            if not chosen:
                return 0
            c.execute(
                update(Instance)
                .where(Instance.id.in_([i for i, _ in chosen]), Instance.spool_removed_at.is_(None))
                .values(spool_removed_at=self._clock())
            )
        for _, path in chosen:
            self._spool.discard(self._spool.root / path)
        return len(chosen)
