"""``gateway serve`` driven by DCMTK, as real modalities would: statuses, files, rows, rejections."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from tests.conftest import GATEWAY_BIN, Served, rows, wait_for
from tests.factory import write_study
from tests.peers import dcmtk, require_tool, spool_files

AS_RECEIVED = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",  # deflated
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "JPEG-lossy.dcm",  # JPEG extended
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
]


def test_echoscu_is_answered(served: Callable[..., Served]) -> None:
    gateway = served()
    result = dcmtk("echoscu", "-aet", "MONITOR", "-aec", "GATEWAY", "127.0.0.1", str(gateway.port))
    assert result.returncode == 0, result.stderr
    assert gateway.stop() == 0


def test_storescu_study_is_stored_recorded_and_counted(
    served: Callable[..., Served], tmp_path: Path
) -> None:
    gateway = served()
    files = write_study(tmp_path / "study", 12)
    result = dcmtk("storescu", "-aet", "CT_ROOM1", "-aec", "GATEWAY", "127.0.0.1",
                   str(gateway.port), *map(str, files))
    assert result.returncode == 0, result.stderr

    stored = spool_files(gateway.spool)
    assert len(stored) == 12
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    for path in stored:
        ds = pydicom.dcmread(path)
        assert ds.PixelData == sent[ds.SOPInstanceUID].PixelData
        assert ds.file_meta.SourceApplicationEntityTitle == "CT_ROOM1"
    assert {r.sop_instance_uid for r in rows(gateway.db_url, "SELECT * FROM instances")} == set(sent)

    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics") as response:
        metrics = response.read().decode()
    assert 'gateway_instances_received_total{calling_ae="CT_ROOM1",status="0x0000"} 12.0' in metrics
    assert "gateway_store_seconds_count 12.0" in metrics
    assert "gateway_spool_free_bytes" in metrics
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/healthz") as response:
        assert json.loads(response.read())["status"] == "ok"

    assert gateway.stop() == 0
    [assoc] = rows(gateway.db_url, "SELECT * FROM associations")
    assert (assoc.calling_ae, assoc.called_ae, assoc.result, assoc.end_state) == (
        "CT_ROOM1", "GATEWAY", "accepted", "released")
    assert assoc.instances == 12
    assert assoc.bytes == sum(p.stat().st_size for p in stored)
    assert json.loads(assoc.statuses) == {"0x0000": 12}
    assert assoc.peer_host == "127.0.0.1"

    status = subprocess.run(
        [str(GATEWAY_BIN), "status", "--config", str(gateway.config_path)],
        capture_output=True, text=True, timeout=60, check=False
    )
    assert status.returncode == 0, status.stderr
    assert "CT_ROOM1" in status.stdout and "12 instances" in status.stdout
    assert "accepted/released" in status.stdout


@pytest.mark.parametrize("name", AS_RECEIVED)
def test_each_transfer_syntax_is_stored_as_received(
    served: Callable[..., Served], name: str
) -> None:
    """dcmsend proposes each file's own transfer syntax; the gateway keeps it, no transcoding."""
    gateway = served()
    path = get_testdata_file(name)
    assert isinstance(path, str)
    source = Path(path)
    result = dcmtk("dcmsend", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1",
                   str(gateway.port), str(source))
    assert result.returncode == 0, result.stderr + result.stdout
    [stored] = spool_files(gateway.spool)
    original, kept = pydicom.dcmread(source), pydicom.dcmread(stored)
    if original.file_meta.TransferSyntaxUID in (ImplicitVRLittleEndian, ExplicitVRBigEndian):
        # dcmsend also offers explicit VR little endian for these, which the gateway prefers
        assert kept.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert (kept.pixel_array == original.pixel_array).all()
    else:
        assert kept.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert kept.PixelData == original.PixelData  # encapsulated fragments: not re-encoded
    assert kept.SOPInstanceUID == original.SOPInstanceUID
    assert kept.PatientName == original.PatientName


def _rejected(result: subprocess.CompletedProcess[str], reason: str) -> bool:
    return result.returncode != 0 and reason in (result.stderr + result.stdout)


