"""The run ledger: a ``job_runs`` row for every run, and the ``job_leases`` row that lets a job
run once at a time, on one node.

Both are decided in one transaction when a run begins, and without savepoints (SQLite's driver
does not take them reliably): the run row goes in first, so a second node firing the same
scheduled time fails on ``UNIQUE (job, scheduled_for)`` and does nothing; then the lease is taken
only if it has lapsed, and if it has not, the transaction is rolled back and nothing is recorded.
A lease lapses ``lease_s`` after it was last renewed: a node that dies mid-run frees its jobs, and
its ``running`` rows are marked ``interrupted`` when it starts again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from gateway.db.models import JobLease, JobRun

LEASE_S = 300.0


class _Held(Exception):
    """The lease is someone else's: roll the transaction back."""


@dataclass(frozen=True)
class RunRecord:
    id: int
    job: str
    node: str
    trigger: str
    scheduled_for: datetime | None
    started_at: datetime
    finished_at: datetime | None
    outcome: str
    counts: dict[str, int]
    error: str | None


class RunLedger:
    def __init__(
        self,
        engine: Engine,
        node: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        lease_s: float = LEASE_S,
    ) -> None:
        self._engine = engine
        self._node = node
        self._clock = clock
        self._lease = timedelta(seconds=lease_s)

    def begin(self, job: str, kind: str, trigger: str, scheduled_for: datetime | None) -> int | None:
        """The new run's id, or None when this fire time was already run (by any node) or the
        job is running now (anywhere)."""
        now = self._clock()
        try:
            with self._engine.begin() as c:
                run_id = c.execute(insert(JobRun).values(
                    job=job, kind=kind, node=self._node, trigger=trigger,
                    scheduled_for=scheduled_for, started_at=now, outcome="running", counts="{}",
                ).returning(JobRun.id)).scalar_one()
                taken = c.execute(
                    update(JobLease).where(JobLease.job == job, JobLease.lease_until <= now)
                    .values(node=self._node, run_id=run_id, lease_until=now + self._lease)
                ).rowcount
                if not taken:
                    if c.scalar(select(JobLease.job).where(JobLease.job == job)) is not None:
                        raise _Held()
                    c.execute(insert(JobLease).values(job=job, node=self._node, run_id=run_id,
                                                      lease_until=now + self._lease))
                return int(run_id)
        except (_Held, IntegrityError):
            return None

    def renew(self, job: str, run_id: int) -> None:
        with self._engine.begin() as c:
            c.execute(update(JobLease).where(JobLease.job == job, JobLease.run_id == run_id)
                      .values(lease_until=self._clock() + self._lease))

    def finish(self, job: str, run_id: int, outcome: str, counts: dict[str, int],
               error: str | None) -> None:
        now = self._clock()
        with self._engine.begin() as c:
            c.execute(update(JobRun).where(JobRun.id == run_id).values(
                finished_at=now, outcome=outcome, counts=json.dumps(counts, sort_keys=True),
                error=error[:400] if error else None))
            c.execute(update(JobLease).where(JobLease.job == job, JobLease.run_id == run_id)
                      .values(lease_until=now, run_id=None))

    def interrupted(self) -> int:
        """At start: this node's runs still marked running ended with the node; free their
        leases at once rather than when they lapse."""
        now = self._clock()
        with self._engine.begin() as c:
            ids = list(c.scalars(select(JobRun.id).where(JobRun.node == self._node,
                                                         JobRun.outcome == "running")))
            if ids:
                c.execute(update(JobRun).where(JobRun.id.in_(ids)).values(
                    outcome="interrupted", finished_at=now,
                    error="the gateway stopped while this run was going"))
                c.execute(update(JobLease).where(JobLease.run_id.in_(ids))
                          .values(lease_until=now, run_id=None))
        return len(ids)

    def last_scheduled(self, job: str) -> datetime | None:
        """The latest fire time a run was recorded for (any node, any outcome)."""
        with self._engine.connect() as c:
            found = c.scalar(select(func.max(JobRun.scheduled_for)).where(JobRun.job == job))
        return _aware(found) if found is not None else None

    def history(self, job: str | None = None, limit: int = 20) -> list[RunRecord]:
        statement = select(JobRun).order_by(JobRun.id.desc()).limit(limit)
        if job is not None:
            statement = statement.where(JobRun.job == job)
        with self._engine.connect() as c:
            rows = c.execute(statement).all()
        return [_record(r) for r in rows]

    def latest(self) -> dict[str, RunRecord]:
        """Each job's most recent run."""
        newest = select(func.max(JobRun.id)).group_by(JobRun.job).scalar_subquery()
        with self._engine.connect() as c:
            rows = c.execute(select(JobRun).where(JobRun.id.in_(newest))).all()
        return {r.job: _record(r) for r in rows}


def _record(r: Any) -> RunRecord:
    return RunRecord(
        r.id, r.job, r.node, r.trigger, _aware(r.scheduled_for) if r.scheduled_for else None,
        _aware(r.started_at), _aware(r.finished_at) if r.finished_at else None,
        r.outcome, json.loads(r.counts or "{}"), r.error,
    )


def _aware(at: datetime) -> datetime:
    """SQLite gives naive datetimes back; they were written in UTC."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
