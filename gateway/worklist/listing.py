"""``gateway worklist list``: one day's worklist items for an operator at a terminal.

Lines carry what an operator needs to find a step (start, station, modality, status, accession
number, procedure): they are printed on the operator's terminal, never logged.
"""

from __future__ import annotations

from sqlalchemy import Engine, select

from gateway.db.models import WorklistItem, WorklistItemStation


def items_on(engine: Engine, day: str, station: str | None = None) -> list[str]:
    """Every item scheduled on ``day`` (DA, local), listed or not, by start time."""
    statement = (select(WorklistItem.start_time, WorklistItem.station_ae, WorklistItem.modality,
                        WorklistItem.status, WorklistItem.accession_number,
                        WorklistItem.step_id, WorklistItem.requested_procedure_description)
                 .where(WorklistItem.start_date == day)
                 .order_by(WorklistItem.start_time, WorklistItem.id))
    if station:
        statement = statement.where(WorklistItem.id.in_(
            select(WorklistItemStation.item_id).where(WorklistItemStation.station_ae == station)))
    with engine.connect() as c:
        rows = c.execute(statement).all()
    lines = [(f"{'start':<6} {'station':<16} {'mod':<4} {'status':<12} {'accession':<16} "
             f"{'step':<16} procedure")] if rows else []
    for time, ae, modality, status, accession, step, description in rows:
        shown = f"{time[:2]}:{time[2:4]}" if len(time) >= 4 else time
        lines.append(f"{shown:<6} {ae or '-':<16} {modality:<4} {status:<12} {accession:<16} "
                     f"{step:<16} {description or ''}")
    return lines
