"""No patient data in the service log, at DEBUG as at INFO, whatever path an instance takes.

A canary patient (non-ASCII name, patient ID, birth date, accession number: strings found nowhere
else) goes through every path the gateway has: C-STORE from storescu, refusals on the wire, a
remap that rewrites the name, ID and birth date (to a second canary), forwarding to Orthanc (REST)
and to DCMTK storescp (DIMSE), C-FIND with the canary as keys, C-MOVE to storescp, C-GET. Each
path is shown to have run by what a user sees (statuses, files at the destination, ledger rows);
then the whole log, as raw bytes, is searched for every canary value in the encodings and
spellings a log line could carry (UTF-8, Latin-1, UTF-16, Python escapes, case-folded, names in
parts, dates with dashes). PS3.15 E.1-1 lists these attributes as identifying.
"""

from __future__ import annotations

import codecs
import copy
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import GATEWAY_BIN, Served, free_port, port_open, rows, wait_for
from tests.factory import make_dataset, write_file
from tests.orthanc import Orthanc
from tests.peers import dcmtk, encode, raw_c_store, require_tool

# As received from the modality ...
NAME = "QZXKANARIE^ŽØFIÆ^ÜBERLÄNGE"
PATIENT_ID = "QZXPID-4471"
BIRTH_DATE = "19311107"
ACCESSION = "QZXACC8812"
# ... and as the remap rewrites it (map_identity: device ID -> MRN, name, birth date).
MAPPED_NAME = "WQVMAPPÉD^ÉLODIE"
MRN = "WQVMRN-5523"
MAPPED_BIRTH_DATE = "19290214"

RULES = """
[[rules]]
name = "canary identity"
match = { calling_ae = ["CT_ROOM1"] }
actions = [{ type = "map_identity", unmatched = "pass" }]
"""
IDENTITIES = ("issuer,local_id,mrn,patient_name,birth_date,sex\n"
              f"CT_ROOM1,{PATIENT_ID},{MRN},{MAPPED_NAME},{MAPPED_BIRTH_DATE},F\n")


def _spellings(value: str) -> set[bytes]:
    """How ``value`` could appear in a log: whole and in its PN components, in each encoding a
    handler or a repr() could produce, and case-folded (the ledger keeps folded names)."""
    parts = {value, value.replace("^", " "), *value.split("^")}
    if len(value) == 8 and value.isdigit():  # a DA: also as an ISO date
        parts.add(f"{value[:4]}-{value[4:6]}-{value[6:]}")
    found: set[bytes] = set()
    for part in {p for p in parts if len(p) >= 4}:
        for text in (part, part.casefold(), part.upper()):
            found.add(text.encode("utf-8"))
            found.add(text.encode("utf-16-le"))
            found.add(text.encode("unicode_escape"))  # repr() of a str
            found.add(repr(text.encode("utf-8"))[2:-1].encode("ascii"))  # repr() of bytes
            with_latin1 = codecs.encode(text, "latin-1", errors="ignore")
            if len(with_latin1) == len(text):
                found.add(with_latin1)
    return found


CANARIES = [NAME, PATIENT_ID, BIRTH_DATE, ACCESSION, MAPPED_NAME, MRN, MAPPED_BIRTH_DATE]


def test_the_spellings_cover_what_a_leak_would_look_like() -> None:
    spellings = _spellings(NAME)
    for leak in (b"name QZXKANARIE.", "ŽØFIÆ".encode(), repr("ŽØFIÆ").encode("unicode_escape"),
                 repr("ŽØFIÆ".encode()).encode(), "qzxkanarie^žøfiæ^überlänge".encode(),
                 "ÜBERLÄNGE".encode("latin-1"), "ŽØFIÆ".encode("utf-16-le")):
        assert any(s in leak for s in spellings), leak
    assert b"1931-11-07" in _spellings(BIRTH_DATE)


