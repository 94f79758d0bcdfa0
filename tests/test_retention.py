"""Retention of other versions (gateway.forward.retention): the copy ``replace`` superseded, or
the one ``keep_first`` did not make current, leaves the spool with its instance's protection, and
never while the current copy is not confirmed everywhere or when another node's disk holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from gateway.app import Gateway
from gateway.config import RetentionConfig
from gateway.db.engine import make_engine, make_sessions
from gateway.db.migrate import upgrade
from gateway.db.models import ForwardJob, Instance, InstanceVersion
from gateway.dicom.status import Status
from gateway.forward import retention as retention_module
from gateway.forward.outbox import new_jobs
from gateway.forward.retention import Retention
from gateway.receive.spool import Spool
from gateway.report import _size, status_report
from tests.conftest import rows, wait_for
from tests.factory import make_dataset, write_file, write_study
from tests.peers import store
from tests.test_forward import (
    FAST,
    MR_IMAGE_STORAGE,
    dimse_destination,
    send,
    start_storescp,
    storescp_profile,
)

NAME = "Ñúñez^Zoë=山田^太郎"  # alphabetic and ideographic groups, UTF-8
T0 = datetime(2026, 12, 14, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=30)
OLD = NOW - timedelta(days=10)  # older than keep_days = 7
YOUNG = NOW - timedelta(days=1)
KEEP = RetentionConfig(keep_days=7)


def _spool_line(app: Gateway) -> str:
    with make_sessions(app.engine)() as session:
        report = status_report(session, app.spool.root, 0, node=app.config.forward.node_name)
    return next(line for line in report.splitlines() if line.startswith("Spool "))


def _copies(folder: Path, count: int, **overrides: Any) -> tuple[list[Path], list[Path]]:
    """``count`` instances of one study, and a second copy of each: other content (a corrected
    series description), the same UIDs, as a modality resending a corrected series."""
    first = write_study(folder / "first", count, PatientName=NAME,
                        SpecificCharacterSet="ISO_IR 192", **overrides)
    second = []
    for path in first:
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "corrected"
        second.append(write_file(ds, folder / "second" / path.name))
    return first, second


@pytest.mark.parametrize("policy", ["replace", "keep_first"])
def test_versions_leave_the_spool_once_their_instance_is_confirmed_everywhere_and_expired(
    make_gateway: Callable[..., Gateway], db_url: str, tmp_path: Path, policy: str,
) -> None:
    """The PACS takes MR only: the CT instances are dead letters, never confirmed, so their
    versions stay with them; the MR instances' versions go with the current copies."""
    profile = storescp_profile(tmp_path / "mr-only.cfg", "MRImageStorage")
    process, port = start_storescp(tmp_path / "pacs", "-xf", str(profile), "Default")
    try:
        app = make_gateway(
            db=db_url, storage={"duplicate_policy": policy},
            forward={**FAST, "destinations": [dimse_destination("pacs", port)]},
            retention={"keep_days": 0, "check_interval_s": 0.2},
        )
        ct_first, ct_second = _copies(tmp_path / "ct", 2)
        mr_first, mr_second = _copies(tmp_path / "mr", 2, SOPClassUID=MR_IMAGE_STORAGE,
                                      Modality="MR")
        send(app.config.dicom.port, ct_first + mr_first)
        send(app.config.dicom.port, ct_second + mr_second)
        versions_sql = ("SELECT v.spool_path, v.spool_removed_at, v.size_bytes, i.modality "
                        "FROM instance_versions v JOIN instances i "
                        "ON i.sop_instance_uid = v.sop_instance_uid")

        def removed() -> list[Any]:
            return [v for v in rows(db_url, versions_sql) if v.spool_removed_at is not None]

        # the row is marked before the file goes: wait for both
        wait_for(lambda: len(gone := removed()) == 2
                 and not any((app.spool.root / v.spool_path).exists() for v in gone)
                 and len(rows(db_url, "SELECT id FROM instances "
                                      "WHERE spool_removed_at IS NOT NULL")) == 2,
                 30, "the confirmed MR instances' versions and current files removed")
        versions = rows(db_url, versions_sql)
        assert len(versions) == 4
        for version in versions:
            present = (app.spool.root / version.spool_path).exists()
            assert present == (version.modality == "CT"), version
            assert (version.spool_removed_at is None) == present, version
        assert {j.state for j in rows(db_url, "SELECT state FROM forward_jobs j JOIN instances i "
                                              "ON i.id = j.instance_id WHERE i.modality = 'CT'")
                } == {"dead"}
        # gateway status counts what is still on this node's disk: the CT files only
        held = rows(db_url, "SELECT sum(size_bytes) AS n FROM instances WHERE modality = 'CT'")
        kept = sum(v.size_bytes for v in versions if v.modality == "CT")
        assert _spool_line(app).startswith(
            f"Spool {app.spool.root}: 2 instances, {_size(held[0].n + kept)} "
            f"(other versions {_size(kept)});")
    finally:
        process.terminate()
        process.wait(10)


