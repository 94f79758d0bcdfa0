"""``gateway status``: what an operator checks first, from the ledger and the filesystem.

Shows AE titles, counts and sizes only; patient values stay in the database.
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.db.models import AssociationRecord, Instance, InstanceVersion
from gateway.receive.spool import filesystem_free_bytes


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    raise AssertionError("unreachable")


def status_report(session: Session, spool_root: Path, min_free_bytes: int,
                  now: datetime | None = None) -> str:
    """Read-only: the spool folder is measured where it is (or would be), never created."""
    now = now or datetime.now(UTC)
    midnight = datetime.combine(now.date(), time.min, tzinfo=UTC)
    lines = [f"Received today (since {midnight:%Y-%m-%d %H:%M} UTC), by calling AE:"]
    rows = session.execute(
        select(Instance.calling_ae, func.count(), func.sum(Instance.size_bytes))
        .where(Instance.received_at >= midnight)
        .group_by(Instance.calling_ae)
        .order_by(Instance.calling_ae)
    ).all()
    if not rows:
        lines.append("  (nothing yet)")
    for calling_ae, count, size in rows:
        lines.append(f"  {calling_ae:<16} {count:>8} instances {_size(size):>12}")
    held = session.scalar(select(func.sum(Instance.size_bytes))) or 0
    versions = session.scalar(select(func.sum(InstanceVersion.size_bytes))) or 0
    total = session.scalar(select(func.count()).select_from(Instance)) or 0
    lines.append("")
    measured = spool_root
    while not measured.exists() and measured != measured.parent:
        measured = measured.parent
    lines.append(f"Spool {spool_root}: {total} instances, {_size(held + versions)} "
                 f"(other versions {_size(versions)}); free "
                 f"{_size(filesystem_free_bytes(measured))}, minimum {_size(min_free_bytes)}")
    lines.append("")
    lines.append("Last associations:")
    recent = session.scalars(
        select(AssociationRecord).order_by(AssociationRecord.id.desc()).limit(10)
    ).all()
    if not recent:
        lines.append("  (none yet)")
    for a in recent:
        state = a.end_state or "open"
        detail = f"{a.reason}" if a.result == "rejected" else (
            f"{a.instances} stored, {a.duplicates} dup, {_size(a.bytes)}, statuses {a.statuses}"
        )
        lines.append(f"  #{a.id} {a.started_at:%Y-%m-%d %H:%M:%S} {a.calling_ae:<16} "
                     f"{a.peer_host}:{a.peer_port} {a.result}/{state} {detail}")
    return "\n".join(lines)
