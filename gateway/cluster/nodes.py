"""The ``nodes`` table: each node says it lives every ``cluster.heartbeat_s``; ``gateway status``
and ``/healthz`` list every node and whether it is stale (no heartbeat for ``STALE_BEATS``
intervals), and a retrieve looks up where a holder's HTTP application listens.

Invariants: a node writes only its own row; a row is never deleted by the gateway (a node that is
gone for good still holds the files the ledger says it holds, and an operator must see that).
The heartbeat is an UPDATE, and an INSERT only for a node's first beat (portable to SQLite and
PostgreSQL, no dialect upsert); two processes of one node racing on that INSERT keep one row.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway import __version__
from gateway.db.models import ForwardJob, Instance, Node

log = logging.getLogger(__name__)
STALE_BEATS = 3
WAITING = ("queued", "sending")  # forward jobs only the holder can do


@dataclass(frozen=True)
class NodeState:
    name: str
    url: str | None
    version: str
    started_at: datetime
    last_heartbeat: datetime
    stale: bool

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "url": self.url, "version": self.version,
                "started_at": self.started_at.isoformat(),
                "last_heartbeat": self.last_heartbeat.isoformat(), "stale": self.stale}


class NodeRegistry:
    def __init__(self, engine: Engine, name: str, url: str | None, heartbeat_s: float,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._engine = engine
        self.name = name
        self.url = url
        self._heartbeat_s = heartbeat_s
        self._clock = clock
        self._started_at = clock()

    def beat(self) -> None:
        now = self._clock()
        values = {"last_heartbeat": now, "url": self.url, "version": __version__,
                  "heartbeat_s": self._heartbeat_s}
        with self._engine.begin() as c:
            updated = c.execute(update(Node).where(Node.name == self.name)
                                .values(started_at=self._started_at, **values))
            if updated.rowcount:
                return
        try:
            with self._engine.begin() as c:
                c.execute(insert(Node).values(name=self.name, started_at=self._started_at,
                                              **values))
        except IntegrityError:  # another process of this node inserted it first: update
            with self._engine.begin() as c:
                c.execute(update(Node).where(Node.name == self.name).values(**values))


def list_nodes(engine: Engine, now: datetime | None = None) -> list[NodeState]:
    """Every node that ever beat, with whether it is stale now."""
    now = now or datetime.now(UTC)
    with engine.connect() as c:
        rows = c.execute(select(Node).order_by(Node.name)).all()
    found = []
    for r in rows:
        last = _aware(r.last_heartbeat)
        stale = now - last > timedelta(seconds=STALE_BEATS * r.heartbeat_s)
        found.append(NodeState(r.name, r.url, r.version, _aware(r.started_at), last, stale))
    return found


def node_url(engine: Engine, name: str) -> str | None:
    with engine.connect() as c:
        return c.scalar(select(Node.url).where(Node.name == name))


def waiting_on(engine: Engine, node: str, limit: int = 0) -> tuple[int, list[str]]:
    """Instances held by ``node`` with forwarding still to do there (only that node can send
    them): how many, and the first ``limit`` SOP Instance UIDs."""
    held = (select(Instance.id, Instance.sop_instance_uid)
            .join(ForwardJob, ForwardJob.instance_id == Instance.id)
            .where(Instance.node_name == node, ForwardJob.state.in_(WAITING))
            .distinct().subquery())
    with engine.connect() as c:
        count = int(c.scalar(select(func.count()).select_from(held)) or 0)
        uids = (list(c.scalars(select(held.c.sop_instance_uid)
                               .order_by(held.c.sop_instance_uid).limit(limit)))
                if limit and count else [])
    return count, uids


class Heartbeat:
    """A daemon thread beating every ``heartbeat_s``; a database outage is logged, not fatal
    (the node looks stale to the others until it can write again, which is the truth)."""

    def __init__(self, registry: NodeRegistry, interval_s: float) -> None:
        self._registry = registry
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-heartbeat", daemon=True)

    def start(self) -> None:
        self._beat()  # at once: the others see this node (and its URL) before it receives
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._beat()

    def _beat(self) -> None:
        try:
            self._registry.beat()
        except SQLAlchemyError as exc:
            log.warning("heartbeat of node %s failed: %s", self._registry.name,
                        type(exc).__name__)


def _aware(at: datetime) -> datetime:
    """SQLite gives naive datetimes back; they were written in UTC."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
