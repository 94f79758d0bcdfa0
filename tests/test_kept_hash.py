"""``instances.kept_sha256``: the ledger knows the SHA-256 of each spool file as kept, not only as
received. After a remap rewrite, ``sha256`` still describes the received object (an identical
second copy is still "identical") and ``kept_sha256`` the file on disk, which is what a node
fetching it from another checks it against (gateway.db.models.kept_hash)."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from gateway.app import Gateway
from gateway.db.engine import make_engine
from gateway.db.migrate import upgrade
from gateway.db.models import kept_hash
from gateway.dicom.status import Status
from gateway.receive.spool import hash_dataset
from gateway.receive.validate import dataset_offset
from gateway.remap.apply import Modification, rewrite_file
from tests.conftest import rows, wait_for
from tests.factory import make_dataset
from tests.peers import raw_c_store
from tests.test_nodes import downgrade, two_nodes  # noqa: F401  (a fixture)
from tests.test_retrieve import NAME, _after_meta, _final_move, _identifier

NEW_ID = "MRN-0042"
NEW_NAME = "Παπαδόπουλος^Ωμέγα"  # Greek: a Latin-1 object moves to UTF-8 to hold it
RULES = (
    '[[rules]]\nname = "mrn"\nactions = [\n'
    f'  {{ type = "set", tag = "PatientID", value = "{NEW_ID}" }},\n'
    f'  {{ type = "set", tag = "PatientName", value = "{NEW_NAME}" }},\n]\n'
)
T0 = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


def _dataset_sha256(path: Path) -> str:
    with open(path, "rb") as fp:
        return hash_dataset(path, dataset_offset(fp))


# What is sent: (label, how to build the object). Each is sent as its data set's exact bytes, in
# its own transfer syntax, so the ledger's ``sha256`` must be the hash of exactly those bytes.
def _plain_latin1() -> pydicom.Dataset:
    return make_dataset(PatientName="Müller^Jürgen", PatientID="DEV-1",
                        SpecificCharacterSet="ISO_IR 100")


def _plain_utf8() -> pydicom.Dataset:
    return make_dataset(PatientName=NAME, PatientID="DEV-2", SpecificCharacterSet="ISO_IR 192")


def _compressed(name: str) -> Callable[[], pydicom.Dataset]:
    def build() -> pydicom.Dataset:
        ds = pydicom.dcmread(str(get_testdata_file(name)))
        ds.SpecificCharacterSet, ds.PatientName, ds.PatientID = "ISO_IR 192", NAME, "DEV-3"
        return ds
    return build


OBJECTS: list[tuple[str, Callable[[], pydicom.Dataset], str]] = [
    ("plain latin-1", _plain_latin1, ExplicitVRLittleEndian),
    ("plain implicit", _plain_utf8, ImplicitVRLittleEndian),
    ("JPEG 2000", _compressed("JPEG2000.dcm"), "1.2.840.10008.1.2.4.91"),
    ("JPEG baseline", _compressed("SC_rgb_jpeg_gdcm.dcm"), "1.2.840.10008.1.2.4.50"),
    ("RLE", _compressed("MR_small_RLE.dcm"), "1.2.840.10008.1.2.5"),
]


def _part10(ds: pydicom.Dataset, transfer_syntax: str, folder: Path,
            study: str | None = None) -> Path:
    """``ds`` with new UIDs (in ``study``, or a new one) as a Part-10 file in ``transfer_syntax``
    (compressed objects keep their own)."""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
    meta.TransferSyntaxUID = transfer_syntax
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta = meta
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _send(port: int, path: Path, calling_ae: str = "MODALITY") -> int:
    """The data set's exact bytes, in the file's transfer syntax (``raw_c_store``)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return raw_c_store(port, _after_meta(path), str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                       calling_ae, transfer_syntax=str(ds.file_meta.TransferSyntaxUID))


def _rewritten(db: str, count: int) -> list[Any]:
    return wait_for(
        lambda: (r := rows(db, "SELECT * FROM instances WHERE remap_state = 'done'"))
        and len(r) == count and r, 60, f"{count} instances rewritten")


def _rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(RULES, encoding="utf-8")
    return path


# -- the rewrite computes the hash it records -------------------------------------------------