def _storescp(folder: Path, ae_title: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    folder.mkdir(parents=True)
    process = subprocess.Popen(
        [require_tool("storescp"), "-aet", ae_title, "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: port_open(port), 10, f"storescp {ae_title} to listen")
    return process, port


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[dict[str, int]]:
    """Two storescp: PACS (a forward destination) and VIEWER_SCP (a C-MOVE destination)."""
    started = {name: _storescp(tmp_path / name.lower(), name) for name in ("PACS", "VIEWER_SCP")}
    yield {name: port for name, (_, port) in started.items()}
    for process, _ in started.values():
        process.terminate()
        process.wait(10)


def _datasets(files: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in files]


@pytest.mark.parametrize("level", ["DEBUG", "INFO"])
def test_canary_patient_never_reaches_the_log_on_any_path(
    served: Callable[..., Served], orthanc_factory: Callable[..., Orthanc], peers: dict[str, int],
    tmp_path: Path, level: str,
) -> None:
    orthanc = orthanc_factory()
    password = tmp_path / "orthanc-password"
    password.write_text(orthanc.password + "\n", encoding="utf-8")
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES, encoding="utf-8")
    gateway = served(
        logging={"level": level},
        storage={"duplicate_policy": "reject"},
        security={"unknown_callers": ["echo", "store", "find", "get", "move"], "peers": [
            {"ae_title": "VIEWER_SCP", "host": "127.0.0.1", "port": peers["VIEWER_SCP"],
             "services": ["echo"]},
            {"ae_title": "NOSY", "services": ["echo"]},
        ]},
        remap={"rules_file": str(rules)},
        forward={"stable_after_s": 0.3, "check_interval_s": 0.2, "destinations": [
            {"type": "orthanc", "name": "orthanc", "url": orthanc.url,
             "username": orthanc.username, "password_file": str(password)},
            {"type": "dimse", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
             "port": peers["PACS"], "verify": "none"},
        ]},
    )
    (tmp_path / "identities.csv").write_text(IDENTITIES, encoding="utf-8")
    imported = subprocess.run(
        [str(GATEWAY_BIN), "identities", "import", str(tmp_path / "identities.csv"),
         "--config", str(gateway.config_path)],
        capture_output=True, text=True, timeout=60, check=False)
    assert imported.returncode == 0, imported.stderr
    port = str(gateway.port)

    canary: dict[str, Any] = {
        "PatientName": NAME, "PatientID": PATIENT_ID, "PatientBirthDate": BIRTH_DATE,
        "AccessionNumber": ACCESSION, "SpecificCharacterSet": "ISO_IR 192"}
    study = generate_uid()
    files = [write_file(make_dataset(StudyInstanceUID=study, InstanceNumber=n, **canary),
                        tmp_path / "study" / f"{n}.dcm") for n in (1, 2)]
    sent = {ds.SOPInstanceUID for ds in _datasets(files)}

    # C-STORE, remapped: the ledger and the spool carry the mapped identity.
    stored = dcmtk("storescu", "-aet", "CT_ROOM1", "-aec", "GATEWAY", "127.0.0.1", port,
                   *map(str, files))
    assert stored.returncode == 0, stored.stderr
    done = wait_for(lambda: (r := rows(gateway.db_url, "SELECT * FROM instances WHERE "
                                       "remap_state = 'done'")) and len(r) == 2 and r, 30, "remap")
    assert {(r.patient_id, r.original_patient_id) for r in done} == {(MRN, PATIENT_ID)}
    for instance in done:
        kept = pydicom.dcmread(gateway.spool / instance.spool_path)
        assert (kept.PatientName, kept.PatientID, kept.PatientBirthDate) == (
            MAPPED_NAME, MRN, MAPPED_BIRTH_DATE)

    # Forwarded to Orthanc (REST) and to storescp (DIMSE), as remapped.
    wait_for(lambda: len(rows(gateway.db_url, "SELECT id FROM forward_jobs WHERE state IN "
                              "('forwarded', 'confirmed')")) == 4, 60, "forwarded to both")
    assert orthanc.sop_instance_uids() == sent
    at_pacs = _datasets(sorted((tmp_path / "pacs").iterdir()))
    assert {ds.SOPInstanceUID for ds in at_pacs} == sent
    assert {str(ds.PatientName) for ds in at_pacs} == {MAPPED_NAME}

    # Refusals on the wire, each with the canary in its data set.
    changed = copy.deepcopy(_datasets(files)[0])
    changed.SeriesDescription = "other content, same UID"
    refusals = {
        "duplicate with other content": raw_c_store(
            gateway.port, encode(changed), changed.SOPClassUID, changed.SOPInstanceUID),
        "data set UID is not the request's": raw_c_store(
            gateway.port, encode(changed), changed.SOPClassUID, generate_uid()),
        "undecodable": raw_c_store(gateway.port, encode(changed)[:-7] + b"\xff" * 3,
                                   changed.SOPClassUID, generate_uid()),
    }
    assert refusals == {"duplicate with other content": 0x0111,
                        "data set UID is not the request's": 0xA900, "undecodable": 0xC000}

    # C-FIND with every canary value as a key, mapped and as received.
    def find(*keys: str, aet: str = "FINDSCU") -> subprocess.CompletedProcess[str]:
        """stdout: the Study Instance UIDs answered."""
        folder = tmp_path / f"find-{len(list(tmp_path.glob('find-*')))}"
        folder.mkdir()
        result = dcmtk("findscu", "-v", "-S", "-X", "-aet", aet, "-aec", "GATEWAY", "127.0.0.1", port,
                       "-k", "QueryRetrieveLevel=STUDY", "-k", "SpecificCharacterSet=ISO_IR 192",
                       "-k", "PatientBirthDate", "-k", "StudyInstanceUID", *(
                           a for k in keys for a in ("-k", k)), cwd=folder)
        result.stdout = "\n".join(str(pydicom.dcmread(p).StudyInstanceUID)
                                  for p in sorted(folder.glob("rsp*.dcm")))
        return result

    for keys in ([f"PatientName={MAPPED_NAME.split('^')[0][:7]}*"], [f"PatientID={MRN}"],
                 [f"AccessionNumber={ACCESSION}", f"PatientBirthDate={MAPPED_BIRTH_DATE}"]):
        found = find(*keys)
        assert found.returncode == 0 and found.stdout == study, (keys, found.stderr)
    # Whole names as keys (their matches are tests/test_query.py's business: on SQLite a
    # non-ASCII name matches only once the folded column is in use), and the keys as received.
    for keys in ([f"PatientName={MAPPED_NAME}"], [f"PatientName={NAME}"],
                 [f"PatientID={PATIENT_ID}"]):
        found = find(*keys)
        assert found.returncode == 0, (keys, found.stderr)
        assert found.stdout in ("", study), keys
    refused = find(f"PatientID={MRN}", f"PatientName={MAPPED_NAME}", aet="NOSY")  # echo only
    assert refused.stdout == "" and "Status: 0x124)" in refused.stderr, refused.stderr

    # C-MOVE to VIEWER_SCP, and C-GET.
    moved = dcmtk("movescu", "-S", "-aet", "VIEWER", "-aec", "GATEWAY", "-aem", "VIEWER_SCP",
                  "127.0.0.1", port, "-k", "QueryRetrieveLevel=STUDY", "-k",
                  f"StudyInstanceUID={study}")
    assert moved.returncode == 0, moved.stderr
    assert {ds.SOPInstanceUID for ds in _datasets(sorted((tmp_path / "viewer_scp").iterdir()))
            } == sent
    got = tmp_path / "got"
    got.mkdir()
    fetched = dcmtk("getscu", "-S", "-aet", "VIEWER", "-aec", "GATEWAY", "-od", str(got),
                    "127.0.0.1", port, "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={study}")
    assert fetched.returncode == 0, fetched.stderr
    assert {ds.SOPInstanceUID for ds in _datasets(sorted(got.iterdir()))} == sent
    assert gateway.stop() == 0

    log = gateway.log_path.read_bytes()
    assert b"C-FIND from FINDSCU at STUDY level" in log and b"C-GET from VIEWER" in log, log
    leaks = sorted({(value, spelling) for value in CANARIES for spelling in _spellings(value)
                    if spelling in log})
    lines = [line for line in log.splitlines() if any(s in line for _, s in leaks)]
    assert not leaks, b"\n".join(lines[:20]).decode("utf-8", "replace")
