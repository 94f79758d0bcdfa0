"""C-MOVE and C-GET as a PACS or viewer sees them (gateway.query.retrieve, gateway.query.gate):
the UIDs and bytes that arrive are those received, partial results name what failed, and every
refusal has its status and Error Comment on the wire, on SQLite and PostgreSQL.

DCMTK ``movescu``/``getscu``/``storescp`` are the peers; pynetdicom is the SCU where the test must
read what DCMTK does not print (the Failed SOP Instance UID List, the Error Comment)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from gateway.app import Gateway
from tests.conftest import rows, wait_for
from tests.factory import make_dataset, write_file
from tests.peers import dcmtk
from tests.test_forward import start_storescp

ALL = ["echo", "store", "find", "move", "get"]
# Compressed objects from pydicom's bundled test data that the installed codecs decode: RLE,
# JPEG 2000 and JPEG baseline (kept encapsulated in the spool, decompressed for plain peers).
COMPRESSED = ("SC_rgb_rle.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_RLE.dcm")
NAME = "Ñúñez^Zoë=山田^太郎"  # alphabetic and ideographic groups, UTF-8


def _uids(ds: Dataset) -> tuple[str, str, str]:
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _after_meta(path: Path) -> bytes:
    """The data set's bytes, after the File Meta Information (which each writer makes its own)."""
    from gateway.receive.validate import dataset_offset

    with open(path, "rb") as fp:
        fp.seek(dataset_offset(fp))
        return fp.read()


