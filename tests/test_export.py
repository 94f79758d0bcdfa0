"""Export archives (gateway.export) as an operator and a recipient see them.

Every archive a test makes is checked whole (``check_archive``): ``unzip -t``; extracted, its
manifest verifies with ``sha256sum -c`` and names every file but itself, and comes last; its JSON
validates against the schema in the repository; every ``.dcm`` is the spool's file byte for byte
(or the ledger's SHA-256 of it, once retention removed it) with the UIDs received. Previews,
DICOMDIR and de-identification are built elsewhere (their own modules and tests); here they are
off, and the tests that need them are skipped until those modules are present.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import UID, RLELossless, generate_uid

from gateway.app import Gateway
from gateway.config import ExportOptions, ExportSelector
from gateway.db.engine import make_engine, make_sessions
from gateway.db.migrate import upgrade
from gateway.export import metadata, names
from gateway.export.plan import read_plan
from gateway.export.progress import LineReporter
from gateway.export.run import Exporter, ExportRequest, work_folder
from gateway.export.sources import Sources
from gateway.query.retrieve import Loader
from gateway.receive.spool import hash_dataset
from gateway.receive.validate import dataset_offset
from tests.conftest import GATEWAY_BIN, config_dict, free_port, rows, wait_for, write_toml
from tests.factory import make_dataset, write_file
from tests.peers import dcmtk

PATIENT = "MRN0042"
NAME = "Ğürsoy^Ayşe"
OFF = ["--no-previews", "--no-dicomdir"]  # built by other modules (see the module docstring)
PLAIN = ExportOptions(previews=False, dicomdir=False)


# -- what a site holds ------------------------------------------------------------------------------

@dataclass
class Site:
    """A gateway holding three studies (two of PATIENT, one of another patient), its config as a
    file for the CLI, and the studies' UIDs."""

    app: Gateway
    config: Path
    db: str
    spool: Path
    studies: dict[str, str]  # "ct", "mr", "other" -> Study Instance UID
    out: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        return subprocess.run([str(GATEWAY_BIN), *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)

    def instances(self, study: str) -> list[Any]:
        return rows(self.db, "SELECT * FROM instances WHERE study_instance_uid = :s ORDER BY id",
                    s=study)


def ct_study(folder: Path) -> list[Path]:
    """Four CT instances in two series: a 3-frame one and an RLE-compressed one among them."""
    study, series = generate_uid(), [generate_uid(), generate_uid()]
    common: dict[str, Any] = {
        "StudyInstanceUID": study, "PatientID": PATIENT, "PatientName": NAME,
        "SpecificCharacterSet": "ISO_IR 192", "StudyDate": "20261101",
        "AccessionNumber": "ACC-CT", "StudyDescription": "CT THORAX"}
    files = []
    for i in range(4):
        ds = make_dataset(SeriesInstanceUID=series[i % 2], SeriesNumber=i % 2 + 1,
                          InstanceNumber=i // 2 + 1, frames=3 if i == 1 else 1, **common)
        if i == 2:
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            ds.compress(RLELossless, generate_instance_uid=False)
            path = folder / f"ct{i}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        else:
            files.append(write_file(ds, folder / f"ct{i}.dcm"))
    return files


def simple_study(folder: Path, count: int, **values: Any) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    return [write_file(make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series,
                                    InstanceNumber=i + 1, **values), folder / f"{i}.dcm")
            for i in range(count)]


def send(port: int, files: list[Path], calling_ae: str = "MODALITY") -> None:
    """dcmsend proposes each file's own transfer syntax (the RLE one stays RLE)."""
    sent = dcmtk("dcmsend", "-aet", calling_ae, "-aec", "GATEWAY", "127.0.0.1", str(port),
                 *map(str, files))
    assert sent.returncode == 0, sent.stderr


def study_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture
def site(make_gateway: Callable[..., Gateway], tmp_path: Path, db_url: str) -> Site:
    return make_site(make_gateway, tmp_path, db_url)


def make_site(make_gateway: Callable[..., Gateway], tmp_path: Path, db_url: str,
              **sections: Any) -> Site:
    app = make_gateway(db=db_url, **sections)
    ct = ct_study(tmp_path / "send" / "ct")
    mr = simple_study(tmp_path / "send" / "mr", 2, PatientID=PATIENT, PatientName=NAME,
                      SpecificCharacterSet="ISO_IR 192", StudyDate="20261115", Modality="MR",
                      AccessionNumber="ACC-MR", SOPClassUID="1.2.840.10008.5.1.4.1.1.4")
    other = simple_study(tmp_path / "send" / "other", 2, PatientID="PAT-2",
                         PatientName="Jones^Bob", StudyDate="20261120", AccessionNumber="ACC-O")
    send(app.config.dicom.port, ct + mr + other)
    data = config_dict(tmp_path, db_url, free_port(), **sections)
    config = write_toml(tmp_path / "gateway.toml", data)
    studies = {"ct": study_of(ct), "mr": study_of(mr), "other": study_of(other)}
    wait_for(lambda: len(rows(db_url, "SELECT id FROM instances")) == 8, 30, "8 instances kept")
    return Site(app, config, db_url, app.config.storage.spool_dir, studies, tmp_path / "out")


# -- checking an archive whole ------------------------------------------------------------------------

@dataclass
class Checked:
    root: Path  # extracted
    document: dict[str, Any]  # the top-level JSON
    names: list[str]  # entries in archive order


def check_archive(path: Path, db: str, spool: Path, top: str, received: bool = True) -> Checked:
    """The checks of the module docstring; returns the extracted archive. ``received``: the
    DICOM files are those received (false for a de-identified export: then each is checked to
    be a DICOM file whose digest the JSON gives)."""
    if path.is_dir():
        root = path
        listed = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        order = listed
    else:
        tested = subprocess.run(["unzip", "-t", str(path)], capture_output=True, text=True,
                                check=False)
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert "No errors detected" in tested.stdout
        root = path.with_name(path.name + ".extracted")
        shutil.rmtree(root, ignore_errors=True)
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None
            order = [i.filename for i in archive.infolist()]
            assert all(names.is_inside(n) for n in order)
            archive.extractall(root)
        assert order[-1] == "manifest.sha256", "the manifest comes last"
        listed = order
    manifest = (root / "manifest.sha256").read_text(encoding="utf-8")
    verified = subprocess.run(["sha256sum", "--strict", "-c", "manifest.sha256"], cwd=root,
                              capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    in_manifest = [line.split("  ", 1)[1] for line in manifest.splitlines()
                   if not line.startswith("#")]
    assert sorted(in_manifest) == sorted(n for n in listed if n != "manifest.sha256")
    document = json.loads((root / top).read_text(encoding="utf-8"))
    for json_file in root.rglob("*_data.json"):
        metadata.check(json.loads(json_file.read_text(encoding="utf-8")))
    ledger = {r.sop_instance_uid: r for r in rows(db, "SELECT * FROM instances")}
    for instance in document["instances"]:
        if instance["path"] is None:
            continue
        if not received:
            data = (root / instance["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == instance["sha256"]
            ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
            assert ds.SOPInstanceUID == instance["sopInstanceUID"]
            continue
        kept = ledger[instance["sopInstanceUID"]]
        data = (root / instance["path"]).read_bytes()
        if kept.spool_removed_at is None:
            assert data == (spool / kept.spool_path).read_bytes(), "not the spool's bytes"
        assert hashlib.sha256(data).hexdigest() == instance["sha256"]
        # the ledger's SHA-256 covers the data set (after the file meta), as it arrived
        assert hash_dataset(root / instance["path"], dataset_offset(BytesIO(data))) == kept.sha256
        ds = pydicom.dcmread(root / instance["path"], stop_before_pixels=True)
        assert (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID) == (
            kept.sop_instance_uid, kept.series_instance_uid, kept.study_instance_uid)
    return Checked(root, document, order)


def export_rows(db: str) -> list[Any]:
    found = rows(db, "SELECT * FROM audit_events WHERE action = 'export' ORDER BY id")
    return [(r, json.loads(r.detail)) for r in found]


# -- on demand: gateway export ----------------------------------------------------------------------

def test_a_study_exports_to_a_zip_that_verifies_and_is_audited(site: Site) -> None:
    study = site.studies["ct"]
    done = site.cli("export", "study", study, "--out", str(site.out), "--by", "dr.house", *OFF)
    assert done.returncode == 0, done.stderr
    archive = site.out / f"study_{study}_export.zip"
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert f"{archive}  sha256 {digest}" in done.stdout
    checked = check_archive(archive, site.db, site.spool, "study_data.json")
    kept = site.instances(study)
    assert sorted(checked.names) == sorted(
        [f"dicom/{n}.dcm" for n in range(1, 5)] + ["study_data.json", "manifest.sha256"])
    document = checked.document
    assert document["patient"]["patientID"] == PATIENT
    assert document["patient"]["patientName"] == NAME
    assert document["patient"]["studyCount"] == 1
    (listed,) = document["studies"]
    assert (listed["studyInstanceUID"], listed["numberOfSeries"], listed["numberOfInstances"],
            listed["modality"]) == (study, 2, 4, "CT")
    assert sorted(i["sopInstanceUID"] for i in document["instances"]) == sorted(
        r.sop_instance_uid for r in kept)
    assert sorted(i["numberOfFrames"] for i in document["instances"]) == [1, 1, 1, 3]
    assert document["metadata"]["exportedBy"] == "dr.house"
    assert document["metadata"]["includesImages"] is True
    # series 1 first, then by instance number: dicom/1.dcm and 2.dcm are series 1
    first = pydicom.dcmread(checked.root / "dicom/1.dcm", stop_before_pixels=True)
    assert (first.SeriesNumber, first.InstanceNumber) == (1, 1)
    compressed = [i for i in document["instances"]
                  if pydicom.dcmread(checked.root / i["path"]).file_meta.TransferSyntaxUID
                  == RLELossless]
    assert len(compressed) == 1  # kept compressed, as received
    (row, detail), = export_rows(site.db)
    assert (row.actor, row.study_instance_uid, detail["outcome"], detail["sha256"],
            detail["instances"], detail["bytes"]) == (
        "dr.house", study, "success", digest, 4, archive.stat().st_size)
    assert detail["options"]["include_images"] is True
    assert not any(p.name.startswith(".export-") for p in site.out.iterdir())


def test_a_patient_exports_every_study_under_studies_uid(site: Site) -> None:
    done = site.cli("export", "patient", PATIENT, "--out", str(site.out), *OFF)
    assert done.returncode == 0, done.stderr
    archive = site.out / f"patient_{PATIENT}_export.zip"
    checked = check_archive(archive, site.db, site.spool, "patient_data.json")
    ct, mr = site.studies["ct"], site.studies["mr"]
    assert sorted(checked.names) == sorted(
        [f"studies/{ct}/dicom/{n}.dcm" for n in range(1, 5)]
        + [f"studies/{mr}/dicom/{n}.dcm" for n in range(1, 3)]
        + [f"studies/{ct}/study_data.json", f"studies/{mr}/study_data.json",
           "patient_data.json", "manifest.sha256"])
    document = checked.document
    assert document["patient"]["studyCount"] == 2
    assert [s["studyInstanceUID"] for s in document["studies"]] == [ct, mr]  # by date
    assert [s["path"] for s in document["studies"]] == [f"studies/{ct}/", f"studies/{mr}/"]
    assert {s["modality"] for s in document["studies"]} == {"CT", "MR"}
    per_study = json.loads((checked.root / f"studies/{mr}/study_data.json").read_text("utf-8"))
    assert [i["path"] for i in per_study["instances"]] == [
        f"studies/{mr}/dicom/1.dcm", f"studies/{mr}/dicom/2.dcm"]
    assert site.studies["other"] not in json.dumps(document)


def test_metadata_only_json_and_folder_formats(site: Site) -> None:
    study = site.studies["ct"]
    only = site.cli("export", "study", study, "--out", str(site.out / "a"), "--metadata-only",
                    *OFF)
    assert only.returncode == 0, only.stderr
    checked = check_archive(site.out / "a" / f"study_{study}_export.zip", site.db, site.spool,
                            "study_data.json")
    assert sorted(checked.names) == ["manifest.sha256", "study_data.json"]
    assert checked.document["metadata"]["includesImages"] is False
    assert all(i["path"] is None and i["sha256"] is None for i in checked.document["instances"])
    assert sorted(i["numberOfFrames"] for i in checked.document["instances"]) == [1, 1, 1, 3]

    as_json = site.cli("export", "study", study, "--out", str(site.out / "b"), "--format",
                       "json", *OFF)
    assert as_json.returncode == 0, as_json.stderr
    (written,) = (site.out / "b").iterdir()
    assert written.name == f"study_{study}_export.json"
    document = json.loads(written.read_text(encoding="utf-8"))
    metadata.check(document)
    assert document["patient"]["patientName"] == NAME and len(document["instances"]) == 4

    folder = site.cli("export", "patient", PATIENT, "--out", str(site.out / "c"), "--format",
                      "folder", *OFF)
    assert folder.returncode == 0, folder.stderr
    (written,) = (site.out / "c").iterdir()
    assert written.name == f"patient_{PATIENT}_export" and written.is_dir()
    checked = check_archive(written, site.db, site.spool, "patient_data.json")
    assert len([n for n in checked.names if n.endswith(".dcm")]) == 6
    audited = [d["options"]["format"] for _, d in export_rows(site.db)]
    assert audited == ["zip", "json", "folder"]


def test_accession_and_all_and_nothing_found(site: Site) -> None:
    by_accession = site.cli("export", "accession", "ACC-MR", "--out", str(site.out), *OFF)
    assert by_accession.returncode == 0, by_accession.stderr
    assert (site.out / f"study_{site.studies['mr']}_export.zip").is_file()
    everything = site.cli("export", "all", "--out", str(site.out / "all"), *OFF)
    assert everything.returncode == 0, everything.stderr
    assert sorted(p.name for p in (site.out / "all").iterdir()) == [
        "patient_MRN0042_export.zip", "patient_PAT-2_export.zip"]
    for archive in (site.out / "all").glob("*.zip"):
        check_archive(archive, site.db, site.spool, "patient_data.json")
    nothing = site.cli("export", "patient", "NOBODY", "--out", str(site.out), *OFF)
    assert nothing.returncode == 1 and "nothing to export" in nothing.stderr
    bad = site.cli("export", "study", "1.2.x", "--out", str(site.out), *OFF)
    assert bad.returncode == 2 and "not a Study Instance UID" in bad.stderr


def remove_from_spool(site: Site, instance: Any) -> None:
    """What retention does: the file goes, the row says when."""
    (site.spool / instance.spool_path).unlink()
    engine = sa.create_engine(site.db)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE instances SET spool_removed_at = :now WHERE id = :id"),
                  {"now": datetime.now(UTC), "id": instance.id})
    engine.dispose()


def test_a_missing_instance_fails_the_export_naming_it_unless_partial(site: Site) -> None:
    study = site.studies["ct"]
    lost, held = site.instances(study)[:2]
    remove_from_spool(site, lost)
    engine = sa.create_engine(site.db)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE instances SET remap_state = 'held' WHERE id = :id"),
                  {"id": held.id})
    engine.dispose()
    failed = site.cli("export", "study", study, "--out", str(site.out), *OFF)
    assert failed.returncode == 1
    assert lost.sop_instance_uid in failed.stdout and held.sop_instance_uid in failed.stdout
    assert "no Orthanc destination" in failed.stdout and "held for an operator" in failed.stdout
    assert "--allow-partial" in failed.stdout
    assert not site.out.exists() or not any(site.out.iterdir())  # nothing half made
    (_, detail), = export_rows(site.db)
    assert detail["outcome"] == "failed" and lost.sop_instance_uid in detail["error"]

    partial = site.cli("export", "study", study, "--out", str(site.out), "--allow-partial", *OFF)
    assert partial.returncode == 0, partial.stderr
    assert "2 missing" in partial.stdout
    checked = check_archive(site.out / f"study_{study}_export.zip", site.db, site.spool,
                            "study_data.json")
    missing = {m["sopInstanceUID"]: m["reason"] for m in checked.document["missing"]}
    assert set(missing) == {lost.sop_instance_uid, held.sop_instance_uid}
    assert "retention removed it" in missing[lost.sop_instance_uid]
    assert checked.document["metadata"]["complete"] is False
    assert len(checked.document["instances"]) == 2
    manifest = (checked.root / "manifest.sha256").read_text(encoding="utf-8")
    assert f"# missing {lost.sop_instance_uid}" in manifest
    assert f"# missing {held.sop_instance_uid}" in manifest
    assert export_rows(site.db)[-1][1]["missing"] == sorted(
        [lost.sop_instance_uid, held.sop_instance_uid],
        key=[r.sop_instance_uid for r in site.instances(study)].index)


# -- names: hostile Patient IDs ------------------------------------------------------------------------

HOSTILE = ["../../etc", "/etc/passwd", "a/b\\c", "..", ".", "", "x\x00y", "\x1b[2J\x07bell",
           "Ω" * 200, "CON", "a" * 200, "MRN0042 ", "mrn0042"]


@given(st.text(max_size=200))
@settings(max_examples=500, deadline=None)
def test_a_patient_archive_name_is_one_safe_component_for_any_id(patient_id: str) -> None:
    stem = names.patient_stem(patient_id)
    assert "/" not in stem and "\\" not in stem and stem not in (".", "..")
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in stem)
    assert len(stem) <= len("patient__export") + names.SAFE_ID_LENGTH + 14
    assert (Path("/exports") / names.archive_name(stem, "zip")).parent == Path("/exports")


@given(st.lists(st.text(max_size=80), min_size=2, max_size=6, unique=True))
@settings(max_examples=300, deadline=None)
def test_different_patient_ids_never_share_an_archive_name(ids: list[str]) -> None:
    stems = [names.patient_stem(i) for i in ids]
    assert len(set(stems)) == len(stems)
    assert len({s.casefold() for s in stems}) == len(stems)  # nor on a case-blind disk


def insert_instance(sessions: Any, spool: Path, patient_id: str, source: Path) -> str:
    """A ledger row for a copy of ``source`` under ``patient_id`` (as remapped to it)."""
    from gateway.db.models import Instance

    ds = pydicom.dcmread(source, stop_before_pixels=True)
    study = generate_uid()
    relative = Path(study) / f"{ds.SOPInstanceUID}.dcm"
    (spool / relative).parent.mkdir(parents=True)
    shutil.copyfile(source, spool / relative)
    with sessions() as session:
        session.add(Instance(
            sop_instance_uid=generate_uid(), sop_class_uid=ds.SOPClassUID,
            study_instance_uid=study, series_instance_uid=generate_uid(), patient_id=patient_id,
            calling_ae="MODALITY", peer_address="127.0.0.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
            size_bytes=source.stat().st_size, sha256="0" * 64, spool_path=str(relative),
            received_at=datetime.now(UTC)))
        session.commit()
    return study


@pytest.mark.parametrize("patient_id", HOSTILE)
def test_hostile_patient_ids_never_leave_the_export_folder(
    tmp_path: Path, sqlite_url: str, patient_id: str,
) -> None:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    sessions = make_sessions(engine)
    spool = tmp_path / "spool"
    source = write_file(make_dataset(), tmp_path / "one.dcm")
    insert_instance(sessions, spool, patient_id, source)
    insert_instance(sessions, spool, "SAFE", source)
    out = tmp_path / "exports" / "inner"
    exporter = Exporter(sessions, Sources(spool, lambda: Loader(spool, {})),
                        LineReporter(lambda _: None))
    report = exporter.run(ExportRequest("k", "test", "all", ExportSelector(), "patient", PLAIN,
                                        out))
    engine.dispose()
    assert [a.outcome for a in report.archives] == ["success", "success"]
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 2 and "patient_SAFE_export.zip" in written
    assert all(p.parent == out for p in out.iterdir())
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["inner"]
    for archive in out.iterdir():
        with zipfile.ZipFile(archive) as opened:
            assert all(names.is_inside(n) for n in opened.namelist())
            document = json.loads(opened.read("patient_data.json"))
        assert document["patient"]["patientID"] in (patient_id, "SAFE")  # the value, intact


# -- Orthanc: a recipient of the ZIP, and where retention left the files -----------------------------

def test_the_study_zip_uploads_to_orthanc_whole(site: Site, orthanc_factory: Any) -> None:
    study = site.studies["ct"]
    done = site.cli("export", "study", study, "--out", str(site.out), *OFF)
    assert done.returncode == 0, done.stderr
    archive = site.out / f"study_{study}_export.zip"
    check_archive(archive, site.db, site.spool, "study_data.json")
    orthanc = orthanc_factory()
    status, body = orthanc.request("POST", "/instances", archive.read_bytes(),
                                   {"Content-Type": "application/zip"})
    assert status == 200, body
    kept = {r.sop_instance_uid: r for r in site.instances(study)}
    assert orthanc.sop_instance_uids() == set(kept)
    assert orthanc.study_instance_uids() == {study}
    for found in orthanc.post_json("/tools/find", {"Level": "Instance", "Query": {},
                                                   "Expand": True}):
        row = kept[found["MainDicomTags"]["SOPInstanceUID"]]
        status, data = orthanc.request("GET", f"/instances/{found['ID']}/file")
        assert status == 200 and data == (site.spool / row.spool_path).read_bytes()
    # the same study with every entry in ZIP64 form: Orthanc reads each one again
    zip64 = forced_zip64(site, study)
    status, body = orthanc.request("POST", "/instances", zip64.read_bytes(),
                                   {"Content-Type": "application/zip"})
    assert status == 200, body
    answers = json.loads(body)
    assert len(answers) == 4 and {a["Status"] for a in answers} == {"AlreadyStored"}


def forced_zip64(site: Site, study: str) -> Path:
    """The study's archive with ZIP64 headers on every entry and a ZIP64 end record (what an
    archive over 4 GiB has), checked whole."""
    exporter, engine = exporter_for(site.db, site.spool)
    out = site.out / "zip64"
    exporter.run(ExportRequest("zip64", "test", "study", ExportSelector(studies=(study,)),
                               "study", PLAIN, out, force_zip64=True))
    engine.dispose()
    archive = out / f"study_{study}_export.zip"
    data = archive.read_bytes()
    assert b"PK\x06\x06" in data and b"PK\x06\x07" in data  # ZIP64 end record and locator
    with zipfile.ZipFile(archive) as opened:
        for info in opened.infolist():  # every local header says "see the ZIP64 extra field"
            local = data[info.header_offset:info.header_offset + 30]
            assert local[18:26] == b"\xff" * 8, info.filename
    check_archive(archive, site.db, site.spool, "study_data.json")
    return archive


def test_instances_retention_removed_are_fetched_back_from_orthanc(
    make_gateway: Callable[..., Gateway], tmp_path: Path, db_url: str, orthanc_factory: Any,
) -> None:
    from tests.test_forward import FAST, orthanc_destination

    orthanc = orthanc_factory()
    site = make_site(make_gateway, tmp_path, db_url,
                     forward={**FAST, "destinations": [orthanc_destination(orthanc, tmp_path)]},
                     retention={"keep_days": 0, "check_interval_s": 0.2})
    wait_for(lambda: not rows(db_url, "SELECT id FROM instances WHERE spool_removed_at IS NULL"),
             60, "every file confirmed in Orthanc and removed from the spool")
    study = site.studies["ct"]
    assert not [p for r in site.instances(study) for p in site.spool.rglob(f"{r.sop_instance_uid}*")]
    done = site.cli("export", "study", study, "--out", str(site.out), *OFF)
    assert done.returncode == 0, done.stderr
    checked = check_archive(site.out / f"study_{study}_export.zip", site.db, site.spool,
                            "study_data.json")
    remote = {r.sop_instance_uid: r.remote_id for r in rows(
        db_url, "SELECT i.sop_instance_uid, f.remote_id FROM forward_jobs f JOIN instances i "
        "ON i.id = f.instance_id WHERE f.state = 'confirmed'")}
    assert len(checked.document["instances"]) == 4
    for instance in checked.document["instances"]:
        assert instance["orthancInstanceId"] == remote[instance["sopInstanceUID"]]


# -- export jobs on the scheduler -------------------------------------------------------------------

def with_job(site: Site, **job: Any) -> Path:
    """The site's configuration file with one export job added (never firing by itself: the
    tests run it with ``gateway jobs run``, or start a gateway that fires it)."""
    from tests.conftest import toml_value

    job = {"name": "research", "kind": "export", "every_s": 365 * 86400,
           "destination": "exports", "options": {"previews": False, "dicomdir": False}, **job}
    with open(site.config, "a", encoding="utf-8") as fp:
        fp.write("[[jobs]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in job.items()))
    return site.config.parent / str(job["destination"])


def test_an_export_job_selects_exports_expires_and_keeps_its_history(site: Site) -> None:
    exports = with_job(site, select={"study_date": "20261101-20261115",
                                     "modalities": ["CT", "MR"], "calling_aes": ["MODALITY"]},
                       keep_days=30)
    exports.mkdir()
    stale, unrelated = exports / "study_1.2.3_export.zip", exports / "notes.txt"
    for path in (stale, unrelated):
        path.write_text("old")
        old = time.time() - 40 * 86400
        os.utime(path, (old, old))
    ran = site.cli("jobs", "run", "research")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "job research: success" in ran.stdout
    assert "archives 2" in ran.stdout and "expired 1" in ran.stdout
    assert "instances" in ran.stdout and "MB/s" in ran.stdout  # its progress, as plain lines
    ct, mr = site.studies["ct"], site.studies["mr"]
    assert sorted(p.name for p in exports.iterdir()) == sorted(
        ["notes.txt", f"study_{ct}_export.zip", f"study_{mr}_export.zip"])
    for study in (ct, mr):
        check_archive(exports / f"study_{study}_export.zip", site.db, site.spool,
                      "study_data.json")
    audited = export_rows(site.db)
    assert {(r.actor, d["job"], d["outcome"]) for r, d in audited} == {
        ("job:research", "research", "success")}
    history = site.cli("jobs", "history", "research")
    assert history.returncode == 0 and "success" in history.stdout
    assert "archives 2" in history.stdout
    listed = site.cli("jobs")
    assert "research" in listed.stdout and "export" in listed.stdout
    assert NAME not in ran.stdout + history.stdout + listed.stdout


def test_new_since_last_run_exports_only_what_arrived_since(site: Site, tmp_path: Path) -> None:
    exports = with_job(site, select={"new_since_last_run": True})
    engine = sa.create_engine(site.db)
    with engine.begin() as c:  # received an hour ago: well before any run
        c.execute(sa.text("UPDATE instances SET received_at = :at"),
                  {"at": datetime.now(UTC) - timedelta(hours=1)})
    engine.dispose()
    first = site.cli("jobs", "run", "research")
    assert first.returncode == 0 and "archives 3" in first.stdout, first.stdout + first.stderr
    second = site.cli("jobs", "run", "research")
    assert second.returncode == 0, second.stderr
    assert "archives 0" in second.stdout
    later = simple_study(tmp_path / "send" / "later", 2, PatientID="PAT-3")
    send(site.app.config.dicom.port, later)
    wait_for(lambda: len(rows(site.db, "SELECT id FROM instances")) == 10, 30, "2 more kept")
    third = site.cli("jobs", "run", "research")
    assert third.returncode == 0 and "archives 1" in third.stdout, third.stdout
    assert (exports / f"study_{study_of(later)}_export.zip").is_file()
    assert len(export_rows(site.db)) == 4


def test_a_scheduled_export_runs_in_the_gateway_and_counts_in_metrics(
    site: Site, make_gateway: Callable[..., Gateway], tmp_path: Path,
) -> None:
    exports = tmp_path / "scheduled"
    app = make_gateway(db=site.db, jobs=[{
        "name": "nightly", "kind": "export", "every_s": 1, "destination": str(exports),
        "per": "patient", "select": {"patients": [PATIENT]},
        "options": {"previews": False, "dicomdir": False}}])
    wait_for(lambda: rows(site.db, "SELECT id FROM job_runs WHERE job = 'nightly' "
                          "AND outcome = 'success'"), 60, "a scheduled run to succeed")
    archive = exports / f"patient_{PATIENT}_export.zip"
    check_archive(archive, site.db, site.spool, "patient_data.json")
    registry = app.metrics.registry
    assert (registry.get_sample_value("gateway_exports_total", {"outcome": "success"}) or 0) >= 1
    assert (registry.get_sample_value("gateway_export_bytes_total") or 0) >= archive.stat().st_size
    assert (registry.get_sample_value("gateway_export_seconds_count") or 0) >= 1
    assert registry.get_sample_value("gateway_export_previews_total") == 0


# -- interrupted exports continue, to the same bytes --------------------------------------------------

def exporter_for(db: str, spool: Path, checkpoint_bytes: int = 1,
                 lines: list[str] | None = None) -> tuple[Exporter, Any]:
    engine = make_engine(db)
    exporter = Exporter(make_sessions(engine), Sources(spool, lambda: Loader(spool, {})),
                        LineReporter((lines if lines is not None else []).append),
                        checkpoint_bytes=checkpoint_bytes)
    return exporter, engine


def everything(destination: Path, **options: Any) -> ExportRequest:
    return ExportRequest("crash", "test", "all", ExportSelector(), "patient",
                         PLAIN.model_copy(update=options), destination)


CRASH_POINTS = {
    # where: (what to patch, after how many calls the process is killed)
    "mid-entry": ("gateway.export.zipstream.ZipWriter._write", 9),
    "after-checkpoint": ("gateway.export.plan.ArchiveLog.checkpoint", 3),
    "torn-checkpoint": ("gateway.export.plan.ArchiveLog._append", 2),
    "central-directory": ("gateway.export.zipstream.ZipWriter._central_header", 3),
    "before-rename": ("gateway.export.run.place", 0),
    "before-audit": ("gateway.export.run.Exporter._record", 0),
    "second-archive": ("gateway.export.plan.ArchiveLog.checkpoint", 7),
}


def crash_child(db: str, spool: str, destination: str, point: str, options: str) -> None:
    """Run in a subprocess: export everything and SIGKILL this process at ``point``."""
    import importlib

    target, after = CRASH_POINTS[point]
    module_name, *attributes = target.split(".")
    while not hasattr(importlib.import_module(module_name), attributes[0]):
        module_name += "." + attributes.pop(0)
    owner: Any = importlib.import_module(module_name)
    for attribute in attributes[:-1]:
        owner = getattr(owner, attribute)
    original = getattr(owner, attributes[-1])
    calls = [0]

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] > after:
            if point == "torn-checkpoint":  # half a record reaches the disk, then the end
                with open(args[0].path, "ab") as fp:
                    fp.write(b'{"done": 99, "entr')
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, attributes[-1], dying)
    exporter, _ = exporter_for(db, Path(spool))
    exporter.run(everything(Path(destination), **json.loads(options)))
    raise AssertionError("the export ended without being killed")