_SOURCES = [(label, build, ts) for label, build, ts in OBJECTS] + [
    ("deflated", lambda: pydicom.dcmread(str(get_testdata_file("image_dfl.dcm"))),
     "1.2.840.10008.1.2.1.99"),
]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=st.sampled_from(_SOURCES),
       patient_id=st.text(st.characters(min_codepoint=0x30, max_codepoint=0x5A), min_size=1,
                          max_size=16),
       family=st.text(st.sampled_from("AbçÑöΩλЖж山田"), min_size=1, max_size=12))
def test_a_rewrite_returns_the_hash_of_the_data_set_it_wrote(
    source: tuple[str, Callable[[], pydicom.Dataset], str], patient_id: str, family: str,
) -> None:
    """Whatever the transfer syntax (native, compressed, deflated) and whatever the new values
    (character set moves included), the hash returned is ``hash_dataset`` of the file written,
    and a repeated rewrite (nothing left to change) returns the same."""
    _, build, transfer_syntax = source
    with tempfile.TemporaryDirectory() as folder:
        path = _part10(build(), transfer_syntax, Path(folder))
        why = Modification("COERCE", "GATEWAY", "MODALITY", T0)
        changes: dict[str, Any] = {"PatientID": patient_id, "PatientName": f"{family}^Zoë"}
        kept = rewrite_file(path, changes, why)
        assert kept.sha256 == _dataset_sha256(path)
        assert kept.size_bytes == path.stat().st_size
        assert pydicom.dcmread(path).PatientID == patient_id
        assert rewrite_file(path, changes, why) == kept


# -- one node: the rewrite records it, duplicates still compare the received hash ---------------

@pytest.mark.parametrize("label,build,transfer_syntax", OBJECTS, ids=[o[0] for o in OBJECTS])
def test_a_rewritten_instance_keeps_both_hashes_and_an_identical_copy_is_identical(
    make_gateway: Callable[..., Gateway], tmp_path: Path, db_url: str,
    label: str, build: Callable[[], pydicom.Dataset], transfer_syntax: str,
) -> None:
    app = make_gateway(db=db_url, remap={"rules_file": str(_rules(tmp_path))},
                       storage={"duplicate_policy": "reject"})
    port = app.config.dicom.port
    sent = _part10(build(), transfer_syntax, tmp_path / "sent")
    assert _send(port, sent) == Status.SUCCESS
    (row,) = _rewritten(db_url, 1)
    kept = app.config.storage.spool_dir / row.spool_path
    assert pydicom.dcmread(kept).PatientID == NEW_ID  # the file was rewritten
    assert row.sha256 == hashlib.sha256(_after_meta(sent)).hexdigest()  # as received
    assert row.kept_sha256 == _dataset_sha256(kept) != row.sha256  # as kept

    # The received bytes again: identical (Success, nothing kept); other content under the same
    # UID is refused by policy ``reject``, so the Success is the identity check's.
    assert _send(port, sent) == Status.SUCCESS
    other = pydicom.dcmread(sent)
    other.SeriesDescription = "another copy"
    other.save_as(tmp_path / "other.dcm", enforce_file_format=True)
    assert _send(port, tmp_path / "other.dcm") == Status.DUPLICATE_SOP_INSTANCE
    assert rows(db_url, "SELECT count(*) FROM instance_versions")[0][0] == 0
    (after,) = rows(db_url, "SELECT sha256, kept_sha256 FROM instances")
    assert tuple(after) == (row.sha256, row.kept_sha256)


def test_a_replacing_copy_drops_the_kept_hash_of_the_file_it_replaces(
    make_gateway: Callable[..., Gateway], tmp_path: Path, db_url: str,
) -> None:
    """Policy ``replace`` publishes a new file whose ``sha256`` is its own: a kept hash left
    from the rewritten file it replaced would make every reader refuse the new one."""
    app = make_gateway(db=db_url, remap={"rules_file": str(_rules(tmp_path))},
                       storage={"duplicate_policy": "replace"})
    port = app.config.dicom.port
    first = _part10(_plain_utf8(), ExplicitVRLittleEndian, tmp_path / "sent")
    assert _send(port, first) == Status.SUCCESS
    (rewritten,) = _rewritten(db_url, 1)
    assert rewritten.kept_sha256 is not None
    # A second copy that already carries the rules' values: nothing to rewrite (state none)
    second = pydicom.dcmread(first)
    second.PatientID, second.PatientName = NEW_ID, NEW_NAME
    second.SeriesDescription = "corrected copy"
    second.save_as(tmp_path / "second.dcm", enforce_file_format=True)
    assert _send(port, tmp_path / "second.dcm") == Status.SUCCESS
    (row,) = rows(db_url, "SELECT * FROM instances")
    assert row.remap_state == "none" and row.spool_path != rewritten.spool_path
    assert row.kept_sha256 is None
    assert row.sha256 == _dataset_sha256(app.config.storage.spool_dir / row.spool_path)
    assert kept_hash(row.sha256, row.kept_sha256, row.remap_state) == row.sha256


