"""Forwarding with real peers: DCMTK sends to the gateway, which forwards to a real Orthanc (REST,
DICOMweb, DIMSE) or DCMTK ``storescp``; what arrived is checked at the destination and in the ledger.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import urllib.request
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

import numpy
import pydicom
import pytest
from PIL import Image
from pydicom.data.data_manager import DATA_ROOT
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from gateway.app import Gateway
from tests.conftest import (
    GATEWAY_BIN,
    Served,
    descendants,
    free_port,
    port_open,
    rows,
    running,
    saturated,
    wait_for,
)
from tests.factory import CANARY_ID, CANARY_NAME, make_dataset, write_file, write_study
from tests.orthanc import Orthanc
from tests.peers import dcmtk, require_tool

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
OUTAGE_S = 10  # the field report said a minute; with probes every 0.5 s, 10 s is 20 probes
# Quick enough for tests: a study is verified 0.3 s after its last instance; backoff stays short.
FAST: dict[str, Any] = {
    "stable_after_s": 0.3,
    "check_interval_s": 0.2,
    "retry": {"first_delay_s": 0.2, "max_delay_s": 1.0},
    "breaker": {"failures_to_open": 3, "probe_interval_s": 0.5},
}


def orthanc_destination(orthanc: Orthanc, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    secret = tmp_path / "orthanc-password"
    secret.write_text(orthanc.password + "\n", encoding="utf-8")
    return {"type": "orthanc", "name": "orthanc", "url": orthanc.url,
            "username": orthanc.username, "password_file": str(secret), **extra}


def jobs(db: str, state: str | None = None) -> list[Any]:
    where = "" if state is None else f" WHERE state = '{state}'"
    return rows(db, "SELECT * FROM forward_jobs" + where + " ORDER BY id")


def send(port: int, files: list[Path], calling_ae: str = "CT_ROOM1") -> None:
    result = dcmtk("storescu", "-aet", calling_ae, "-aec", "GATEWAY", "127.0.0.1", str(port),
                   *map(str, files), timeout=300)
    assert result.returncode == 0, result.stderr


def waited(job: Any) -> float:
    """Seconds from received to forwarded (SQLite gives the times back as text)."""
    times = [t if isinstance(t, datetime) else datetime.fromisoformat(t)
             for t in (job.created_at, job.forwarded_at)]
    return (times[1] - times[0]).total_seconds()


Uids = tuple[str, str, str]  # Study, Series, SOP Instance UID


@dataclass
class Recording:
    """A real Orthanc whose Lua ``ReceivedInstanceFilter`` writes the UIDs of every copy it is
    given (REST, DICOMweb or C-STORE) before it looks for duplicates: Orthanc keeps the first
    copy of a UID and its changes log shows a second one nowhere, so only this sees a re-send."""

    orthanc: Orthanc
    received: Path

    def copies(self) -> list[Uids]:
        if not self.received.exists():
            return []
        lines = self.received.read_text(encoding="ascii").splitlines()
        return [(study, series, sop) for study, series, sop in (line.split() for line in lines)]


RECORD_EVERY_COPY = """
function ReceivedInstanceFilter(dicom, origin, info)
   local f = io.open([[{path}]], "a")
   f:write(dicom.StudyInstanceUID .. " " .. dicom.SeriesInstanceUID .. " " ..
           dicom.SOPInstanceUID .. "\\n")
   f:close()
   return true
end
"""
# A destination that never holds what it stores: each instance is deleted once stored.
DROP_EVERY_INSTANCE = """
function OnStoredInstance(instanceId, tags, metadata, origin)
   Delete(instanceId)
end
"""
UNCOMPRESSED = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]


@pytest.fixture
def recording_orthanc(tmp_path: Path) -> Iterator[Callable[..., Recording]]:
    """``recording_orthanc(dicomweb=, uncompressed_only=, drops=)``: a started Orthanc that
    records every copy; ``uncompressed_only`` accepts only little endian uncompressed over DIMSE
    (as many PACS are set up); ``drops`` deletes each instance once stored."""
    started: list[Orthanc] = []

    def start(dicomweb: bool = False, uncompressed_only: bool = False,
              drops: bool = False) -> Recording:
        root = tmp_path / f"recording-orthanc-{len(started)}"
        root.mkdir(parents=True)
        received = root / "received.txt"
        script = root / "record.lua"
        script.write_text(RECORD_EVERY_COPY.format(path=received)
                          + (DROP_EVERY_INSTANCE if drops else ""), encoding="utf-8")
        extra: dict[str, Any] = {"LuaScripts": [str(script)]}
        if uncompressed_only:
            extra["AcceptedTransferSyntaxes"] = UNCOMPRESSED
        orthanc = Orthanc(root, free_port(), free_port(), dicomweb=dicomweb, extra_config=extra)
        started.append(orthanc)
        orthanc.start()
        return Recording(orthanc, received)

    yield start
    for orthanc in started:
        orthanc.kill()


def metric(port: int, line_start: str) -> float:
    """One sample from a served gateway's /metrics (0 when the labelled series does not exist)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        text = response.read().decode()
    found = [line for line in text.splitlines() if line.startswith(line_start + " ")]
    return float(found[0].split()[-1]) if found else 0.0


