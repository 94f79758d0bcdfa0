"""Engine and sessions from a URL, with the settings that make commits durable.

SQLite runs in WAL mode with ``synchronous=FULL``: a commit that returned is on disk, which is the
promise behind every C-STORE Success. PostgreSQL's defaults already give that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MMAP_BYTES = 1 << 30


def make_engine(url: str, busy_timeout_s: float = 10.0, durable: bool = True) -> Engine:
    """``durable=False`` lets commits return before the disk has them (SQLite synchronous=NORMAL,
    PostgreSQL synchronous_commit=off): for state that is safe to lose in a crash, such as a
    forward job's progress (it is sent again) or the association ledger."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
            pool_size=20,
            max_overflow=40,
        )
        event.listen(engine, "connect", _sqlite_pragmas if durable else _sqlite_pragmas_normal)
        return engine
    connect_args: dict[str, Any] = {"connect_timeout": max(1, int(busy_timeout_s))}
    if not durable:
        # PostgreSQL's asynchronous commit: never corrupts, may lose the last commits on a crash
        connect_args["options"] = "-c synchronous_commit=off"
    return create_engine(
        url, pool_pre_ping=True, pool_size=20, max_overflow=40, connect_args=connect_args
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Reads through the OS page cache, shared by every pooled connection, instead of each
    # connection's own small cache: queries over a large ledger stop re-reading their pages.
    cursor.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
    cursor.close()


def _sqlite_pragmas_normal(dbapi_connection: Any, _record: Any) -> None:
    _sqlite_pragmas(dbapi_connection, _record)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL: safe from crashes, not from power loss
    cursor.close()


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