@dataclass(frozen=True)
class Case:
    """One instance with one other version, as retention on node ``a`` finds them."""

    name: str
    jobs: tuple[str, ...]  # the states of the instance's forward jobs, one per destination
    current_at: datetime
    version_at: datetime
    removed: bool  # what retention should do with the version's file
    current_removed: bool = False  # retention (early cleanup) already removed the current file
    version_node: str | None = "a"
    current_node: str | None = "a"
    file_missing: bool = False  # the version's file is already gone (a crash after the mark)


CASES = [
    Case("both expired, confirmed", ("confirmed",), OLD, OLD, True),
    Case("superseded copy expired, current young (replace)", ("confirmed",), YOUNG, OLD, True),
    Case("current expired, version young (keep_first): never outlives the current",
         ("confirmed", "confirmed"), OLD, YOUNG, True),
    Case("both young", ("confirmed",), YOUNG, YOUNG, False),
    Case("both young, current file gone early", ("confirmed",), YOUNG, YOUNG, True,
         current_removed=True),
    Case("one destination not confirmed", ("confirmed", "forwarded"), OLD, OLD, False),
    Case("queued again (a replace resends)", ("queued",), OLD, OLD, False),
    Case("sending", ("sending",), OLD, OLD, False),
    Case("dead letter", ("confirmed", "dead"), OLD, OLD, False),
    Case("purged", ("purged",), OLD, OLD, False),
    Case("no destination: the gateway holds the only copy", (), OLD, OLD, False),
    Case("another node's disk holds the version", ("confirmed",), OLD, OLD, False,
         version_node="b"),
    Case("the current copy on another node, the version here", ("confirmed",), OLD, OLD, True,
         current_node="b"),
    Case("no node named (before migration 0013): any node's", ("confirmed",), OLD, OLD, True,
         version_node=None),
    Case("file already gone: not an error", ("confirmed",), OLD, OLD, True, file_missing=True),
]