def test_storescu_to_orthanc_every_instance_confirmed_with_equal_pixels(
    make_gateway: Callable[..., Gateway], orthanc_factory: Callable[..., Orthanc],
    db_url: str, tmp_path: Path,
) -> None:
    orthanc = orthanc_factory()
    app = make_gateway(db=db_url, forward={
        **FAST, "destinations": [orthanc_destination(orthanc, tmp_path, concurrency=1)]})
    files = write_study(tmp_path / "study", 12) + write_study(tmp_path / "other", 5)
    send(app.config.dicom.port, files)

    wait_for(lambda: len(jobs(db_url, "confirmed")) == 17, 30, "every job confirmed")
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    assert orthanc.sop_instance_uids() == set(sent)
    for uid, ds in sent.items():
        arrived = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(uid)))
        assert arrived.PixelData == ds.PixelData
    ledger = jobs(db_url)
    assert all(j.forwarded_at is not None and j.confirmed_at >= j.forwarded_at for j in ledger)
    assert all(j.remote_id for j in ledger) and all(j.attempts == 0 for j in ledger)
    # instances of a study left in the order they arrived
    first = [j for j in ledger if j.study_instance_uid == str(sent[next(iter(sent))].StudyInstanceUID)]
    assert [j.forwarded_at for j in first] == sorted(j.forwarded_at for j in first)


def test_a_drained_queue_is_verified_at_once_not_at_the_next_round(
    make_gateway: Callable[..., Gateway], orthanc_factory: Callable[..., Orthanc],
    db_url: str, tmp_path: Path,
) -> None:
    """The proof of delivery runs when a destination's queue empties, not only every
    ``check_interval_s``: with a round a minute apart, the study is still confirmed in seconds."""
    orthanc = orthanc_factory()
    app = make_gateway(db=db_url, forward={
        **FAST, "stable_after_s": 0.0, "check_interval_s": 60.0,
        "destinations": [orthanc_destination(orthanc, tmp_path)]})
    send(app.config.dicom.port, write_study(tmp_path / "study", 4))
    wait_for(lambda: len(jobs(db_url, "confirmed")) == 4, 15, "confirmed before the first round")


def test_orthanc_down_a_while_then_everything_arrives_once(
    served: Callable[..., Served], recording_orthanc: Callable[..., Recording], tmp_path: Path,
) -> None:
    """Once: what the gateway was told stored is counted (a re-send would count twice), and the
    destination records every copy it is given; only a send the kill cut short may come again."""
    recording = recording_orthanc()
    orthanc = recording.orthanc
    gateway = served(forward={**FAST, "destinations": [orthanc_destination(orthanc, tmp_path)]})
    files = write_study(tmp_path / "a", 250) + write_study(tmp_path / "b", 250)
    sender = threading.Thread(target=send, args=(gateway.port, files))
    sender.start()
    wait_for(lambda: len(jobs(gateway.db_url, "forwarded") + jobs(gateway.db_url, "confirmed")) >= 20,
             60, "forwarding under way")
    orthanc.kill()  # at once: a clean stop takes Orthanc 3.5 s, and the queue would be empty
    before_kill = {sop for _, _, sop in recording.copies()}
    sender.join(timeout=300)  # the modality notices nothing: every C-STORE answered Success
    assert not sender.is_alive()
    assert len(rows(gateway.db_url, "SELECT id FROM instances")) == 500

    def queue() -> str:
        result = subprocess.run([str(GATEWAY_BIN), "queue", "--config", str(gateway.config_path)],
                                check=False, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    wait_for(lambda: "open" in queue(), 30, "breaker open while Orthanc is away")
    before = queue()
    orthanc_row = before.splitlines()[1].split()
    assert orthanc_row[0] == "orthanc" and int(orthanc_row[1]) > 0  # queued
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics") as response:
        metrics = response.read().decode()
    assert 'gateway_forward_breaker_open{destination="orthanc"} 1.0' in metrics
    depth = next(line for line in metrics.splitlines() if line.startswith(
        'gateway_forward_queue_depth{destination="orthanc",state="queued"}'))
    assert float(depth.split()[-1]) > 0
    time.sleep(OUTAGE_S)  # the outage itself; the modality already finished meanwhile
    orthanc.start()

    wait_for(lambda: len(jobs(gateway.db_url, "confirmed")) == 500, 180, "all 500 confirmed")
    assert orthanc.instance_count() == 500
    sent = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    copies = Counter(sop for _, _, sop in recording.copies())
    assert set(copies) == sent
    # Twice only what was on its way when Orthanc died (one per sender, 2 by default): it
    # arrived, and the answer did not.
    again = {sop: n for sop, n in copies.items() if n > 1}
    assert len(again) <= 2 and set(again) <= before_kill and max(copies.values()) <= 2, again
    sent_label = '{destination="orthanc"}'
    assert metric(gateway.metrics_port, f"gateway_forwarded_total{sent_label}") == 500
    assert metric(gateway.metrics_port, f"gateway_forward_requeued_missing_total{sent_label}") == 0
    assert jobs(gateway.db_url, "dead") == []
    assert "closed" in queue()
    assert gateway.stop() == 0


def test_gateway_killed_mid_forward_each_instance_arrives_exactly_once(
    served: Callable[..., Served], recording_orthanc: Callable[..., Recording], tmp_path: Path,
) -> None:
    """Every copy Orthanc is given is counted (its own changes log hides a second copy): each
    instance arrives once, except the one in flight at the kill, which may arrive twice."""
    recording = recording_orthanc()
    orthanc = recording.orthanc
    orthanc.stop()  # the queue fills first, so that the kill lands in the middle of draining it
    forward = {**FAST, "destinations": [orthanc_destination(orthanc, tmp_path, concurrency=1,
                                                            batch_size=1)]}
    rules = tmp_path / "rules.toml"  # rewriting workers too, to see that none outlives the kill
    rules.write_text('[[rules]]\nname = "site"\nactions = [{ type = "set", tag = '
                     '"InstitutionName", value = "General Hospital" }]\n', encoding="utf-8")
    remap = {"rules_file": str(rules)}
    gateway = served(forward=forward, remap=remap)
    files = write_study(tmp_path / "study", 150)
    send(gateway.port, files)
    orthanc.start()

    def done() -> int:
        return len(rows(gateway.db_url, "SELECT id FROM forward_jobs WHERE state IN "
                        "('forwarded', 'confirmed')"))

    wait_for(lambda: done() >= 10, 60, "forwarding under way")
    workers = descendants(gateway.process.pid)
    assert len(workers) >= 2  # the forward process and the rewriting pool
    gateway.stop(signal.SIGKILL)
    assert done() < 150, "the kill came too late to test anything"
    in_flight = {r.sop_instance_uid for r in rows(
        gateway.db_url, "SELECT i.sop_instance_uid FROM forward_jobs j JOIN instances i "
        "ON i.id = j.instance_id WHERE j.state = 'sending'")}
    assert len(in_flight) <= 1  # one sender, batches of one
    wait_for(lambda: not any(running(p) for p in workers), 10, "no worker outlives the gateway")

    again = served(forward=forward, remap=remap)
    wait_for(lambda: len(jobs(again.db_url, "confirmed")) == 150, 120, "all confirmed after restart")
    sent = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    assert orthanc.sop_instance_uids() == sent
    copies = Counter(sop for _, _, sop in recording.copies())
    assert set(copies) == sent
    twice = {sop for sop, n in copies.items() if n > 1}
    assert twice <= in_flight and max(copies.values()) <= 2, (twice, in_flight)
    ledger = jobs(again.db_url)
    assert len(ledger) == 150 and all(j.state == "confirmed" for j in ledger)
    assert again.stop() == 0


def storescp_profile(path: Path, sop_class_keyword: str) -> Path:
    """A DCMTK association profile accepting one storage SOP class (and C-ECHO), uncompressed."""
    path.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
        "TransferSyntax2 = OppositeEndianExplicit\nTransferSyntax3 = LittleEndianImplicit\n"
        "[[PresentationContexts]]\n[Only]\n"
        f"PresentationContext1 = {sop_class_keyword}\\Uncompressed\n"
        "PresentationContext2 = VerificationSOPClass\\Uncompressed\n"
        "[[Profiles]]\n[Default]\nPresentationContexts = Only\n",
        encoding="utf-8",
    )
    return path