def test_unknown_caller_is_rejected_when_the_allow_list_is_closed(
    served: Callable[..., Served]
) -> None:
    gateway = served(security={"unknown_callers": [], "peers": [
        {"ae_title": "CT_ROOM1", "services": ["echo", "store"]},
        {"ae_title": "FAR_AWAY", "host": "10.9.9.9", "services": ["echo"]},
    ]})
    port = str(gateway.port)
    assert dcmtk("echoscu", "-aet", "CT_ROOM1", "-aec", "GATEWAY", "127.0.0.1", port
                 ).returncode == 0
    stranger = dcmtk("echoscu", "-aet", "STRANGER", "-aec", "GATEWAY", "127.0.0.1", port)
    assert _rejected(stranger, "Calling AE Title Not Recognized"), stranger.stderr
    wrong_host = dcmtk("echoscu", "-aet", "FAR_AWAY", "-aec", "GATEWAY", "127.0.0.1", port)
    assert _rejected(wrong_host, "Calling AE Title Not Recognized"), wrong_host.stderr
    gateway.stop()
    ledger = rows(gateway.db_url, "SELECT calling_ae, result, reason FROM associations ORDER BY id")
    assert [tuple(r) for r in ledger] == [
        ("CT_ROOM1", "accepted", None),
        ("STRANGER", "rejected", "calling_ae_not_recognized"),
        ("FAR_AWAY", "rejected", "calling_ae_not_recognized"),
    ]


def test_wrong_called_ae_is_rejected(served: Callable[..., Served]) -> None:
    gateway = served()
    result = dcmtk("echoscu", "-aet", "CT_ROOM1", "-aec", "NOT_US", "127.0.0.1", str(gateway.port))
    assert _rejected(result, "Called AE Title Not Recognized"), result.stderr


def test_associations_beyond_the_maximum_are_rejected_transiently(
    served: Callable[..., Served]
) -> None:
    gateway = served(dicom={"max_associations": 1})
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate("127.0.0.1", gateway.port, ae_title="GATEWAY")
    assert held.is_established
    try:
        result = dcmtk("echoscu", "-aet", "SECOND", "-aec", "GATEWAY", "127.0.0.1",
                       str(gateway.port))
        assert _rejected(result, "Local Limit Exceeded"), result.stderr
    finally:
        held.release()
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics") as response:
        metrics = response.read().decode()
    assert 'gateway_associations_total{reason="local_limit_exceeded",result="rejected"} 1.0' in metrics


class PausableRelay:
    """A loopback TCP relay between one sender and the gateway whose sender-to-gateway direction
    can be paused: the association stays established, mid-transfer, for as long as a test needs
    (a network that stalls; the bytes are passed on unchanged)."""

    def __init__(self, port: int) -> None:
        self._upstream_port = port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._flowing = threading.Event()
        self._flowing.set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def _run(self) -> None:
        with self._server:
            client, _ = self._server.accept()
        upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
        with client, upstream:

            def answers() -> None:
                while data := upstream.recv(65536):
                    client.sendall(data)
                client.shutdown(socket.SHUT_WR)

            answering = threading.Thread(target=answers, daemon=True)
            answering.start()
            while True:
                self._flowing.wait()
                data = client.recv(16384)
                if not data:
                    break
                self._flowing.wait()
                upstream.sendall(data)
            upstream.shutdown(socket.SHUT_WR)
            answering.join(30)

    def close(self) -> None:
        self.resume()
        self._thread.join(30)