def test_a_rewrite_finished_after_the_instance_was_replaced_records_nothing(
    db_url: str, tmp_path: Path,
) -> None:
    """A rewrite in flight while policy ``replace`` made a new copy current: its result (done,
    the old file's size and hash) belongs to the superseded file, not to the row's new one; the
    new copy stays as its own rewrite will find it (pending, no kept hash)."""
    from gateway.config import RemapConfig
    from gateway.db.models import Instance
    from gateway.remap.rules import load_rules
    from gateway.remap.stage import Remapper, Rewritten

    engine = make_engine(db_url)
    upgrade(engine)
    try:
        remapper = Remapper(load_rules(_rules(tmp_path)), RemapConfig(), engine)
        plan = '{"PatientID": "MRN-0042", "__reason__": "COERCE"}'
        ids = []
        with engine.begin() as c:
            for n in range(2):
                key = c.execute(sa.insert(Instance).values(
                    sop_instance_uid=f"1.2.3.{n}", sop_class_uid="1.2", study_instance_uid="1.3",
                    series_instance_uid="1.4", calling_ae="CT", peer_address="h",
                    transfer_syntax_uid=ExplicitVRLittleEndian, size_bytes=100, sha256="a" * 64,
                    spool_path=f"1.3/1.4/1.2.3.{n}.dcm", received_at=T0, remap_state="pending",
                    remap_plan=plan)).inserted_primary_key
                assert key is not None
                ids.append(int(key[0]))
        replaced, kept = remapper.claim(ids)
        with engine.begin() as c:  # what Ingest._second_copy does under policy replace
            c.execute(sa.update(Instance).where(Instance.id == replaced.instance_id).values(
                spool_path="1.3/1.4/1.2.3.0.bbbbbbbbbbbbbbbb.dcm", sha256="b" * 64,
                size_bytes=200, kept_sha256=None, remap_state="pending"))
        remapper.finish([Rewritten(replaced.instance_id, replaced.spool_path, 120, sha256="c" * 64),
                         Rewritten(kept.instance_id, kept.spool_path, 130, sha256="d" * 64)])
        found = {r.id: r for r in rows(db_url, "SELECT id, remap_state, size_bytes, sha256, "
                                               "kept_sha256 FROM instances")}
        assert tuple(found[replaced.instance_id])[1:] == ("pending", 200, "b" * 64, None)
        assert tuple(found[kept.instance_id])[1:] == ("done", 130, "a" * 64, "d" * 64)
    finally:
        engine.dispose()


# -- two nodes: a fetch checks the file as kept, end to end -------------------------------------

@pytest.fixture
def remapping_nodes(two_nodes: Any,  # noqa: F811  (the fixture imported above)
                    tmp_path: Path) -> Callable[[str], tuple[Gateway, Gateway]]:
    """tests/test_nodes.py's ``two_nodes`` (and its storescp ``ANY``, which keeps the bytes as
    received), ``b`` rewriting what it receives."""
    return lambda db: two_nodes(db, remap_b={"rules_file": str(_rules(tmp_path))})


def _flip_a_pixel_byte(path: Path) -> None:
    """One byte in the middle of Pixel Data's value (native or encapsulated)."""
    with open(path, "rb") as fp:
        pydicom.dcmread(fp, stop_before_pixels=True)
        pixel_data_at = fp.tell()
    size = path.stat().st_size
    assert size - pixel_data_at > 64, "no pixel data to corrupt"
    at = pixel_data_at + (size - pixel_data_at) // 2
    with open(path, "r+b") as fp:
        fp.seek(at)
        byte = fp.read(1)
        fp.seek(at)
        fp.write(bytes([byte[0] ^ 0x5A]))


