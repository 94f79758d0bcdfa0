"""No patient data in the service log at INFO or above, whatever path an instance takes."""

from __future__ import annotations

import copy
from pathlib import Path

from pydicom.uid import generate_uid

from tests.factory import CANARY_ACCESSION, CANARY_ID, CANARY_NAME, make_dataset, write_file
from tests.peers import dcmtk, encode, raw_c_store

CANARY_BIRTH_DATE = "19311111"


def test_canary_patient_never_reaches_the_log(served, tmp_path: Path) -> None:
    gateway = served(storage={"duplicate_policy": "reject"}, logging={"level": "INFO"},
                     security={"unknown_callers": ["echo", "store", "find", "get"]})
    canary = make_dataset(PatientName=CANARY_NAME, PatientID=CANARY_ID,
                          AccessionNumber=CANARY_ACCESSION, PatientBirthDate=CANARY_BIRTH_DATE)
    first = write_file(canary, tmp_path / "first.dcm")
    changed = copy.deepcopy(canary)
    changed.SeriesDescription = "other content, same UID"
    second = write_file(changed, tmp_path / "second.dcm")
    port = str(gateway.port)

    assert dcmtk("storescu", "-aet", "CT_ROOM1", "-aec", "GATEWAY", "127.0.0.1", port,
                 str(first)).returncode == 0
    assert dcmtk("storescu", "-aet", "CT_ROOM1", "-aec", "GATEWAY", "127.0.0.1", port,
                 str(first)).returncode == 0  # identical duplicate
    dcmtk("storescu", "-aet", "CT_ROOM1", "-aec", "GATEWAY", "127.0.0.1", port, str(second))
    # refused paths log too: mismatched UIDs, and undecodable bytes carrying the canary
    raw_c_store(gateway.port, encode(canary), canary.SOPClassUID, generate_uid())
    raw_c_store(gateway.port, encode(canary)[:-7] + b"\xff" * 3, canary.SOPClassUID,
                canary.SOPInstanceUID)
    # queries carrying the canary as keys, and a retrieve of its study
    for key in (f"PatientID={CANARY_ID}", f"PatientName={CANARY_NAME}",
                f"AccessionNumber={CANARY_ACCESSION}"):
        assert dcmtk("findscu", "-S", "-aec", "GATEWAY", "127.0.0.1", port, "-k",
                     "QueryRetrieveLevel=STUDY", "-k", key, "-k", "PatientBirthDate",
                     cwd=tmp_path).returncode == 0
    assert dcmtk("getscu", "-S", "-aec", "GATEWAY", "-od", str(tmp_path), "127.0.0.1", port,
                 "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={canary.StudyInstanceUID}").returncode == 0
    assert gateway.stop() == 0

    log = gateway.log()
    assert "C-FIND from FINDSCU at STUDY level: 1 matches" in log and "C-GET" in log, log
    assert "answered 0x0111" in log and "answered 0xA900" in log, log  # the paths were taken
    for secret in (CANARY_NAME, "CANARY", CANARY_ID, CANARY_ACCESSION, CANARY_BIRTH_DATE):
        assert secret not in log
