"""Loading the identity table and the orders from files the hospital's systems export.

Idempotent: importing the same file twice changes nothing the second time. Every row is validated
(pydantic, so the rules are declared, not hand-checked); a bad row is reported with its line number
and the reason, and the good rows still load. The report counts added, updated, unchanged and
rejected rows. Patient values appear in the report only as line numbers, never in the log.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway import audit
from gateway.db.models import Order, PatientIdentity

Sex = Literal["M", "F", "O"]
# An order's life: scheduled, then in progress and completed (MPPS); cancelled before it started
# or discontinued once started (HL7 ORC-1 CA, DC). The worklist lists scheduled and in_progress.
OrderStatus = Literal["scheduled", "in_progress", "completed", "cancelled", "discontinued"]


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    @field_validator("birth_date", check_fields=False)
    @classmethod
    def _dicom_date(cls, value: str | None) -> str | None:
        if not value:
            return None
        try:
            datetime.strptime(value, "%Y%m%d")
        except ValueError:
            raise ValueError("birth_date must be a date written YYYYMMDD") from None
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class IdentityRow(_Row):
    issuer: str = Field(min_length=1, max_length=64)
    local_id: str = Field(min_length=1, max_length=64)
    mrn: str = Field(min_length=1, max_length=64)
    patient_name: str | None = Field(None, max_length=324)
    birth_date: str | None = None
    sex: Sex | None = None


class OrderRow(_Row):
    accession_number: str = Field(min_length=1, max_length=16)  # SH
    mrn: str = Field(min_length=1, max_length=64)
    modality: str = Field(min_length=1, max_length=16)
    scheduled_at: datetime
    requested_procedure_id: str | None = Field(None, max_length=16)
    requested_procedure_description: str | None = Field(None, max_length=64)
    study_instance_uid: str | None = Field(None, max_length=64, pattern=r"^[0-9.]+$")
    patient_name: str | None = Field(None, max_length=324)
    birth_date: str | None = None
    sex: Sex | None = None
    status: OrderStatus = "scheduled"

    @field_validator("scheduled_at", mode="before")
    @classmethod
    def _dicom_or_iso(cls, value: Any) -> Any:
        """Accept ISO 8601 and DICOM's YYYYMMDDHHMM[SS]; local time, no zone (as DICOM's)."""
        if isinstance(value, str) and value.isdigit() and len(value) in (12, 14):
            return datetime.strptime(value.ljust(14, "0"), "%Y%m%d%H%M%S")
        return value

    @field_validator("scheduled_at")
    @classmethod
    def _naive(cls, value: datetime) -> datetime:
        if value.tzinfo is not None:
            raise ValueError("scheduled_at is local wall-clock time, as in DICOM: drop the zone")
        return value


@dataclass
class ImportReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            (f"added {self.added}, updated {self.updated}, unchanged {self.unchanged}, "
            f"rejected {len(self.rejected)}")
        ]
        out += [f"  line {line}: {why}" for line, why in self.rejected]
        return out


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, fields) from a CSV with a header row, or a JSON list of objects (where the
    "line" is the object's position, counted from 1)."""
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        for number, item in enumerate(data, start=1):
            yield number, item if isinstance(item, dict) else {"": item}
        return
    with open(path, newline="", encoding="utf-8-sig") as fp:
        reader = csv.DictReader(fp)
        for row in reader:
            yield reader.line_num, {k.strip(): (v or "") for k, v in row.items() if k is not None}


def _why(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "row"
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown column; check the header row"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def import_identities(
    session: Session, path: Path, actor: str, now: datetime | None = None
) -> ImportReport:
    """Keyed by (issuer, local ID): a row for a known key updates it."""
    return _upsert(session, path, IdentityRow, PatientIdentity,
                   lambda r: (r.issuer, r.local_id), "identities_imported", actor, now)


def import_orders(session: Session, path: Path, actor: str, now: datetime | None = None) -> ImportReport:
    """Keyed by accession number: a row for a known accession updates the order."""
    return _upsert(session, path, OrderRow, Order,
                   lambda r: r.accession_number, "orders_imported", actor, now)


def _upsert(
    session: Session,
    path: Path,
    row_model: type[_Row],
    table: type[PatientIdentity | Order],
    key: Callable[[Any], object],
    action: str,
    actor: str,
    now: datetime | None,
) -> ImportReport:
    now = now or datetime.now(UTC)
    report = ImportReport()
    existing: dict[object, Any] = {key(r): r for r in session.scalars(select(table))}
    for line, fields in _records(path):
        try:
            row = row_model.model_validate(fields)
        except ValidationError as exc:
            report.rejected.append((line, _why(exc)))
            continue
        values = row.model_dump()
        current = existing.get(key(row))
        if current is None:
            current = table(**values, updated_at=now)
            session.add(current)
            existing[key(row)] = current
            report.added += 1
        elif any(getattr(current, k) != v for k, v in values.items()):
            for name, value in values.items():
                setattr(current, name, value)
            current.updated_at = now
            report.updated += 1
        else:
            report.unchanged += 1
    audit.record(session, actor, action, None, now, file=path.name,
                 added=report.added, updated=report.updated, rejected=len(report.rejected))
    return report
