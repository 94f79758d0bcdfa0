"""The ledger's tables: what arrived, every version of it, and every association.

Patient values live here (they are what the ledger is for) and nowhere in the service log. Schema
changes go through an Alembic migration in ``gateway/db/migrations/versions``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
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
    # Retention walks the instances still in the spool, oldest first, however many were removed.
    __table_args__ = (Index("ix_instances_in_spool", "spool_removed_at", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LEN))
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    calling_ae: Mapped[str] = mapped_column(String(16), index=True)
    peer_address: Mapped[str] = mapped_column(String(80))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LEN))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # SHA-256 of the data set as received (gateway.receive.spool.hash_dataset: from the data
    # set's offset, after the File Meta Information): duplicate detection compares arrivals with
    # it, so it never changes while the row describes the same received object.
    sha256: Mapped[str] = mapped_column(String(64))
    # The same hash of the file now at ``spool_path``, once the remap stage rewrote it; NULL:
    # the file is the received one (``sha256`` describes it), or, with ``remap_state`` done, it
    # was rewritten before revision 0014 and the ledger has no hash of it. What a reader checks
    # a spool file against: ``kept_hash`` below.
    kept_sha256: Mapped[str | None] = mapped_column(String(64))
    spool_path: Mapped[str] = mapped_column(String(400))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    # Remap (gateway.remap): patient_id, patient_name and accession_number above hold the values
    # the instance carries after remapping; the received ones are kept here. ``remap_state``:
    # none (no rule changed it), pending (file not rewritten yet; ``remap_plan`` says how), held
    # (its study waits for an operator), done (file rewritten), failed (rewrite refused; see log).
    remap_state: Mapped[str] = mapped_column(
        String(16), default="none", server_default="none", index=True
    )
    remap_plan: Mapped[str | None] = mapped_column(Text)
    original_patient_id: Mapped[str | None] = mapped_column(String(64))
    original_patient_name: Mapped[str | None] = mapped_column(String(324))
    original_accession_number: Mapped[str | None] = mapped_column(String(64))
    # What C-FIND answers with (gateway.query.attributes), as the instance carries it (remapped).
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    study_time: Mapped[str | None] = mapped_column(String(16))
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician_name: Mapped[str | None] = mapped_column(String(324))
    series_number: Mapped[str | None] = mapped_column(String(12))
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    instance_number: Mapped[str | None] = mapped_column(String(12))
    # gateway.query.folding.fold_name of the names above: matching compares these, on every database.
    patient_name_folded: Mapped[str | None] = mapped_column(String(324), index=True)
    referring_physician_name_folded: Mapped[str | None] = mapped_column(String(324))
    # Institution Name (0008,0080) as the instance carries it (remapped): sites (gateway.web.auth,
    # gateway.export.select.site_scope) recognise a hospital's instances by it.
    institution_name: Mapped[str | None] = mapped_column(String(64), index=True)
    # Retention (gateway.forward.retention) removed the file once every destination confirmed it.
    spool_removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The node whose spool holds the file (``forward.node_name`` of the node that received it;
    # gateway.cluster). NULL: written before nodes were recorded and by no node since: whichever
    # node reads it, as when there was only one.
    node_name: Mapped[str | None] = mapped_column(String(64), index=True)


def kept_hash(sha256: str, kept_sha256: str | None, remap_state: str) -> str | None:
    """The SHA-256 the data set of an instance's spool file must have (``coalesce(kept_sha256,
    sha256)``); None when the ledger does not know it: a file the remap stage rewrote before
    revision 0013 recorded kept hashes (its ``sha256`` is the received object's, which the file
    no longer is, and rehashing every such file at upgrade was not an option)."""
    if kept_sha256 is not None:
        return kept_sha256
    return None if remap_state == "done" else sha256


class InstanceVersion(Base):
    """A copy of an instance that is not (or no longer) the current one; never deleted silently.

    ``disposition`` says why it exists: ``superseded`` (policy ``replace`` made a newer copy
    current) or ``not_kept`` (policy ``keep_first`` kept the older copy current).
    """

    __tablename__ = "instance_versions"
    # Retention walks the versions still in the spool, oldest first (migration 0015).
    __table_args__ = (Index("ix_instance_versions_in_spool", "spool_removed_at", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), index=True)
    disposition: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    spool_path: Mapped[str] = mapped_column(String(400))
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The node whose spool holds this version's file: the node that received this copy, which
    # may differ from the current copy's (gateway.cluster). NULL: as ``Instance.node_name``.
    node_name: Mapped[str | None] = mapped_column(String(64), index=True)
    # Set by retention (gateway.forward.retention) before it unlinks the file, as
    # ``Instance.spool_removed_at``: the row stays, the ledger keeps the history.
    spool_removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PatientIdentity(Base):
    """Device or local patient ID -> the hospital MRN, keyed by issuer (or the calling AE title
    when the object names no Issuer of Patient ID)."""

    __tablename__ = "patient_identities"
    __table_args__ = (UniqueConstraint("issuer", "local_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    issuer: Mapped[str] = mapped_column(String(64))
    local_id: Mapped[str] = mapped_column(String(64))
    mrn: Mapped[str] = mapped_column(String(64), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(324))
    birth_date: Mapped[str | None] = mapped_column(String(8))
    sex: Mapped[str | None] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Order(Base):
    """A scheduled procedure from the hospital's order system; the worklist builds on it too.

    ``scheduled_at`` is local wall-clock time without a zone, as DICOM dates and times are.
    """

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    accession_number: Mapped[str] = mapped_column(String(64), unique=True)
    mrn: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str] = mapped_column(String(16))
    scheduled_at: Mapped[datetime] = mapped_column(DateTime(timezone=False), index=True)
    requested_procedure_id: Mapped[str | None] = mapped_column(String(64))
    requested_procedure_description: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(324))
    birth_date: Mapped[str | None] = mapped_column(String(8))
    sex: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="scheduled")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Worklist (gateway.worklist): where and by whom it is to be performed, from the RIS (HL7
    # OBR/ORC) or an import; ``procedure_steps`` lists several steps as JSON when the order has
    # more than one (each {step_id, description, modality, station_ae, start}); the HL7 order
    # numbers tie change and cancel messages to the order.
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    scheduled_station_ae: Mapped[str | None] = mapped_column(String(16))
    scheduled_station_name: Mapped[str | None] = mapped_column(String(16))
    performing_physician: Mapped[str | None] = mapped_column(String(324))
    referring_physician: Mapped[str | None] = mapped_column(String(324))
    procedure_steps: Mapped[str | None] = mapped_column(Text)
    placer_order_number: Mapped[str | None] = mapped_column(String(64), index=True)
    filler_order_number: Mapped[str | None] = mapped_column(String(64), index=True)


class WorklistItem(Base):
    """One Scheduled Procedure Step a modality sees in its worklist (PS3.4 Annex K), built from
    an order by the worklist build job. ``status`` holds the DICOM SPS status (SCHEDULED,
    STARTED, COMPLETED, DISCONTINUED); only SCHEDULED and STARTED items are listed. Names are
    stored with their folded form (gateway.query.folding) for matching, as the ledger does."""

    __tablename__ = "worklist_items"
    __table_args__ = (UniqueConstraint("order_id", "step_id"),
                      Index("ix_worklist_items_listed", "start_date", "status", "expires_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    step_id: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    accession_number: Mapped[str] = mapped_column(String(16), index=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_name_folded: Mapped[str | None] = mapped_column(String(324), index=True)
    birth_date: Mapped[str | None] = mapped_column(String(8))
    sex: Mapped[str | None] = mapped_column(String(16))
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), index=True)
    requested_procedure_id: Mapped[str | None] = mapped_column(String(16))
    requested_procedure_description: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16), index=True)
    station_ae: Mapped[str | None] = mapped_column(String(16), index=True)
    station_name: Mapped[str | None] = mapped_column(String(16))
    start_date: Mapped[str] = mapped_column(String(8), index=True)  # DA, local
    start_time: Mapped[str] = mapped_column(String(16))  # TM, local
    performing_physician: Mapped[str | None] = mapped_column(String(324))
    performing_physician_folded: Mapped[str | None] = mapped_column(String(324))
    step_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician: Mapped[str | None] = mapped_column(String(324))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    built_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The item's attributes that have no column above (an imported .wl file's Medical Alerts,
    # Requested Procedure Code Sequence, ...), in the DICOM JSON model (PS3.18 F.2); those of the
    # Scheduled Procedure Step inside its (0040,0100) item. Answered, never matched on.
    attributes: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")


class WorklistItemStation(Base):
    """Every Scheduled Station AE Title (0040,0001) of an item: the attribute is multi-valued
    (VM 1-n), and a query for one of them matches the item (PS3.4 K.6.1.2). ``station_ae`` of
    the item holds the first, for display."""

    __tablename__ = "worklist_item_stations"

    item_id: Mapped[int] = mapped_column(
        ForeignKey("worklist_items.id", ondelete="CASCADE"), primary_key=True)
    station_ae: Mapped[str] = mapped_column(String(16), primary_key=True, index=True)


class PerformedStep(Base):
    """A Modality Performed Procedure Step (PS3.4 Annex F): created IN PROGRESS by N-CREATE,
    ended COMPLETED or DISCONTINUED by N-SET. ``attributes`` is the step as last set, in the
    DICOM JSON model (PS3.18 F.2), which the N-SET checks read; the performed series it lists
    link the study to its order (``study_instance_uid``, ``accession_number``)."""

    __tablename__ = "performed_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    worklist_item_id: Mapped[int | None] = mapped_column(ForeignKey("worklist_items.id"))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    performed_series: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of UIDs
    attributes: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PerformedSeries(Base):
    """One series a performed step lists (Performed Series Sequence, PS3.3 C.4.15): the link
    from the images in the ledger (``instances.series_instance_uid``) to the step, and through
    it to the worklist item and the order, which remap follows before any date-window match.
    A table rather than a search in ``performed_steps.performed_series``: the lookup runs in the
    C-STORE handler, for a study's first instance, and must be an index probe."""

    __tablename__ = "performed_series"
    __table_args__ = (UniqueConstraint("performed_step_id", "series_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    performed_step_id: Mapped[int] = mapped_column(ForeignKey("performed_steps.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), index=True)


