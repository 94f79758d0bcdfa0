"""Which instances an export takes: the ledger's studies for a selector, and each archive's
instances with where their bytes are (the spool, or an Orthanc destination that confirmed them).

Every criterion selects studies, and a study is always exported whole: an archive of half a study
is a trap for whoever receives it. Sites are the one exception to "any instance matches": a study
belongs to a site only when EVERY instance of it does (``within``), so that a study holding one
instance of another hospital is never shown to the first one (whole, it would leak that
instance). The export API and export jobs select by site through this one function. Instances are listed in a fixed order (series, then instance
number, then UID), which is what makes an archive's bytes the same on every run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, false, func, not_, or_, select
from sqlalchemy.orm import Session, aliased

from gateway.config import ExportSelector, SiteConfig
from gateway.db.models import ForwardJob, Instance

IN_CHUNK = 500  # values per IN (...) list: well inside every database's limit on parameters


@dataclass(frozen=True)
class Item:
    """One instance of an archive, as the ledger knew it when the archive began (frozen in the
    archive's progress record, so a resumed export writes the same thing)."""

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    series_number: str | None
    instance_number: str | None
    patient_id: str | None
    patient_name: str | None
    birth_date: str | None
    sex: str | None
    accession_number: str | None
    study_date: str | None
    study_time: str | None
    study_description: str | None
    modality: str | None
    size_bytes: int
    sha256: str
    remap_state: str
    spool_path: str | None  # relative to the spool; None once retention removed the file
    copies: tuple[tuple[str, str], ...]  # (destination, remote id) that confirmed it
    node_name: str | None = None  # the node whose spool holds it (gateway.cluster)
    # SHA-256 of the file's data set as the remap stage rewrote it (None: as received, or a
    # progress record from before it was kept); ``gateway.db.models.kept_hash``
    kept_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _ITEM_FIELDS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Item:
        values = dict(data)
        values["copies"] = tuple((str(d), str(r)) for d, r in values["copies"])
        return cls(**values)

    @property
    def orthanc_id(self) -> str | None:
        """The first confirmed destination's identifier (Orthanc's instance ID)."""
        return self.copies[0][1] if self.copies else None


_ITEM_FIELDS = tuple(f.name for f in fields(Item))


@dataclass(frozen=True)
class StudySummary:
    study_instance_uid: str
    patient_id: str | None
    study_date: str | None
    study_time: str | None
    instances: int
    bytes: int


def date_range(value: str | None, today: date) -> tuple[str | None, str | None]:
    """(first, last) study date, YYYYMMDD, either open; from the selector's ``study_date``."""
    if value is None:
        return None, None
    if value in ("yesterday", "today"):
        day = today - timedelta(days=1) if value == "yesterday" else today
        text = day.strftime("%Y%m%d")
        return text, text
    first, dash, last = value.partition("-")
    if not dash:
        return value, value
    return first or None, last or None


@dataclass(frozen=True)
class SiteScope:
    """What a token or a job may see: instances sent by one of ``calling_aes`` or carrying one
    of ``institution_names`` (the union of the sites it names)."""

    calling_aes: frozenset[str]
    institution_names: frozenset[str]


def site_scope(sites: Iterable[SiteConfig]) -> SiteScope:
    listed = list(sites)
    return SiteScope(frozenset(ae for s in listed for ae in s.calling_aes),
                     frozenset(n for s in listed for n in s.institution_names))


def _member(table: Any, scope: SiteScope) -> ColumnElement[bool]:
    """The instance (a row of ``table``) belongs to ``scope``. Never NULL: an instance without
    Institution Name is a member by its calling AE or not at all (a NULL here would make the
    NOT of it NULL too, and ``within`` would miss a foreign instance)."""
    found: ColumnElement[bool] = (table.calling_ae.in_(sorted(scope.calling_aes))
                                  if scope.calling_aes else false())
    if scope.institution_names:
        found = or_(found, func.coalesce(table.institution_name, "").in_(
            sorted(scope.institution_names)))
    return found


def within(scope: SiteScope) -> ColumnElement[bool]:
    """For a row of ``instances``: it is in scope, and so is every other instance of its study."""
    other = aliased(Instance)
    foreign = select(other.study_instance_uid).where(not_(_member(other, scope)))
    return and_(_member(Instance, scope), Instance.study_instance_uid.not_in(foreign))


def study_uids(session: Session, selector: ExportSelector, today: date,
               since: datetime | None = None, sites: SiteScope | None = None) -> list[str]:
    """Studies with at least one instance matching every criterion of ``selector``, and, with
    ``sites``, every instance of which is in that scope. A selector naming sites needs their
    definitions (``site_scope``): without them this refuses rather than select too much."""
    if selector.sites and sites is None:
        raise ValueError("the selector names sites: pass their scope (select.site_scope)")
    statement = select(Instance.study_instance_uid).distinct()
    if sites is not None:
        statement = statement.where(within(sites))
    if selector.patients:
        statement = statement.where(Instance.patient_id.in_(selector.patients))
    if selector.studies:
        statement = statement.where(Instance.study_instance_uid.in_(selector.studies))
    if selector.accession_numbers:
        statement = statement.where(Instance.accession_number.in_(selector.accession_numbers))
    if selector.modalities:
        statement = statement.where(Instance.modality.in_(selector.modalities))
    if selector.calling_aes:
        statement = statement.where(Instance.calling_ae.in_(selector.calling_aes))
    first, last = date_range(selector.study_date, today)
    if first is not None:
        statement = statement.where(Instance.study_date >= first)
    if last is not None:
        statement = statement.where(Instance.study_date <= last)
    if since is not None:
        statement = statement.where(Instance.received_at >= since)
    return sorted(session.scalars(statement))


def summaries(session: Session, studies: Sequence[str]) -> list[StudySummary]:
    """Each study's size and the values that group and order studies (its first instance's
    patient, date and time), in the order exports list studies: date, time, UID."""
    found: dict[str, StudySummary] = {}
    for chunk in _chunks(studies):
        totals = {
            uid: (int(count), int(size or 0))
            for uid, count, size in session.execute(
                select(Instance.study_instance_uid, func.count(), func.sum(Instance.size_bytes))
                .where(Instance.study_instance_uid.in_(chunk))
                .group_by(Instance.study_instance_uid))
        }
        first = (select(func.min(Instance.id)).where(Instance.study_instance_uid.in_(chunk))
                 .group_by(Instance.study_instance_uid))
        for uid, patient, day, time in session.execute(
                select(Instance.study_instance_uid, Instance.patient_id, Instance.study_date,
                       Instance.study_time).where(Instance.id.in_(first))):
            count, size = totals[uid]
            found[uid] = StudySummary(uid, patient, day, time, count, size)
    return sorted(found.values(), key=lambda s: (s.study_date or "", s.study_time or "",
                                                 s.study_instance_uid))


def items(session: Session, studies: Sequence[str],
          sites: SiteScope | None = None) -> list[Item]:
    """Every instance of ``studies``, study by study in the order given, each study's in the
    order the archive lists them; with the confirmed copies of each. With ``sites``: only
    studies still wholly in scope (an instance of another site that arrived after the plan
    drops its study here, rather than leak)."""
    rows: list[Instance] = []
    for chunk in _chunks(studies):
        statement = select(Instance).where(Instance.study_instance_uid.in_(chunk))
        if sites is not None:
            statement = statement.where(within(sites))
        rows.extend(session.execute(statement).scalars())
    copies: dict[int, list[tuple[str, str]]] = {}
    for chunk in _chunks([r.id for r in rows]):
        for instance_id, destination, remote_id in session.execute(
            select(ForwardJob.instance_id, ForwardJob.destination, ForwardJob.remote_id)
            .where(ForwardJob.instance_id.in_(chunk), ForwardJob.state == "confirmed",
                   ForwardJob.remote_id.is_not(None))
            .order_by(ForwardJob.destination)
        ):
            copies.setdefault(instance_id, []).append((destination, str(remote_id)))
    position = {uid: n for n, uid in enumerate(studies)}
    rows.sort(key=lambda r: (position[r.study_instance_uid], _number(r.series_number),
                             r.series_instance_uid, _number(r.instance_number),
                             r.sop_instance_uid))
    return [
        Item(r.id, r.sop_instance_uid, r.sop_class_uid, r.study_instance_uid,
             r.series_instance_uid, r.series_number, r.instance_number, r.patient_id,
             r.patient_name, r.patient_birth_date, r.patient_sex, r.accession_number,
             r.study_date, r.study_time, r.study_description, r.modality, int(r.size_bytes),
             r.sha256, r.remap_state, None if r.spool_removed_at is not None else r.spool_path,
             tuple(copies.get(r.id, ())), r.node_name, r.kept_sha256)
        for r in rows
    ]


def _number(value: str | None) -> tuple[int, int]:
    """IS values sort as numbers; absent or unreadable ones last."""
    try:
        return (0, int(str(value).strip()))
    except ValueError:
        return (1, 0)


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), IN_CHUNK):
        yield values[start:start + IN_CHUNK]
