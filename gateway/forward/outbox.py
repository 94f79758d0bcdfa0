"""The durable outbox: forward jobs in the database, claimed, settled and confirmed here only.

Invariants: a job is claimed by one sender at a time (an UPDATE guarded by ``state = 'queued'``,
and ``FOR UPDATE SKIP LOCKED`` on PostgreSQL where several nodes share the queue); jobs leave in the
order they were received (a claim takes the oldest ready job's study and that study's oldest ready
jobs; with ``concurrency`` > 1 the next sender takes the next batch, so batches of one study may
be in flight together, and arrive in order only at concurrency 1); an instance is claimed only once
its remap is settled
(``remap_state`` none or done), so a held or not yet rewritten instance never leaves. Delivery is
at least once: a claim interrupted by a crash is queued again at the next start (or when its lease
ends), and destinations are idempotent for an instance they already hold.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, and_, case, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from gateway.cluster.holder import held_by
from gateway.db.models import DestinationState, ForwardJob, Instance

SETTLED_REMAP = ("none", "done")
_INSERT_JOB = insert(ForwardJob)
LEASE = timedelta(minutes=10)


@dataclass(frozen=True)
class Outgoing:
    """One claimed job with what a destination needs to send it."""

    job_id: int
    instance_id: int
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    study_uid: str  # as sent: after any UID regeneration by the remap
    series_uid: str
    sop_uid: str
    attempts: int
    created_at: datetime


@dataclass(frozen=True)
class Delivered:
    job: Outgoing
    remote_id: str | None = None


@dataclass(frozen=True)
class Failed:
    job: Outgoing
    reason: str
    permanent: bool


Result = Delivered | Failed


@dataclass(frozen=True)
class Sent:
    """A forwarded job awaiting proof that the destination holds it."""

    job_id: int
    study_uid: str
    series_uid: str
    sop_uid: str
    remote_id: str | None
    created_at: datetime
    verify_misses: int = 0


@dataclass(frozen=True)
class QueueStats:
    destination: str
    queued: int
    waiting_remap: int
    sending: int
    forwarded: int
    confirmed: int
    dead: int
    oldest_unconfirmed: datetime | None
    breaker: str


def new_jobs(
    connection: Connection, instance_id: int, study_uid: str, destinations: Sequence[str],
    now: datetime,
) -> None:
    """Called by ingest inside the transaction that records the instance."""
    if destinations:
        connection.execute(
            _INSERT_JOB,
            [
                {"instance_id": instance_id, "destination": d, "study_instance_uid": study_uid,
                 "state": "queued", "attempts": 0, "created_at": now, "next_attempt_at": now}
                for d in destinations
            ],
        )


def requeue_for_new_copy(connection: Connection, instance_id: int, now: datetime) -> None:
    """A replaced instance (duplicate policy ``replace``) is sent again, everywhere."""
    connection.execute(
        update(ForwardJob)
        .where(ForwardJob.instance_id == instance_id)
        .values(state="queued", attempts=0, next_attempt_at=now, forwarded_at=None,
                confirmed_at=None, last_error=None, owner=None, lease_until=None, verify_misses=0)
    )


def _sent_uids(plan: str | None, study: str, series: str, sop: str) -> tuple[str, str, str]:
    """UIDs as the destination will know them: a remap plan may have regenerated them."""
    changes = json.loads(plan) if plan else {}
    return (
        str(changes.get("StudyInstanceUID", study)),
        str(changes.get("SeriesInstanceUID", series)),
        str(changes.get("SOPInstanceUID", sop)),
    )


def verify_gave_up_reason(destination: str, misses: int) -> str:
    return (f"not found at {destination} after {misses} verifications; check the destination "
            "(it may change UIDs)")


class Outbox:
    def __init__(
        self,
        engine: Engine,
        spool_root: Path,
        node: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._engine = engine
        self._root = spool_root
        self._node = node
        self._clock = clock
        self._skip_locked = engine.dialect.name == "postgresql"
        # In this process, one claim at a time, so that batches are taken strictly in order
        # (other nodes are kept apart by SKIP LOCKED).
        self._claiming = threading.Lock()

    # -- sending -----------------------------------------------------------------------------

    def claim(self, destination: str, limit: int) -> list[Outgoing]:
        """The oldest ready jobs of one study whose files this node holds.

        Why the holder sends, rather than any node fetching the file from the holder over HTTP
        (``gateway.cluster.peers``): a job then needs nothing but the local disk and the
        destination, as on a single node; a fetch would put a second node's disk, network and
        CPU on every forwarded byte (the file crosses the network twice), and a holder that is
        down could not serve the fetch anyway, so its jobs could not move either way. What the
        holder acknowledged stays on its disk (the one rule) and leaves when it returns, which
        ``gateway status`` says meanwhile (``gateway.cluster.nodes.waiting_on``). Receiving
        spreads over the nodes (the balancer), so forwarding does too."""
        with self._claiming:
            return self._claim(destination, limit)

    def _claim(self, destination: str, limit: int) -> list[Outgoing]:
        now = self._clock()
        ready = and_(
            ForwardJob.destination == destination,
            ForwardJob.state == "queued",
            ForwardJob.next_attempt_at <= now,
            Instance.remap_state.in_(SETTLED_REMAP),
            held_by(self._node),
        )
        with self._engine.begin() as c:
            study = c.scalar(
                select(ForwardJob.study_instance_uid)
                .join(Instance, Instance.id == ForwardJob.instance_id)
                .where(ready)
                .order_by(ForwardJob.id)
                .limit(1)
            )
            if study is None:
                return []
            ids = (
                select(ForwardJob.id)
                .join(Instance, Instance.id == ForwardJob.instance_id)
                .where(ready, ForwardJob.study_instance_uid == study)
                .order_by(ForwardJob.id)
                .limit(limit)
            )
            if self._skip_locked:
                ids = ids.with_for_update(skip_locked=True, of=ForwardJob)
            wanted = list(c.scalars(ids))
            if not wanted:
                return []
            c.execute(
                update(ForwardJob)
                .where(ForwardJob.id.in_(wanted), ForwardJob.state == "queued")
                .values(state="sending", owner=self._node, lease_until=now + LEASE)
            )
            rows = c.execute(
                select(ForwardJob.id, ForwardJob.attempts, ForwardJob.created_at, ForwardJob.owner,
                       ForwardJob.state, Instance.id, Instance.spool_path, Instance.sop_class_uid,
                       Instance.transfer_syntax_uid, Instance.study_instance_uid,
                       Instance.series_instance_uid, Instance.sop_instance_uid,
                       Instance.remap_plan)
                .join(Instance, Instance.id == ForwardJob.instance_id)
                .where(ForwardJob.id.in_(wanted))
                .order_by(ForwardJob.id)
            ).all()
        claimed = []
        for (job_id, attempts, created, owner, state, instance_id, path, sop_class, syntax,
             study_uid, series, sop, plan) in rows:
            if owner != self._node or state != "sending":
                continue
            sent = _sent_uids(plan, study_uid, series, sop)
            claimed.append(Outgoing(job_id, instance_id, self._root / path, sop_class, syntax,
                                    *sent, attempts, _aware(created)))
        return claimed

    def settle(
        self, results: Sequence[Result], untried: Sequence[Outgoing],
        retry_at: Callable[[Outgoing], datetime | None],
    ) -> list[Failed]:
        """Record a batch's results; ``retry_at`` gives a failed job's next attempt, or None when
        it has had enough. Returns the jobs that went to the dead letters."""
        now = self._clock()
        dead: list[Failed] = []
        delivered = [
            {"id": r.job.job_id, "state": "forwarded", "forwarded_at": now, "remote_id": r.remote_id,
             "sent_study_uid": r.job.study_uid, "sent_series_uid": r.job.series_uid,
             "sent_sop_uid": r.job.sop_uid, "last_error": None, "owner": None, "lease_until": None}
            for r in results if isinstance(r, Delivered)
        ]
        failed = []
        for r in results:
            if not isinstance(r, Failed):
                continue
            when = None if r.permanent else retry_at(r.job)
            if when is None:
                dead.append(r)
            failed.append(
                {"id": r.job.job_id, "state": "dead" if when is None else "queued",
                 "attempts": r.job.attempts + 1, "next_attempt_at": when or now,
                 "last_error": r.reason[:400], "owner": None, "lease_until": None}
            )
        back = [{"id": j.job_id, "state": "queued", "owner": None, "lease_until": None}
                for j in untried]
        with Session(self._engine) as session, session.begin():
            for rows in (delivered, failed, back):
                if rows:  # ORM bulk UPDATE by primary key: one statement per kind
                    session.execute(update(ForwardJob), rows)
        return dead

    def requeue_interrupted(self) -> int:
        """At start: this node's claims, and anyone's whose lease ended, are queued again."""
        now = self._clock()
        with self._engine.begin() as c:
            result = c.execute(
                update(ForwardJob)
                .where(ForwardJob.state == "sending",
                       (ForwardJob.owner == self._node) | (ForwardJob.lease_until < now))
                .values(state="queued", owner=None, lease_until=None)
            )
        return int(result.rowcount or 0)

    def retry_now(self, destination: str) -> None:
        """The destination answers again: jobs waiting out a backoff need not wait longer."""
        now = self._clock()
        with self._engine.begin() as c:
            c.execute(
                update(ForwardJob)
                .where(ForwardJob.destination == destination, ForwardJob.state == "queued",
                       ForwardJob.next_attempt_at > now)
                .values(next_attempt_at=now)
            )

    # -- proof of delivery -------------------------------------------------------------------

    def stable_studies(self, destination: str, quiet: timedelta, limit: int = 50) -> list[str]:
        """Studies with forwarded jobs, nothing left to send, and no instance for ``quiet``."""
        cutoff = self._clock() - quiet
        candidates = (
            select(ForwardJob.study_instance_uid)
            .where(ForwardJob.destination == destination, ForwardJob.state == "forwarded")
            .distinct()
            .limit(limit * 4)
            .scalar_subquery()
        )
        unsettled = func.sum(case((ForwardJob.state.in_(("queued", "sending")), 1), else_=0))
        with self._engine.connect() as c:
            return list(
                c.scalars(
                    select(ForwardJob.study_instance_uid)
                    .where(ForwardJob.destination == destination,
                           ForwardJob.study_instance_uid.in_(candidates))
                    .group_by(ForwardJob.study_instance_uid)
                    .having(unsettled == 0, func.max(ForwardJob.created_at) <= cutoff)
                    .limit(limit)
                )
            )

    def forwarded(self, destination: str, study: str) -> list[Sent]:
        with self._engine.connect() as c:
            rows = c.execute(
                select(ForwardJob.id, ForwardJob.sent_study_uid, ForwardJob.sent_series_uid,
                       ForwardJob.sent_sop_uid, ForwardJob.remote_id, ForwardJob.created_at,
                       ForwardJob.verify_misses)
                .where(ForwardJob.destination == destination,
                       ForwardJob.study_instance_uid == study, ForwardJob.state == "forwarded")
                .order_by(ForwardJob.id)
            ).all()
        return [Sent(i, st or "", se or "", so or "", r, _aware(at), int(m or 0))
                for i, st, se, so, r, at, m in rows]

    def confirm(
        self, confirmed: Sequence[Sent], missing: Sequence[Sent], destination: str, max_misses: int,
    ) -> list[Sent]:
        """The destination holds ``confirmed``; ``missing`` is sent again, at once, unless this
        is its ``max_misses``-th miss: then it goes to the dead letters, which this returns.

        The count is kept in the row (``verify_misses``), so a destination that never holds
        what it is sent (one that changes UIDs) costs ``max_misses`` sends per instance, not an
        endless loop, and a restart does not start the count again."""
        now = self._clock()
        gave_up = [s for s in missing if s.verify_misses + 1 >= max_misses]
        again = [s for s in missing if s not in gave_up]
        with self._engine.begin() as c:
            if confirmed:
                c.execute(
                    update(ForwardJob)
                    .where(ForwardJob.id.in_([s.job_id for s in confirmed]),
                           ForwardJob.state == "forwarded")
                    .values(state="confirmed", confirmed_at=now)
                )
            if again:
                c.execute(
                    update(ForwardJob)
                    .where(ForwardJob.id.in_([s.job_id for s in again]),
                           ForwardJob.state == "forwarded")
                    .values(state="queued", next_attempt_at=now,
                            verify_misses=ForwardJob.verify_misses + 1,
                            last_error="not found at the destination when verified; sent again")
                )
            if gave_up:
                c.execute(
                    update(ForwardJob)
                    .where(ForwardJob.id.in_([s.job_id for s in gave_up]),
                           ForwardJob.state == "forwarded")
                    .values(state="dead", verify_misses=ForwardJob.verify_misses + 1,
                            last_error=verify_gave_up_reason(destination, max_misses))
                )
        return gave_up

    # -- breaker -----------------------------------------------------------------------------

    def save_breaker(self, destination: str, state: str, failures: int, error: str | None) -> None:
        with self._engine.begin() as c:
            updated = c.execute(
                update(DestinationState)
                .where(DestinationState.destination == destination)
                .values(breaker=state, failures=failures, since=self._clock(),
                        last_error=error[:400] if error else None)
            )
            if not updated.rowcount:
                c.execute(
                    insert(DestinationState).values(
                        destination=destination, breaker=state, failures=failures,
                        since=self._clock(), last_error=error[:400] if error else None)
                )


UNSETTLED = ("queued", "sending", "forwarded", "dead")


def queue_stats(
    engine: Engine, destinations: Sequence[str], count_confirmed: bool = False
) -> list[QueueStats]:
    """What ``gateway queue`` and the metrics show, one row per destination.

    Only jobs not yet confirmed are read by state (an index range, however long the history);
    confirmed ones, the bulk of a busy ledger, are counted only when asked (``gateway queue``),
    not at every metrics scrape."""
    unsettled = ForwardJob.state.in_(UNSETTLED)
    with engine.connect() as c:
        counts = list(c.execute(
            select(ForwardJob.destination, ForwardJob.state, func.count())
            .where(unsettled).group_by(ForwardJob.destination, ForwardJob.state)
        ).all())
        held = c.execute(
            select(ForwardJob.destination, func.count())
            .join(Instance, Instance.id == ForwardJob.instance_id)
            .where(ForwardJob.state == "queued", Instance.remap_state.not_in(SETTLED_REMAP))
            .group_by(ForwardJob.destination)
        ).all()
        if count_confirmed:
            counts += list(c.execute(
                select(ForwardJob.destination, ForwardJob.state, func.count())
                .where(ForwardJob.state == "confirmed").group_by(ForwardJob.destination,
                                                                 ForwardJob.state)
            ).all())
        oldest = dict(
            c.execute(
                select(ForwardJob.destination, func.min(ForwardJob.created_at))
                .where(ForwardJob.state.in_(("queued", "sending", "forwarded")))
                .group_by(ForwardJob.destination)
            ).all()
        )
        breakers = dict(c.execute(select(DestinationState.destination, DestinationState.breaker)).all())
    table: dict[str, dict[str, int]] = {d: {} for d in destinations}
    for destination, state, n in counts:
        table.setdefault(destination, {})[state] = int(n)
    for destination, n in held:  # queued, but waiting for their remap: shown apart
        row = table.setdefault(destination, {})
        row["waiting_remap"] = int(n)
        row["queued"] = row.get("queued", 0) - int(n)
    return [
        QueueStats(
            d, row.get("queued", 0), row.get("waiting_remap", 0), row.get("sending", 0),
            row.get("forwarded", 0), row.get("confirmed", 0), row.get("dead", 0),
            _aware(oldest[d]) if oldest.get(d) else None, breakers.get(d, "closed"),
        )
        for d, row in table.items()
    ]


def _aware(at: datetime) -> datetime:
    """SQLite gives naive datetimes back; they were written in UTC."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