class Hl7Message(Base):
    """Every HL7 v2 message received over MLLP, in full (it holds patient data: it lives here,
    never in the service log), with the acknowledgement it got (AA, AE or AR) and why."""

    __tablename__ = "hl7_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    peer: Mapped[str] = mapped_column(String(80))
    message_type: Mapped[str | None] = mapped_column(String(16))
    control_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    ack_code: Mapped[str] = mapped_column(String(2), index=True)
    error: Mapped[str | None] = mapped_column(String(400))
    raw: Mapped[str] = mapped_column(Text)


class StudyDecision(Base):
    """One decision per study, so every instance of it gets the same mapping, across
    associations and restarts. ``state``: ready (apply it) or held (waits for an operator;
    ``candidates`` lists the orders that could fit, as JSON)."""

    __tablename__ = "study_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    hold_reason: Mapped[str | None] = mapped_column(String(200))
    # The answers the study's instances replay (gateway.remap.lookup.StoredResolver), as JSON.
    identity: Mapped[str | None] = mapped_column(Text)
    order_match: Mapped[str | None] = mapped_column(Text)
    candidates: Mapped[str] = mapped_column(Text, default="[]")
    mrn: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    rules: Mapped[str] = mapped_column(Text, default="[]")
    decided_by: Mapped[str] = mapped_column(String(64))
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """Who did what and when: automatic decisions (actor ``gateway``) and operators' commands.
    ``detail`` is JSON and may hold patient values: it is the record, not the service log."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN), index=True)
    detail: Mapped[str] = mapped_column(Text, default="{}")


class ForwardJob(Base):
    """One instance on its way to one destination: the outbox row and the delivery ledger.

    ``state``: queued (waits for ``next_attempt_at``, and for its instance's remap) -> sending
    (claimed by ``owner`` until ``lease_until``) -> forwarded (the destination said stored) ->
    confirmed (the destination was asked and holds it); or dead (permanent refusal, too many
    attempts or too old; ``last_error`` says why) and purged (an operator gave up on it).
    Created in the transaction that records the instance, so no kept instance lacks its jobs.
    """

    __tablename__ = "forward_jobs"
    __table_args__ = (
        UniqueConstraint("instance_id", "destination"),
        Index("ix_forward_jobs_ready", "destination", "state", "next_attempt_at"),
        Index("ix_forward_jobs_study", "destination", "study_instance_uid", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LEN))
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    forwarded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    confirmed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # What the destination knows the instance by: its UIDs as sent (after any regeneration) and
    # the destination's own identifier where it has one (Orthanc's instance ID).
    sent_study_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    sent_series_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    sent_sop_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    remote_id: Mapped[str | None] = mapped_column(String(64))
    # Times the destination was asked (proof of delivery) and lacked this instance; the re-send
    # stops at ``forward.max_verify_misses`` and the job goes to the dead letters.
    verify_misses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(String(400))


class DestinationState(Base):
    """Each destination's circuit breaker, written on every change so that ``gateway queue``
    (another process) shows it."""

    __tablename__ = "destination_states"

    destination: Mapped[str] = mapped_column(String(64), primary_key=True)
    breaker: Mapped[str] = mapped_column(String(16))  # closed | open
    failures: Mapped[int] = mapped_column(Integer, default=0)
    since: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(String(400))


class JobRun(Base):
    """One run of a scheduled job (gateway.jobs): when, where, how it ended and what it did.

    ``scheduled_for`` is the fire time a scheduled run answers (None for a run an operator asked
    for); it is unique per job, so two nodes firing the same time run it once. ``outcome``:
    running, success, failed, interrupted (the node stopped or died while it ran)."""

    __tablename__ = "job_runs"
    __table_args__ = (UniqueConstraint("job", "scheduled_for"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    node: Mapped[str] = mapped_column(String(64))
    trigger: Mapped[str] = mapped_column(String(16))  # schedule | missed | operator
    scheduled_for: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str] = mapped_column(String(16), index=True)
    counts: Mapped[str] = mapped_column(Text, default="{}")  # JSON {"imported": 3, ...}
    error: Mapped[str | None] = mapped_column(String(400))


class JobLease(Base):
    """Who runs a job now: one row per job, held until ``lease_until`` (renewed while the run
    lasts), so a job never runs twice at once, on one node or on several sharing PostgreSQL."""

    __tablename__ = "job_leases"

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    node: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[int | None] = mapped_column(Integer)
    lease_until: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Node(Base):
    """A gateway node sharing this database (gateway.cluster): its heartbeat, and where the
    others fetch its files (``url``: its HTTP application)."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_heartbeat: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    url: Mapped[str | None] = mapped_column(String(300))
    version: Mapped[str] = mapped_column(String(32))
    heartbeat_s: Mapped[float] = mapped_column(Float)