def start_storescp(folder: Path, *options: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [require_tool("storescp"), "-aet", "PACS", "-od", str(folder), *options, str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: port_open(port), 10, "storescp to listen")
    return process, port


def dimse_destination(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"type": "dimse", "name": name, "ae_title": "PACS", "host": "127.0.0.1", "port": port,
            "verify": "none", **extra}


def test_refused_sop_class_is_dead_lettered_and_blocks_nothing(
    make_gateway: Callable[..., Gateway], tmp_path: Path,
) -> None:
    profile = storescp_profile(tmp_path / "mr-only.cfg", "MRImageStorage")
    process, port = start_storescp(tmp_path / "pacs", "-xf", str(profile), "Default")
    try:
        app = make_gateway(forward={**FAST, "destinations": [dimse_destination("pacs", port)]})
        ct = write_study(tmp_path / "ct", 3)
        mr = write_study(tmp_path / "mr", 4, SOPClassUID=MR_IMAGE_STORAGE, Modality="MR")
        send(app.config.dicom.port, ct + mr)
        db = app.config.database.url
        wait_for(lambda: len(jobs(db, "confirmed")) == 4 and len(jobs(db, "dead")) == 3, 30,
                 "MR confirmed, CT dead-lettered")
        for job in jobs(db, "dead"):
            assert "SOP class 1.2.840.10008.5.1.4.1.1.2" in job.last_error
            assert job.attempts == 1  # refused once: not retried
        assert len(list((tmp_path / "pacs").iterdir())) == 4

        result = subprocess.run([str(GATEWAY_BIN), "queue", "--config", str(_config_file(app, tmp_path))],
                                check=False, capture_output=True, text=True, timeout=60)
        row = result.stdout.splitlines()[1].split()
        assert row[0] == "pacs" and row[5] == "4" and row[6] == "3", result.stdout
    finally:
        process.terminate()
        process.wait(10)


def _config_file(app: Gateway, tmp_path: Path) -> Path:
    from tests.conftest import write_toml

    return write_toml(tmp_path / "cli.toml", {"database": {"url": app.config.database.url},
                                              "storage": {"spool_dir": str(app.spool.root)},
                                              "forward": {"destinations": [
                                                  d.model_dump(mode="json")
                                                  for d in app.config.forward.destinations]}})


def jpeg_file(path: Path) -> Path:
    """A JPEG baseline RGB image, compressed with Pillow, as a modality might send one."""
    image = Image.new("RGB", (64, 48))
    image.putdata([(x * 4, y * 5, (x + y) % 256) for y in range(48) for x in range(64)])
    buffer = pydicom.filebase.DicomBytesIO()
    image.save(cast(IO[bytes], buffer), format="JPEG", quality=90)
    ds = make_dataset(rows=48, columns=64, SOPClassUID="1.2.840.10008.5.1.4.1.1.7",
                      Modality="OT")
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    return write_file(ds, path, JPEGBaseline8Bit)


def test_jpeg_to_a_peer_that_takes_only_uncompressed_is_transcoded(
    make_gateway: Callable[..., Gateway], tmp_path: Path,
) -> None:
    process, port = start_storescp(tmp_path / "pacs")  # storescp's default: uncompressed only
    try:
        app = make_gateway(forward={**FAST, "destinations": [dimse_destination("pacs", port)]})
        original = jpeg_file(tmp_path / "jpeg.dcm")
        result = dcmtk("dcmsend", "-aet", "US_ROOM", "-aec", "GATEWAY", "127.0.0.1",
                       str(app.config.dicom.port), str(original))  # proposes the file's own syntax
        assert result.returncode == 0, result.stderr
        db = app.config.database.url
        wait_for(lambda: len(jobs(db, "confirmed")) == 1, 30, "transcoded and confirmed")
        stored = rows(db, "SELECT transfer_syntax_uid FROM instances")[0]
        assert stored.transfer_syntax_uid == JPEGBaseline8Bit  # kept as received in the spool
        (arrived,) = (tmp_path / "pacs").iterdir()
        received = pydicom.dcmread(arrived)
        assert not received.file_meta.TransferSyntaxUID.is_compressed
        expected = pydicom.dcmread(original)
        expected.decompress()
        assert received.pixel_array.tobytes() == expected.pixel_array.tobytes()
    finally:
        process.terminate()
        process.wait(10)


def test_dicomweb_and_dimse_find_destinations_confirm_by_asking(
    make_gateway: Callable[..., Gateway], recording_orthanc: Callable[..., Recording],
    tmp_path: Path,
) -> None:
    """Each destination loses one instance after it answered "stored" and before it is asked:
    QIDO-RS and C-FIND find it missing and it is sent again. A destination that trusted the
    STOW-RS answer or the C-STORE status would never hold it."""
    web_recording = recording_orthanc(dicomweb=True)
    archive = recording_orthanc()
    web, dimse = web_recording.orthanc, archive.orthanc
    secret = tmp_path / "web-password"
    secret.write_text(web.password, encoding="utf-8")
    app = make_gateway(forward={**FAST, "stable_after_s": 3.0, "destinations": [
        {"type": "dicomweb", "name": "web", "url": web.url + "/dicom-web", "username": web.username,
         "password_file": str(secret), "instances_per_request": 4},
        {"type": "dimse", "name": "archive", "ae_title": dimse.aet, "host": "127.0.0.1",
         "port": dimse.dicom_port, "verify": "find"},
    ]})
    files = write_study(tmp_path / "study", 9)
    send(app.config.dicom.port, files)
    db = app.config.database.url
    sent = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    wait_for(lambda: len(jobs(db, "forwarded")) == 18, 10, "STOW-RS and C-STORE done")
    # Lost at each destination before the study is stable: verification finds them missing.
    lost_web, lost_dimse = min(sent), max(sent)
    web.delete(f"/instances/{web.instance_id(lost_web)}")
    dimse.delete(f"/instances/{dimse.instance_id(lost_dimse)}")
    assert len(jobs(db, "confirmed")) == 0, "verified before the loss: nothing tested"

    wait_for(lambda: len(jobs(db, "confirmed")) == 18, 30, "9 confirmed at each destination")
    assert web.sop_instance_uids() == sent
    assert dimse.sop_instance_uids() == sent
    for name, recording, lost in (("web", web_recording, lost_web),
                                  ("archive", archive, lost_dimse)):
        requeued = app.metrics.registry.get_sample_value(
            "gateway_forward_requeued_missing_total", {"destination": name})
        assert requeued == 1, name
        copies = Counter(sop for _, _, sop in recording.copies())
        assert copies == {sop: 2 if sop == lost else 1 for sop in sent}, name


def test_routes_send_each_modality_where_it_belongs(
    make_gateway: Callable[..., Gateway], tmp_path: Path,
) -> None:
    ct_process, ct_port = start_storescp(tmp_path / "ct-pacs")
    mr_process, mr_port = start_storescp(tmp_path / "mr-pacs")
    try:
        app = make_gateway(forward={**FAST, "destinations": [
            dimse_destination("ct_pacs", ct_port), dimse_destination("mr_pacs", mr_port)],
            "routes": [{"name": "mr", "match": {"modality": ["MR"]}, "destinations": ["mr_pacs"]}],
            "default_destinations": ["ct_pacs"]})
        send(app.config.dicom.port, write_study(tmp_path / "ct", 2)
             + write_study(tmp_path / "mr", 3, SOPClassUID=MR_IMAGE_STORAGE, Modality="MR"))
        db = app.config.database.url
        wait_for(lambda: len(jobs(db, "confirmed")) == 5, 30, "all confirmed")
        assert len(list((tmp_path / "ct-pacs").iterdir())) == 2
        assert len(list((tmp_path / "mr-pacs").iterdir())) == 3
    finally:
        for process in (ct_process, mr_process):
            process.terminate()
            process.wait(10)


def test_retention_removes_only_files_confirmed_everywhere(
    make_gateway: Callable[..., Gateway], tmp_path: Path,
) -> None:
    profile = storescp_profile(tmp_path / "mr-only.cfg", "MRImageStorage")
    process, port = start_storescp(tmp_path / "pacs", "-xf", str(profile), "Default")
    try:
        app = make_gateway(
            forward={**FAST, "destinations": [dimse_destination("pacs", port)]},
            retention={"keep_days": 0, "check_interval_s": 0.2},
        )
        send(app.config.dicom.port, write_study(tmp_path / "ct", 2)
             + write_study(tmp_path / "mr", 3, SOPClassUID=MR_IMAGE_STORAGE, Modality="MR"))
        db = app.config.database.url
        # the row is marked before the file goes (retention.py): wait for both
        wait_for(lambda: len(removed := rows(
            db, "SELECT spool_path FROM instances WHERE spool_removed_at IS NOT NULL")) == 3
            and not any((app.spool.root / r.spool_path).exists() for r in removed),
            30, "the confirmed MR files removed")
        kept = rows(db, "SELECT spool_path, modality, spool_removed_at FROM instances")
        for instance in kept:
            present = (app.spool.root / instance.spool_path).exists()
            assert present == (instance.modality == "CT")  # dead letters are never removed
            assert (instance.spool_removed_at is None) == present
    finally:
        process.terminate()
        process.wait(10)


def test_held_study_leaves_only_when_released_and_arrives_remapped(
    served: Callable[..., Served], orthanc_factory: Callable[..., Orthanc], tmp_path: Path,
) -> None:
    from tests.test_remap import IDENTITIES, ORDERS, RULES, cli

    orthanc = orthanc_factory()
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES, encoding="utf-8")
    gateway = served(remap={"rules_file": str(rules)},
                     forward={**FAST, "destinations": [orthanc_destination(orthanc, tmp_path)]})
    for kind, text in (("identities", IDENTITIES), ("orders", ORDERS)):
        (tmp_path / f"{kind}.csv").write_text(text, encoding="utf-8")
        assert cli(gateway.config_path, kind, "import", str(tmp_path / f"{kind}.csv")).returncode == 0
    files = write_study(tmp_path / "study", 2, PatientID="DEV-77", AccessionNumber=None,
                        StudyTime="100000")  # two orders fit: held
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    send(gateway.port, files, calling_ae="CT1")
    wait_for(lambda: len(rows(gateway.db_url, "SELECT id FROM instances WHERE remap_state = 'held'"))
             == 2, 30, "held")
    queue = subprocess.run([str(GATEWAY_BIN), "queue", "--config", str(gateway.config_path)],
                           check=False, capture_output=True, text=True, timeout=60).stdout
    assert queue.splitlines()[1].split()[2] == "2", queue  # shown as held, not as sendable
    # Sender rounds ran meanwhile: a study that no rule holds, sent after, leaves and is confirmed.
    send(gateway.port, write_study(tmp_path / "unheld", 1), calling_ae="CT2")
    wait_for(lambda: len(jobs(gateway.db_url, "confirmed")) == 1, 30, "an unheld study confirmed")
    held = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    assert not held & orthanc.sop_instance_uids()

    assert cli(gateway.config_path, "reconcile", "assign", study, "ACC-B").returncode == 0
    wait_for(lambda: len(jobs(gateway.db_url, "confirmed")) == 3, 30, "released and confirmed")
    assert held <= orthanc.sop_instance_uids()
    for uid in held:
        arrived = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(uid)))
        assert (arrived.PatientID, arrived.AccessionNumber) == ("MRN0077", "ACC-B")
    assert gateway.stop() == 0


