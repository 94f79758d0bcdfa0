"""Durable commits per second from 1, 2 and 4 processes on one database, with the gateway's own
engine settings (``gateway.db.engine.make_engine``: SQLite WAL, ``synchronous=FULL``, the busy
timeout): does SQLite fail (``database is locked``) or serialise when several receiver processes
(``dicom.workers``) commit at once? Each process runs ``--threads`` threads (a receiver's
association threads), each committing one ~1 kB row per transaction, as a C-STORE does.

    python scripts/measure_commits.py [--seconds 5] [--threads 2] [--postgres URL]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from gateway.db.engine import make_engine

ROW = "x" * 1000


def _process(url: str, seconds: float, threads: int, out: Any) -> None:
    engine = make_engine(url, busy_timeout_s=10.0)
    counts = [0, 0]  # commits, failures
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def commit_loop() -> None:
        while time.monotonic() < deadline:
            try:
                with engine.begin() as c:
                    c.execute(sa.text("INSERT INTO t (pid, body) VALUES (:p, :b)"),
                              {"p": os.getpid(), "b": ROW})
                with lock:
                    counts[0] += 1
            except OperationalError:
                with lock:
                    counts[1] += 1

    running = [threading.Thread(target=commit_loop) for _ in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    out.put(tuple(counts))
    engine.dispose()


def measure(url: str, processes: int, seconds: float, threads: int) -> tuple[float, int]:
    engine = make_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("DROP TABLE IF EXISTS t"))
        c.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY "
                          + ("AUTOINCREMENT" if url.startswith("sqlite") else "GENERATED ALWAYS "
                             "AS IDENTITY") + ", pid INTEGER, body TEXT)"))
    engine.dispose()
    ctx = multiprocessing.get_context("fork")
    out: Any = ctx.Queue()
    procs = [ctx.Process(target=_process, args=(url, seconds, threads, out))
             for _ in range(processes)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join()
    engine = make_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("DROP TABLE t"))
    engine.dispose()
    return sum(r[0] for r in results) / seconds, sum(r[1] for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--postgres", help="a PostgreSQL URL to measure beside SQLite")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(dir=Path.home()) as folder:
        urls = [("sqlite", f"sqlite:///{folder}/commits.db")]
        if args.postgres:
            urls.append(("postgresql", args.postgres))
        for name, url in urls:
            for processes in (1, 2, 4):
                rate, failed = measure(url, processes, args.seconds, args.threads)
                print(f"{name:<10} {processes} process(es) x {args.threads} threads: "
                      f"{rate:7.0f} commits/s, {failed} failed", flush=True)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
