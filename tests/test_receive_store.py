"""C-STORE through the real app, on SQLite and PostgreSQL: statuses on the wire, files, rows."""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from gateway.app import Gateway
from gateway.dicom.status import Status
from gateway.receive.validate import dataset_offset
from tests.conftest import rows
from tests.factory import CT_IMAGE_STORAGE, make_dataset
from tests.objects import PRIVATE, SYNTAXES, cut_offsets, encoded, layout, private_object
from tests.peers import encode, raw_c_store, spool_files, store


def test_stored_instance_is_on_disk_and_in_the_ledger(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    app = make_gateway(db=db_url)
    assert app.receiver is not None
    ds = make_dataset(PatientName="DOE^JANE", PatientID="PID-42", AccessionNumber="A-77")

    assert store(app.receiver.address[1], ds, calling_ae="CT_ROOM1") == Status.SUCCESS

    [path] = spool_files(app.spool.root)
    assert path == app.spool.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / (
        ds.SOPInstanceUID + ".dcm"
    )
    stored = pydicom.dcmread(path)
    assert stored.file_meta.SourceApplicationEntityTitle == "CT_ROOM1"
    assert stored.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert stored.PixelData == ds.PixelData
    [row] = rows(db_url, "SELECT * FROM instances")
    assert row.sop_instance_uid == ds.SOPInstanceUID
    assert row.study_instance_uid == ds.StudyInstanceUID
    assert row.series_instance_uid == ds.SeriesInstanceUID
    assert row.sop_class_uid == CT_IMAGE_STORAGE
    assert (row.patient_id, row.patient_name, row.accession_number) == ("PID-42", "DOE^JANE", "A-77")
    assert (row.modality, row.study_date, row.calling_ae) == ("CT", "20261123", "CT_ROOM1")
    assert row.peer_address.startswith("127.0.0.1:")
    assert row.size_bytes == path.stat().st_size
    assert len(row.sha256) == 64
    assert app.spool.root / row.spool_path == path
    [assoc] = rows(db_url, "SELECT * FROM associations")
    assert (assoc.calling_ae, assoc.result, assoc.instances) == ("CT_ROOM1", "accepted", 1)
    assert not list(app.spool.incoming.iterdir())


def _assert_nothing_kept(app: Gateway, db_url: str) -> None:
    assert spool_files(app.spool.root) == []
    assert rows(db_url, "SELECT * FROM instances") == []
    assert not list(app.spool.incoming.iterdir())
    assert not list(app.spool.root.rglob("*.tmp"))


def test_dataset_uids_differing_from_the_request_are_refused_with_a900(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    app = make_gateway(db=db_url)
    assert app.receiver is not None
    ds = make_dataset()
    status = raw_c_store(app.receiver.address[1], encode(ds), CT_IMAGE_STORAGE, generate_uid())
    assert status == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    _assert_nothing_kept(app, db_url)


def test_undecodable_dataset_is_refused_with_c000(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    app = make_gateway(db=db_url)
    assert app.receiver is not None
    ds = make_dataset()
    # A valid start, then an element claiming 0x7FFFFFF0 bytes that never come.
    garbage = encode(ds)[:40] + b"\x10\x00\x10\x00PN\xf0\xff" + b"\x01" * 7
    status = raw_c_store(app.receiver.address[1], garbage, CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    assert status == Status.CANNOT_UNDERSTAND
    _assert_nothing_kept(app, db_url)


def test_invalid_uid_is_refused_with_c001(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    app = make_gateway(db=db_url)
    assert app.receiver is not None
    ds = make_dataset(SeriesInstanceUID="1.2.3/../../etc")
    status = raw_c_store(app.receiver.address[1], encode(ds), CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    assert status == Status.INVALID_UID
    ds = make_dataset(StudyInstanceUID=None)
    status = raw_c_store(app.receiver.address[1], encode(ds), CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    assert status == Status.INVALID_UID
    _assert_nothing_kept(app, db_url)


def test_uid_with_a_trailing_newline_is_refused_with_c001(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    """PS3.5 9.1: digits and dots only. A newline after them is not padding (pydicom strips
    only NUL and space), and accepting it put a UID in the ledger that no file holds."""
    app = make_gateway(db=db_url)
    assert app.receiver is not None
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        overrides: dict[str, Any] = {keyword: "1.2.826.0.1.3680043.2.1143.77"}  # odd: NUL-padded
        ds = make_dataset(**overrides)
        payload = encode(ds).replace(b"1.2.826.0.1.3680043.2.1143.77\0",
                                     b"1.2.826.0.1.3680043.2.1143.77\n")
        status = raw_c_store(app.receiver.address[1], payload, CT_IMAGE_STORAGE,
                             ds.SOPInstanceUID)
        assert status == Status.INVALID_UID, keyword
    _assert_nothing_kept(app, db_url)


@functools.cache
def _rich(syntax: str, large: bool) -> tuple[pydicom.Dataset, bytes, list[int]]:
    ds, data = encoded(syntax, large)
    return ds, data, cut_offsets(data, syntax)


def _part10_data_set(path: Path) -> bytes:
    with open(path, "rb") as fp:
        offset = dataset_offset(fp)
        fp.seek(offset)
        return fp.read()


def test_objects_rich_in_structure_are_kept_byte_identical_in_every_syntax(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    """Nested sequences of both length kinds, private blocks with odd lengths, UN and a private
    sequence, values over the defer size before and after the pixel data, non-ASCII names."""
    app = make_gateway(db=db_url)
    assert app.receiver is not None
    for syntax, transfer_syntax in SYNTAXES.items():
        ds, data, _ = _rich(syntax, True)
        status = raw_c_store(app.receiver.address[1], data, ds.SOPClassUID, ds.SOPInstanceUID,
                             transfer_syntax=transfer_syntax)
        assert status == Status.SUCCESS, syntax
        [path] = app.spool.root.rglob(f"{ds.SOPInstanceUID}.dcm")
        assert _part10_data_set(path) == data, syntax
    names = rows(db_url, "SELECT patient_name FROM instances")
    assert [row.patient_name for row in names] == ["MÜLLER^JÖRG"] * len(SYNTAXES)


def test_secondary_capture_with_private_elements_of_any_vr_and_length_is_kept(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    """Unknown VRs in implicit VR, odd lengths of numeric VRs, values over the defer size
    before and after the pixel data: a header decode that converted them refused these with
    0xC000 "dataset could not be decoded (AttributeError)" (or BytesLengthException)."""
    app = make_gateway(db=db_url)
    assert app.receiver is not None
    for syntax in ("implicit", "explicit"):
        for private in PRIVATE:
            ds, data = private_object(*private, syntax=syntax)
            status = raw_c_store(app.receiver.address[1], data, ds.SOPClassUID,
                                 ds.SOPInstanceUID, transfer_syntax=SYNTAXES[syntax])
            assert status == Status.SUCCESS, (syntax, private[1], private[3])
            [path] = app.spool.root.rglob(f"{ds.SOPInstanceUID}.dcm")
            assert _part10_data_set(path) == data
    assert len(rows(db_url, "SELECT id FROM instances")) == 2 * len(PRIVATE)


# Where a transfer stops short, named: the cases first (a value over the defer size,
# which pydicom skips without reading and then reads short), then one at each depth.
CUT_INSIDE = {
    "private value before the pixel data": (0x00291001, 0),
    "pixel data": (0x7FE00010, 0),
    "private value after the pixel data": (0x7FE11001, 0),
    "trailing padding": (0xFFFCFFFC, 0),
    "nested sequence item": (0xFFFEE000, 2),
    "element in an item": (0x00080104, 1),
}


def test_data_sets_cut_inside_a_value_are_refused_with_c000_and_nothing_kept(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    app = make_gateway(db=db_url)
    assert app.receiver is not None
    for syntax in ("explicit", "implicit", "jpeg"):
        ds, data, _ = _rich(syntax, True)
        lengths = layout(data, syntax == "implicit", True)
        for name, (tag, depth) in CUT_INSIDE.items():
            entry = next(e for e in lengths if (e.tag, e.depth) == (tag, depth))
            cut = entry.value + min(entry.length, 0xFFFF) // 2 if entry.length > 1 else entry.at
            status = raw_c_store(app.receiver.address[1], data[:cut], ds.SOPClassUID,
                                 ds.SOPInstanceUID, transfer_syntax=SYNTAXES[syntax])
            assert status == Status.CANNOT_UNDERSTAND, (syntax, name)
    _assert_nothing_kept(app, db_url)


def test_truncated_or_overlong_data_sets_are_refused_with_c000_and_nothing_kept(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    """The class of data sets whose declared lengths run past what arrives: cut inside any
    element, item or fragment at any depth (or inside the deflate stream), or with any length
    made to reach past the end, in every syntax, with values over the defer size or not."""
    app = make_gateway(db=db_url)
    assert app.receiver is not None
    port = app.receiver.address[1]

    @settings(max_examples=100, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.data())
    def check(draw: st.DataObject) -> None:
        syntax = draw.draw(st.sampled_from(list(SYNTAXES)), "syntax")
        ds, data, cuts = _rich(syntax, draw.draw(st.booleans(), "large"))
        if syntax == "deflated" or draw.draw(st.booleans(), "cut"):
            payload = data[:draw.draw(st.sampled_from(cuts), "cut at")]
        else:
            little = syntax != "big-endian"
            reachable = [
                entry for entry in layout(data, syntax == "implicit", little)
                if entry.length != 0xFFFFFFFF
                and len(data) - entry.value < (1 << (8 * entry.size)) - 2
            ]
            entry = draw.draw(st.sampled_from(reachable), "inflated")
            declared = len(data) - entry.value + 1
            declared += draw.draw(st.integers(0, (1 << (8 * entry.size)) - 3 - declared))
            field = struct.pack(("<" if little else ">") + "HI"[entry.size == 4], declared)
            payload = data[:entry.at] + field + data[entry.at + entry.size:]
        status = raw_c_store(port, payload, ds.SOPClassUID, ds.SOPInstanceUID,
                             transfer_syntax=SYNTAXES[syntax])
        assert status == Status.CANNOT_UNDERSTAND
        _assert_nothing_kept(app, db_url)

    check()


def test_low_disk_answers_a700_and_recovers_when_space_returns(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    free = {"bytes": 10 * 1024 * 1024}  # below the 64 MiB minimum configured here
    app = make_gateway(db=db_url, free_bytes=lambda _p: free["bytes"],
                       storage={"min_free_mb": 64})
    assert app.receiver is not None
    port = app.receiver.address[1]
    refused = make_dataset()
    assert store(port, refused) == Status.OUT_OF_RESOURCES
    _assert_nothing_kept(app, db_url)
    assert app.health()["spool_free"] is False

    free["bytes"] = 10 * 1024**3
    assert store(port, refused) == Status.SUCCESS
    assert len(spool_files(app.spool.root)) == 1
    assert app.health() == {"database": True, "spool_free": True}


def test_unauthorised_service_is_refused_with_0124(make_gateway: Callable[..., Gateway]) -> None:
    app = make_gateway(security={"unknown_callers": ["echo"]})
    assert app.receiver is not None
    assert store(app.receiver.address[1], make_dataset()) == Status.NOT_AUTHORIZED
    assert spool_files(app.spool.root) == []


def test_restart_removes_unacknowledged_leftovers(
    make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    (spool / "incoming").mkdir(parents=True)
    (spool / "incoming" / "tmpabc.dcm").write_bytes(b"partial")
    (spool / "1.2" / "3.4").mkdir(parents=True)
    (spool / "1.2" / "3.4" / ".deadbeef.tmp").write_bytes(b"half")
    app = make_gateway()
    assert not list(app.spool.root.rglob("*.tmp"))
    assert not list(app.spool.incoming.iterdir())


def test_every_refusal_says_why_in_its_error_comment(
    make_gateway: Callable[..., Gateway], db_url: str
) -> None:
    """Each non-success C-STORE-RSP (and C-ECHO-RSP) carries Error Comment (0000,0902): the only
    "why" a sender sees (``storescu`` shows it with -v). At most 64 characters (LO), and 0xA700
    only where retrying later can help."""
    from io import BytesIO

    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE

    free = {"bytes": 10 * 1024**3}
    app = make_gateway(
        db=db_url, free_bytes=lambda _p: free["bytes"],
        storage={"min_free_mb": 64, "duplicate_policy": "reject"},
        security={"unknown_callers": ["echo", "store"],
                  "peers": [{"ae_title": "ECHO_ONLY_MODAL1", "services": ["echo"]},
                            {"ae_title": "STORE_ONLY", "services": ["store"]}]},
    )
    assert app.receiver is not None
    port = app.receiver.address[1]

    def answer(payload: bytes, sop_instance: str, calling_ae: str = "RAWSCU") -> tuple[int, str]:
        ae = AE(ae_title=calling_ae)
        ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
        assert assoc.is_established
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            pass
        try:
            request = C_STORE()
            request.MessageID, request.Priority = 1, 2
            request.AffectedSOPClassUID = CT_IMAGE_STORAGE
            request.AffectedSOPInstanceUID = sop_instance
            request.DataSet = BytesIO(payload)
            context_id = assoc.accepted_contexts[0].context_id
            assert context_id is not None
            assoc.dimse.send_msg(request, context_id)
            _, response = assoc.dimse.get_msg(block=True)
            assert response is not None
            assert response.Status is not None
            return int(response.Status), str(response.ErrorComment or "")
        finally:
            assoc._reactor_checkpoint.set()
            assoc.release()

    kept = make_dataset(PatientName="MÜLLER^JÖRG")
    assert answer(encode(kept), kept.SOPInstanceUID) == (Status.SUCCESS, "")
    changed = make_dataset(SOPInstanceUID=kept.SOPInstanceUID, StudyInstanceUID=kept.StudyInstanceUID,
                           SeriesInstanceUID=kept.SeriesInstanceUID, PatientName="MÜLLER^JÖRG",
                           InstanceNumber=2)
    ds = make_dataset()
    cases = {
        "not authorised": (encode(ds), ds.SOPInstanceUID, "ECHO_ONLY_MODAL1"),
        "UIDs differ": (encode(ds), generate_uid(), "RAWSCU"),
        "undecodable": (encode(ds)[:40] + b"\x10\x00\x10\x00PN\xf0\xff" + b"\x01" * 7,
                        ds.SOPInstanceUID, "RAWSCU"),
        "invalid UID": (encode(make_dataset(SOPInstanceUID="1.2.x")), "1.2.x", "RAWSCU"),
        "duplicate": (encode(changed), kept.SOPInstanceUID, "RAWSCU"),
    }
    said = {name: answer(*args[:2], calling_ae=args[2]) for name, args in cases.items()}
    free["bytes"] = 1024
    said["no room"] = answer(encode(ds), ds.SOPInstanceUID)

    assert said == {
        "not authorised": (Status.NOT_AUTHORIZED,
                           'ECHO_ONLY_MODAL1 may not store; add "store" in security.peers'),
        "UIDs differ": (Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, said["UIDs differ"][1]),
        "undecodable": (Status.CANNOT_UNDERSTAND, said["undecodable"][1]),
        "invalid UID": (Status.INVALID_UID, said["invalid UID"][1]),
        "duplicate": (Status.DUPLICATE_SOP_INSTANCE, said["duplicate"][1]),
        "no room": (Status.OUT_OF_RESOURCES, "spool below minimum free"),
    }
    # The validation reasons are validate.py's words, whatever they are: carried, not judged here
    assert "already stored" in said["duplicate"][1]
    assert all(0 < len(comment) <= 64 and comment.isascii() for _, comment in said.values())
    assert len({comment for _, comment in said.values()}) == len(said)

    echo = AE(ae_title="STORE_ONLY")
    echo.add_requested_context("1.2.840.10008.1.1")
    assoc = echo.associate("127.0.0.1", port, ae_title="GATEWAY")
    assert assoc.is_established
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    assert int(status.Status) == Status.NOT_AUTHORIZED
    assert status.ErrorComment == 'STORE_ONLY may not echo; add "echo" in security.peers'
