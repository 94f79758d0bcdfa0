"""The spool's crash window: a file given its final name whose ledger row was never committed.

The real thing first: ``gateway serve``'s own code in a subprocess, killed with SIGKILL between
the hard link and the commit, then restarted on the same spool and database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from gateway.app import Gateway
from gateway.dicom.status import Status
from gateway.receive.spool import CLAIMS, ClaimLog
from tests.conftest import config_dict, free_port, port_open, rows, wait_for
from tests.factory import make_dataset
from tests.peers import spool_files, store

# The gateway, killed by itself at the moment the issue names: the instance whose SOP Instance
# UID is argv[2] has been linked under its final name (``Spool.claim``), its row not committed.
KILLED_IN_THE_WINDOW = """
import json, os, signal, sys, time
from prometheus_client import CollectorRegistry
from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.receive import ingest

insert = ingest.Ingest._insert_new
def insert_or_die(self, header, published, prepared):
    if str(header.sop_instance_uid) == sys.argv[2]:
        assert published.path.is_file()
        os.kill(os.getpid(), signal.SIGKILL)
    return insert(self, header, published, prepared)
ingest.Ingest._insert_new = insert_or_die
with open(sys.argv[1]) as fp:
    app = Gateway(GatewayConfig.model_validate(json.load(fp)), CollectorRegistry())
app.start()
time.sleep(300)
"""


def _final(spool: Path, ds: object) -> Path:
    return spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"  # type: ignore[attr-defined]


def test_a_kill_between_link_and_commit_leaves_nothing_after_restart(
    make_gateway: Callable[..., Gateway], db_url: str, tmp_path: Path
) -> None:
    port = free_port()
    config = config_dict(tmp_path, db_url, port)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    script = tmp_path / "killed.py"
    script.write_text(KILLED_IN_THE_WINDOW, encoding="utf-8")
    kept, doomed = make_dataset(), make_dataset(PatientName="KÖNIG^ÆSA")
    process = subprocess.Popen([sys.executable, str(script), str(config_path), doomed.SOPInstanceUID],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port) or process.poll() is not None, 30, "gateway to listen")
        assert store(port, kept) == Status.SUCCESS

        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(doomed.SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
        assert assoc.is_established
        doomed.file_meta = kept.file_meta
        answer = assoc.send_c_store(doomed)
        assert "Status" not in answer  # killed before answering: the sender still holds it
        assoc.release()
        assert process.wait(30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    spool = Path(config["storage"]["spool_dir"])
    doomed_name = f"{doomed.StudyInstanceUID}/{doomed.SeriesInstanceUID}/{doomed.SOPInstanceUID}.dcm"
    kept_name = f"{kept.StudyInstanceUID}/{kept.SeriesInstanceUID}/{kept.SOPInstanceUID}.dcm"
    assert _final(spool, doomed).is_file()  # the crash window's litter, before the fix's restart
    assert [r.sop_instance_uid for r in rows(db_url, "SELECT sop_instance_uid FROM instances")] \
        == [kept.SOPInstanceUID]
    claims = (spool / CLAIMS).read_text().splitlines()
    assert f"+{doomed_name}" in claims and f"-{doomed_name}" not in claims
    # A kill after the commit but before the "-" line: the row holds the name, which stays.
    with open(spool / CLAIMS, "a") as fp:
        fp.write(f"+{kept_name}\n")

    app = make_gateway(db=db_url)
    assert app.receiver is not None

    assert not _final(spool, doomed).exists()
    assert _final(spool, kept).is_file()
    assert [p.name for p in spool_files(spool)] == [f"{kept.SOPInstanceUID}.dcm"]
    assert store(app.receiver.address[1], doomed) == Status.SUCCESS  # sent again: the fast path
    assert _final(spool, doomed).is_file()
    assert {r.sop_instance_uid for r in rows(db_url, "SELECT sop_instance_uid FROM instances")} \
        == {kept.SOPInstanceUID, doomed.SOPInstanceUID}
    assert (spool / CLAIMS).read_text().splitlines() == [f"+{doomed_name}", f"-{doomed_name}"]


def test_only_pending_names_without_a_row_are_removed_and_versions_are_rows_too(
    make_gateway: Callable[..., Gateway], db_url: str, tmp_path: Path
) -> None:
    """Written directly: every kind of name the log can hold, and which survive a restart."""
    app = make_gateway(db=db_url, storage={"duplicate_policy": "replace"})
    assert app.receiver is not None
    port = app.receiver.address[1]
    first = make_dataset()
    second = make_dataset(SOPInstanceUID=first.SOPInstanceUID, StudyInstanceUID=first.StudyInstanceUID,
                          SeriesInstanceUID=first.SeriesInstanceUID, InstanceNumber=7)
    assert store(port, first) == Status.SUCCESS
    assert store(port, second) == Status.SUCCESS  # replace: two files, two rows
    recorded = [app.spool.relative(p) for p in spool_files(app.spool.root)]
    assert len(recorded) == 2
    series = Path(recorded[0]).parent
    orphans = [series / f"{first.SOPInstanceUID}.0123456789abcdef.dcm", series / "1.2.3.4.dcm",
               Path("9.8") / "7.6" / "5.4.dcm"]
    settled = series / "1.2.3.5.dcm"
    for name in (*orphans, settled):
        (app.spool.root / name).parent.mkdir(parents=True, exist_ok=True)
        (app.spool.root / name).write_bytes(b"never acknowledged")
    app.stop()
    with open(app.spool.root / CLAIMS, "w") as fp:
        fp.writelines(f"+{name}\n" for name in (*recorded, *orphans, settled, "../../outside"))
        fp.write(f"-{settled}\n")

    restarted = make_gateway(db=db_url, storage={"duplicate_policy": "replace"})

    assert sorted(restarted.spool.relative(p) for p in spool_files(restarted.spool.root)) == sorted(
        [*recorded, str(settled)])
    assert len(rows(db_url, "SELECT id FROM instances")) == 1
    assert len(rows(db_url, "SELECT id FROM instance_versions")) == 1
    assert (restarted.spool.root / CLAIMS).read_text() == ""


def test_the_claim_log_stays_small_and_keeps_what_is_pending(tmp_path: Path) -> None:
    log = ClaimLog(tmp_path / CLAIMS, compact_bytes=4096)
    for i in range(5000):
        log.intend(f"1.2/3.4/{i}.dcm")
        if i % 1000:
            log.settle(f"1.2/3.4/{i}.dcm")
    log.intend("1.2/3.4/again.dcm")
    log.intend("1.2/3.4/again.dcm")
    log.settle("1.2/3.4/again.dcm")
    assert os.path.getsize(tmp_path / CLAIMS) < 4096 + 100
    pending = ClaimLog(tmp_path / CLAIMS).take_pending()
    assert pending == sorted([f"1.2/3.4/{i}.dcm" for i in range(0, 5000, 1000)]
                             + ["1.2/3.4/again.dcm"])
