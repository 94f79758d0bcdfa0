"""The database gone: C-STORE answers 0xA700 (the sender keeps the image), nothing is half-written,
and the gateway recovers by itself when the database is back."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from gateway.app import Gateway
from gateway.dicom.status import Status
from tests.conftest import POSTGRES_URL, rows
from tests.factory import make_dataset
from tests.peers import spool_files, store


@contextmanager
def database_unavailable(db_url: str) -> Iterator[None]:
    if db_url.startswith("sqlite:///"):
        # Another process holding an exclusive lock is what a stuck backup or a full disk looks
        # like to SQLite: every write waits busy_timeout_s, then fails.
        holder = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    assert POSTGRES_URL
    name = sa.make_url(db_url).database
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        c.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = :name"), {"name": name})
    try:
        yield
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()


def test_database_outage_answers_a700_then_recovers(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    app = make_gateway(db=db_url)
    assert app.receiver is not None
    port = app.receiver.address[1]
    assert store(port, make_dataset()) == Status.SUCCESS

    refused = make_dataset()
    with database_unavailable(db_url):
        assert store(port, refused) == Status.OUT_OF_RESOURCES
        if db_url.startswith("postgresql"):
            assert app.health()["database"] is False
    stored = {r.sop_instance_uid for r in rows(db_url, "SELECT sop_instance_uid FROM instances")}
    assert refused.SOPInstanceUID not in stored
    assert len(spool_files(app.spool.root)) == 1, "the refused instance left a file behind"
    assert not list(app.spool.root.rglob("*.tmp"))

    assert store(port, refused) == Status.SUCCESS
    assert len(rows(db_url, "SELECT id FROM instances")) == 2
    assert len(spool_files(app.spool.root)) == 2
    assert app.health()["database"] is True
