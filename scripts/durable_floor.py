"""The gateway with its C-STORE handler cut down to the durable minimum, for ``scripts/bench``.

Why it exists: the receive target compares the gateway with ``storescp``, which never syncs. This
receiver says how fast any handler could answer on this machine while keeping the gateway's one
rule (Success only once the image, its name and its row are on disk): it runs the gateway's own
network path (``gateway serve``, its streaming reader included) but each image is only synced,
hard-linked to ``<spool>/flat/<SOPInstanceUID>.dcm``, and then its folder synced while one SQLite
row is committed with ``synchronous=FULL`` (the gateway's order of durable steps, with the same
overlap). No validation, no header decode, no ledger columns, no hash.
``FLOOR_NOSYNC=1`` drops the three syncs, to show what they cost.

Usage: ``.venv/bin/python scripts/durable_floor.py serve --config F`` (as ``gateway serve``).
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.cli import main
from gateway.dicom.status import Status
from gateway.receive import ingest
from gateway.receive.spool import fsync_path

SYNC = not os.environ.get("FLOOR_NOSYNC")
_lock = threading.Lock()
_connections: dict[Path, sqlite3.Connection] = {}
_folder_syncs = ThreadPoolExecutor(max_workers=4)


def _connection(root: Path) -> sqlite3.Connection:
    with _lock:
        connection = _connections.get(root)
        if connection is None:
            connection = sqlite3.connect(root.parent / "floor.db", check_same_thread=False,
                                         isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={'FULL' if SYNC else 'OFF'}")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS kept (uid TEXT PRIMARY KEY, path TEXT NOT NULL)")
            (root / "flat").mkdir(exist_ok=True)
            _connections[root] = connection
        return connection


def _sync(path: Path) -> None:
    if SYNC:
        fsync_path(path)


def store(self: ingest.Ingest, request: ingest.StoreRequest) -> ingest.StoreOutcome:
    root: Path = self._spool.root
    connection = _connection(root)
    final = root / "flat" / f"{request.affected_sop_instance}.dcm"
    _sync(request.incoming)
    os.link(request.incoming, final)
    syncing = _folder_syncs.submit(_sync, final.parent)
    with _lock:
        connection.execute("BEGIN")
        connection.execute("INSERT INTO kept VALUES (?, ?)",
                           (request.affected_sop_instance, str(final)))
        connection.execute("COMMIT")
    syncing.result()
    return ingest.StoreOutcome(Status.SUCCESS, final.stat().st_size)


if __name__ == "__main__":
    ingest.Ingest.store = store  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))