@pytest.mark.parametrize(("form", "point"), [("zip", p) for p in CRASH_POINTS] + [
    ("folder", p) for p in CRASH_POINTS if p not in ("mid-entry", "central-directory")])
def test_a_killed_export_continues_to_the_same_bytes(
    site: Site, tmp_path: Path, point: str, form: str,
) -> None:
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    options = {"format": form}
    child = subprocess.run(
        [sys.executable, "-c", "import sys, tests.test_export as t; t.crash_child(*sys.argv[1:])",
         site.db, str(site.spool), str(killed), point, json.dumps(options)],
        capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr
    work = work_folder(killed, "crash")
    plan = read_plan(work)
    assert plan is not None
    cut = 1 if point == "second-archive" else 0  # the archive being written when killed
    if point != "before-audit":  # killed after the rename: the archive is whole and in place
        assert not (killed / plan.archives[cut].name).exists(), "a half archive is visible"
    assert all((killed / a.name).exists() for a in plan.archives[:cut])
    # the same plan, built without interruption
    work_folder(reference, "crash").mkdir(parents=True)
    shutil.copy(work / "plan.json", work_folder(reference, "crash") / "plan.json")
    lines: dict[Path, list[str]] = {killed: [], reference: []}
    for destination in (killed, reference):
        exporter, engine = exporter_for(site.db, site.spool, lines=lines[destination])
        report = exporter.run(everything(destination, **options))
        engine.dispose()
        assert report.resumed == 1 and not report.failed
        assert [a.archive.name for a in report.archives] == [a.name for a in plan.archives]
    if point not in ("before-rename", "before-audit"):  # continued, not started over
        assert any(line.startswith("resumed: ") for line in lines[killed]), lines[killed]
    assert not any(line.startswith("resumed: ") for line in lines[reference])
    assert not work.exists()
    for archive in plan.archives:
        mine, theirs = killed / archive.name, reference / archive.name
        checked = check_archive(mine, site.db, site.spool, "patient_data.json")
        if form == "zip":
            assert mine.read_bytes() == theirs.read_bytes()
        else:
            for name in checked.names:
                assert (mine / name).read_bytes() == (theirs / name).read_bytes(), name
    audited = [d for _, d in export_rows(site.db) if d["archive"].startswith(str(killed))]
    assert sorted(d["archive"] for d in audited) == sorted(
        str(killed / a.name) for a in plan.archives), "one audit row per archive"
    digests = {d["archive"]: d["sha256"] for d in audited}
    if form == "zip":
        for archive in plan.archives:
            path = killed / archive.name
            assert digests[str(path)] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_sigkill_during_a_scheduled_export_then_the_next_run_resumes_it(
    site: Site, served: Callable[..., Any], tmp_path: Path,
) -> None:
    big = [write_file(make_dataset(rows=724, columns=724, StudyInstanceUID=study_uid,
                                   SeriesInstanceUID=series_uid, InstanceNumber=i + 1,
                                   PatientID="PAT-BIG"), tmp_path / "send" / "big" / f"{i}.dcm")
           for study_uid, series_uid in [(generate_uid(), generate_uid())] for i in range(60)]
    send(site.app.config.dicom.port, big)
    wait_for(lambda: len(rows(site.db, "SELECT id FROM instances")) == 68, 60, "60 more kept")
    study = study_of(big)
    exports = tmp_path / "exports"
    job = {"name": "research", "kind": "export", "every_s": 1, "destination": str(exports),
           "select": {"studies": [study]}, "checkpoint_mb": 1,
           "options": {"previews": False, "dicomdir": False}}
    gateway = served(db=site.db, jobs=[job])
    log = work_folder(exports, "job-research") / "archive-1.log"

    def counted() -> int:
        found = rows(site.db, "SELECT counts FROM job_runs WHERE job = 'research' "
                     "AND outcome = 'running'")
        return int(json.loads(found[0].counts).get("instances_done", 0)) if found else 0

    wait_for(lambda: log.is_file() and log.read_bytes().count(b'"done"') >= 3 and counted(), 60,
             "a scheduled run to record three checkpoints and show its progress")
    gateway.stop(signal.SIGKILL)
    plan = read_plan(work_folder(exports, "job-research"))
    assert plan is not None and not (exports / plan.archives[0].name).exists()
    (run,) = rows(site.db, "SELECT * FROM job_runs WHERE job = 'research' "
                  "AND outcome = 'running'")
    assert run.trigger == "schedule"
    assert json.loads(run.counts)["instances_done"] >= 1  # what `gateway jobs` shows meanwhile
    listed = subprocess.run([str(GATEWAY_BIN), "jobs", "--config", str(gateway.config_path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert "running" in listed.stdout and "instances_done" in listed.stdout, listed.stdout
    reference = tmp_path / "reference"
    work_folder(reference, "job-research").mkdir(parents=True)
    shutil.copy(work_folder(exports, "job-research") / "plan.json",
                work_folder(reference, "job-research"))

    restarted = served(db=site.db, jobs=[{**job, "every_s": 365 * 86400}])
    resumed = subprocess.run([str(GATEWAY_BIN), "jobs", "run", "research", "--config",
                              str(restarted.config_path)], capture_output=True, text=True,
                             timeout=120, check=False)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed: " in resumed.stdout and "resumed 1" in resumed.stdout
    archive = exports / plan.archives[0].name
    check_archive(archive, site.db, site.spool, "study_data.json")
    assert not work_folder(exports, "job-research").exists()
    runs = rows(site.db, "SELECT outcome, trigger FROM job_runs WHERE job = 'research' "
                "ORDER BY id")
    assert [(r.outcome, r.trigger) for r in runs][-2:] == [("interrupted", "schedule"),
                                                            ("success", "operator")]
    exporter, engine = exporter_for(site.db, site.spool)
    exporter.run(ExportRequest("job-research", "job:research", "job",
                               ExportSelector(studies=(study,)), "study", PLAIN, reference))
    engine.dispose()
    assert archive.read_bytes() == (reference / plan.archives[0].name).read_bytes()
    (_, detail), = [(r, d) for r, d in export_rows(site.db) if d["archive"] == str(archive)]
    assert detail["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()


# -- progress ---------------------------------------------------------------------------------------

def test_progress_is_plain_lines_without_a_terminal(site: Site) -> None:
    study = site.studies["ct"]
    done = site.cli("export", "study", study, "--out", str(site.out), *OFF)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("exporting 1 archive(s): 4 instances, ")
    assert lines[1].startswith(f"archive 1 (study {study}): 4 instances, ")
    assert lines[2].startswith(f"archive 1 (study {study}): written, 4 instance(s), ")
    assert lines[-1].startswith("4/4 instances, ") and " MB/s, ETA " in lines[-1]
    assert "\r" not in done.stderr and "\x1b" not in done.stderr  # no bar, no escapes
    assert done.stdout.count("\n") == 1  # stdout: the archive and its SHA-256, nothing else


def test_progress_is_a_bar_on_a_terminal(site: Site) -> None:
    import pty

    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    process = subprocess.Popen(
        [str(GATEWAY_BIN), "export", "study", site.studies["ct"], "--out", str(site.out),
         "--config", str(site.config), *OFF],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and b"sha256" in stdout
    text = shown.decode("utf-8", errors="replace")
    assert "\r" in text and "%|" in text  # tqdm redraws its bar in place
    assert "4/4 instances" in text and "B/s" in text


def test_line_progress_counts_rate_and_eta() -> None:
    from gateway.export.plan import ArchivePlan

    now = [0.0]
    lines: list[str] = []
    reporter = LineReporter(lines.append, every_s=5.0, clock=lambda: now[0])
    archive = ArchivePlan(1, "study_1.2_export.zip", "study", "1.2", ("1.2",), 10, 10_000_000)
    reporter.begin(1, 10, 10_000_000)
    reporter.archive(archive)
    reporter.advance(4, 4_000_000, skipped=True)  # done before an interruption
    now[0] = 2.0
    reporter.advance(1, 1_000_000)
    assert len(lines) == 3  # begin, archive, resumed: no timed line before 5 s
    now[0] = 6.0
    reporter.advance(1, 1_000_000)
    # 2 MB in 6 s since the start (the 4 MB resumed do not count as speed); 4 MB left
    assert lines[-1] == "6/10 instances, 6.0/10.0 MB, 0.3 MB/s, ETA 0:00:12"
    assert lines[2] == "resumed: 4 instances (4.0 MB) were done already"


# -- the service log ---------------------------------------------------------------------------------

def test_export_jobs_log_no_patient_data_at_debug(
    make_gateway: Callable[..., Gateway], served: Callable[..., Any], tmp_path: Path,
    sqlite_url: str,
) -> None:
    from tests.test_logs_canary import BIRTH_DATE, NAME, PATIENT_ID, _spellings

    app = make_gateway(db=sqlite_url)
    whole = simple_study(tmp_path / "send" / "whole", 2, PatientID=PATIENT_ID, PatientName=NAME,
                         PatientBirthDate=BIRTH_DATE, SpecificCharacterSet="ISO_IR 192")
    broken = simple_study(tmp_path / "send" / "broken", 2, PatientID=PATIENT_ID + "-2",
                          PatientName=NAME, SpecificCharacterSet="ISO_IR 192")
    send(app.config.dicom.port, whole + broken)
    wait_for(lambda: len(rows(sqlite_url, "SELECT id FROM instances")) == 4, 30, "4 kept")
    site = Site(app, tmp_path, sqlite_url, app.config.storage.spool_dir, {}, tmp_path / "out")
    remove_from_spool(site, site.instances(study_of(broken))[0])
    exports = tmp_path / "exports"
    gateway = served(db=sqlite_url, logging={"level": "DEBUG"}, jobs=[{
        "name": "canary", "kind": "export", "every_s": 1, "destination": str(exports),
        "per": "patient", "select": {"patients": [PATIENT_ID, PATIENT_ID + "-2"]},
        "options": {"previews": False, "dicomdir": False}}])
    wait_for(lambda: rows(sqlite_url, "SELECT id FROM job_runs WHERE outcome = 'failed'"), 60,
             "a run that wrote one archive and failed the other")
    gateway.stop()
    assert [p.name for p in exports.iterdir() if not p.name.startswith(".")] == [
        f"patient_{PATIENT_ID}_export.zip"]  # the job did run: its archive is there
    log = gateway.log_path.read_bytes()
    assert b"job canary" in log and b"cannot be exported" in log
    for value in (NAME, PATIENT_ID, BIRTH_DATE):
        for spelling in _spellings(value):
            assert spelling not in log, (value, spelling)


# -- Number of Frames without pydicom ----------------------------------------------------------------

def part10_bytes(ds: pydicom.Dataset, syntax: str) -> bytes:
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def pydicom_frames(data: bytes) -> int:
    from gateway.export.build import number_of_frames

    return number_of_frames(pydicom.dcmread(BytesIO(data), stop_before_pixels=True))


@st.composite
def headers(draw: st.DrawFn) -> tuple[pydicom.Dataset, str]:
    """Data sets with what stands before group 0028 in real objects: text, private blocks,
    nested sequences of defined and undefined length; Number of Frames and Rows or not."""
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = make_dataset()
    for keyword in ("Rows", "Columns", "PixelData", "SamplesPerPixel", "PhotometricInterpretation",
                    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, keyword)

    def items(depth: int) -> Sequence:
        found = []
        for _ in range(draw(st.integers(0, 3))):
            item = pydicom.Dataset()
            item.CodeValue = draw(st.text("ABC123", min_size=1, max_size=8))
            if depth < 3 and draw(st.booleans()):
                item.ConceptCodeSequence = items(depth + 1)
            found.append(item)
        sequence = Sequence(found)
        sequence.is_undefined_length = draw(st.booleans())
        for item in sequence:
            item.is_undefined_length_sequence_item = draw(st.booleans())
        return sequence

    if draw(st.booleans()):
        ds.ReferencedImageSequence = items(0)
    if draw(st.booleans()):
        ds.AnatomicRegionSequence = items(0)
    for block in range(draw(st.integers(0, 3))):
        group = 0x0009 + 2 * block
        ds.private_block(group, f"ACME {block}", create=True).add_new(
            0x01, "OB", draw(st.binary(max_size=300)))
    frames = draw(st.one_of(st.none(), st.integers(0, 5000)))
    if frames is not None:
        ds.NumberOfFrames = draw(st.sampled_from([str(frames), f" {frames}", f"{frames} "]))
    if draw(st.booleans()):
        ds.Rows, ds.Columns = 4, 4
    syntax = draw(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                   ExplicitVRBigEndian]))
    return ds, syntax


@given(headers(), st.integers(0, 4000))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_frames_from_the_first_bytes_agree_with_pydicom(
    header: tuple[pydicom.Dataset, str], cut: int,
) -> None:
    from gateway.export.frames import number_of_frames as frames_in_head

    ds, syntax = header
    data = part10_bytes(ds, syntax)
    assert frames_in_head(data, complete=True) == pydicom_frames(data)  # all there: it knows
    found = frames_in_head(data[:cut])
    assert found is None or found == pydicom_frames(data)  # cut short: right, or unsure


@pytest.mark.parametrize("syntax", ["explicit", "implicit", "big-endian", "jpeg", "deflated"])
def test_frames_of_rich_objects_agree_with_pydicom(syntax: str) -> None:
    from gateway.export.frames import number_of_frames as frames_in_head
    from tests.objects import encoded, part10

    ds, data = encoded(syntax)
    whole = part10(ds, data, syntax)
    found = frames_in_head(whole, complete=True)
    if syntax == "deflated":
        assert found is None  # left to pydicom
    else:
        assert found == pydicom_frames(whole)


# -- configuration --------------------------------------------------------------------------------

def test_the_example_export_job_is_valid_and_means_what_it_says(tmp_path: Path) -> None:
    from gateway.config import ExportJob, load

    example = (Path(__file__).parent.parent / "config" / "gateway.example.toml").read_text()
    block = example[example.index('# name = "research-ct"'):].split("\n\n")[0]
    text = "[[jobs]]\n" + "\n".join(line.removeprefix("# ") for line in block.splitlines())
    (job,) = load(write_text(tmp_path / "g.toml", text), environ={}).jobs
    assert isinstance(job, ExportJob)
    assert (job.cron, job.per, job.keep_days, job.destination) == (
        "0 2 * * *", "study", 30, Path("/exports/research"))
    assert job.select == ExportSelector(study_date="yesterday", modalities=("CT",),
                                        calling_aes=("CT_SITE_A",))
    assert job.options.deidentify and not job.options.previews and job.options.format == "zip"


@pytest.mark.parametrize(("values", "problem"), [
    ({"select": {"study_date": "2026-11-01"}}, "yesterday"),
    ({"select": {"studies": ["1.2.x"]}}, "not a Study Instance UID"),
    ({"options": {"format": "tar"}}, "format"),
    ({"per": "series"}, "per"),
    ({"keep_days": 0}, "keep_days"),
    ({"select": {"modality": ["CT"]}}, "did you mean modalities"),
])
def test_a_wrong_export_job_is_refused_naming_the_key(
    tmp_path: Path, values: dict[str, Any], problem: str,
) -> None:
    from gateway.config import load
    from gateway.errors import ConfigError
    from tests.conftest import toml_value

    job = {"name": "x", "kind": "export", "every_s": 60, "destination": "out", **values}
    text = "[[jobs]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in job.items())
    with pytest.raises(ConfigError) as refused:
        load(write_text(tmp_path / "g.toml", text), environ={})
    assert problem in str(refused.value)


def test_a_relative_destination_is_relative_to_the_config_file(tmp_path: Path) -> None:
    from gateway.config import load

    text = ('[[jobs]]\nname = "x"\nkind = "export"\nevery_s = 60\ndestination = "exports"\n')
    (job,) = load(write_text(tmp_path / "etc" / "g.toml", text), environ={}).jobs
    assert job.destination == tmp_path / "etc" / "exports"  # type: ignore[union-attr]


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- with the preview, DICOMDIR and de-identification modules (skipped until they are merged) -------

def test_previews_are_pngs_of_every_frame_within_the_size(site: Site) -> None:
    from PIL import Image

    study = site.studies["ct"]
    done = site.cli("export", "study", study, "--out", str(site.out), "--no-dicomdir",
                    "--preview-max-size", "16")
    assert done.returncode == 0, done.stderr
    checked = check_archive(site.out / f"study_{study}_export.zip", site.db, site.spool,
                            "study_data.json")
    assert checked.document["metadata"]["includesPreviews"] is True
    for instance in checked.document["instances"]:
        number = instance["path"].removeprefix("dicom/").removesuffix(".dcm")
        assert instance["previews"] == [f"previews/{number}_frame_{k}.png"
                                        for k in range(1, instance["numberOfFrames"] + 1)]
        for preview in instance["previews"]:
            with Image.open(checked.root / preview) as image:
                assert image.format == "PNG" and max(image.size) <= 16
    (_, detail), = export_rows(site.db)
    assert detail["previews"] == 6  # 3 single-frame instances and one of 3 frames


def test_a_patient_archive_with_a_dicomdir_opens_in_pydicom_and_dcmtk(site: Site) -> None:
    from pydicom.fileset import FileSet

    done = site.cli("export", "patient", PATIENT, "--out", str(site.out), "--no-previews")
    assert done.returncode == 0, done.stderr
    checked = check_archive(site.out / f"patient_{PATIENT}_export.zip", site.db, site.spool,
                            "patient_data.json")
    with warnings.catch_warnings():  # FileSet leaves its staging folder to the collector
        warnings.simplefilter("ignore", ResourceWarning)
        fileset = FileSet(checked.root / "DICOMDIR")
        # FileSet.FileID names where pydicom would move a file whose IDs are not its own
        # PT/ST/SE/IM scheme; where the file is now is its path
        listed = {str(i.SOPInstanceUID): Path(i.path).relative_to(checked.root).as_posix()
                  for i in fileset}
        del fileset
        gc.collect()
    records = [r for r in pydicom.dcmread(checked.root / "DICOMDIR").DirectoryRecordSequence
               if "ReferencedFileID" in r]
    referenced = {str(r.ReferencedSOPInstanceUIDInFile): "/".join(r.ReferencedFileID)
                  for r in records}
    expected = {i["sopInstanceUID"]: i["path"] for i in checked.document["instances"]}
    assert listed == expected and referenced == expected
    assert all((checked.root / path).is_file() for path in listed.values())
    dumped = dcmtk("dcmdump", "-q", str(checked.root / "DICOMDIR"))
    assert dumped.returncode == 0, dumped.stderr


def test_a_key_image_export_has_the_middle_image_and_its_metadata(site: Site) -> None:
    from PIL import Image

    study = site.studies["ct"]
    done = site.cli("export", "study", study, "--out", str(site.out), "--key-image", *OFF)
    assert done.returncode == 0, done.stderr
    checked = check_archive(site.out / f"study_{study}_export.zip", site.db, site.spool,
                            "study_data.json")
    with Image.open(checked.root / "image.jpg") as image:
        assert image.format == "JPEG"
    about = json.loads((checked.root / "metadata.json").read_text(encoding="utf-8"))
    middle = checked.document["instances"][len(checked.document["instances"]) // 2]
    assert about["sopInstanceUID"] == middle["sopInstanceUID"]
    assert about["patientName"] == NAME


def test_a_deidentified_export_holds_none_of_the_identifiers(site: Site) -> None:
    study = site.studies["ct"]
    done = site.cli("export", "study", study, "--out", str(site.out), "--deidentify", *OFF)
    assert done.returncode == 0, done.stderr
    (archive,) = site.out.glob("study_*_export.zip")
    assert study not in archive.name
    checked = check_archive(archive, site.db, site.spool, "study_data.json", received=False)
    assert checked.document["metadata"]["deidentified"] is True
    assert len({i["studyInstanceUID"] for i in checked.document["instances"]}) == 1
    kept = site.instances(study)
    secrets_ = {study, PATIENT, "ACC-CT", *(r.sop_instance_uid for r in kept),
                *(r.series_instance_uid for r in kept)}
    for path in checked.root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in secrets_:
                assert value.encode() not in data, (path.name, value)
            assert NAME.encode() not in data and "Ğürsoy".encode() not in data
    assert all(i["orthancInstanceId"] is None for i in checked.document["instances"])


def test_a_killed_deidentified_export_continues_to_the_same_bytes(site: Site, tmp_path: Path) -> None:
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    options = {"deidentify": True}
    child = subprocess.run(
        [sys.executable, "-c", "import sys, tests.test_export as t; t.crash_child(*sys.argv[1:])",
         site.db, str(site.spool), str(killed), "after-checkpoint", json.dumps(options)],
        capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr
    plan = read_plan(work_folder(killed, "crash"))
    assert plan is not None and plan.deid_secret
    work_folder(reference, "crash").mkdir(parents=True)
    shutil.copy(work_folder(killed, "crash") / "plan.json", work_folder(reference, "crash"))
    for destination in (killed, reference):
        exporter, engine = exporter_for(site.db, site.spool)
        assert not exporter.run(everything(destination, **options)).failed
        engine.dispose()
    for archive in plan.archives:
        assert (killed / archive.name).read_bytes() == (reference / archive.name).read_bytes()


def test_the_same_export_twice_at_once_is_refused(site: Site) -> None:
    import fcntl

    study = site.studies["ct"]
    args = ("export", "study", study, "--out", str(site.out), *OFF)
    first = site.cli(*args)
    assert first.returncode == 0, first.stderr
    key = export_rows(site.db)[0][1]["export"]
    work = work_folder(site.out, key)
    work.mkdir()
    descriptor = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # as the export running now holds it
        second = site.cli(*args)
    finally:
        os.close(descriptor)
    assert second.returncode == 1 and "running now" in second.stderr
    assert len(export_rows(site.db)) == 1  # refused before anything was done
    third = site.cli(*args)
    assert third.returncode == 0, third.stderr
    assert not work.exists()


def test_a_full_disk_stops_the_export_without_naming_paths_and_the_next_run_continues(
    site: Site, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    from gateway.export.run import ExportStopped
    from gateway.export.sinks import ZipSink

    original = ZipSink.add_file
    calls = [0]

    def filling(self: ZipSink, name: str, *args: Any) -> Any:
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device",
                          str(site.out / f"patient_{PATIENT}_export.zip"))
        return original(self, name, *args)

    monkeypatch.setattr(ZipSink, "add_file", filling)
    request = ExportRequest("full", "test", "patient", ExportSelector(patients=(PATIENT,)),
                            "patient", PLAIN, site.out)
    exporter, engine = exporter_for(site.db, site.spool)
    with pytest.raises(ExportStopped) as stopped:
        exporter.run(request)
    assert "No space left on device" in str(stopped.value)
    assert PATIENT not in str(stopped.value) and str(site.out) not in str(stopped.value)
    assert read_plan(work_folder(site.out, "full")) is not None  # kept, to continue from
    assert not export_rows(site.db)  # nothing written, nothing recorded as written
    monkeypatch.setattr(ZipSink, "add_file", original)
    report = exporter.run(request)
    engine.dispose()
    assert report.resumed == 1 and [a.outcome for a in report.archives] == ["success"]
    check_archive(site.out / f"patient_{PATIENT}_export.zip", site.db, site.spool,
                  "patient_data.json")


def test_a_patient_archive_made_again_holds_every_study_of_the_patient(
    site: Site, tmp_path: Path,
) -> None:
    exports = with_job(site, per="patient", select={"new_since_last_run": True})
    engine = sa.create_engine(site.db)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE instances SET received_at = :at"),
                  {"at": datetime.now(UTC) - timedelta(hours=1)})
    engine.dispose()
    first = site.cli("jobs", "run", "research")
    assert first.returncode == 0 and "archives 2" in first.stdout, first.stdout + first.stderr
    later = simple_study(tmp_path / "send" / "later", 1, PatientID=PATIENT, PatientName=NAME,
                         SpecificCharacterSet="ISO_IR 192", StudyDate="20261201")
    send(site.app.config.dicom.port, later)
    wait_for(lambda: len(rows(site.db, "SELECT id FROM instances")) == 9, 30, "1 more kept")
    second = site.cli("jobs", "run", "research")
    assert second.returncode == 0 and "archives 1" in second.stdout, second.stdout
    checked = check_archive(exports / f"patient_{PATIENT}_export.zip", site.db, site.spool,
                            "patient_data.json")
    assert [s["studyInstanceUID"] for s in checked.document["studies"]] == [
        site.studies["ct"], site.studies["mr"], study_of(later)]  # last week's studies kept
    assert (exports / "patient_PAT-2_export.zip").is_file()  # not made again: nothing new
