"""What an operator does to the outbox: look at it, send again, give up. Each change is audited.

``retry`` without ``dead``: jobs waiting out a backoff go now. With ``dead``: dead letters go back
to the queue with their attempts and verification misses reset. ``purge_dead``: dead letters older than a cutoff become
``purged``; their files stay in the spool (retention never removes an unconfirmed instance).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from gateway import audit
from gateway.db.models import ForwardJob
from gateway.forward.outbox import QueueStats

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration; write a number and a unit: 30m, 12h, 7d")
    return timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])


def retry(
    engine: Engine, actor: str, destination: str | None = None, study: str | None = None,
    dead: bool = False, now: datetime | None = None,
) -> int:
    now = now or datetime.now(UTC)
    query = update(ForwardJob).where(ForwardJob.state == ("dead" if dead else "queued"))
    if destination:
        query = query.where(ForwardJob.destination == destination)
    if study:
        query = query.where(ForwardJob.study_instance_uid == study)
    values: dict[str, object] = {"state": "queued", "next_attempt_at": now}
    if dead:  # a fresh start: backoff and the proof-of-delivery guard count from zero again
        values["attempts"] = 0
        values["verify_misses"] = 0
    with Session(engine) as session, session.begin():
        count = int(session.execute(query.values(**values)).rowcount or 0)  # type: ignore[attr-defined]
        audit.record(session, actor, "queue_retry", study, now, destination=destination,
                     dead=dead, jobs=count)
    return count


def purge_dead(engine: Engine, actor: str, older_than: timedelta, now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    with Session(engine) as session, session.begin():
        count = int(
            session.execute(  # type: ignore[attr-defined]
                update(ForwardJob)
                .where(ForwardJob.state == "dead", ForwardJob.created_at < now - older_than)
                .values(state="purged")
            ).rowcount or 0
        )
        audit.record(session, actor, "queue_purge_dead", None, now,
                     older_than_s=older_than.total_seconds(), jobs=count)
    return count


def queue_table(stats: Sequence[QueueStats], now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    header = ("destination", "queued", "held/remap", "sending", "unconfirmed", "confirmed", "dead",
              "oldest", "breaker")
    rows = [header]
    for s in stats:
        oldest = _age(now - s.oldest_unconfirmed) if s.oldest_unconfirmed else "-"
        rows.append((s.destination, str(s.queued), str(s.waiting_remap), str(s.sending),
                     str(s.forwarded), str(s.confirmed), str(s.dead), oldest, s.breaker))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"