@pytest.fixture
def ledger(db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def _add(engine: sa.Engine, spool: Spool, case: Case, destinations: int | None = None) -> int:
    """An instance with ``case.jobs`` and one version, each with its file; the version's id."""
    study, series, uid = generate_uid(), generate_uid(), generate_uid()
    folder = spool.root / study / series
    folder.mkdir(parents=True, exist_ok=True)
    current, version = f"{study}/{series}/{uid}.dcm", f"{study}/{series}/{uid}.{'1' * 16}.dcm"
    (spool.root / current).write_bytes(b"current")
    if not case.file_missing:
        (spool.root / version).write_bytes(b"version")
    with engine.begin() as c:
        key = c.execute(sa.insert(Instance).values(
            sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=study, series_instance_uid=series, calling_ae="CT",
            peer_address="127.0.0.1", transfer_syntax_uid="1.2.840.10008.1.2.1", size_bytes=7,
            sha256="0" * 64, spool_path=current, received_at=case.current_at,
            node_name=case.current_node,
            spool_removed_at=NOW - timedelta(hours=1) if case.current_removed else None,
        )).inserted_primary_key
        assert key is not None
        names = tuple(f"pacs{i}" for i in range(len(case.jobs)))
        new_jobs(c, int(key[0]), study, names, case.current_at)
        for name, state in zip(names, case.jobs, strict=True):
            c.execute(sa.update(ForwardJob).where(ForwardJob.instance_id == int(key[0]),
                                                  ForwardJob.destination == name)
                      .values(state=state))
        if case.current_removed:
            (spool.root / current).unlink()
        version_id = c.execute(sa.insert(InstanceVersion).values(
            sop_instance_uid=uid, disposition="superseded", sha256="1" * 64, size_bytes=7,
            spool_path=version, calling_ae="CT", received_at=case.version_at,
            node_name=case.version_node,
        )).inserted_primary_key
        assert version_id is not None
    return int(version_id[0])


def _version(engine: sa.Engine, version_id: int) -> Any:
    with engine.connect() as c:
        return c.execute(sa.select(InstanceVersion).where(InstanceVersion.id == version_id)).one()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_version_goes_only_when_its_instance_is_confirmed_everywhere_and_unprotected(
    ledger: sa.Engine, tmp_path: Path, case: Case,
) -> None:
    spool = Spool(tmp_path / "spool-a", 0)
    version_id = _add(ledger, spool, case)
    Retention(ledger, spool, KEEP, lambda: NOW, node="a").run_once()
    version = _version(ledger, version_id)
    assert (version.spool_removed_at is not None) == case.removed
    assert (spool.root / version.spool_path).exists() == (not case.removed
                                                         and not case.file_missing)


def test_all_cases_at_once_on_one_ledger(ledger: sa.Engine, tmp_path: Path) -> None:
    """The same table in one round: each row decided by its own instance, not its neighbours'."""
    spool = Spool(tmp_path / "spool-a", 0)
    ids = {_add(ledger, spool, case): case for case in CASES}
    Retention(ledger, spool, KEEP, lambda: NOW, node="a").run_once()
    for version_id, case in ids.items():
        version = _version(ledger, version_id)
        assert (version.spool_removed_at is not None) == case.removed, case.name


def test_below_free_space_confirmed_versions_go_first_oldest_first(
    ledger: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Early cleanup (``cleanup_below_free_mb``) regardless of age: the versions of confirmed
    instances go first, the oldest first, one batch at a time until there is room; a version of
    an instance not confirmed everywhere never goes. Current files follow only once no
    confirmed version is left."""
    monkeypatch.setattr(retention_module, "BATCH", 1)
    young = [YOUNG + timedelta(minutes=m) for m in range(4)]
    unconfirmed = _add(ledger, Spool(tmp_path / "spool", 0),
                       Case("unconfirmed, oldest", ("queued",), young[0], young[0], False))
    confirmed = [
        _add(ledger, Spool(tmp_path / "spool", 0),
             Case(f"confirmed {i}", ("confirmed",), young[0], at, True))
        for i, at in enumerate(reversed(young[1:]))  # inserted youngest first
    ]
    oldest_two = set(confirmed[1:])
    floor = 1024 * 1024
    root = tmp_path / "spool"

    def free(path: Path) -> int:  # room again once two files have gone
        return floor - 1 if len(list(root.rglob("*.dcm"))) > 2 * 4 - 2 else floor

    spool = Spool(root, 0, free)
    config = RetentionConfig(keep_days=365, cleanup_below_free_mb=1)
    assert Retention(ledger, spool, config, lambda: NOW, node="a").run_once() == 2
    gone = {i for i in [unconfirmed, *confirmed] if _version(ledger, i).spool_removed_at}
    assert gone == oldest_two
    with ledger.connect() as c:
        assert c.scalar(sa.select(sa.func.count()).select_from(Instance)
                        .where(Instance.spool_removed_at.is_not(None))) == 0

    # No room at all: every confirmed file goes, versions before current copies; nothing else.
    spool = Spool(root, 0, lambda path: 0)
    assert Retention(ledger, spool, config, lambda: NOW, node="a").run_once() == 1 + 3
    assert _version(ledger, unconfirmed).spool_removed_at is None
    assert (root / _version(ledger, unconfirmed).spool_path).exists()
    assert all(_version(ledger, i).spool_removed_at for i in confirmed)
    left = sorted(p.name for p in root.rglob("*.dcm"))
    assert len(left) == 2  # the unconfirmed instance's current copy and version


def test_a_copy_replacing_one_retention_removed_is_in_the_spool_and_its_prior_copy_is_not(
    make_gateway: Callable[..., Gateway], db_url: str,
) -> None:
    """Retention removed the current file; the modality then sends other content under the same
    UID (``replace``). The new file is in the spool (its row is no longer marked removed, so a
    retrieve reads it and retention removes it in turn); the superseded copy's file was already
    gone, so its version row says so and ``gateway status`` does not count it."""
    app = make_gateway(db=db_url, storage={"duplicate_policy": "replace"})
    assert app.receiver is not None
    port = app.receiver.address[1]
    first = make_dataset(PatientName=NAME, SpecificCharacterSet="ISO_IR 192")
    assert store(port, first) == Status.SUCCESS
    (instance,) = rows(db_url, "SELECT spool_path FROM instances")
    with app.engine.begin() as c:  # as retention does: mark, then unlink
        c.execute(sa.update(Instance).values(spool_removed_at=datetime.now(UTC)))
    (app.spool.root / instance.spool_path).unlink()
    second = make_dataset(PatientName=NAME, SpecificCharacterSet="ISO_IR 192",
                          SOPInstanceUID=first.SOPInstanceUID,
                          StudyInstanceUID=first.StudyInstanceUID,
                          SeriesInstanceUID=first.SeriesInstanceUID, SeriesDescription="corrected")
    assert store(port, second) == Status.SUCCESS
    (current,) = rows(db_url, "SELECT spool_path, spool_removed_at, size_bytes FROM instances")
    (version,) = rows(db_url, "SELECT spool_path, spool_removed_at FROM instance_versions")
    assert version.spool_path == instance.spool_path and version.spool_removed_at is not None
    assert current.spool_removed_at is None
    assert pydicom.dcmread(app.spool.root / current.spool_path).SeriesDescription == "corrected"
    assert _spool_line(app).startswith(
        f"Spool {app.spool.root}: 1 instances, {_size(current.size_bytes)} (other versions 0 B);")


def test_a_version_chosen_before_its_instance_was_sent_again_is_not_marked(
    ledger: sa.Engine, tmp_path: Path,
) -> None:
    """Between retention's SELECT and its UPDATE a ``replace`` may requeue the instance (the new
    copy is sent again): the UPDATE asks for the confirmation again, and only what it marked is
    unlinked."""
    spool = Spool(tmp_path / "spool-a", 0)
    version_id = _add(ledger, spool, Case("chosen", ("confirmed",), OLD, OLD, True))
    with ledger.begin() as c:
        c.execute(sa.update(ForwardJob).values(state="queued"))  # the replace, just committed
        marked = Retention(ledger, spool, KEEP, lambda: NOW, node="a")._mark_versions(
            c, [version_id])
    assert marked == []
    version = _version(ledger, version_id)
    assert version.spool_removed_at is None and (spool.root / version.spool_path).exists()