def test_bad_destination_config_names_key_and_fix(tmp_path: Path) -> None:
    from tests.conftest import config_dict, write_toml

    data = config_dict(tmp_path, f"sqlite:///{tmp_path / 'g.db'}", 11112)
    data["forward"] = {"destinations": [{"type": "orthanc", "name": "main", "url": "ftp://x"}],
                       "routes": [{"name": "r", "destinations": ["nowhere"]}]}
    path = write_toml(tmp_path / "bad.toml", data)
    result = subprocess.run([str(GATEWAY_BIN), "check-config", "--config", str(path)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "forward.destinations.0.orthanc.url = 'ftp://x'" in result.stderr

    data["forward"]["destinations"][0]["url"] = "http://127.0.0.1:8042"
    result = subprocess.run([str(GATEWAY_BIN), "check-config", "--config",
                             str(write_toml(path, data))], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "route r names destination 'nowhere', which is not defined" in result.stderr


def test_low_disk_removes_confirmed_files_early_and_never_unconfirmed_ones(
    make_gateway: Callable[..., Gateway], tmp_path: Path,
) -> None:
    profile = storescp_profile(tmp_path / "mr-only.cfg", "MRImageStorage")
    process, port = start_storescp(tmp_path / "pacs", "-xf", str(profile), "Default")
    try:
        mib = 1024 * 1024
        app = make_gateway(
            free_bytes=lambda path: 5 * mib,  # always under the 10 MiB watermark
            forward={**FAST, "destinations": [dimse_destination("pacs", port)]},
            retention={"keep_days": 365, "cleanup_below_free_mb": 10, "check_interval_s": 0.2},
        )
        send(app.config.dicom.port, write_study(tmp_path / "ct", 2)
             + write_study(tmp_path / "mr", 3, SOPClassUID=MR_IMAGE_STORAGE, Modality="MR"))
        db = app.config.database.url
        wait_for(lambda: len(rows(db, "SELECT id FROM instances WHERE spool_removed_at IS NOT NULL"))
                 == 3, 30, "confirmed files removed early, though young")
        # A later retention round under pressure: one more confirmed file goes, no CT file does.
        send(app.config.dicom.port, write_study(tmp_path / "mr2", 1, SOPClassUID=MR_IMAGE_STORAGE,
                                                Modality="MR"))
        wait_for(lambda: len(rows(db, "SELECT id FROM instances WHERE spool_removed_at IS NOT NULL"))
                 == 4, 30, "a later round removed the next confirmed file")
        for instance in rows(db, "SELECT spool_path, modality FROM instances"):
            assert (app.spool.root / instance.spool_path).exists() == (instance.modality == "CT")
    finally:
        process.terminate()
        process.wait(10)


def test_forwarding_stands_aside_while_the_receiver_is_saturated_never_longer_than_the_hold(
    make_gateway: Callable[..., Gateway], orthanc_factory: Callable[..., Orthanc],
    db_url: str, tmp_path: Path,
) -> None:
    """During a burst the modality gets the machine; the archive's copy waits, at most
    ``burst_hold_s`` after arrival. Out of a burst, instances leave at once. The saturation is
    simulated (the C-STORE handlers' busy seconds, 80% of wall time): a real one depends on the
    machine, and everything else here is real. The times compared are the ledger's (arrival and
    forwarding), so a slow test process cannot make a hold look longer or shorter; a burst the
    machine paused (``steady`` false) is tried again. How long ``wait`` holds to the millisecond
    is tests/test_busy.py's business."""
    hold_s = 4.0
    orthanc = orthanc_factory()
    app = make_gateway(db=db_url, forward={
        **FAST, "burst_hold_s": hold_s, "destinations": [orthanc_destination(orthanc, tmp_path)]})
    port = app.config.dicom.port
    # The forward process is up and reading the receiver (its hold needs two whole windows of
    # samples before it can call anything a burst): one study forwarded before the burst.
    warm_up = write_study(tmp_path / "warm-up", 1)
    send(port, warm_up)
    study = str(pydicom.dcmread(warm_up[0]).StudyInstanceUID)
    wait_for(lambda: {j.state for j in _jobs_of(db_url, study)} == {"confirmed"}, 30,
             "a first study confirmed")
    for attempt in range(3):
        with saturated(app.load) as burst:
            files = write_study(tmp_path / f"burst-{attempt}", 3)
            send(port, files)
            uids = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
            study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
            # "confirmed" too: a sender that did not hold would otherwise make this wait time
            # out instead of failing the assertion below, which says what went wrong.
            def states(s: str = study) -> set[str]:
                return {j.state for j in _jobs_of(db_url, s)}

            wait_for(lambda: any(state in ("sending", "confirmed") for state in states()), 30,
                     "the sender to take the first instance in hand")
            assert not uids & orthanc.sop_instance_uids(), "forwarded while saturated"
            wait_for(lambda: states() == {"confirmed"},
                     hold_s + 30, "held instances confirmed, the receiver still saturated")
        if burst.steady:
            break
    else:
        pytest.fail("the machine paused the simulated burst in each of 3 attempts")
    # A batch waits until its oldest instance has waited the hold; so none leaves before the
    # first instance of the burst has.
    burst_jobs = _jobs_of(db_url, study)
    first = min(_aware(j.created_at) for j in burst_jobs)
    left = [(_aware(j.forwarded_at) - first).total_seconds() for j in burst_jobs]
    assert min(left) >= hold_s, f"left before the hold ran out: {left}"
    held = [waited(j) for j in burst_jobs]
    assert max(held) < hold_s + 10, held

    quiet = write_study(tmp_path / "quiet", 2)
    send(port, quiet)
    uids = {str(pydicom.dcmread(f).SOPInstanceUID) for f in quiet}
    study = str(pydicom.dcmread(quiet[0]).StudyInstanceUID)
    wait_for(lambda: {j.state for j in _jobs_of(db_url, study)} == {"confirmed"}, 30,
             "later instances confirmed")
    later = [waited(j) for j in _jobs_of(db_url, study)]
    assert len(later) == 2 and all(s < hold_s for s in later), f"held with no burst: {later}"
    assert uids <= orthanc.sop_instance_uids()


# --- UIDs are identity: what arrives is exactly what was received ----------------------------

NON_ASCII_NAME = "Müller^Zoë"
# pydicom's bundled images, one per compressed transfer syntax beside the JPEG made here
BUNDLED = {JPEGLSLossless: "MR_small_jpeg_ls_lossless.dcm",
           JPEG2000Lossless: "MR_small_jp2klossless.dcm", RLELossless: "MR_small_RLE.dcm"}


def relabelled(source: Path, target: Path, study: str) -> Path:
    """``source`` as a new instance of ``study`` (its own series), pixels untouched, with a
    non-ASCII patient name in UTF-8."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on its odd test files
        ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet, ds.PatientName, ds.PatientID = "ISO_IR 192", NON_ASCII_NAME, "TEST-UIDS"
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def mixed_study(folder: Path) -> list[Path]:
    """One study: JPEG baseline, JPEG-LS, JPEG 2000 and RLE images, and two uncompressed ones."""
    study = generate_uid()
    sources = [jpeg_file(folder / "source" / "jpeg.dcm")]
    sources += [Path(DATA_ROOT) / "test_files" / name for name in BUNDLED.values()]
    files = [relabelled(source, folder / f"encoded{i}.dcm", study) for i, source in enumerate(sources)]
    for i in range(2):
        ds = make_dataset(StudyInstanceUID=study, InstanceNumber=i + 1, PatientName=NON_ASCII_NAME,
                          SpecificCharacterSet="ISO_IR 192")
        files.append(write_file(ds, folder / f"plain{i}.dcm", ExplicitVRLittleEndian))
    return files


def identity(ds: pydicom.Dataset) -> Uids:
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


@pytest.fixture
def storescp_factory(tmp_path: Path) -> Iterator[Callable[[], tuple[Path, int]]]:
    """DCMTK ``storescp`` with its defaults (uncompressed only) and unique file names, so that
    every copy it is given stays a file of its own: ``(folder, port)``."""
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[Path, int]:
        folder = tmp_path / f"storescp-{len(processes)}"
        process, port = start_storescp(folder, "+uf")
        processes.append(process)
        return folder, port

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("kind", ["orthanc", "dicomweb", "dimse-compressed",
                                  "dimse-uncompressed-find", "dimse-storescp"])
def test_the_uids_that_arrive_are_exactly_the_uids_received(
    kind: str, make_gateway: Callable[..., Gateway], recording_orthanc: Callable[..., Recording],
    storescp_factory: Callable[[], tuple[Path, int]], tmp_path: Path,
) -> None:
    """Each destination type, compressed and uncompressed inputs: every copy that arrives carries
    a (Study, Series, SOP Instance UID) that was received, each arrives once, and once confirmed
    the destination holds exactly what was sent (no re-send loop after it is confirmed). A peer
    that takes only uncompressed data gets the pixels decoded, under the same UIDs; before the
    fix it got a new SOP Instance UID per send, which C-FIND never found: sent again forever."""
    recording: Recording | None = None
    if kind == "dimse-storescp":
        folder, port = storescp_factory()
        destination = dimse_destination("dest", port)  # storescp answers no C-FIND
    else:
        recording = recording_orthanc(dicomweb=kind == "dicomweb",
                                      uncompressed_only=kind == "dimse-uncompressed-find")
        orthanc = recording.orthanc
        if kind == "orthanc":
            destination = orthanc_destination(orthanc, tmp_path) | {"name": "dest"}
        elif kind == "dicomweb":
            secret = tmp_path / "web-password"
            secret.write_text(orthanc.password, encoding="utf-8")
            destination = {"type": "dicomweb", "name": "dest", "url": orthanc.url + "/dicom-web",
                           "username": orthanc.username, "password_file": str(secret)}
        else:
            destination = {"type": "dimse", "name": "dest", "ae_title": orthanc.aet,
                           "host": "127.0.0.1", "port": orthanc.dicom_port, "verify": "find"}
    app = make_gateway(forward={**FAST, "destinations": [destination]})
    files = mixed_study(tmp_path / "in")
    originals = {identity(ds): ds for ds in map(pydicom.dcmread, files)}
    result = dcmtk("dcmsend", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1",
                   str(app.config.dicom.port), *map(str, files))  # each file's own syntax
    assert result.returncode == 0, result.stderr
    db = app.config.database.url
    kept = {r.transfer_syntax_uid for r in rows(db, "SELECT transfer_syntax_uid FROM instances")}
    assert {JPEGBaseline8Bit, *BUNDLED} <= kept  # received as compressed as they were sent

    wait_for(lambda: len(jobs(db, "confirmed")) == len(files), 30, "every instance confirmed")
    time.sleep(1.0)  # five more verification rounds: nothing may be sent after confirmation

    def arrived() -> list[Uids]:
        if recording is not None:
            return recording.copies()
        return [identity(pydicom.dcmread(f)) for f in sorted(folder.iterdir())]

    assert Counter(arrived()) == Counter(originals.keys())  # exactly these, each once
    assert jobs(db, "dead") == []
    if recording is not None:
        assert recording.orthanc.instance_count() == len(files)
    if kind in ("orthanc", "dicomweb", "dimse-compressed"):  # kept as received, not decoded
        assert recording is not None
        for uid, original in originals.items():
            data = recording.orthanc.instance_file(uid[2])
            held = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), stop_before_pixels=True)
            assert held.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID, uid
    else:  # decoded on the way
        for uid, original in originals.items():
            if recording is not None:
                data = recording.orthanc.instance_file(uid[2])
                received = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
            else:
                (path,) = [f for f in folder.iterdir() if identity(pydicom.dcmread(f)) == uid]
                received = pydicom.dcmread(path)
            assert not received.file_meta.TransferSyntaxUID.is_compressed
            assert received.PatientName == NON_ASCII_NAME
            assert numpy.array_equal(received.pixel_array, original.pixel_array), uid


def test_a_destination_that_never_holds_what_it_stores_gets_each_instance_n_times_then_gives_up(
    served: Callable[..., Served], recording_orthanc: Callable[..., Recording], db_url: str,
    tmp_path: Path,
) -> None:
    """Orthanc deleting each instance once stored stands for any destination that keeps lacking
    what it said it stored (one that changes UIDs): after ``max_verify_misses`` verifications
    the instance is a dead letter with the reason, counted and logged by UID, and nothing more
    is sent; ``queue retry --dead`` starts the count again."""
    recording = recording_orthanc(drops=True)
    forward = {**FAST, "max_verify_misses": 3,
               "destinations": [orthanc_destination(recording.orthanc, tmp_path)]}
    gateway = served(db=db_url, forward=forward)
    files = write_study(tmp_path / "study", 2, PatientName=CANARY_NAME, PatientID=CANARY_ID)
    sent = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    send(gateway.port, files)

    wait_for(lambda: len(jobs(db_url, "dead")) == 2, 60, "both given up")
    time.sleep(1.5)  # more verification rounds: the loop has stopped
    assert Counter(sop for _, _, sop in recording.copies()) == {sop: 3 for sop in sent}
    for job in jobs(db_url):
        assert (job.state, job.verify_misses) == ("dead", 3)
        assert job.last_error == ("not found at orthanc after 3 verifications; check the "
                                  "destination (it may change UIDs)")
    label = '{destination="orthanc"}'
    assert metric(gateway.metrics_port, f"gateway_forward_verify_gave_up_total{label}") == 2
    assert metric(gateway.metrics_port, f"gateway_forward_dead_total{label}") == 2
    assert metric(gateway.metrics_port, f"gateway_forward_requeued_missing_total{label}") == 4
    log = gateway.log()
    for sop in sent:
        assert any("WARNING" in line and "orthanc" in line and sop in line
                   for line in log.splitlines()), sop
    assert CANARY_NAME.split("^")[0] not in log and CANARY_ID not in log

    result = subprocess.run([str(GATEWAY_BIN), "queue", "retry", "--dead", "--config",
                             str(gateway.config_path)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: len(jobs(db_url, "dead")) == 2, 60, "given up again")
    # three more sends each: the count started from zero (kept, it would stop after one)
    assert Counter(sop for _, _, sop in recording.copies()) == {sop: 6 for sop in sent}
    assert all(job.verify_misses == 3 for job in jobs(db_url))
    assert gateway.stop() == 0


def _aware(value: datetime | str) -> datetime:
    """A timestamp column, aware (SQLite gives naive UTC text back)."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _jobs_of(db: str, study: str) -> list[Any]:
    return rows(db, "SELECT * FROM forward_jobs WHERE study_instance_uid = :s ORDER BY id", s=study)


def test_a_dimse_destination_with_nagle_on_is_not_paced_by_delayed_acks(
    make_gateway: Callable[..., Gateway], tmp_path: Path,
) -> None:
    """DCMTK's storescp leaves Nagle on: it writes each C-STORE-RSP in pieces and holds the last
    until our ACK of the first, which Linux delays by 40 ms unless TCP_QUICKACK is re-armed
    before every read (``fastpath.QuickAckSocket``). 40 small instances on one association took
    1.6-1.8 s from storescp's first file to its last before."""
    process, port = start_storescp(tmp_path / "pacs")  # no TCP_NODELAY in its environment
    try:
        destination = dimse_destination("pacs", port, batch_size=50)
        app = make_gateway(forward={**FAST, "destinations": [destination]})
        files = write_study(tmp_path / "small", 40, Rows=8, Columns=8)
        send(app.config.dicom.port, files)
        db = app.config.database.url
        wait_for(lambda: len(jobs(db, "confirmed")) == 40, 60, "40 instances sent")
        # From the first file storescp wrote to the last: 40 C-STOREs on one association, at
        # least 40 x 40 ms when each answer waits for a delayed ACK
        written = sorted(f.stat().st_mtime for f in (tmp_path / "pacs").iterdir())
        assert written[-1] - written[0] < 0.8
        kept = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                for f in (tmp_path / "pacs").iterdir()}
        assert kept == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                        for f in files}
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("adopted", [True, False], ids=["requesting", "pynetdicom"])
def test_an_answer_the_reactor_takes_is_given_back_to_the_waiting_sender(
        tmp_path: Path, adopted: bool) -> None:
    """pynetdicom's reactor can miss its pause and take a C-STORE-RSP off the queue while
    ``send_c_store`` waits for it (``fastpath.RequestingAssociation``): what the reactor then
    does with it decides between an answer and a 60 s DIMSE timeout that aborts the association.
    Played here as the race leaves it: the reactor serving the response."""
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from gateway.receive.fastpath import RequestingAssociation

    process, port = start_storescp(tmp_path / "pacs")
    ae = AE("GATEWAY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
    try:
        assert assoc.is_established
        if adopted:
            RequestingAssociation.adopt(assoc)
        assoc._reactor_checkpoint.clear()  # the live reactor held, as send_c_*() holds it
        while not assoc._is_paused:
            time.sleep(0.001)
        answers = []
        for message_id in (1, 2):
            answer = C_STORE()
            answer.MessageIDBeingRespondedTo, answer.Status = message_id, 0x0000
            answer.AffectedSOPClassUID = CTImageStorage
            assert answer.is_valid_response
            answers.append(answer)
        assoc.dimse.msg_queue.put((1, answers[1]))  # an answer queued behind the one taken
        assoc._serve_request(answers[0], 1)
        queued = [assoc.dimse.msg_queue.get_nowait()[1]
                  for _ in range(assoc.dimse.msg_queue.qsize())]
        # Given back where it was, ahead of the later one (a C-FIND's answers stay in order);
        # pynetdicom's own drops it: "Received unexpected C-STORE service message"
        assert queued == (answers if adopted else answers[1:])
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()
        process.terminate()
        process.wait(10)
