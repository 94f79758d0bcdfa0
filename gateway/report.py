"""``gateway status``: what an operator checks first, from the ledger and the filesystem.

Shows AE titles, counts and sizes only; patient values stay in the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time
from pathlib import Path

from sqlalchemy import Engine, func, select, union
from sqlalchemy.orm import Session

from gateway.cluster.holder import held_by
from gateway.cluster.nodes import STALE_BEATS, list_nodes, waiting_on
from gateway.db.models import (
    AssociationRecord,
    Instance,
    InstanceVersion,
    PerformedSeries,
    PerformedStep,
    WorklistItem,
)
from gateway.receive.spool import filesystem_free_bytes

WORKLIST_STATUSES = (("SCHEDULED", "scheduled"), ("STARTED", "in progress"),
                     ("COMPLETED", "completed"), ("DISCONTINUED", "discontinued"))
WORKLIST_LISTED = 50


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    raise AssertionError("unreachable")


def status_report(session: Session, spool_root: Path, min_free_bytes: int,
                  now: datetime | None = None, waiting_uids: int = 0,
                  node: str | None = None) -> str:
    """Read-only: the spool folder is measured where it is (or would be), never created.
    ``waiting_uids``: list up to that many UIDs waiting on each node (``--waiting``). ``node``:
    this node (``forward.node_name``): the spool line counts what its own disk holds, current
    copies and other versions alike (gateway.cluster.holder); the others' are on their lines."""
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
    in_spool = held_by(node) & Instance.spool_removed_at.is_(None)  # retention removed the rest
    held = session.scalar(select(func.sum(Instance.size_bytes)).where(in_spool)) or 0
    versions = session.scalar(select(func.sum(InstanceVersion.size_bytes))
                              .where(held_by(node, InstanceVersion.node_name),
                                     InstanceVersion.spool_removed_at.is_(None))) or 0
    total = session.scalar(select(func.count()).select_from(Instance).where(in_spool)) or 0
    lines.append("")
    measured = spool_root
    while not measured.exists() and measured != measured.parent:
        measured = measured.parent
    lines.append(f"Spool {spool_root}: {total} instances, {_size(held + versions)} "
                 f"(other versions {_size(versions)}); free "
                 f"{_size(filesystem_free_bytes(measured))}, minimum {_size(min_free_bytes)}")
    lines.append("")
    lines.extend(nodes_report(session, now, waiting_uids))
    lines.append("")
    lines.extend(worklist_today(session, now))
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


def nodes_report(session: Session, now: datetime, waiting_uids: int = 0) -> list[str]:
    """Every node of the cluster: last heartbeat, stale or not, and the instances whose
    forwarding waits on it (only the node holding a file forwards it: gateway.forward.outbox).
    Instances waiting on a stale node are flagged: they leave when it returns."""
    engine = session.get_bind()
    assert isinstance(engine, Engine)
    nodes = list_nodes(engine, now)
    spools = _spools_by_node(session)
    lines = [f"Nodes ({len(nodes)}; stale after {STALE_BEATS} missed heartbeats):"]
    if not nodes:
        lines.append("  (none has started with this database yet)")
    for node in nodes:
        age = (now - node.last_heartbeat).total_seconds()
        count, uids = waiting_on(engine, node.name, waiting_uids)
        flag = "STALE" if node.stale else "alive"
        waiting = f"{count} instances waiting on it" + (
            " (they leave when it returns)" if node.stale and count else "")
        lines.append(f"  {node.name:<20} {flag:<5} last heartbeat "
                     f"{node.last_heartbeat:%Y-%m-%d %H:%M:%S} UTC ({age:.0f} s ago), "
                     f"{node.url or '-'}, {waiting}; {spools.pop(node.name, _EMPTY).line()}")
        lines.extend(f"    waiting: {uid}" for uid in uids)
        if len(uids) < count and uids:
            lines.append(f"    ... and {count - len(uids)} more")
    for name, spool in sorted(spools.items(), key=lambda item: item[0] or ""):
        lines.append(f"  {name or '(no node named)':<20} no heartbeat; {spool.line()}")
    return lines


