"""Remapping at ingest, end to end: DCMTK storescu sends studies through rules; the spool files,
the ledger rows, the study decisions and the audit rows show what happened and why."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from gateway.app import Gateway
from gateway.dicom.status import Status
from tests.conftest import GATEWAY_BIN, Served, rows, saturated, wait_for
from tests.factory import make_dataset, write_file, write_study
from tests.peers import dcmtk, spool_files, store

RULES = """
[[rules]]
name = "ct identity and order"
match = { calling_ae = ["CT1"], modality = ["CT"] }
actions = [
  { type = "map_identity", unmatched = "hold" },
  { type = "reconcile_order", unmatched = "hold" },
  { type = "set", tag = "InstitutionName", value = "General Hospital" },
]
"""

IDENTITIES = """issuer,local_id,mrn,patient_name,birth_date,sex
CT1,DEV-42,MRN0042,DOE^JANE,19800202,F
CT1,DEV-77,MRN0077,ROE^RICHARD,19700707,M
"""

ORDERS = """accession_number,mrn,modality,scheduled_at,requested_procedure_id,requested_procedure_description
ACC-1,MRN0042,CT,2026-11-23T10:00,RP1,CT HEAD
ACC-MR,MRN0042,MR,2026-11-23T10:30,RP2,MR KNEE
ACC-A,MRN0077,CT,2026-11-23T09:00,RP3,CT CHEST
ACC-B,MRN0077,CT,2026-11-23T11:00,RP4,CT ABDOMEN
"""


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(GATEWAY_BIN), *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def remap_gateway(served: Callable[..., Served], tmp_path: Path) -> Callable[..., Served]:
    def start(rules: str = RULES, db: str | None = None, **remap: Any) -> Served:
        rules_path = tmp_path / "rules.toml"
        rules_path.write_text(rules, encoding="utf-8")
        server = served(db=db, remap={"rules_file": str(rules_path), "issuer_of_patient_id": "HOSPITAL",
                               **remap})
        (tmp_path / "identities.csv").write_text(IDENTITIES, encoding="utf-8")
        (tmp_path / "orders.csv").write_text(ORDERS, encoding="utf-8")
        for kind in ("identities", "orders"):
            result = cli(server.config_path, kind, "import", str(tmp_path / f"{kind}.csv"))
            assert result.returncode == 0, result.stderr
        return server

    return start


def send(port: int, files: list[Path], calling_ae: str = "CT1") -> None:
    result = dcmtk("storescu", "-aet", calling_ae, "-aec", "GATEWAY", "127.0.0.1", str(port),
                   *map(str, files))
    assert result.returncode == 0, result.stderr


def wait_remapped(db: str, count: int, state: str = "done") -> list[Any]:
    return wait_for(
        lambda: (r := rows(db, "SELECT * FROM instances WHERE remap_state = :s", s=state))
        and len(r) == count and r,
        30, f"{count} instances {state}",
    )


def test_identity_and_unique_order_applied_with_originals_kept(
    remap_gateway: Callable[..., Served], tmp_path: Path, db_url: str
) -> None:
    server = remap_gateway(db=db_url)
    files = write_study(tmp_path / "study", 3, PatientID="DEV-42", AccessionNumber=None,
                        InstitutionName=None)
    send(server.port, files)

    done = wait_remapped(server.db_url, 3)
    assert {(r.patient_id, r.original_patient_id, r.accession_number, r.original_accession_number,
             r.patient_name, r.original_patient_name) for r in done} == {
        ("MRN0042", "DEV-42", "ACC-1", None, "DOE^JANE", "TEST^PATIENT")}
    for path in spool_files(server.spool):
        ds = pydicom.dcmread(path)
        assert (ds.PatientID, ds.IssuerOfPatientID, str(ds.PatientName), ds.PatientBirthDate,
                ds.PatientSex, ds.AccessionNumber, ds.InstitutionName) == (
            "MRN0042", "HOSPITAL", "DOE^JANE", "19800202", "F", "ACC-1", "General Hospital")
        request = ds.RequestAttributesSequence[0]
        assert (request.RequestedProcedureID, request.RequestedProcedureDescription,
                request.AccessionNumber) == ("RP1", "CT HEAD", "ACC-1")
        [item] = ds.OriginalAttributesSequence
        [previous] = item.ModifiedAttributesSequence
        assert previous.PatientID == "DEV-42"
        assert str(previous.PatientName) == "TEST^PATIENT"
        assert previous.PatientBirthDate == "19700101"
        assert previous.PatientSex == "O"
        for added in ("AccessionNumber", "IssuerOfPatientID", "InstitutionName",
                      "RequestAttributesSequence"):
            assert added in previous and previous[added].is_empty, added
        assert item.ModifyingSystem == "GATEWAY"
        assert item.SourceOfPreviousValues == "CT1"
        assert item.ReasonForTheAttributeModification == "COERCE"
        assert len(item.AttributeModificationDateTime) >= 14
        assert ds.PixelData == pydicom.dcmread(files[0]).PixelData
    [decision] = rows(server.db_url, "SELECT state, mrn, accession_number, decided_by FROM study_decisions")
    assert tuple(decision) == ("ready", "MRN0042", "ACC-1", "gateway")
    assert [r.action for r in rows(server.db_url, "SELECT action FROM audit_events "
                                   "WHERE study_instance_uid IS NOT NULL")] == ["study_decided"]
    assert "DEV-42" not in server.log() and "DOE^JANE" not in server.log()


def test_one_study_one_decision_across_associations_and_table_changes(
    remap_gateway: Callable[..., Served], tmp_path: Path, db_url: str
) -> None:
    server = remap_gateway(db=db_url)
    files = write_study(tmp_path / "study", 3, PatientID="DEV-42", AccessionNumber=None)
    send(server.port, files[:1])
    wait_remapped(server.db_url, 1)
    # The identity table changes between the two associations: the study keeps its decision.
    (tmp_path / "changed.csv").write_text("issuer,local_id,mrn\nCT1,DEV-42,MRN9999\n")
    assert cli(server.config_path, "identities", "import", str(tmp_path / "changed.csv")).returncode == 0
    send(server.port, files[1:])

    done = wait_remapped(server.db_url, 3)
    assert {r.patient_id for r in done} == {"MRN0042"}
    assert {pydicom.dcmread(p).PatientID for p in spool_files(server.spool)} == {"MRN0042"}
    assert len(rows(server.db_url, "SELECT id FROM study_decisions")) == 1
    assert len(rows(server.db_url, "SELECT id FROM associations WHERE result = 'accepted'")) == 2


def test_ambiguous_study_is_held_listed_and_released_by_assign(
    remap_gateway: Callable[..., Served], tmp_path: Path, db_url: str
) -> None:
    server = remap_gateway(db=db_url)
    files = write_study(tmp_path / "study", 2, PatientID="DEV-77", AccessionNumber=None,
                        StudyTime="100000")
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    send(server.port, files)

    held = wait_remapped(server.db_url, 2, "held")
    assert {r.patient_id for r in held} == {"DEV-77"}  # nothing applied while held
    assert {pydicom.dcmread(p).PatientID for p in spool_files(server.spool)} == {"DEV-77"}
    listing = cli(server.config_path, "reconcile", "list")
    assert listing.returncode == 0, listing.stderr
    assert study in listing.stdout and "ACC-A" in listing.stdout and "ACC-B" in listing.stdout
    assert "2 orders match" in listing.stdout

    assigned = cli(server.config_path, "reconcile", "assign", study, "ACC-B", "--by", "alice")
    assert assigned.returncode == 0, assigned.stderr
    assert "2 instance(s) released, 2 rewritten" in assigned.stdout
    # The service's own periodic release may have planned the study again meanwhile (it reads
    # held rows without a lock) and be rewriting it a second time: the end state is what counts
    query = "SELECT patient_id, accession_number, remap_state FROM instances"
    wait_for(lambda: {tuple(r) for r in rows(server.db_url, query)}
             == {("MRN0077", "ACC-B", "done")}, 15, "both instances rewritten for ACC-B")
    for path in spool_files(server.spool):
        ds = pydicom.dcmread(path)
        assert (ds.PatientID, ds.AccessionNumber) == ("MRN0077", "ACC-B")
        assert ds.RequestAttributesSequence[0].RequestedProcedureID == "RP4"
    audit = rows(server.db_url, "SELECT actor, action, detail FROM audit_events "
                 "WHERE study_instance_uid = :s ORDER BY id", s=study)
    assert [(a.actor, a.action) for a in audit] == [("gateway", "study_held"), ("alice", "study_assigned")]
    assert json.loads(audit[1].detail)["previous"]["candidates"] == ["ACC-A", "ACC-B"]
    # A later instance of the same study follows the operator's decision.
    late = write_file(pydicom.dcmread(files[0]), tmp_path / "late.dcm")
    late_ds = pydicom.dcmread(late)
    late_ds.SOPInstanceUID = generate_uid()
    write_file(late_ds, late)
    send(server.port, [late])
    wait_remapped(server.db_url, 3)

    refused = cli(server.config_path, "reconcile", "assign", study, "ACC-A")
    assert refused.returncode == 1 and "is not held" in refused.stderr


def test_unknown_patient_passes_unchanged_when_the_rule_says_pass(
    remap_gateway: Callable[..., Served], tmp_path: Path
) -> None:
    rules = RULES.replace('type = "map_identity", unmatched = "hold"', 'type = "map_identity", unmatched = "pass"')
    rules = rules.replace('type = "reconcile_order", unmatched = "hold"', 'type = "reconcile_order", unmatched = "pass"')
    server = remap_gateway(rules)
    files = write_study(tmp_path / "study", 1, PatientID="NOBODY", AccessionNumber=None)
    send(server.port, files)
    [row] = wait_remapped(server.db_url, 1)
    assert (row.patient_id, row.original_patient_id) == ("NOBODY", "NOBODY")
    assert pydicom.dcmread(spool_files(server.spool)[0]).InstitutionName == "General Hospital"


def test_coerced_status_is_configurable(
    make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rules]]\nname = "site"\nactions = [{ type = "set", tag = "InstitutionName", '
                     'value = "General Hospital" }]\n')
    warning = make_gateway(remap={"rules_file": str(rules), "coerced_status": "warning"})
    assert warning.receiver is not None
    assert store(warning.receiver.address[1], make_dataset()) == Status.COERCION_OF_DATA_ELEMENTS
    unchanged = make_dataset(InstitutionName="General Hospital")
    assert store(warning.receiver.address[1], unchanged) == Status.SUCCESS


def test_regenerated_uids_are_consistent_and_under_the_root(
    make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rules]]\nname = "new uids"\nactions = [{ type = "regenerate_uid", tag = '
                     '"StudyInstanceUID" }, { type = "regenerate_uid", tag = "SOPInstanceUID" }]\n')
    app = make_gateway(remap={"rules_file": str(rules), "uid_root": "1.2.826.0.1.3680043.9.7"})
    assert app.receiver is not None
    study = generate_uid()
    first, second = make_dataset(StudyInstanceUID=study), make_dataset(StudyInstanceUID=study)
    for ds in (first, second):
        assert store(app.receiver.address[1], ds) == Status.SUCCESS
    db = f"sqlite:///{app.config.database.url.removeprefix('sqlite:///')}"
    wait_remapped(db, 2)
    written = [pydicom.dcmread(p) for p in spool_files(app.spool.root)]
    new_studies = {ds.StudyInstanceUID for ds in written}
    assert len(new_studies) == 1 and study not in new_studies
    assert next(iter(new_studies)).startswith("1.2.826.0.1.3680043.9.7.")
    for ds in written:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPInstanceUID not in (first.SOPInstanceUID, second.SOPInstanceUID)


def test_bad_rules_are_reported_with_rule_key_and_fix(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rules]]\nname = "typo"\nactions = [{ type = "set", tag = "PatientIdd", value = "x" }]\n'
        '[[rules]]\nname = "bad regex"\nmatch = { tags = [{ tag = "PatientID", regex = "(" }] }\n'
        'actions = [{ type = "delete", tag = "PatientAddress" }]\n'
        '[[rules]]\nname = "uid"\nactions = [{ type = "set", tag = "StudyInstanceUID", value = "1.2" }]\n'
    )
    config = tmp_path / "gateway.toml"
    config.write_text(f'[remap]\nrules_file = "{rules}"\n')
    result = cli(config, "check-config")
    assert result.returncode == 2
    assert "rule #1 'typo'" in result.stderr and "'PatientIdd' is not a DICOM keyword" in result.stderr
    assert "rule #2 'bad regex'" in result.stderr and "not a valid regular expression" in result.stderr
    assert "rule #3 'uid'" in result.stderr and "use an action of type regenerate_uid" in result.stderr


def test_remap_test_prints_changes_and_writes_nothing(
    remap_gateway: Callable[..., Served], tmp_path: Path
) -> None:
    server = remap_gateway()
    [path] = write_study(tmp_path / "sample", 1, PatientID="DEV-42", AccessionNumber=None)
    before = path.read_bytes()
    result = cli(server.config_path, "remap", "test", "--calling-ae", "CT1", str(path))
    assert result.returncode == 0, result.stderr
    assert "PatientID: 'DEV-42' -> 'MRN0042'" in result.stdout
    assert "AccessionNumber: (absent) -> 'ACC-1'" in result.stdout
    assert path.read_bytes() == before
    assert rows(server.db_url, "SELECT id FROM instances") == []
    assert rows(server.db_url, "SELECT id FROM study_decisions") == []


def test_remap_replay_summarises_what_candidate_rules_would_change(
    remap_gateway: Callable[..., Served], tmp_path: Path
) -> None:
    server = remap_gateway()
    send(server.port, write_study(tmp_path / "study", 2, PatientID="DEV-42", AccessionNumber=None))
    wait_remapped(server.db_url, 2)
    candidate = tmp_path / "candidate.toml"
    candidate.write_text(RULES.replace("General Hospital", "Other Hospital"), encoding="utf-8")
    result = cli(server.config_path, "remap", "replay", "--rules", str(candidate), "--since", "2000-01-01")
    assert result.returncode == 0, result.stderr
    assert "examined 2 instance(s)" in result.stdout and "2 would differ" in result.stdout
    assert "InstitutionName: 2 instance(s)" in result.stdout
    assert "'General Hospital' -> 'Other Hospital'" in result.stdout
    same = cli(server.config_path, "remap", "replay", "--rules", str(tmp_path / "rules.toml"),
               "--since", "2000-01-01")
    assert "0 would differ" in same.stdout, same.stdout


# pydicom's bundled character set files, and the name the identity table gives each patient:
# the first five fit the file's own character set, the last two force the move to UTF-8.
CHARSET_CASES = [
    ("chrH31.dcm", "山田^花子", None),  # ISO 2022 IR 87 (Japanese)
    ("chrX2.dcm", "王^小红", None),  # GB18030
    ("chrFren.dcm", "Müller^Jürgen", None),  # ISO_IR 100 (Latin-1)
    ("chrRuss.dcm", "Петров^Пётр", None),  # ISO_IR 144 (Cyrillic)
    ("chrI2.dcm", "김^철수", None),  # ISO 2022 IR 149 (Korean)
    ("chrFren.dcm", "山田^太郎", "ISO_IR 192"),  # Japanese in a Latin-1 object
    ("chrH31.dcm", "Müller^Jürgen", "ISO_IR 192"),  # no u-umlaut in ISO 2022 IR 87
]


def test_new_names_round_trip_in_every_character_set(
    remap_gateway: Callable[..., Served], tmp_path: Path
) -> None:
    from pydicom import config as pydicom_config
    from pydicom.data import get_charset_files
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    rules = ('[[rules]]\nname = "identity"\nmatch = { calling_ae = ["CT1"] }\n'
             'actions = [{ type = "map_identity", unmatched = "hold" }]\n')
    server = remap_gateway(rules)
    identities = ["issuer,local_id,mrn,patient_name"]
    files, expected = [], {}
    for number, (name, new_name, new_charset) in enumerate(CHARSET_CASES):
        ds = pydicom.dcmread(get_charset_files(name)[0])
        ds.PatientID = f"CHARSET-{number}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        files.append(write_file(ds, tmp_path / "charsets" / f"{number}.dcm"))
        identities.append(f'CT1,CHARSET-{number},MRN-C{number},"{new_name}"')
        expected[ds.SOPInstanceUID] = (new_name, new_charset or ds.SpecificCharacterSet,
                                       str(ds.PatientName))
    (tmp_path / "charsets.csv").write_text("\n".join(identities) + "\n", encoding="utf-8")
    assert cli(server.config_path, "identities", "import", str(tmp_path / "charsets.csv")).returncode == 0
    send(server.port, files)

    wait_remapped(server.db_url, len(CHARSET_CASES))
    saved = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    try:
        for path in spool_files(server.spool):
            ds = pydicom.dcmread(path)
            new_name, charset, old_name = expected[ds.SOPInstanceUID]
            assert str(ds.PatientName) == new_name
            assert ds.SpecificCharacterSet == charset
            previous = ds.OriginalAttributesSequence[0].ModifiedAttributesSequence[0]
            assert str(previous.PatientName) == old_name
            # Every text value encodes in the declared set without replacement characters.
            buffer = DicomBytesIO()
            buffer.is_little_endian, buffer.is_implicit_VR = True, False
            write_dataset(buffer, ds)
    finally:
        pydicom_config.settings.writing_validation_mode = saved


def _dciodvfy_findings(path: Path) -> set[str]:
    from tests.peers import require_tool

    result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True,
                            timeout=60, check=False)
    return {line.strip() for line in (result.stdout + result.stderr).splitlines()
            if line.startswith(("Error", "Warning"))}


def test_remapped_objects_pass_dciodvfy_as_well_as_the_input(
    remap_gateway: Callable[..., Served], tmp_path: Path
) -> None:
    from pydicom.data import get_testdata_file

    server = remap_gateway()
    source = get_testdata_file("CT_small.dcm")
    assert isinstance(source, str)
    ds = pydicom.dcmread(source)
    ds.PatientID = "DEV-42"
    del ds.AccessionNumber
    ds.StudyDate, ds.StudyTime = "20261123", "101500"
    sent = write_file(ds, tmp_path / "ct.dcm")
    send(server.port, [sent])

    wait_remapped(server.db_url, 1)
    [stored] = spool_files(server.spool)
    assert pydicom.dcmread(stored).PatientID == "MRN0042"
    assert _dciodvfy_findings(stored) <= _dciodvfy_findings(sent)


def test_rewrite_interrupted_by_a_stop_is_finished_once_after_restart(
    make_gateway: Callable[..., Gateway], tmp_path: Path, sqlite_url: str
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rules]]\nname = "site"\nactions = [{ type = "set", tag = "InstitutionName", '
                     'value = "General Hospital" }]\n')
    first = make_gateway(remap={"rules_file": str(rules)})
    assert first.receiver is not None
    assert store(first.receiver.address[1], make_dataset()) == Status.SUCCESS
    wait_remapped(sqlite_url, 1)
    first.stop()
    # As if the service had stopped between renaming the rewritten file and recording it.
    import sqlalchemy as sa

    engine = sa.create_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE instances SET remap_state = 'rewriting'"))
    engine.dispose()

    make_gateway(remap={"rules_file": str(rules)})
    wait_remapped(sqlite_url, 1)
    [path] = spool_files(tmp_path / "spool")
    ds = pydicom.dcmread(path)
    assert ds.InstitutionName == "General Hospital"
    assert len(ds.OriginalAttributesSequence) == 1


def test_rewrites_yield_to_a_saturated_receiver_but_are_never_starved(
    make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    """While the receiver is saturated nothing is rewritten until the oldest waiting instance has
    waited max_defer_s; then all are, the receiver still saturated. Out of a burst an instance is
    taken at once. The saturation is simulated (the C-STORE handlers' busy seconds, 80% of wall
    time, as gateway.busy reads them); everything else is real. When each rewrite happened is
    read from the rewritten file's mtime against the ledger's received_at, so a slow test process
    cannot hide an early rewrite; a burst the machine paused (``steady`` false) is tried again."""
    max_defer_s = 3.0
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rules]]\nname = "site"\nactions = [{ type = "set", tag = "InstitutionName", '
                     'value = "General Hospital" }]\n')
    app = make_gateway(remap={"rules_file": str(rules), "max_defer_s": max_defer_s})
    assert app.receiver is not None
    db = f"sqlite:///{app.config.database.url.removeprefix('sqlite:///')}"
    port = app.receiver.address[1]
    # The remap process is up and reading the receiver (its hold needs two whole windows of
    # samples before it can call anything a burst): one instance rewritten before the burst.
    warm_up = generate_uid()
    assert store(port, make_dataset(StudyInstanceUID=warm_up)) == Status.SUCCESS
    wait_for(lambda: _instances_of(db, warm_up)[0].remap_state == "done", 30, "a first rewrite")
    for attempt in range(3):
        with saturated(app.load) as burst:
            study = generate_uid()
            for _ in range(8):
                assert store(port, make_dataset(StudyInstanceUID=study)) == Status.SUCCESS
            def all_rewritten(s: str = study) -> Any:
                return (r := _instances_of(db, s)) and all(
                    i.remap_state == "done" for i in r) and r

            mine = wait_for(all_rewritten, max_defer_s + 30,
                            "rewrites done though the receiver is still saturated")
        if burst.steady:
            break
    else:
        pytest.fail("the machine paused the simulated burst in each of 3 attempts")
    first_received = min(_when(i.received_at) for i in mine)
    rewritten = [_rewritten_at(app.spool.root / i.spool_path) for i in mine]
    assert min(rewritten) >= first_received + timedelta(seconds=max_defer_s), (
        "rewritten before the oldest had waited max_defer_s")
    assert max(rewritten) < first_received + timedelta(seconds=max_defer_s + 10)
    for instance in mine:
        assert pydicom.dcmread(app.spool.root / instance.spool_path).InstitutionName == (
            "General Hospital")

    for _ in range(3):  # no burst: each taken at once (claimed; the rewrite itself runs idle)
        study = generate_uid()
        sent = time.monotonic()
        assert store(port, make_dataset(StudyInstanceUID=study)) == Status.SUCCESS
        def state(s: str = study) -> Any:
            return _instances_of(db, s)[0].remap_state

        wait_for(lambda: state() in ("rewriting", "done"), max_defer_s + 30, "the rewrite to start")
        assert time.monotonic() - sent < max_defer_s, "deferred though the receiver was not busy"
        wait_for(lambda: state() == "done", 30, "rewritten")


def _instances_of(db: str, study: str) -> list[Any]:
    return rows(db, "SELECT * FROM instances WHERE study_instance_uid = :s", s=study)


def _when(value: datetime | str) -> datetime:
    """A timestamp column, aware (SQLite gives naive UTC text back)."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _rewritten_at(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)
