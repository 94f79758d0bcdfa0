"""The ledger's tables: what arrived, every version of it, and every association.

Patient values live here (they are what the ledger is for) and nowhere in the service log. Schema
changes go through an Alembic migration in ``gateway/db/migrations/versions``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UID_LEN = 64


class Base(DeclarativeBase):
    pass


class AssociationRecord(Base):
    """One association request, accepted or rejected, with what it carried."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16), index=True)
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    result: Mapped[str] = mapped_column(String(16))  # accepted | rejected
    reason: Mapped[str | None] = mapped_column(String(64))
    end_state: Mapped[str | None] = mapped_column(String(16))  # released | aborted | closed
    instances: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    statuses: Mapped[str] = mapped_column(Text, default="{}")  # JSON {"0x0000": n, ...}


class Instance(Base):
    """The current version of each SOP instance held in the spool."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LEN))
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    calling_ae: Mapped[str] = mapped_column(String(16), index=True)
    peer_address: Mapped[str] = mapped_column(String(80))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LEN))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    spool_path: Mapped[str] = mapped_column(String(400))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))


class InstanceVersion(Base):
    """A copy of an instance that is not (or no longer) the current one; never deleted silently.

    ``disposition`` says why it exists: ``superseded`` (policy ``replace`` made a newer copy
    current) or ``not_kept`` (policy ``keep_first`` kept the older copy current).
    """

    __tablename__ = "instance_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), index=True)
    disposition: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    spool_path: Mapped[str] = mapped_column(String(400))
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
