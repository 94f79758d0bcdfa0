"""Retention: a spool file goes only after every destination confirmed it.

Two triggers, one rule. Files older than ``keep_days`` go; when free space falls below
``cleanup_below_free_mb``, confirmed files go early, oldest first, until there is room again.
An instance with any job not confirmed (queued, sending, forwarded, dead, purged), or with no job
at all (the gateway is then the only copy), is never removed. The row stays, with
``spool_removed_at`` set: the ledger keeps the history, and query/retrieve knows where to look.
The row is marked before the file is unlinked, so a crash can leave a stray file, never a row that
claims a file the spool no longer has.

Other versions of an instance (``instance_versions``: the copy ``replace`` superseded, or the one
``keep_first`` did not make current) follow the current copy. A version's file goes once every
destination confirmed its instance's current copy, and either the version or the current copy is
older than ``keep_days``, or the current copy's file is already gone: a superseded copy never
outlives the protection of the current one (under ``keep_first`` the version is the younger copy,
so its own age alone would keep it longer), and it is never removed while the current copy is not
confirmed everywhere (a ``replace`` sends the new copy again, so its instance is unconfirmed until
that copy is confirmed too; until then the prior copy is the one the destinations hold). Below the
free-space minimum, confirmed versions go first, oldest first, before any current file: query and
retrieve serve current copies only. Versions are marked and unlinked exactly as current files
(``instance_versions.spool_removed_at``, migration 0015). A node removes only the files on its own
disk (``node_name`` of each row, gateway.cluster.holder), versions included: a version's file is
on the node that received that copy, which need not hold the current one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, Connection, Engine, exists, or_, select, update

from gateway.cluster.holder import held_by
from gateway.config import RetentionConfig
from gateway.db.models import ForwardJob, Instance, InstanceVersion
from gateway.receive.spool import Spool

log = logging.getLogger(__name__)
BATCH = 200
MIB = 1024 * 1024


def confirmed_everywhere() -> ColumnElement[bool]:
    """The instance (``Instance`` in the enclosing query) has jobs, and every one is confirmed."""
    unconfirmed = exists().where(
        ForwardJob.instance_id == Instance.id, ForwardJob.state != "confirmed"
    )
    any_job = exists().where(ForwardJob.instance_id == Instance.id)
    return any_job & ~unconfirmed


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
        """Files removed: current copies and other versions alike."""
        cutoff = self._clock() - timedelta(days=self._config.keep_days)
        removed = self._remove_versions(cutoff) + self._remove(cutoff)
        floor = self._config.cleanup_below_free_mb * MIB
        while floor and self._spool.free_bytes() < floor:
            early = self._remove_versions(None) or self._remove(None)
            if not early:
                log.warning("spool below cleanup_below_free_mb and nothing confirmed to remove")
                break
            removed += early
        if removed:
            log.info("retention removed %d confirmed files from the spool", removed)
        return removed

    def _remove(self, received_before: datetime | None) -> int:
        """One batch of current copies, oldest first; ``None`` means regardless of age."""
        query = (
            select(Instance.id, Instance.spool_path)
            .where(Instance.spool_removed_at.is_(None), confirmed_everywhere(),
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

    def _remove_versions(self, received_before: datetime | None) -> int:
        """One batch of other versions on this node's disk, oldest first; ``None``: regardless
        of age (early cleanup), still only once the current copy is confirmed everywhere."""
        ready = confirmed_everywhere()
        if received_before is not None:
            ready = ready & or_(InstanceVersion.received_at < received_before,
                                Instance.received_at < received_before,
                                Instance.spool_removed_at.is_not(None))
        with self._engine.begin() as c:
            chosen = c.execute(
                select(InstanceVersion.id, InstanceVersion.spool_path)
                .join(Instance, Instance.sop_instance_uid == InstanceVersion.sop_instance_uid)
                .where(InstanceVersion.spool_removed_at.is_(None), ready,
                       held_by(self._node, InstanceVersion.node_name))
                .order_by(InstanceVersion.received_at)
                .limit(BATCH)
            ).all()
            if not chosen:
                return 0
            marked = self._mark_versions(c, [i for i, _ in chosen])
        for path in marked:
            self._spool.discard(self._spool.root / path)
        return len(marked)

    def _mark_versions(self, c: Connection, ids: list[int]) -> list[str]:
        """Before any unlink: a crash then leaves a stray file, never a row claiming a file that
        is gone. The confirmation is asked again in the UPDATE itself, so a ``replace`` that
        requeued the instance since the SELECT keeps its prior copy. The paths of the rows marked."""
        still_confirmed = (
            select(Instance.id)
            .where(Instance.sop_instance_uid == InstanceVersion.sop_instance_uid,
                   confirmed_everywhere())
            .exists()
        )
        return list(c.scalars(
            update(InstanceVersion)
            .where(InstanceVersion.id.in_(ids), InstanceVersion.spool_removed_at.is_(None),
                   still_confirmed)
            .values(spool_removed_at=self._clock())
            .returning(InstanceVersion.spool_path)
        ))