@pytest.fixture
def holding(make_gateway: Callable[..., Gateway], tmp_path: Path) -> Iterator[Any]:
    """A gateway holding one study of compressed and plain instances with a non-ASCII name
    (stored with dcmsend, which proposes each file's own transfer syntax), and two storescp
    peers: PLAIN (storescp's default, uncompressed only) and ANY (every syntax it knows)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(db: str, **sections: Any) -> tuple[Gateway, list[Path]]:
        plain, plain_port = start_storescp(tmp_path / "plain")
        everything, any_port = start_storescp(tmp_path / "any", "+xa", "+B")  # +B: bytes as received
        started.extend((plain, everything))
        app = make_gateway(db=db, security={"unknown_callers": ["echo"], "peers": [
            {"ae_title": "VIEWER", "services": ALL},
            {"ae_title": "MODALITY", "services": ["store"]},
            {"ae_title": "PLAIN", "host": "127.0.0.1", "port": plain_port},
            {"ae_title": "ANY", "host": "127.0.0.1", "port": any_port},
        ]}, **sections)
        study, series = generate_uid(), generate_uid()
        files = []
        for i, name in enumerate(COMPRESSED):
            source = get_testdata_file(name)
            assert isinstance(source, str)
            ds: Dataset = pydicom.dcmread(source)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SpecificCharacterSet, ds.PatientName, ds.PatientID = "ISO_IR 192", NAME, "RET-1"
            path = tmp_path / "sent" / f"c{i}.dcm"
            path.parent.mkdir(exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        for i in range(3):
            ds = make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=i + 1,
                              PatientID="RET-1", PatientName=NAME, SpecificCharacterSet="ISO_IR 192")
            files.append(write_file(ds, tmp_path / "sent" / f"p{i}.dcm"))
        sent = dcmtk("dcmsend", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1",
                     str(app.config.dicom.port), *map(str, files))
        assert sent.returncode == 0, sent.stderr
        return app, files

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


def _move(app: Gateway, destination: str, *keys: str,
          calling_ae: str = "VIEWER") -> subprocess.CompletedProcess[str]:
    args = ["-S", "-aet", calling_ae, "-aec", "GATEWAY", "-aem", destination, "127.0.0.1",
            str(app.config.dicom.port)]
    for key in keys:
        args += ["-k", key]
    return dcmtk("movescu", *args)


def test_move_and_get_deliver_exactly_the_uids_received(
    holding: Any, tmp_path: Path, db_url: str,
) -> None:
    app, files = holding(db_url)
    sent = {_uids(pydicom.dcmread(f)): f for f in files}
    study = next(iter(sent))[0]
    key = f"StudyInstanceUID={study}"

    moved = _move(app, "ANY", "QueryRetrieveLevel=STUDY", key)
    assert moved.returncode == 0, moved.stderr
    arrived = {_uids(pydicom.dcmread(f)): f for f in (tmp_path / "any").iterdir()}
    assert set(arrived) == set(sent)  # the same UIDs, each once
    # the bytes the gateway received (dcmsend re-encodes some files as it sends them)
    spool = app.config.storage.spool_dir
    received = {r.sop_instance_uid: spool / r.spool_path
                for r in rows(db_url, "SELECT sop_instance_uid, spool_path FROM instances")}
    for uids, path in arrived.items():  # sent as kept: the same syntax, the same bytes
        original = pydicom.dcmread(sent[uids])
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == \
            original.file_meta.TransferSyntaxUID
        assert _after_meta(path) == _after_meta(received[uids[2]]), uids

    moved = _move(app, "PLAIN", "QueryRetrieveLevel=STUDY", key)
    assert moved.returncode == 0, moved.stderr
    got = tmp_path / "got"
    got.mkdir()
    fetched = dcmtk("getscu", "-S", "-aet", "VIEWER", "-aec", "GATEWAY", "-od", str(got),
                    "127.0.0.1", str(app.config.dicom.port), "-k", "QueryRetrieveLevel=STUDY",
                    "-k", key)  # getscu accepts uncompressed syntaxes only, by default
    assert fetched.returncode == 0, fetched.stderr
    for folder in (tmp_path / "plain", got):
        received = {_uids(ds := pydicom.dcmread(f)): ds for f in folder.iterdir()}
        assert set(received) == set(sent), folder.name  # decompressed, under the same UIDs
        for uids, ds in received.items():
            assert not ds.file_meta.TransferSyntaxUID.is_compressed
            assert ds.file_meta.MediaStorageSOPInstanceUID == uids[2]
            assert str(ds.PatientName) == NAME
            original = pydicom.dcmread(sent[uids])
            if original.file_meta.TransferSyntaxUID.is_compressed:
                original.decompress(generate_instance_uid=False)
            assert ds.pixel_array.tobytes() == original.pixel_array.tobytes()


def _scu(*contexts: str) -> AE:
    ae = AE(ae_title="VIEWER")
    for context in contexts:
        ae.add_requested_context(context)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _final_move(app: Gateway, identifier: Dataset, destination: str, calling_ae: str = "VIEWER",
                model: str = StudyRootQueryRetrieveInformationModelMove,
                ) -> tuple[Dataset, Dataset | None]:
    ae = _scu(model)
    ae.ae_title = calling_ae
    assoc = ae.associate("127.0.0.1", app.config.dicom.port, ae_title="GATEWAY")
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_move(identifier, destination, model))
    finally:
        assoc.release()
    status, found = responses[-1]
    return status, found


def _final_get(app: Gateway, identifier: Dataset, calling_ae: str = "VIEWER",
               ) -> tuple[Dataset, Dataset | None, list[str]]:
    stored: list[str] = []

    def on_store(event: evt.Event) -> int:
        stored.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = _scu(StudyRootQueryRetrieveInformationModelGet)
    ae.ae_title = calling_ae
    roles: list[Any] = []  # pynetdicom's ext_neg: a list of its user information items
    for cx in StoragePresentationContexts[:120]:
        assert cx.abstract_syntax is not None
        ae.add_requested_context(cx.abstract_syntax)
        roles.append(build_role(cx.abstract_syntax, scp_role=True))
    assoc = ae.associate("127.0.0.1", app.config.dicom.port, ae_title="GATEWAY",
                         ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    status, found = responses[-1]
    return status, found, stored


def test_a_partial_retrieve_is_b000_and_names_the_instance_that_failed(
    holding: Any, tmp_path: Path, db_url: str,
) -> None:
    app, files = holding(db_url)
    (lost,) = rows(db_url, "SELECT sop_instance_uid, spool_path, study_instance_uid FROM instances "
                           "WHERE transfer_syntax_uid = '1.2.840.10008.1.2.1' "
                           "ORDER BY id LIMIT 1")
    (app.config.storage.spool_dir / lost.spool_path).unlink()  # gone from the disk, still listed
    study = _identifier("STUDY", StudyInstanceUID=lost.study_instance_uid)

    status, failed = _final_move(app, study, "ANY")
    assert status.Status == 0xB000  # PS3.4 C.4.2.1.5: sub-operations complete, one failed
    assert failed is not None and failed.FailedSOPInstanceUIDList == lost.sop_instance_uid
    assert status.NumberOfFailedSuboperations == 1
    assert status.NumberOfCompletedSuboperations == len(files) - 1
    arrived = {str(pydicom.dcmread(f).SOPInstanceUID) for f in (tmp_path / "any").iterdir()}
    assert len(arrived) == len(files) - 1 and lost.sop_instance_uid not in arrived

    status, failed, stored = _final_get(app, study)
    assert status.Status == 0xB000
    assert failed is not None and failed.FailedSOPInstanceUIDList == lost.sop_instance_uid
    assert len(stored) == len(files) - 1 and lost.sop_instance_uid not in stored


@pytest.mark.parametrize(("case", "status", "comment", "movescu_says"), [
    ("not allowed", 0x0124, 'MODALITY may not C-MOVE: add "move" to its services', "(Unknown Status: 0x124)"),
    ("no unique key", 0xC000, "a STUDY retrieve needs StudyInstanceUID",
     "(Failed: UnableToProcess)"),
    ("patient level on study root", 0xA900, "Query/Retrieve Level PATIENT",
     "(Error: DataSetDoesNotMatchSOPClass)"),
    ("unknown destination", 0xA801, "move destination NOWHERE unknown",
     "(Refused: MoveDestinationUnknown)"),
])
def test_a_refused_move_says_why_and_opens_no_association(
    holding: Any, tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture,
    case: str, status: int, comment: str, movescu_says: str,
) -> None:
    app, _ = holding(db_url)
    calling_ae, destination = "VIEWER", "ANY"
    identifier = _identifier("STUDY", StudyInstanceUID="")
    (study,) = {r.study_instance_uid for r in rows(db_url, "SELECT study_instance_uid FROM instances")}
    if case == "not allowed":
        calling_ae, identifier = "MODALITY", _identifier("STUDY", StudyInstanceUID=study)
    elif case == "no unique key":
        identifier = _identifier("STUDY", PatientID="RET-1")
    elif case == "patient level on study root":  # what Orthanc 1.10 sends for a patient answer
        identifier = _identifier("PATIENT", PatientID="RET-1")
    else:
        destination, identifier = "NOWHERE", _identifier("STUDY", StudyInstanceUID=study)

    with caplog.at_level(logging.DEBUG):
        answer, _ = _final_move(app, identifier, destination, calling_ae)
    assert answer.Status == status
    assert str(answer.ErrorComment).startswith(comment), answer.ErrorComment
    assert list((tmp_path / "any").iterdir()) == []  # nothing was sent anywhere
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert any(r.levelno == logging.WARNING and "C-MOVE" in r.getMessage() and "refused"
               in r.getMessage() for r in caplog.records)
    audit = wait_for(lambda: rows(db_url, "SELECT actor, detail FROM audit_events "
                                          "WHERE action = 'move'"), 10, "the refusal's audit row")
    assert [(a.actor, f"0x{status:04X}" in a.detail) for a in audit] == [(calling_ae, True)]

    # movescu, as an operator runs it, shows the status
    shown = _move(app, destination, *(f"{e.keyword}={e.value}" for e in identifier),
                  calling_ae=calling_ae)
    assert movescu_says in shown.stderr, shown.stderr


def test_a_refused_get_and_find_say_why(holding: Any, db_url: str) -> None:
    app, _ = holding(db_url)
    status, _, stored = _final_get(app, _identifier("STUDY", PatientID="RET-1"))
    assert (status.Status, stored) == (0xC000, [])
    assert str(status.ErrorComment) == "a STUDY retrieve needs StudyInstanceUID with a value"
    status, _, stored = _final_get(app, _identifier("STUDY", StudyInstanceUID="1.2"), "MODALITY")
    assert (status.Status, stored) == (0x0124, [])
    assert str(status.ErrorComment) == 'MODALITY may not C-GET: add "get" to its services'

    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore

    ae = _scu(StudyRootQueryRetrieveInformationModelFind)
    ae.ae_title = "MODALITY"
    assoc = ae.associate("127.0.0.1", app.config.dicom.port, ae_title="GATEWAY")
    try:
        ((answer, _),) = list(assoc.send_c_find(_identifier("STUDY", PatientID=""),
                                                StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    assert answer.Status == 0x0124
    assert str(answer.ErrorComment) == 'MODALITY may not C-FIND: add "find" to its services'


def test_patient_root_move_at_patient_level_is_served(holding: Any, tmp_path: Path) -> None:
    """The Patient Root model does have a PATIENT level: what Orthanc should have asked for."""
    app, files = holding(f"sqlite:///{tmp_path / 'gateway.db'}")
    status, _ = _final_move(app, _identifier("PATIENT", PatientID="RET-1"), "ANY",
                            model=PatientRootQueryRetrieveInformationModelMove)
    assert status.Status == 0x0000 and status.NumberOfCompletedSuboperations == len(files)


def test_move_sub_operations_do_not_wait_for_delayed_acks(
    make_gateway: Callable[..., Gateway], tmp_path: Path,
) -> None:
    """C-MOVE to DCMTK storescp, which leaves Nagle on: each C-STORE-RSP reached the gateway
    only after its delayed ACK fired (40 ms), so 40 small instances took at least 1.6 s; with
    TCP_QUICKACK on the sub-operation association they take a fraction of that."""
    import time

    process, port = start_storescp(tmp_path / "moved")
    try:
        app = make_gateway(security={"unknown_callers": ["echo"], "peers": [
            {"ae_title": "VIEWER", "services": ALL},
            {"ae_title": "MODALITY", "services": ["store"]},
            {"ae_title": "PACS", "host": "127.0.0.1", "port": port}]})
        study, series = generate_uid(), generate_uid()
        files = [write_file(make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series,
                                         InstanceNumber=i + 1, PatientName=NAME,
                                         SpecificCharacterSet="ISO_IR 192"),
                            tmp_path / "sent" / f"{i}.dcm") for i in range(40)]
        sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1",
                     str(app.config.dicom.port), *map(str, files))
        assert sent.returncode == 0, sent.stderr
        started = time.perf_counter()
        moved = _move(app, "PACS", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
        took = time.perf_counter() - started
        assert moved.returncode == 0, moved.stderr
        assert len(list((tmp_path / "moved").iterdir())) == len(files)
        assert took < 1.2, f"{took:.2f} s for {len(files)} sub-operations"
    finally:
        process.terminate()
        process.wait(10)
