"""Query/retrieve with real peers: DCMTK findscu, movescu (to storescp) and getscu, and Orthanc
querying and retrieving through its REST API, as a PACS would."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from gateway.app import Gateway
from tests.conftest import rows, wait_for
from tests.factory import make_dataset, write_file
from tests.orthanc import Orthanc
from tests.peers import dcmtk
from tests.test_forward import FAST, orthanc_destination, start_storescp, storescp_profile

ALL = ["echo", "store", "find", "move", "get"]


def study(folder: Path, count: int, series: int = 1, **overrides: Any) -> list[Path]:
    """One study of ``count`` instances spread over ``series`` series."""
    study_uid = generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    return [
        write_file(make_dataset(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uids[i % series],
                                InstanceNumber=i + 1, SeriesNumber=i % series + 1, **overrides),
                   folder / f"IMG{i:04d}.dcm")
        for i in range(count)
    ]


@pytest.fixture
def archive(make_gateway: Callable[..., Gateway], tmp_path: Path, sqlite_url: str) -> Callable[..., Gateway]:
    """A gateway holding three studies of two patients, and peers allowed what tests need."""

    def start(peers: list[dict[str, Any]] | None = None, db: str | None = None,
              **sections: Any) -> Gateway:
        app = make_gateway(db=db or sqlite_url, security={"unknown_callers": ["echo", "store"], "peers": peers or [
            {"ae_title": "VIEWER", "services": ALL}, {"ae_title": "MODALITY", "services": ["store"]}
        ]}, **sections)
        files = (
            study(tmp_path / "a", 4, series=2, PatientID="PAT-1", PatientName="Smith^Anna",
                  StudyDate="20261101", AccessionNumber="ACC-A", StudyDescription="CT HEAD")
            + study(tmp_path / "b", 3, PatientID="PAT-1", PatientName="Smith^Anna",
                    StudyDate="20261115", AccessionNumber="ACC-B", Modality="MR",
                    SOPClassUID="1.2.840.10008.5.1.4.1.1.4")
            + study(tmp_path / "c", 2, PatientID="PAT-2", PatientName="Jones^Bob",
                    StudyDate="20261120", AccessionNumber="ACC-C")
        )
        result = dcmtk("storescu", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1",
                       str(app.config.dicom.port), *map(str, files))
        assert result.returncode == 0, result.stderr
        return app

    return start


def find(app: Gateway, tmp_path: Path, *keys: str, root: str = "-S", aet: str = "VIEWER",
         extra: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess[str], list[pydicom.Dataset]]:
    """Run findscu, extracting every response identifier to a file; return them parsed."""
    out = tmp_path / f"find-{generate_uid()[-12:]}"
    out.mkdir()
    args = [root, "-v", "-X", *extra, "-aet", aet, "-aec", "GATEWAY", "127.0.0.1",
            str(app.config.dicom.port)]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run([dcmtk_path("findscu"), *args], capture_output=True, text=True,
                            cwd=out, timeout=60, env={"TCP_NODELAY": "1", "PATH": "/usr/bin"}, check=False)
    return result, [pydicom.dcmread(f) for f in sorted(out.glob("rsp*.dcm"))]


def dcmtk_path(tool: str) -> str:
    from tests.peers import require_tool

    return require_tool(tool)


def test_find_each_level_of_both_models_with_counts(archive: Any, tmp_path: Path, db_url: str) -> None:
    app = archive(db=db_url)
    _, studies = find(app, tmp_path, "QueryRetrieveLevel=STUDY", "PatientID=PAT-1",
                      "StudyInstanceUID", "AccessionNumber", "ModalitiesInStudy",
                      "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                      "StudyDescription", "RetrieveAETitle")
    by_accession = {s.AccessionNumber: s for s in studies}
    assert set(by_accession) == {"ACC-A", "ACC-B"}
    a, b = by_accession["ACC-A"], by_accession["ACC-B"]
    assert (a.NumberOfStudyRelatedSeries, a.NumberOfStudyRelatedInstances) == (2, 4)
    assert (b.NumberOfStudyRelatedSeries, b.NumberOfStudyRelatedInstances) == (1, 3)
    assert a.ModalitiesInStudy == "CT" and b.ModalitiesInStudy == "MR"
    assert a.StudyDescription == "CT HEAD" and a.RetrieveAETitle == "GATEWAY"

    _, series = find(app, tmp_path, "QueryRetrieveLevel=SERIES",
                     f"StudyInstanceUID={a.StudyInstanceUID}", "SeriesInstanceUID", "Modality",
                     "SeriesNumber", "NumberOfSeriesRelatedInstances")
    assert sorted((s.SeriesNumber, s.NumberOfSeriesRelatedInstances) for s in series) == [(1, 2), (2, 2)]
    _, images = find(app, tmp_path, "QueryRetrieveLevel=IMAGE",
                     f"StudyInstanceUID={a.StudyInstanceUID}",
                     f"SeriesInstanceUID={series[0].SeriesInstanceUID}", "SOPInstanceUID",
                     "InstanceNumber", "SOPClassUID")
    assert len(images) == 2 and all(i.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" for i in images)

    _, patients = find(app, tmp_path, "QueryRetrieveLevel=PATIENT", "PatientID", "PatientName",
                       "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances",
                       root="-P")
    assert sorted((str(p.PatientID), p.NumberOfPatientRelatedStudies,
                   p.NumberOfPatientRelatedInstances) for p in patients) == [
        ("PAT-1", 2, 7), ("PAT-2", 1, 2)]
    refused, none = find(app, tmp_path, "QueryRetrieveLevel=PATIENT", "PatientID")  # study root
    assert none == [] and "(Error: DataSetDoesNotMatchSOPClass)" in refused.stderr  # 0xA900


@pytest.mark.parametrize(("key", "expected"), [
    ("PatientName=smith*", {"ACC-A", "ACC-B"}),           # wildcard, any case
    ("PatientName=J?NES^BOB", {"ACC-C"}),                  # ? wildcard, any case
    ("PatientName=SMITH^ANNA", {"ACC-A", "ACC-B"}),        # single value, any case
    ("StudyDate=20261110-20261120", {"ACC-B", "ACC-C"}),   # range, both ends included
    ("StudyDate=-20261101", {"ACC-A"}),
    ("StudyDate=20261115-", {"ACC-B", "ACC-C"}),
    ("AccessionNumber=ACC-?", {"ACC-A", "ACC-B", "ACC-C"}),
    ("AccessionNumber=acc-a", set()),                      # not a name: case counts
    ("ModalitiesInStudy=MR", {"ACC-B"}),
    ("PatientID=", {"ACC-A", "ACC-B", "ACC-C"}),           # universal
])
def test_find_matching_types(
    archive: Any, tmp_path: Path, key: str, expected: set[str], db_url: str
) -> None:
    app = archive(db=db_url)  # wildcards are GLOB on SQLite and LIKE on PostgreSQL
    _, found = find(app, tmp_path, "QueryRetrieveLevel=STUDY", "AccessionNumber", key)
    assert {str(f.AccessionNumber) for f in found} == expected


def test_find_uid_list_and_character_set(archive: Any, tmp_path: Path) -> None:
    app = archive()
    db = app.config.database.url
    uids = [r.study_instance_uid for r in rows(db, "SELECT DISTINCT study_instance_uid, "
                                               "accession_number FROM instances "
                                               "WHERE accession_number IN ('ACC-A', 'ACC-C')")]
    _, found = find(app, tmp_path, "QueryRetrieveLevel=STUDY", "AccessionNumber",
                    "StudyInstanceUID=" + "\\".join(uids))
    assert {f.AccessionNumber for f in found} == {"ACC-A", "ACC-C"}
    for f in found:
        assert "SpecificCharacterSet" not in f  # plain ASCII: no character set needed

    files = study(tmp_path / "u", 1, PatientID="PAT-3", PatientName="Müller^Jürgen",
                  SpecificCharacterSet="ISO_IR 100")
    assert dcmtk("storescu", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1",
                 str(app.config.dicom.port), str(files[0])).returncode == 0
    _, (found_one,) = find(app, tmp_path, "QueryRetrieveLevel=STUDY", "PatientID=PAT-3",
                           "PatientName")
    assert found_one.SpecificCharacterSet == "ISO_IR 192"
    assert str(found_one.PatientName) == "Müller^Jürgen"


def test_find_cap_and_refusal_are_audited(archive: Any, tmp_path: Path, db_url: str) -> None:
    app = archive(db=db_url, query={"max_results": 2})
    capped, found = find(app, tmp_path, "QueryRetrieveLevel=STUDY", "AccessionNumber")
    assert len(found) == 2 and "(Refused: OutOfResources)" in capped.stderr  # 0xA700
    refused, found = find(app, tmp_path, "QueryRetrieveLevel=STUDY", "PatientID", aet="MODALITY")
    assert found == [] and "Final Find Response (Unknown Status: 0x124)" in refused.stderr
    audit = wait_for(lambda: len(found := rows(
        app.config.database.url, "SELECT actor, action, detail FROM audit_events "
        "WHERE action = 'find' ORDER BY id")) == 2 and found, 10, "two audit rows")
    assert [(a.actor, json.loads(a.detail)["results"], json.loads(a.detail)["status"])
            for a in audit] == [("VIEWER", 2, "0xA700"), ("MODALITY", 0, "0x0124")]


def test_find_cancel_stops_the_matches(archive: Any, tmp_path: Path, db_url: str) -> None:
    app = archive(db=db_url, query={"max_results": 20000})
    # Many matches, so that the C-CANCEL arrives while answers are still going out: ledger rows
    # (queries never read files), copied from a stored instance with new UIDs.
    import sqlalchemy as sa

    with app.engine.begin() as c:
        (template,) = c.execute(sa.text("SELECT * FROM instances LIMIT 1")).mappings().all()
        copies = [dict(template, id=None, sop_instance_uid=generate_uid(), patient_id="PAT-9")
                  for _ in range(10000)]
        c.execute(sa.text("INSERT INTO instances (" + ", ".join(k for k in template if k != "id")
                          + ") VALUES (" + ", ".join(":" + k for k in template if k != "id") + ")"),
                  copies)
    cancelled, found = find(app, tmp_path, "QueryRetrieveLevel=IMAGE", "PatientID=PAT-9",
                            "SOPInstanceUID", extra=("--cancel", "1"))
    assert 1 <= len(found) < 10000
    assert "Final Find Response (Cancel" in cancelled.stderr  # 0xFE00


def test_move_to_storescp_unknown_destination_and_refusing_destination(
    archive: Any, tmp_path: Path, db_url: str,
) -> None:
    pacs, pacs_port = start_storescp(tmp_path / "pacs")
    profile = storescp_profile(tmp_path / "us-only.cfg", "UltrasoundImageStorage")
    picky, picky_port = start_storescp(tmp_path / "picky", "-xf", str(profile), "Default")
    try:
        app = archive(db=db_url, peers=[
            {"ae_title": "VIEWER", "services": ALL},
            {"ae_title": "MODALITY", "services": ["store"]},
            {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port, "services": ["echo"]},
            {"ae_title": "PICKY", "host": "127.0.0.1", "port": picky_port, "services": ["echo"]},
        ])
        db = app.config.database.url
        (study_a,) = {r.study_instance_uid for r in rows(
            db, "SELECT study_instance_uid FROM instances WHERE accession_number = 'ACC-A'")}

        def move(destination: str) -> subprocess.CompletedProcess[str]:
            return dcmtk("movescu", "-S", "-aet", "VIEWER", "-aec", "GATEWAY", "-aem", destination,
                         "127.0.0.1", str(app.config.dicom.port), "-k", "QueryRetrieveLevel=STUDY",
                         "-k", f"StudyInstanceUID={study_a}")

        moved = move("PACS")
        assert moved.returncode == 0, moved.stderr
        arrived = sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in (tmp_path / "pacs").iterdir())
        assert arrived == sorted(r.sop_instance_uid for r in rows(
            db, "SELECT sop_instance_uid FROM instances WHERE accession_number = 'ACC-A'"))
        unknown = move("NOWHERE")
        assert "(Refused: MoveDestinationUnknown)" in unknown.stderr  # 0xA801
        refused = move("PICKY")
        assert "(Refused: OutOfResourcesSubOperations)" in refused.stderr  # 0xA702
        assert list((tmp_path / "picky").iterdir()) == []
        moves = wait_for(lambda: len(found := rows(
            db, "SELECT detail FROM audit_events WHERE action = 'move' ORDER BY id")) == 3
            and found, 10, "three audit rows")
        audit = [json.loads(a.detail) for a in moves]
        assert [(a["destination"], a["status"]) for a in audit] == [
            ("PACS", "0x0000"), ("NOWHERE", "0xA801"), ("PICKY", "0xA702")]
        assert audit[0]["completed"] == 4 and audit[2]["completed"] == 0
    finally:
        for process in (pacs, picky):
            process.terminate()
            process.wait(10)


def test_get_sends_on_the_same_association(archive: Any, tmp_path: Path, db_url: str) -> None:
    app = archive(db=db_url)
    out = tmp_path / "got"
    out.mkdir()
    result = dcmtk("getscu", "-S", "-aet", "VIEWER", "-aec", "GATEWAY", "-od", str(out),
                   "127.0.0.1", str(app.config.dicom.port), "-k", "QueryRetrieveLevel=STUDY",
                   "-k", "AccessionNumber=ACC-B")
    assert list(out.iterdir()) == []  # a retrieve must name its level's unique key
    assert "Failed: UnableToProcess" in result.stderr  # 0xC000
    db = app.config.database.url
    (study_b,) = {r.study_instance_uid for r in rows(
        db, "SELECT study_instance_uid FROM instances WHERE accession_number = 'ACC-B'")}
    result = dcmtk("getscu", "-S", "-aet", "VIEWER", "-aec", "GATEWAY", "-od", str(out),
                   "127.0.0.1", str(app.config.dicom.port), "-k", "QueryRetrieveLevel=STUDY",
                   "-k", f"StudyInstanceUID={study_b}")
    assert result.returncode == 0, result.stderr
    got = [pydicom.dcmread(f) for f in out.iterdir()]
    assert sorted(str(g.SOPInstanceUID) for g in got) == sorted(r.sop_instance_uid for r in rows(
        db, "SELECT sop_instance_uid FROM instances WHERE accession_number = 'ACC-B'"))
    assert {g.Modality for g in got} == {"MR"}


def test_orthanc_queries_and_retrieves_through_its_rest_api(
    archive: Any, orthanc_factory: Callable[..., Orthanc], tmp_path: Path,
) -> None:
    from tests.conftest import free_port

    gateway_port = free_port()
    orthanc = orthanc_factory(modalities={"gateway": ("GATEWAY", "127.0.0.1", gateway_port)})
    archive(dicom={"port": gateway_port}, peers=[
        {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
         "services": ["echo", "find", "move"]},
        {"ae_title": "MODALITY", "services": ["store"]},
    ])
    query = orthanc.post_json("/modalities/gateway/query",
                              {"Level": "Study", "Query": {"PatientID": "PAT-1",
                                                          "AccessionNumber": ""}})
    answers = orthanc.get_json(f"/queries/{query['ID']}/answers?expand")
    accessions = {a["0008,0050"]["Value"] for a in answers}
    assert accessions == {"ACC-A", "ACC-B"}
    index = next(i for i, a in enumerate(answers) if a["0008,0050"]["Value"] == "ACC-A")
    orthanc.post_json(f"/queries/{query['ID']}/answers/{index}/retrieve",
                      {"TargetAet": orthanc.aet, "Synchronous": True})
    wait_for(lambda: orthanc.instance_count() == 4, 30, "the study moved into Orthanc")


def test_move_fetches_back_from_orthanc_what_retention_removed(
    archive: Any, orthanc_factory: Callable[..., Orthanc], tmp_path: Path, db_url: str,
) -> None:
    orthanc = orthanc_factory()
    pacs, pacs_port = start_storescp(tmp_path / "pacs")
    try:
        app = archive(
            db=db_url,
            peers=[{"ae_title": "VIEWER", "services": ALL},
                   {"ae_title": "MODALITY", "services": ["store"]},
                   {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
            forward={**FAST, "destinations": [orthanc_destination(orthanc, tmp_path)]},
            retention={"keep_days": 0, "check_interval_s": 0.2},
        )
        db = app.config.database.url
        wait_for(lambda: len(rows(db, "SELECT id FROM instances WHERE spool_removed_at IS NULL"))
                 == 0, 30, "every file confirmed in Orthanc and removed from the spool")
        (study_c,) = {r.study_instance_uid for r in rows(
            db, "SELECT study_instance_uid FROM instances WHERE accession_number = 'ACC-C'")}
        moved = dcmtk("movescu", "-S", "-aet", "VIEWER", "-aec", "GATEWAY", "-aem", "PACS",
                      "127.0.0.1", str(app.config.dicom.port), "-k", "QueryRetrieveLevel=STUDY",
                      "-k", f"StudyInstanceUID={study_c}")
        assert moved.returncode == 0, moved.stderr
        arrived = [pydicom.dcmread(f) for f in (tmp_path / "pacs").iterdir()]
        kept = {r.sop_instance_uid: r for r in rows(
            db, "SELECT sop_instance_uid, series_instance_uid, spool_removed_at FROM instances "
            "WHERE study_instance_uid = :study", study=study_c)}
        assert all(r.spool_removed_at is not None for r in kept.values())  # fetched back
        assert sorted(str(a.SOPInstanceUID) for a in arrived) == sorted(kept)
        assert all((a.StudyInstanceUID, a.SeriesInstanceUID) ==
                   (study_c, kept[a.SOPInstanceUID].series_instance_uid) for a in arrived)
        assert {a.AccessionNumber for a in arrived} == {"ACC-C"}
    finally:
        pacs.terminate()
        pacs.wait(10)
