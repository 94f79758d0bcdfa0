"""The remap stage: one decision per study in the C-STORE handler, rewrites after it.

Why two halves: decoding, editing and re-encoding an object costs more than receiving it, so the
handler only decides (rules matched on the header it has already decoded, the study's decision
looked up or made once), records the plan with the instance in the same transaction, and answers.
The files are rewritten later by ``RemapWorker`` in worker processes (the second core, no GIL
shared with the receiver), or by ``gateway reconcile assign`` for the held studies it releases.

Instance ``remap_state``: none -> kept as received; pending -> plan recorded, file not rewritten
yet; rewriting -> claimed by one rewriter; done; held -> its study waits for an operator; failed.
A claim is an UPDATE ... WHERE remap_state = 'pending', so two rewriters (the service and an
operator's command) never rewrite one file twice; and a rewrite drops the plan's values the file
already has, so one repeated after a crash changes nothing.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import BigInteger, Engine, String, Table, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway import audit
from gateway.cluster.holder import held_by
from gateway.config import RemapConfig
from gateway.db.engine import make_sessions
from gateway.db.models import AssociationRecord, Instance, StudyDecision
from gateway.query.attributes import changed_values
from gateway.remap.apply import Modification, rewrite_file
from gateway.remap.lookup import DbResolver, StoredResolver, dump
from gateway.remap.plan import (
    Identity,
    OrderAnswer,
    OrderQuery,
    Plan,
    Resolver,
    Settings,
    Subject,
    Value,
    make_plan,
    matching_rules,
)
from gateway.remap.rules import MapIdentityAction, ReconcileOrderAction, RuleSet

log = logging.getLogger(__name__)
CACHED_DECISIONS = 10_000
ACTOR = "gateway"
REASON_KEY = "__reason__"  # not a keyword, so never an element: the plan's COERCE or CORRECT


@dataclass(frozen=True)
class Decided:
    plan: Plan
    state: str  # none | pending | held

    @property
    def coerced(self) -> bool:
        return self.state == "pending" and bool(self.plan.changes)


@dataclass(frozen=True)
class Claimed:
    instance_id: int
    spool_path: Path  # relative to the spool
    changes: dict[str, Value]
    why: Modification


@dataclass(frozen=True)
class Rewritten:
    instance_id: int
    spool_path: Path  # the file rewritten (``Claimed.spool_path``)
    size_bytes: int | None
    error: str | None = None
    sha256: str | None = None  # of the rewritten file's data set: ``instances.kept_sha256``


class _NoLookup:
    """For rule sets without identity or order actions: never asked."""

    def identity(self, issuer: str, local_id: str) -> Identity | None:
        raise AssertionError("rules without map_identity asked for an identity")

    def order(self, query: OrderQuery) -> OrderAnswer:
        raise AssertionError("rules without reconcile_order asked for an order")


class Remapper:
    def __init__(
        self,
        rules: RuleSet,
        config: RemapConfig,
        engine: Engine,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        node: str | None = None,
    ) -> None:
        """``node``: rewrites (and held releases, which read the file) take only the instances
        this node holds; None (operators' commands) takes every one."""
        self._node = node
        self.rules = rules
        self.config = config
        self.settings = Settings(config.issuer_of_patient_id, config.uid_root)
        self._sessions = make_sessions(engine)
        self._clock = clock
        self._window = timedelta(hours=config.order_window_h)
        self._ready: OrderedDict[str, StoredResolver] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._study_locks = [threading.Lock() for _ in range(64)]

    # -- in the C-STORE handler ----------------------------------------------------------------

    def decide(self, subject: Subject, ds: Dataset) -> Decided:
        rules = matching_rules(self.rules, subject, ds)
        if not rules:
            return Decided(Plan(), "none")
        looks_up = any(
            isinstance(a, (MapIdentityAction, ReconcileOrderAction)) for r in rules for a in r.actions
        )
        if looks_up:
            plan = self._plan_for_study(subject, ds, str(ds.StudyInstanceUID))
        else:
            plan = make_plan(self.rules, subject, ds, _NoLookup(), self.settings)
        if plan.held:
            return Decided(plan, "held")
        return Decided(plan, "pending" if plan.changes else "none")

    def _plan_for_study(self, subject: Subject, ds: Dataset, study: str) -> Plan:
        cached = self._cached(study)
        if cached is not None:
            return make_plan(self.rules, subject, ds, cached, self.settings)
        with self._study_locks[hash(study) % len(self._study_locks)]:
            try:
                return self._decide_study(subject, ds, study)
            except IntegrityError:
                # Another process decided this study between our read and our insert: use theirs.
                return self._decide_study(subject, ds, study)

    def _decide_study(self, subject: Subject, ds: Dataset, study: str) -> Plan:
        with self._sessions() as session, session.begin():
            decision = session.scalar(
                select(StudyDecision).where(StudyDecision.study_instance_uid == study)
            )
            if decision is not None:
                resolver: Resolver = StoredResolver(decision)
                plan = make_plan(self.rules, subject, ds, resolver, self.settings)
            else:
                plan = make_plan(
                    self.rules, subject, ds, DbResolver(session, self._window), self.settings
                )
                decision = self._record_decision(session, study, plan)
            if decision.state == "ready":
                self._remember(study, StoredResolver(decision))
        return plan

    def _record_decision(self, session: Session, study: str, plan: Plan) -> StudyDecision:
        answer = plan.order
        decision = StudyDecision(
            study_instance_uid=study,
            state="held" if plan.held else "ready",
            hold_reason="; ".join(plan.holds)[:200] or None,
            identity=dump(plan.identity),
            order_match=dump(answer.order if answer else None),
            candidates=json.dumps(list(answer.candidates) if answer else []),
            mrn=_text(plan.changes.get("PatientID")) or (plan.identity.mrn if plan.identity else None),
            accession_number=answer.order.accession_number if answer and answer.order else None,
            rules=json.dumps(plan.rules),
            decided_by=ACTOR,
            decided_at=self._clock(),
        )
        session.add(decision)
        session.flush()
        audit.record(
            session, ACTOR, "study_held" if plan.held else "study_decided", study, self._clock(),
            rules=plan.rules, holds=plan.holds, flags=plan.flags,
            candidates=list(answer.candidates) if answer else [],
            changes=sorted(plan.changes),
        )
        return decision

    def _cached(self, study: str) -> StoredResolver | None:
        with self._cache_lock:
            resolver = self._ready.get(study)
            if resolver is not None:
                self._ready.move_to_end(study)
            return resolver

    def _remember(self, study: str, resolver: StoredResolver) -> None:
        with self._cache_lock:
            self._ready[study] = resolver
            while len(self._ready) > CACHED_DECISIONS:
                self._ready.popitem(last=False)

    # -- releasing held studies ----------------------------------------------------------------

    def release_held(self, spool_root: Path, study: str | None = None) -> list[int]:
        """Plan every held instance whose study now has a ready decision; mark them pending.

        Runs in the operator's command right after an assignment, and in the service now and
        then, for an instance that was recorded as held while the assignment was being made.
        """
        released: list[int] = []
        with self._sessions() as session, session.begin():
            query = (
                select(Instance, StudyDecision)
                .join(StudyDecision, StudyDecision.study_instance_uid == Instance.study_instance_uid)
                .where(Instance.remap_state == "held", StudyDecision.state == "ready",
                       held_by(self._node))
            )
            if study is not None:
                query = query.where(Instance.study_instance_uid == study)
            for instance, decision in session.execute(query).all():
                with open(spool_root / instance.spool_path, "rb") as fp:
                    ds = dcmread(fp, stop_before_pixels=True)
                subject = Subject(instance.calling_ae, _called_ae(session, instance))
                plan = make_plan(self.rules, subject, ds, StoredResolver(decision), self.settings)
                instance.remap_plan = plan_json(plan)
                instance.remap_state = "pending" if plan.changes else "none"
                _current_values(instance, plan.changes)
                released.append(instance.id)
        return released

    # -- rewriting -----------------------------------------------------------------------------

    def claim(self, instance_ids: list[int]) -> list[Claimed]:
        """Take pending instances for rewriting, in one statement; the ones another rewriter
        holds (or that are no longer pending) are left out."""
        if not instance_ids:
            return []
        with self._sessions() as session, session.begin():
            taken = session.execute(
                update(Instance)
                .where(Instance.id.in_(instance_ids), Instance.remap_state == "pending",
                       held_by(self._node))
                .values(remap_state="rewriting")
                .returning(Instance.id, Instance.spool_path, Instance.remap_plan, Instance.calling_ae)
            ).all()
        claimed = []
        for instance_id, spool_path, plan, calling_ae in taken:
            changes = json.loads(plan or "{}")
            why = Modification(
                reason=str(changes.pop(REASON_KEY, "COERCE")),
                modifying_system=self.config.modifying_system,
                source_of_previous_values=calling_ae,
                at=self._clock(),
            )
            claimed.append(Claimed(instance_id, Path(spool_path), changes, why))
        return claimed

    def finish(self, results: list[Rewritten]) -> None:
        """Record finished rewrites, many in one transaction: the state, and with a rewrite
        its new size and the hash of the file as now kept (``kept_sha256``), in the same
        statement, so no reader ever sees "done" with the received object's hash only.

        Only a row still claimed for that file is changed: a copy that replaced the instance
        meanwhile (policy ``replace``: a new file, state pending or none, no kept hash) must
        not be marked rewritten, nor given the hash of the file it superseded."""
        if not results:
            return
        table = cast(Table, Instance.__table__)  # Core: an executemany with its own WHERE
        with self._sessions() as session, session.begin():
            session.execute(
                update(table)
                .where(table.c.id == bindparam("b_id"), table.c.remap_state == "rewriting",
                       table.c.spool_path == bindparam("b_path"))
                .values(remap_state=bindparam("b_state"),
                        size_bytes=func.coalesce(bindparam("b_size", type_=BigInteger),
                                                 table.c.size_bytes),
                        kept_sha256=func.coalesce(bindparam("b_kept", type_=String),
                                                  table.c.kept_sha256)),
                [
                    {"b_id": r.instance_id, "b_state": "failed" if r.error else "done",
                     "b_size": r.size_bytes, "b_kept": r.sha256,
                     "b_path": str(r.spool_path)}
                    for r in results
                ],
            )
            for failed in (r for r in results if r.error):
                audit.record(session, ACTOR, "rewrite_failed", None, self._clock(),
                             instance_id=failed.instance_id, error=failed.error)

    def requeue_interrupted(self, instance_ids: list[int] | None = None) -> None:
        """A rewrite interrupted by a stop (all of them, at start) or by a worker process that
        died (those given) is done again: the file holds either version, and a rewrite is
        idempotent."""
        query = update(Instance).where(Instance.remap_state == "rewriting")
        if instance_ids is not None:
            query = query.where(Instance.id.in_(instance_ids))
        with self._sessions() as session, session.begin():
            session.execute(query.values(remap_state="pending"))

    def pending_ids(self, limit: int = 1000) -> list[int]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Instance.id)
                    .where(Instance.remap_state == "pending", held_by(self._node))
                    .order_by(Instance.id)
                    .limit(limit)
                )
            )

    def rewrite_now(self, spool_root: Path, instance_ids: list[int]) -> int:
        """Rewrite in this process (operators' commands); returns how many were rewritten."""
        done = 0
        for claimed in self.claim(instance_ids):
            try:
                kept = rewrite_file(spool_root / claimed.spool_path, claimed.changes, claimed.why)
            except Exception as exc:
                self.finish([Rewritten(claimed.instance_id, claimed.spool_path, None,
                                       f"{type(exc).__name__}: {exc}")])
                raise
            self.finish([Rewritten(claimed.instance_id, claimed.spool_path, kept.size_bytes,
                                   sha256=kept.sha256)])
            done += 1
        return done


def plan_json(plan: Plan) -> str | None:
    """The plan as stored with the instance; the reason travels with it."""
    if not plan.changes:
        return None
    return json.dumps({**plan.changes, REASON_KEY: plan.reason}, ensure_ascii=False)


def _text(value: Value) -> str | None:
    if isinstance(value, list):
        return str(value[0]) if value else None
    return value


def _current_values(instance: Instance, changes: dict[str, Value]) -> None:
    """The ledger's columns show the values the object will carry."""
    for column, value in changed_values(changes).items():
        setattr(instance, column, value)


def _called_ae(session: Session, instance: Instance) -> str:
    if instance.association_id is None:
        return ""
    called = session.scalar(
        select(AssociationRecord.called_ae).where(AssociationRecord.id == instance.association_id)
    )
    return called or ""
