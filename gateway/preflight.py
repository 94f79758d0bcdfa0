"""What ``serve`` checks before it listens, and what ``check-config`` reports: one list for both.

Why one place: ``check-config`` used to validate only the file's shape, so it said "ok" for a
configuration that ``serve`` then refused (a destination whose ``password_env`` is unset), and a
port already in use ended ``serve`` in a traceback. Each problem names the key, the bad value and
the fix, as configuration errors do; nothing here writes anything (no folder, no database).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import GatewayConfig, _HttpDestination
from gateway.errors import ConfigError


def problems(config: GatewayConfig, environ: Mapping[str, str] | None = None,
             ports: bool = True) -> list[str]:
    """Every reason ``serve`` would stop at start; empty when it would listen."""
    environ = os.environ if environ is None else environ
    found = _destinations(config, environ)
    found += _writable("storage.spool_dir", config.storage.spool_dir)
    found += _database(config)
    if ports:
        found += _ports(config)
    return found


def _destinations(config: GatewayConfig, environ: Mapping[str, str]) -> list[str]:
    found: list[str] = []
    for destination in config.forward.destinations:
        if not isinstance(destination, _HttpDestination):
            continue
        try:
            destination.password(environ)
        except ConfigError as exc:
            found += exc.problems
        if destination.ca_file is not None and not os.access(destination.ca_file, os.R_OK):
            found.append(f"destination {destination.name}: ca_file {destination.ca_file} cannot "
                         "be read; fix the path or its permissions")
    return found


def _writable(key: str, path: Path) -> list[str]:
    """The folder, or the nearest existing folder above it (``serve`` creates the rest)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"{key} = {str(path)!r}: {existing} is not a folder; choose another path"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [(f"{key} = {str(path)!r}: {existing} is not writable by this user; fix its "
                "permissions or choose another path")]
    return []


def _database(config: GatewayConfig) -> list[str]:
    url = config.database.url
    if url.startswith("sqlite:///"):
        database = Path(url.removeprefix("sqlite:///"))
        if database.exists():
            ok = os.access(database, os.R_OK | os.W_OK)
            return [] if ok else [(f"database.url: {database} is not readable and writable by this "
                                  "user; fix its permissions")]
        return _writable("database.url", database.parent)
    shown = make_url(url).render_as_string(hide_password=True)
    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0][:200]
        return [(f"database.url: cannot connect to {shown} ({reason}); start the database or fix "
                "the URL")]
    finally:
        engine.dispose()
    return []


def _ports(config: GatewayConfig) -> list[str]:
    wanted = [("dicom.port", "GATEWAY_DICOM__PORT", config.dicom.bind_host, config.dicom.port)]
    if config.metrics.enabled and config.metrics.port:
        wanted.append(("metrics.port", "GATEWAY_METRICS__PORT", config.metrics.host,
                       config.metrics.port))
    if config.hl7.enabled and config.hl7.port:
        wanted.append(("hl7.port", "GATEWAY_HL7__PORT", config.hl7.bind_host, config.hl7.port))
    found = []
    for key, variable, host, port in wanted:
        problem = bind_problem(host, port)
        if problem:
            found.append(f"{key} = {port}: {host}:{port} {problem}; set {key} in the file or "
                         f"{variable} to a free port")
    return found


def bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, in words, or None. Bound the way the servers
    bind (SO_REUSEADDR), so a port left in TIME_WAIT by the last run does not count as taken."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        return f"cannot be resolved ({exc.strerror})"
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "is already in use (another gateway, or another program)"
            if exc.errno == errno.EACCES:
                return "needs root or CAP_NET_BIND_SERVICE (a port below 1024)"
            if exc.errno == errno.EADDRNOTAVAIL:
                return "is not an address of this machine"
            return f"cannot be bound ({exc.strerror})"
    return None