@dataclass(frozen=True)
class _NodeSpool:
    instances: int = 0
    size_bytes: int = 0
    versions_bytes: int = 0

    def line(self) -> str:
        return (f"its spool {self.instances} instances, "
                f"{_size(self.size_bytes + self.versions_bytes)} "
                f"(other versions {_size(self.versions_bytes)})")


_EMPTY = _NodeSpool()


def _spools_by_node(session: Session) -> dict[str | None, _NodeSpool]:
    """What each node's disk holds: current copies still in its spool and other versions (each
    file is on the node named on its own row, gateway.cluster.holder), without what retention
    removed. Two grouped scans."""
    current = {name: (int(count), int(size or 0)) for name, count, size in session.execute(
        select(Instance.node_name, func.count(), func.sum(Instance.size_bytes))
        .where(Instance.spool_removed_at.is_(None)).group_by(Instance.node_name))}
    versions = {name: int(size or 0) for name, size in session.execute(
        select(InstanceVersion.node_name, func.sum(InstanceVersion.size_bytes))
        .where(InstanceVersion.spool_removed_at.is_(None)).group_by(InstanceVersion.node_name))}
    return {name: _NodeSpool(*current.get(name, (0, 0)), versions.get(name, 0))
            for name in current.keys() | versions.keys()}


def worklist_today(session: Session, now: datetime) -> list[str]:
    """Today's worklist items (Scheduled Procedure Step Start Date is local, as DICOM dates are)
    by status, and each with the images received for it: those of its Study Instance UID and of
    the series its performed procedure steps listed. No patient values: time, modality, station,
    step ID, status, count."""
    today = now.astimezone().strftime("%Y%m%d")
    items = session.scalars(
        select(WorklistItem).where(WorklistItem.start_date == today)
        .order_by(WorklistItem.start_time, WorklistItem.id)
    ).all()
    by_status = {status: sum(1 for i in items if i.status == status)
                 for status, _ in WORKLIST_STATUSES}
    lines = [f"Worklist today ({today[:4]}-{today[4:6]}-{today[6:]}): " + ", ".join(
        f"{by_status[status]} {label}" for status, label in WORKLIST_STATUSES)]
    if not items:
        lines.append("  (no items scheduled today)")
        return lines
    images = _images_per_item(session, [i.id for i in items[:WORKLIST_LISTED]])
    for item in items[:WORKLIST_LISTED]:
        time_of_day = f"{item.start_time[:2]}:{item.start_time[2:4]}" if item.start_time else ""
        lines.append(f"  #{item.id:<6} {time_of_day:<5} {item.modality:<4} "
                     f"{item.station_ae or '-':<16} step {item.step_id:<16} {item.status:<12} "
                     f"{images.get(item.id, 0):>6} images")
    if len(items) > WORKLIST_LISTED:
        lines.append(f"  ... and {len(items) - WORKLIST_LISTED} more")
    return lines


def _images_per_item(session: Session, item_ids: list[int]) -> dict[int, int]:
    by_study = (
        select(WorklistItem.id.label("item"), Instance.id.label("instance"))
        .join(Instance, Instance.study_instance_uid == WorklistItem.study_instance_uid)
        .where(WorklistItem.id.in_(item_ids))
    )
    by_series = (
        select(PerformedStep.worklist_item_id.label("item"), Instance.id.label("instance"))
        .join(PerformedSeries, PerformedSeries.performed_step_id == PerformedStep.id)
        .join(Instance, Instance.series_instance_uid == PerformedSeries.series_instance_uid)
        .where(PerformedStep.worklist_item_id.in_(item_ids))
    )
    linked = union(by_study, by_series).subquery()  # UNION: an image counted once per item
    rows = session.execute(
        select(linked.c.item, func.count()).group_by(linked.c.item)
    ).all()
    return {int(item): int(count) for item, count in rows}
