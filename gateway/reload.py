"""What a configuration reload (SIGHUP to ``gateway serve``) may change live, and what needs a
restart: one list, read by ``Gateway.reload`` and the README.

Why a list of keys needing a restart rather than of keys applied live: every key not listed is
applied by rebuilding what uses it (the receiver processes, the forward and remap stages, the job
scheduler), so a key added to the configuration later is live by default and safe by
construction; only what is bound once per process tree is listed:

- the listening socket and the processes sharing it (``dicom.bind_host``, ``dicom.port``,
  ``dicom.workers``: the shared counts are sized at start), and the drain time every process was
  given (``dicom.shutdown_grace_s``);
- where data lives (``database``, ``storage.spool_dir``, ``storage.min_free_mb``: the supervisor's
  spool view), and the node's identity (``forward.node_name``, ``cluster``);
- the supervisor's own listeners (``metrics``: the HTTP port; ``api`` and ``sites``: the export
  API mounted on it; ``hl7``: the MLLP port) and ``logging``;
- whether a stage exists at all (``remap.rules_file`` set or unset, ``forward.destinations`` empty
  or not): the receivers' wake-up pipes are made before they fork.

A reload is all or nothing: one key needing a restart keeps the whole old configuration.
Key names only are ever logged, never values (a database URL holds a password; a rule may hold a
patient's identifier).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel

from gateway import preflight
from gateway.config import GatewayConfig, load

RESTART_KEYS: tuple[str, ...] = (
    "dicom.bind_host",
    "dicom.port",
    "dicom.workers",
    "dicom.shutdown_grace_s",
    "database",
    "storage.spool_dir",
    "storage.min_free_mb",
    "forward.node_name",
    "cluster",
    "metrics",
    "api",
    "sites",
    "hl7",
    "logging",
)
RULES_CONTENT = "remap.rules_file (its contents)"


def read(path: Path) -> GatewayConfig:
    """The file as ``serve`` reads it at start: the same loader and the same checks (but the
    ports, which this process holds; a changed port needs a restart anyway). Raises
    ``ConfigError`` listing every problem."""
    from gateway.errors import ConfigError

    config = load(path)
    found = preflight.problems(config, ports=False)
    if found:
        raise ConfigError(found)
    return config


def rules_digest(config: GatewayConfig) -> str | None:
    """The remap rules file's contents, hashed: an edit of the file under an unchanged path is a
    change too (the rules are what an operator edits during the day)."""
    if config.remap.rules_file is None:
        return None
    try:
        return hashlib.sha256(config.remap.rules_file.read_bytes()).hexdigest()
    except OSError:
        return None


def changed_keys(old: BaseModel, new: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ; a table is descended into, a list
    (``security.peers``, ``forward.destinations``, ``jobs``) is named as a whole."""
    found: list[str] = []
    for name in type(old).model_fields:
        a, b = getattr(old, name), getattr(new, name)
        key = f"{prefix}{name}"
        if isinstance(a, BaseModel) and isinstance(b, BaseModel) and type(a) is type(b):
            found += changed_keys(a, b, key + ".")
        elif a != b:
            found.append(key)
    return found


def needing_restart(old: GatewayConfig, new: GatewayConfig, changed: list[str]) -> list[str]:
    """The changed keys a running process tree cannot take (see the module docstring)."""
    found = [key for key in changed
             if any(key == r or key.startswith(r + ".") for r in RESTART_KEYS)]
    if (old.remap.rules_file is None) != (new.remap.rules_file is None):
        found.append("remap.rules_file")
    if bool(old.forward.destinations) != bool(new.forward.destinations):
        found.append("forward.destinations")
    return sorted(set(found))