def test_a_cross_node_move_checks_a_rewritten_file_against_its_kept_hash(
    remapping_nodes: Any, tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = remapping_nodes(db_url)
    study = generate_uid()
    sent = []
    for label, build, transfer_syntax in OBJECTS:
        path = _part10(build(), transfer_syntax, tmp_path / "sent", study)  # one move
        assert _send(b.config.dicom.port, path) == Status.SUCCESS
        sent.append(path)
    held = {r.sop_instance_uid: r for r in _rewritten(db_url, len(sent))}
    assert {r.node_name for r in held.values()} == {"b"}

    status, _ = _final_move(a, _identifier("STUDY", StudyInstanceUID=study), "ANY")
    assert status.Status == 0x0000
    arrived = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
               for p in (tmp_path / "any").iterdir()}
    assert set(arrived) == set(held)
    for uid, path in arrived.items():  # the rewritten files node b keeps
        kept = b.config.storage.spool_dir / held[uid].spool_path
        got = pydicom.dcmread(path, stop_before_pixels=True)
        assert got.PatientID == NEW_ID
        if got.file_meta.TransferSyntaxUID == held[uid].transfer_syntax_uid:
            assert _after_meta(path) == _after_meta(kept), uid  # byte for byte

    # Corrupted at rest after the rewrite: the holder's file no longer hashes to kept_sha256
    corrupted, legacy = sorted(held)[:2]
    _flip_a_pixel_byte(b.config.storage.spool_dir / held[corrupted].spool_path)
    # Rewritten before revision 0014 (no kept hash): still served, checked in transfer only
    engine = sa.create_engine(db_url)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE instances SET kept_sha256 = NULL WHERE sop_instance_uid = :u"),
                  {"u": legacy})
    engine.dispose()
    for path in (tmp_path / "any").iterdir():
        path.unlink()
    caplog.clear()
    status, failed = _final_move(a, _identifier("STUDY", StudyInstanceUID=study), "ANY")
    assert status.Status == 0xB000  # PS3.4 C.4.2.1.5: one sub-operation failed
    assert failed is not None and failed.FailedSOPInstanceUIDList == corrupted
    assert status.NumberOfCompletedSuboperations == len(sent) - 1
    assert any(corrupted in r.getMessage() and "SHA-256" in r.getMessage()
               for r in caplog.records)
    assert legacy in {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                      for p in (tmp_path / "any").iterdir()}


# -- upgrade ---------------------------------------------------------------------------------

def test_migration_0014_from_a_0012_ledger_with_rows(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0012", node_name="a")
        with engine.begin() as c:
            for uid, state in (("1.2.3.1", "none"), ("1.2.3.2", "done"), ("1.2.3.3", "pending")):
                c.execute(sa.text(
                    "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
                    "series_instance_uid, calling_ae, peer_address, transfer_syntax_uid, "
                    "size_bytes, sha256, spool_path, received_at, remap_state, node_name) VALUES "
                    "(:u, '1.2', '1.3', '1.4', 'CT', 'h', '1.2.840.10008.1.2.1', 1, :h, 'p', :t, "
                    ":s, 'a')"), {"u": uid, "h": uid[-1] * 64, "t": T0, "s": state})
        upgrade(engine)
        assert "kept_sha256" in {c["name"] for c in sa.inspect(engine).get_columns("instances")}
        with engine.connect() as c:
            found = c.execute(sa.text("SELECT sop_instance_uid, sha256, kept_sha256, remap_state "
                                      "FROM instances ORDER BY sop_instance_uid")).all()
        assert [r.kept_sha256 for r in found] == [None, None, None]  # no file read at upgrade
        # Not rewritten: the received hash describes the file; rewritten before 0014: unknown
        assert [kept_hash(r.sha256, r.kept_sha256, r.remap_state) for r in found] == [
            "1" * 64, None, "3" * 64]
        downgrade(engine, "0012")
        assert "kept_sha256" not in {c["name"] for c in
                                     sa.inspect(engine).get_columns("instances")}
        with engine.connect() as c:
            assert c.scalar(sa.text("SELECT count(*) FROM instances")) == 3
    finally:
        engine.dispose()
