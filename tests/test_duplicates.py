"""The same SOP Instance UID again: identical copies are stored once; other content follows policy."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pydicom
import pytest
from pydicom.dataset import Dataset

from gateway.app import Gateway
from gateway.dicom.status import Status
from tests.conftest import rows
from tests.factory import make_dataset
from tests.peers import spool_files, store


def _metric(app: Gateway, outcome: str) -> float | None:
    return app.metrics.registry.get_sample_value("gateway_duplicates_total", {"outcome": outcome})


def _two_versions() -> tuple[Dataset, Dataset]:
    first = make_dataset(PatientName="FIRST^COPY")
    second = copy.deepcopy(first)
    second.PatientName = "SECOND^COPY"
    return first, second


@pytest.mark.parametrize("policy", ["keep_first", "replace", "reject"])
def test_identical_copy_is_success_without_a_new_row(
    make_gateway: Callable[..., Gateway], db_url: str, policy: str
) -> None:
    app = make_gateway(db=db_url, storage={"duplicate_policy": policy})
    assert app.receiver is not None
    port = app.receiver.address[1]
    ds = make_dataset()
    assert store(port, ds) == Status.SUCCESS
    assert store(port, copy.deepcopy(ds), calling_ae="OTHER_AE") == Status.SUCCESS
    assert len(rows(db_url, "SELECT id FROM instances")) == 1
    assert rows(db_url, "SELECT id FROM instance_versions") == []
    assert len(spool_files(app.spool.root)) == 1
    assert _metric(app, "identical") == 1
    app.stop()  # ends the ledger rows' associations for certain
    counts = {r.calling_ae: (r.instances, r.duplicates) for r in
              rows(db_url, "SELECT calling_ae, instances, duplicates FROM associations")}
    assert counts == {"PYSCU": (1, 0), "OTHER_AE": (0, 1)}


def test_keep_first_keeps_the_first_current_and_the_second_as_a_version(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    app = make_gateway(db=db_url, storage={"duplicate_policy": "keep_first"})
    assert app.receiver is not None
    first, second = _two_versions()
    port = app.receiver.address[1]
    assert store(port, first) == Status.SUCCESS
    assert store(port, second) == Status.SUCCESS

    [current] = rows(db_url, "SELECT spool_path, patient_name FROM instances")
    assert current.patient_name == "FIRST^COPY"
    assert pydicom.dcmread(app.spool.root / current.spool_path).PatientName == "FIRST^COPY"
    [version] = rows(db_url, "SELECT disposition, spool_path FROM instance_versions")
    assert version.disposition == "not_kept"
    assert pydicom.dcmread(app.spool.root / version.spool_path).PatientName == "SECOND^COPY"
    assert len(spool_files(app.spool.root)) == 2
    assert _metric(app, "kept_first") == 1


def test_replace_makes_the_second_current_and_keeps_the_first_as_prior_version(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    app = make_gateway(db=db_url, storage={"duplicate_policy": "replace"})
    assert app.receiver is not None
    first, second = _two_versions()
    port = app.receiver.address[1]
    assert store(port, first) == Status.SUCCESS
    assert store(port, second, calling_ae="SECOND_AE") == Status.SUCCESS

    [current] = rows(db_url, "SELECT spool_path, patient_name, calling_ae FROM instances")
    assert (current.patient_name, current.calling_ae) == ("SECOND^COPY", "SECOND_AE")
    assert pydicom.dcmread(app.spool.root / current.spool_path).PatientName == "SECOND^COPY"
    [version] = rows(db_url, "SELECT disposition, spool_path, calling_ae FROM instance_versions")
    assert (version.disposition, version.calling_ae) == ("superseded", "PYSCU")
    assert pydicom.dcmread(app.spool.root / version.spool_path).PatientName == "FIRST^COPY"
    # sending the first content again is now a known version: identical, nothing new
    assert store(port, first) == Status.SUCCESS
    assert len(rows(db_url, "SELECT id FROM instance_versions")) == 1
    assert _metric(app, "replaced") == 1


def test_reject_answers_0111_and_keeps_nothing_of_the_second(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    app = make_gateway(db=db_url, storage={"duplicate_policy": "reject"})
    assert app.receiver is not None
    first, second = _two_versions()
    port = app.receiver.address[1]
    assert store(port, first) == Status.SUCCESS
    assert store(port, second) == Status.DUPLICATE_SOP_INSTANCE

    [current] = rows(db_url, "SELECT patient_name FROM instances")
    assert current.patient_name == "FIRST^COPY"
    assert rows(db_url, "SELECT id FROM instance_versions") == []
    assert len(spool_files(app.spool.root)) == 1
    assert not list(app.spool.root.rglob("*.tmp"))
    assert _metric(app, "rejected") == 1


def test_a_file_left_without_its_row_is_replaced_by_the_next_copy(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    """A crash between naming a file and committing its row leaves an unacknowledged file; the
    sender's retry must be stored over it, not refused or counted as a duplicate."""
    app = make_gateway(db=db_url)
    assert app.receiver is not None
    ds = make_dataset(PatientName="RETRIED^COPY")
    orphan = app.spool.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half of an image nobody acknowledged")

    assert store(app.receiver.address[1], ds) == Status.SUCCESS
    [current] = rows(db_url, "SELECT spool_path FROM instances")
    assert app.spool.root / current.spool_path == orphan
    assert pydicom.dcmread(orphan).PatientName == "RETRIED^COPY"
    assert rows(db_url, "SELECT id FROM instance_versions") == []
    assert not _metric(app, "identical")
