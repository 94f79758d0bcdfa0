"""Fixtures: each test gets its own spool, database, port and metrics registry.

``gateway`` runs the real app in this process (fast, inspectable); ``served`` runs ``gateway serve``
as a subprocess, as an operator would, for tests about signals, crashes and logs.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from gateway import busy
from gateway.app import Gateway
from gateway.busy import ReceiverLoad
from gateway.config import GatewayConfig

IN_CI = os.environ.get("CI") == "true"
POSTGRES_URL = os.environ.get("GATEWAY_TEST_POSTGRES_URL")
GATEWAY_BIN = Path(sys.executable).with_name("gateway")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """What a passing test wants the reader of the run to see (`record_property("summary", ...)`,
    e.g. which base the Docker image was built on): pytest shows a passing test's output nowhere
    else, and xdist workers' output not at all; user properties travel with the reports."""
    lines = [f"{report.nodeid}: {value}"
             for reports in terminalreporter.stats.values() for report in reports
             if getattr(report, "when", None) == "call"
             for name, value in getattr(report, "user_properties", ()) if name == "summary"]
    if lines:
        terminalreporter.section("summary")
        for line in lines:
            terminalreporter.line(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PacedReceiver:
    """Stands in for the C-STORE handlers as ``gateway.busy`` reads them: one ends every
    ``every_s``, and together they are busy ``share`` of wall time (set ``share`` to change it as
    it runs). The share of the time elapsed is added, so it is exact however the waits are timed;
    a real saturation depends on the machine running the tests.

    A loaded machine can still starve this thread: once no C-STORE has ended for ``quiet_s`` the
    stages rightly read the burst as over. ``steady`` says whether that never happened, so that a
    test can tell a hold that released early from a simulated burst that paused."""

    def __init__(self, load: ReceiverLoad, share: float, every_s: float = 0.005) -> None:
        self.share = share
        self._load = load
        self._every_s = every_s
        self.quiet_s = max(busy.QUIET_S, busy.QUIET_GAPS * every_s)
        self.longest_gap_s = 0.0
        self._steady_since = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def steady(self) -> bool:
        """No pause long enough for a stage to see the burst end (with a tenth to spare)."""
        return self.longest_gap_s < 0.9 * self.quiet_s

    def steady_for(self) -> float:
        """Seconds since the start or the last pause that could have ended the burst."""
        return time.monotonic() - self._steady_since

    def stop(self) -> None:
        """No C-STORE ends after this returns."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._every_s):
            now = time.monotonic()
            self._load.add(self.share * (now - last))
            if now - last >= 0.9 * self.quiet_s:
                self._steady_since = now
            self.longest_gap_s = max(self.longest_gap_s, now - last)
            last = now


@contextlib.contextmanager
def saturated(load: ReceiverLoad | None, share: float = 0.8) -> Iterator[PacedReceiver]:
    """The receiver's C-STORE handlers busy ``share`` of wall time, ending every 40 ms: a pause
    of the test process shorter than ``QUIET_GAPS`` times that (160 ms) does not end the burst.
    Yields once the stages have seen two whole windows of it; check ``steady`` afterwards."""
    assert load is not None, "the gateway has no background stage to read its load"
    with PacedReceiver(load, share, every_s=0.04) as receiver:
        warm = 2 * busy.WINDOW_S + 2 * busy.POLL_S
        wait_for(lambda: receiver.steady_for() >= warm, 30, "two steady windows of the burst")
        yield receiver


def wait_for(predicate: Callable[[], Any], timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {message}")
        time.sleep(0.02)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: SQLite in tmp_path, or a new database on the machine's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    if not POSTGRES_URL:
        unavailable("GATEWAY_TEST_POSTGRES_URL not set (scripts/test sets it when PostgreSQL runs)")
    name = f"gw_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(POSTGRES_URL).set(database=name)
    yield url.render_as_string(hide_password=False)
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gateway.db'}"


def config_dict(tmp_path: Path, db: str, port: int, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "dicom": {"ae_title": "GATEWAY", "bind_host": "127.0.0.1", "port": port,
                  "shutdown_grace_s": 5.0},
        "security": {"check_called_ae_title": True, "unknown_callers": ["echo", "store"]},
        "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_mb": 1},
        "database": {"url": db, "busy_timeout_s": 2.0},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "logging": {"level": "INFO"},
    }
    for section, values in sections.items():  # a table is merged; a list ([[jobs]]) replaces
        data[section] = values if isinstance(values, list) else {**data.get(section, {}), **values}
    return data


@pytest.fixture
def make_gateway(
    tmp_path: Path, sqlite_url: str
) -> Iterator[Callable[..., Gateway]]:
    """Start the real app in this process: ``make_gateway(db=..., storage={...}, ...)``."""
    started: list[Gateway] = []

    def start(db: str | None = None, free_bytes: Any = None, **sections: dict[str, Any]) -> Gateway:
        for attempt in range(5):
            data = config_dict(tmp_path, db or sqlite_url, free_port(), **sections)
            app = Gateway(GatewayConfig.model_validate(data), CollectorRegistry(), free_bytes)
            try:
                app.start()
            except OSError as exc:
                # The free port was taken between free_port() and the bind (another test's peer
                # starting, in this process or another xdist worker): another port, not a failure
                app.stop()
                if exc.errno != errno.EADDRINUSE or attempt == 4:
                    raise
                continue
            started.append(app)
            return app
        raise AssertionError("unreachable")

    yield start
    for app in started:
        app.stop()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    lines = []
    for section, values in data.items():
        tables = values if isinstance(values, list) else [values]  # a list: [[section]] each
        for table in tables:
            lines.append(f"[[{section}]]" if isinstance(values, list) else f"[{section}]")
            lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
            lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@dataclass
class Served:
    """A ``gateway serve`` subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    config_path: Path
    spool: Path
    db_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


@pytest.fixture
def served(tmp_path: Path, sqlite_url: str) -> Iterator[Callable[..., Served]]:
    """Start ``gateway serve --config F`` as a subprocess and wait until it listens."""
    running: list[Served] = []

    def start(db: str | None = None, env: dict[str, str] | None = None,
              **sections: dict[str, Any]) -> Served:
        for attempt in range(5):
            port, metrics_port = free_port(), free_port()
            data = config_dict(tmp_path, db or sqlite_url, port, **sections)
            data["metrics"]["port"] = metrics_port
            config_path = write_toml(tmp_path / f"gateway-{port}.toml", data)
            log_path = tmp_path / f"gateway-{port}.log"
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    [str(GATEWAY_BIN), "serve", "--config", str(config_path)],
                    stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                )
            server = Served(process, port, metrics_port, config_path,
                            Path(data["storage"]["spool_dir"]), data["database"]["url"], log_path)
            running.append(server)
            wait_for(functools.partial(_listening_or_gone, port, process), 30,
                     "gateway to listen")
            # A free port taken before the gateway bound it (another test's peer starting, in
            # another xdist worker): other ports, as make_gateway does
            if process.poll() is not None and "Address already in use" in server.log() \
                    and attempt < 4:
                continue
            assert process.poll() is None, f"gateway exited at start:\n{server.log()}"
            return server
        raise AssertionError("unreachable")

    yield start
    for server in running:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def _listening_or_gone(port: int, process: subprocess.Popen[bytes]) -> bool:
    return port_open(port) or process.poll() is not None


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        listed = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True, check=False)
        for child in map(int, listed.stdout.split()):
            found.add(child)
            frontier.append(child)
    return found


def running(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def rows(db: str, sql: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(db)
    try:
        with engine.connect() as c:
            return list(c.execute(sa.text(sql), params).all())
    finally:
        engine.dispose()


# At the end: tests.orthanc uses free_port and wait_for from this module.
from tests.orthanc import orthanc_factory  # noqa: F401
from tests.peers import unavailable