def _when(value: datetime | str) -> datetime:
    """A timestamp column, aware (SQLite gives naive UTC text back)."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def test_sigterm_lets_the_sending_association_finish_then_exits_0(
    served: Callable[..., Served], tmp_path: Path
) -> None:
    """The signal lands while storescu's association is established and half sent: the relay
    holds the rest back until the gateway has logged the signal, then lets it through."""
    gateway = served(dicom={"shutdown_grace_s": 30.0})
    total = 40
    files = write_study(tmp_path / "study", total, Rows=128, Columns=128,
                        PixelData=b"\x01\x02" * 128 * 128)
    relay = PausableRelay(gateway.port)
    sender = subprocess.Popen(
        [require_tool("storescu"), "-aet", "CT_ROOM1", "-aec", "GATEWAY", "127.0.0.1",
         str(relay.port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stored = "SELECT id FROM instances"
    wait_for(lambda: rows(gateway.db_url, stored), 30, "the first instance to be recorded")
    relay.pause()
    signalled_at = datetime.now(UTC)
    gateway.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "received SIGTERM" in gateway.log(), 30, "the gateway to take the signal")
    at_signal = len(rows(gateway.db_url, stored))
    assert 1 <= at_signal < total, f"{at_signal} of {total} recorded when the signal landed"
    assert sender.poll() is None and gateway.process.poll() is None
    relay.resume()

    _, err = sender.communicate(timeout=60)
    relay.close()
    assert sender.returncode == 0, err
    assert gateway.process.wait(timeout=60) == 0
    assert len(spool_files(gateway.spool)) == total
    assert len(rows(gateway.db_url, stored)) == total
    [assoc] = rows(gateway.db_url, "SELECT * FROM associations")
    assert (assoc.instances, assoc.end_state) == (total, "released")
    assert _when(assoc.ended_at) > signalled_at
    log = gateway.log()
    ended = log.index(f"association {assoc.id} from CT_ROOM1 released: {total} stored")
    assert log.index("received SIGTERM") < ended < log.index("stopped")
    refused = dcmtk("echoscu", "-aet", "LATE", "127.0.0.1", str(gateway.port))
    assert refused.returncode != 0


def test_sigkill_after_storescu_returns_loses_nothing(
    served: Callable[..., Served], tmp_path: Path
) -> None:
    gateway = served()
    files = write_study(tmp_path / "study", 30)
    result = dcmtk("storescu", "-aet", "CT_ROOM1", "-aec", "GATEWAY", "127.0.0.1",
                   str(gateway.port), *map(str, files))
    assert result.returncode == 0, result.stderr
    gateway.process.kill()
    gateway.process.wait()

    restarted = served()
    sent = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    stored = spool_files(gateway.spool)
    assert {pydicom.dcmread(p).SOPInstanceUID for p in stored} == sent
    assert {r.sop_instance_uid for r in rows(gateway.db_url, "SELECT * FROM instances")} == sent
    assert not list(gateway.spool.rglob("*.tmp"))
    assert not list((gateway.spool / "incoming").iterdir())
    assert restarted.stop() == 0


def test_metrics_endpoint_answers_404_elsewhere(served: Callable[..., Served]) -> None:
    gateway = served()
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/nothing")
    assert error.value.code == 404
    error.value.close()


def test_parallel_senders_are_all_stored(served: Callable[..., Served], tmp_path: Path) -> None:
    gateway = served()
    studies = [write_study(tmp_path / f"s{i}", 10) for i in range(4)]
    results: list[int] = []

    def send(files: list[Path], aet: str) -> None:
        results.append(dcmtk("storescu", "-aet", aet, "-aec", "GATEWAY", "127.0.0.1",
                             str(gateway.port), *map(str, files)).returncode)

    threads = [threading.Thread(target=send, args=(s, f"CT{i}")) for i, s in enumerate(studies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0, 0, 0, 0]
    assert len(spool_files(gateway.spool)) == 40
    assert len(rows(gateway.db_url, "SELECT id FROM instances")) == 40


def test_associations_do_not_leak_file_descriptors(
    served: Callable[..., Served], tmp_path: Path
) -> None:
    gateway = served()
    fds = Path(f"/proc/{gateway.process.pid}/fd")
    assert dcmtk("echoscu", "-aec", "GATEWAY", "127.0.0.1", str(gateway.port)).returncode == 0
    before = len(list(fds.iterdir()))
    files = write_study(tmp_path / "study", 3)
    for _ in range(15):
        assert dcmtk("echoscu", "-aec", "GATEWAY", "127.0.0.1", str(gateway.port)).returncode == 0
        assert dcmtk("storescu", "-aec", "GATEWAY", "127.0.0.1", str(gateway.port),
                     *map(str, files)).returncode == 0
    wait_for(lambda: len(list(fds.iterdir())) <= before + 2, 10,
             f"descriptors back to {before} (now {len(list(fds.iterdir()))})")
