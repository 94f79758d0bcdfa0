"""C-STORE policy: validate -> spool -> record -> answer. The one rule lives here.

Success (0x0000) is returned only after the instance's file is synced under its final name and its
ledger row is committed. Every other path leaves nothing behind: a refused or failed instance has
no file and no row, so the sender (which still holds it) is the only copy, as it should be.

Statuses (PS3.4 B.2.3, PS3.7 C.4): 0x0000 kept or identical duplicate; 0xA700 out of resources (disk
below the minimum, database unavailable); 0xA900 dataset UIDs differ from the request; 0xC000 not
decodable; 0xC001 UID missing or invalid; 0x0111 different content under a known SOP Instance UID
with policy ``reject``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from gateway.cluster.holder import held_by
from gateway.config import DuplicatePolicy
from gateway.db.engine import make_sessions
from gateway.db.models import ForwardJob, Instance, InstanceVersion
from gateway.dicom.status import Status
from gateway.forward.outbox import new_jobs, requeue_for_new_copy
from gateway.forward.routes import Router
from gateway.query.attributes import ledger_values
from gateway.receive.spool import Spool, SpooledFile
from gateway.receive.validate import Header, Refused, dataset_offset, read_header
from gateway.remap.plan import Subject
from gateway.remap.stage import Decided, Plan, Remapper, plan_json

_AS_RECEIVED = Decided(Plan(), "none")

log = logging.getLogger(__name__)

# Built once: SQLAlchemy then finds the compiled statement in its cache on every image.
_INSERT_INSTANCE = insert(Instance)
_DELETE_INSTANCE = delete(Instance)


@dataclass(frozen=True)
class StoreRequest:
    """One complete C-STORE request, as the SCP glue hands it over."""

    incoming: Path
    affected_sop_class: str
    affected_sop_instance: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    peer_address: str
    association_id: int | None


@dataclass(frozen=True)
class _Prepared:
    """What ingest worked out while the received file was being synced."""

    request: StoreRequest
    decided: Decided
    routed: tuple[str, ...]
    values: dict[str, object]  # the row, without the kept file's columns

    def row(self, stored: SpooledFile, spool_path: str) -> dict[str, object]:
        """``kept_sha256`` NULL: the file at ``spool_path`` is the one received, which
        ``sha256`` describes; so a copy that replaces the current one (policy ``replace``) also
        drops the hash of the rewritten file it replaces."""
        return self.values | {"size_bytes": stored.size_bytes, "sha256": stored.sha256,
                              "kept_sha256": None, "spool_path": spool_path}


@dataclass(frozen=True)
class StoreOutcome:
    status: Status
    kept_bytes: int = 0
    duplicate: str | None = None  # identical | kept_first | replaced | rejected
    reason: str | None = None


class Ingest:
    def __init__(
        self,
        spool: Spool,
        engine: Engine,
        duplicate_policy: DuplicatePolicy,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        remapper: Remapper | None = None,
        on_pending: Callable[[int], None] = lambda instance_id: None,
        router: Router | None = None,
        on_queued: Callable[[], None] = lambda: None,
        node_name: str | None = None,
    ) -> None:
        """``node_name``: recorded as the holder of every file kept here (gateway.cluster)."""
        self._node_name = node_name
        self._router = router
        self._on_queued = on_queued
        self._remapper = remapper
        self._on_pending = on_pending
        self._spool = spool
        self._engine = engine
        self._sessions = make_sessions(engine)
        self._policy = duplicate_policy
        self._clock = clock
        # One decision at a time per SOP Instance UID: two associations sending the same UID must
        # not both find "no row" and publish over each other's file.
        self._locks = [threading.Lock() for _ in range(64)]

    @property
    def incoming(self) -> Path:
        return self._spool.incoming

    def store(self, request: StoreRequest) -> StoreOutcome:
        try:
            if not self._spool.has_room_for(request.incoming.stat().st_size):
                return StoreOutcome(Status.OUT_OF_RESOURCES, reason="spool below minimum free")
            with open(request.incoming, "rb") as fp:
                offset = dataset_offset(fp)
                # Hash and fsync in workers while this thread decodes the header and works out
                # the row: both release the GIL, and the fsync is the handler's longest wait.
                sealing = self._spool.seal_in_background(request.incoming, offset)
                try:
                    header = read_header(
                        fp, request.affected_sop_class, request.affected_sop_instance
                    )
                    prepared = self._prepare(request, header)
                finally:
                    sealed = sealing.result()
        except Refused as refused:
            return StoreOutcome(refused.status, reason=refused.reason)
        except OSError as exc:
            log.error("spool write failed for %s: %s", request.affected_sop_instance, exc.strerror)
            return StoreOutcome(Status.OUT_OF_RESOURCES, reason="spool write failed")
        except SQLAlchemyError as exc:
            return self._database_unavailable(exc)
        try:
            with self._locks[hash(header.sop_instance_uid) % len(self._locks)]:
                outcome, pending_id = self._record(header, sealed, prepared)
            if pending_id is not None:
                self._on_pending(pending_id)
            if prepared.routed and outcome.duplicate in (None, "replaced"):
                self._on_queued()
            return outcome
        except SQLAlchemyError as exc:
            # IntegrityError included: only another process can race us on one UID (the lock
            # covers this one), and the sender's retry will then find the stored copy.
            return self._database_unavailable(exc)

    @staticmethod
    def _database_unavailable(exc: SQLAlchemyError) -> StoreOutcome:
        log.error("database unavailable, answering 0xA700: %s", type(exc).__name__)
        return StoreOutcome(Status.OUT_OF_RESOURCES, reason="database unavailable")

    def _prepare(self, request: StoreRequest, header: Header) -> _Prepared:
        """Everything the row needs but the kept file: rules, routes and column values."""
        decided = self._decide(request, header)
        return _Prepared(request, decided, self._route(request, header),
                         self._instance_values(request, header, decided))

    def _decide(self, request: StoreRequest, header: Header) -> Decided:
        """Which rules apply and whether the study is held: decided here, carried out later."""
        if self._remapper is None:
            return _AS_RECEIVED
        return self._remapper.decide(Subject(request.calling_ae, request.called_ae), header.dataset)

    def _route(self, request: StoreRequest, header: Header) -> tuple[str, ...]:
        """Destinations for the forward outbox, from the header as received."""
        if self._router is None:
            return ()
        subject = Subject(request.calling_ae, request.called_ae)
        return self._router.destinations_for(subject, header.dataset)

    def _success(self, decided: Decided, kept_bytes: int, duplicate: str | None = None) -> StoreOutcome:
        """PS3.4 B.2.3: 0xB000 tells the sender its data elements were coerced, when the
        configuration asks for it; by default Success, which every sender takes as such."""
        if decided.coerced and self._remapper and self._remapper.config.coerced_status == "warning":
            return StoreOutcome(Status.COERCION_OF_DATA_ELEMENTS, kept_bytes, duplicate,
                                reason="data elements coerced by rules " + ", ".join(decided.plan.rules))
        return StoreOutcome(Status.SUCCESS, kept_bytes, duplicate)

    def _record(
        self, header: Header, sealed: SpooledFile, prepared: _Prepared
    ) -> tuple[StoreOutcome, int | None]:
        """The common case first: a new SOP Instance UID is one hard link and one INSERT.

        The link claims the final name atomically and fails when a file already holds it, so the
        database is asked nothing before the insert; only a name already taken, or a row without
        its file, goes the longer way through ``_record_again``. The caller holds this UID's lock.
        """
        decided = prepared.decided
        final = self._final_path(header, sealed, versioned=False)
        if self._spool.claim(sealed, final):
            published = SpooledFile(final, sealed.sha256, sealed.size_bytes)
            try:
                instance_id = self._insert_new(header, published, prepared)
                pending = instance_id if decided.state == "pending" else None
                return self._success(decided, published.size_bytes), pending
            except IntegrityError:
                self._spool.discard(final)  # a row without its file: decided below
            except BaseException:
                self._spool.discard(final)
                raise
            finally:
                self._spool.settle(final)  # committed, or removed: out of the crash window
        return self._record_again(header, sealed, prepared)

    def _insert_new(self, header: Header, published: SpooledFile, prepared: _Prepared) -> int:
        """Commit the row while another thread syncs the folder; both must succeed.

        Success may only follow both, so a folder sync that fails after the commit takes the row
        back out: the caller then removes the file and answers 0xA700.
        """
        syncing = self._spool.sync_folder_in_background(published.path.parent)
        try:
            values = prepared.row(published, self._spool.relative(published.path))
            with self._engine.begin() as connection:
                inserted = connection.execute(_INSERT_INSTANCE, values)
                key = inserted.inserted_primary_key
                assert key is not None
                new_jobs(connection, int(key[0]), str(header.study_instance_uid), prepared.routed,
                         values["received_at"])  # type: ignore[arg-type]
        finally:
            synced = syncing.exception()
        if synced is not None:
            with self._engine.begin() as connection:
                connection.execute(delete(ForwardJob).where(ForwardJob.instance_id == int(key[0])))
                connection.execute(
                    _DELETE_INSTANCE.where(Instance.sop_instance_uid == header.sop_instance_uid)
                )
            raise synced
        return int(key[0])

    def _record_again(
        self, header: Header, sealed: SpooledFile, prepared: _Prepared
    ) -> tuple[StoreOutcome, int | None]:
        """A known UID (duplicate policy), or a final name left without a row by a crash.

        A failed commit takes the published file back out. A received file that is not published
        stays in ``incoming/``, where the receiver removes it after the handler returns.
        """
        decided = prepared.decided
        published: SpooledFile | None = None
        try:
            with self._sessions() as session, session.begin():
                current_id = session.scalar(
                    select(Instance.id).where(Instance.sop_instance_uid == header.sop_instance_uid)
                )
                if current_id is None:
                    published = self._publish(sealed, header, versioned=False)
                    values = prepared.row(published, self._spool.relative(published.path))
                    current_id = session.scalar(
                        insert(Instance).values(values).returning(Instance.id)
                    )
                    assert current_id is not None
                    new_jobs(session.connection(), current_id, str(header.study_instance_uid),
                             prepared.routed, values["received_at"])  # type: ignore[arg-type]
                    outcome = self._success(decided, published.size_bytes)
                else:
                    current = session.get_one(Instance, current_id)
                    outcome, published = self._second_copy(
                        session, header, sealed, current, prepared
                    )
                    if outcome.duplicate == "replaced":
                        session.flush()
                        requeue_for_new_copy(session.connection(), current_id, self._clock())
            now_current = outcome.duplicate in (None, "replaced")
            return outcome, current_id if now_current and decided.state == "pending" else None
        except BaseException:
            if published is not None:
                self._spool.discard(published.path)
            raise
        finally:
            if published is not None:
                self._spool.settle(published.path)  # committed, or removed

    def _second_copy(
        self,
        session: Session,
        header: Header,
        sealed: SpooledFile,
        current: Instance,
        prepared: _Prepared,
    ) -> tuple[StoreOutcome, SpooledFile | None]:
        """Duplicate policy. An identical copy is always Success and changes nothing."""
        request = prepared.request
        known = {current.sha256} | set(
            session.scalars(
                select(InstanceVersion.sha256).where(
                    InstanceVersion.sop_instance_uid == header.sop_instance_uid
                )
            )
        )
        if sealed.sha256 in known:
            return StoreOutcome(Status.SUCCESS, duplicate="identical"), None
        if self._policy == "reject":
            return (
                StoreOutcome(
                    Status.DUPLICATE_SOP_INSTANCE,
                    duplicate="rejected",
                    reason="other content already stored under this SOP Instance UID",
                ),
                None,
            )
        published = self._publish(sealed, header, versioned=True)
        now = self._clock()
        if self._policy == "keep_first":
            session.add(
                InstanceVersion(
                    sop_instance_uid=header.sop_instance_uid,
                    disposition="not_kept",
                    sha256=published.sha256,
                    size_bytes=published.size_bytes,
                    spool_path=self._spool.relative(published.path),
                    calling_ae=request.calling_ae,
                    received_at=now,
                    node_name=self._node_name,  # published on this node's disk just now
                )
            )
            return StoreOutcome(Status.SUCCESS, published.size_bytes, "kept_first"), published
        session.add(
            InstanceVersion(
                sop_instance_uid=current.sop_instance_uid,
                disposition="superseded",
                sha256=current.sha256,
                size_bytes=current.size_bytes,
                spool_path=current.spool_path,
                calling_ae=current.calling_ae,
                received_at=current.received_at,
                # The superseded file stays where it is: on the node that held the current copy
                # (another node's disk when that one received it), not on this one.
                node_name=current.node_name,
                # Retention may have removed the current file already: the version then has no
                # file either, and must not be counted, or removed again, as one in the spool.
                spool_removed_at=current.spool_removed_at,
            )
        )
        for column, value in prepared.row(published, self._spool.relative(published.path)).items():
            setattr(current, column, value)
        current.spool_removed_at = None  # the new copy's file is in the spool
        return self._success(prepared.decided, published.size_bytes, "replaced"), published

    def _publish(self, sealed: SpooledFile, header: Header, versioned: bool) -> SpooledFile:
        return self._spool.publish(sealed, self._final_path(header, sealed, versioned))

    def _final_path(self, header: Header, sealed: SpooledFile, versioned: bool) -> Path:
        name = str(header.sop_instance_uid)
        if versioned:
            name = f"{name}.{sealed.sha256[:16]}"
        folder = self._spool.folder_for(header.study_instance_uid, header.series_instance_uid)
        return folder / f"{name}.dcm"

    def _instance_values(
        self, request: StoreRequest, header: Header, decided: Decided
    ) -> dict[str, object]:
        """The patient columns hold the values the object carries once remapped; the received
        ones are kept beside them."""
        changes = decided.plan.changes if decided.state == "pending" else {}
        return dict(
            sop_instance_uid=str(header.sop_instance_uid),
            sop_class_uid=str(header.sop_class_uid),
            study_instance_uid=str(header.study_instance_uid),
            series_instance_uid=str(header.series_instance_uid),
            original_patient_id=header.patient_id,
            original_patient_name=header.patient_name,
            original_accession_number=header.accession_number,
            **ledger_values(header.dataset, changes),
            remap_state=decided.state,
            remap_plan=plan_json(decided.plan) if decided.state == "pending" else None,
            calling_ae=request.calling_ae,
            peer_address=request.peer_address,
            transfer_syntax_uid=request.transfer_syntax,
            received_at=self._clock(),
            association_id=request.association_id,
            node_name=self._node_name,
        )


def is_recorded(engine: Engine, spool_path: str, node: str | None = None) -> bool:
    """Whether a ledger row (the current copy or another version) names this spool file: what
    ``Spool.recover`` asks of each name left in its claim log. By SOP Instance UID, which is
    indexed; the file's name is ``<uid>.dcm`` or ``<uid>.<sha256[:16]>.dcm``. ``node``: only a
    row naming this node as the holder counts for the current copy (another node may hold a copy
    of the same UID under the same relative path on its own disk); so for another version."""
    stem = spool_path.rsplit("/", 1)[-1].removesuffix(".dcm")
    uids = {stem, stem.rsplit(".", 1)[0]}
    with engine.connect() as connection:
        for table in (Instance, InstanceVersion):
            found = connection.execute(
                select(table.id)
                .where(table.sop_instance_uid.in_(uids), table.spool_path == spool_path,
                       held_by(node, table.node_name))
                .limit(1)
            ).first()
            if found is not None:
                return True
    return False
