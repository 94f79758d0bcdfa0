"""Two nodes as ``gateway serve`` processes (own spools, one PostgreSQL database, different
``node_name`` and ports) behind HAProxy in TCP mode, as config/cluster/ deploys them; Orthanc as
the forward destination, a storescp as the C-MOVE destination (gateway.cluster, issue 20).

What a site sees: a study sent through the balancer lands half on each node and reaches Orthanc
once, confirmed; C-FIND on one node finds the other's instances; C-MOVE on A of a study held by
B delivers every instance, the bytes B kept; B killed (SIGKILL, every process) while receiving
keeps what it acknowledged, ``gateway status`` names those instances while it is down, and they
reach Orthanc once when it returns."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from gateway.app import Gateway
from gateway.web.auth import token_sha256
from tests.conftest import (
    GATEWAY_BIN,
    Served,
    descendants,
    free_port,
    port_open,
    rows,
    wait_for,
)
from tests.factory import make_dataset, write_file
from tests.orthanc import Orthanc
from tests.peers import dcmtk, require_tool
from tests.test_forward import FAST, orthanc_destination, start_storescp
from tests.test_retrieve import NAME, _after_meta, _final_move, _identifier

pytestmark = pytest.mark.postgres
SECRET = "a-cluster-secret-for-the-tests"
HAPROXY_CFG = Path(__file__).parents[1] / "config" / "cluster" / "haproxy.cfg"


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[list[int], list[int]], tuple[int, int]]]:
    """HAProxy (Debian's package) in front of the given DICOM and HTTP ports: TCP mode,
    round robin; returns its DICOM and HTTP ports (haproxy missing: skipped, failed under CI)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(dicom: list[int], http: list[int]) -> tuple[int, int]:
        binary = require_tool("haproxy")
        front_dicom, front_http = free_port(), free_port()
        lines = ["global", "  maxconn 256", "defaults", "  timeout connect 5s",
                 "  timeout client 5m", "  timeout server 5m",
                 "frontend dicom", "  mode tcp", f"  bind 127.0.0.1:{front_dicom}",
                 "  default_backend nodes_dicom",
                 "backend nodes_dicom", "  mode tcp", "  balance roundrobin"]
        lines += [f"  server n{i} 127.0.0.1:{p} check" for i, p in enumerate(dicom)]
        lines += ["frontend http", "  mode http", f"  bind 127.0.0.1:{front_http}",
                  "  default_backend nodes_http", "backend nodes_http", "  mode http",
                  "  balance roundrobin", "  option httpchk GET /healthz"]
        lines += [f"  server n{i} 127.0.0.1:{p} check" for i, p in enumerate(http)]
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text("\n".join(lines) + "\n", encoding="utf-8")
        process = subprocess.Popen([binary, "-db", "-f", str(cfg)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(process)
        wait_for(lambda: port_open(front_dicom), 10, "haproxy to listen")
        return front_dicom, front_http

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


def test_the_shipped_haproxy_config_is_valid() -> None:
    binary = require_tool("haproxy")
    checked = subprocess.run([binary, "-c", "-f", str(HAPROXY_CFG)], capture_output=True,
                             text=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _node(served: Callable[..., Served], db: str, tmp_path: Path, name: str,
          orthanc: Orthanc, move_port: int) -> Served:
    return served(
        db=db,
        storage={"spool_dir": str(tmp_path / f"spool-{name}")},
        dicom={"workers": 1},
        security={"unknown_callers": ["echo", "store"], "peers": [
            {"ae_title": "VIEWER", "services": ["echo", "find", "move", "get"]},
            {"ae_title": "ANY", "host": "127.0.0.1", "port": move_port}]},
        forward={**FAST, "node_name": name,
                 "destinations": [orthanc_destination(orthanc, tmp_path)]},
        cluster={"secret_sha256": token_sha256(SECRET), "heartbeat_s": 1.0},
        env={"GATEWAY_CLUSTER_SECRET": SECRET},
    )


def _study(folder: Path, count: int) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    return [write_file(make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series,
                                    InstanceNumber=i + 1, PatientID="CLUSTER-1",
                                    PatientName=NAME, SpecificCharacterSet="ISO_IR 192"),
                       folder / f"{i}.dcm") for i in range(count)]


def _send(port: int, files: list[Path]) -> None:
    sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1", str(port),
                 *map(str, files))
    assert sent.returncode == 0, sent.stderr


def _sop_uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def _confirmed(db: str, uids: set[str]) -> bool:
    done = rows(db, "SELECT i.sop_instance_uid FROM forward_jobs j JOIN instances i "
                    "ON i.id = j.instance_id WHERE j.state = 'confirmed'")
    return uids <= {r.sop_instance_uid for r in done}


def _find_image_uids(port: int, study: str) -> set[str]:
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = study
    identifier.SeriesInstanceUID = ""
    identifier.SOPInstanceUID = ""
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
    assert assoc.is_established
    try:
        return {str(found.SOPInstanceUID) for status, found in
                assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
                if status.Status in (0xFF00, 0xFF01) and found is not None}
    finally:
        assoc.release()


def _kill_tree(server: Served) -> None:
    """SIGKILL to every process of the node at once: the machine lost power, as far as the
    node can tell."""
    for pid in descendants(server.process.pid) | {server.process.pid}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.process.wait(10)


def _status(config: Path) -> str:
    done = subprocess.run([str(GATEWAY_BIN), "status", "--config", str(config), "--waiting", "500"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_nodes_behind_haproxy_act_as_one(
    served: Callable[..., Served], orthanc_factory: Callable[..., Orthanc], haproxy: Any,
    tmp_path: Path, db_url: str,
) -> None:
    orthanc = orthanc_factory()
    move, move_port = start_storescp(tmp_path / "moved", "+B")
    restarted: list[subprocess.Popen[bytes]] = []
    try:
        a = _node(served, db_url, tmp_path, "a", orthanc, move_port)
        b = _node(served, db_url, tmp_path, "b", orthanc, move_port)
        front, _ = haproxy([a.port, b.port], [a.metrics_port, b.metrics_port])

        # A study sent in two associations through the balancer: half lands on each node
        first = _study(tmp_path / "first", 6)
        _send(front, first[:3])
        _send(front, first[3:])
        sent = _sop_uids(first)
        held = {r.sop_instance_uid: r.node_name
                for r in rows(db_url, "SELECT sop_instance_uid, node_name FROM instances")}
        assert set(held) == sent and set(held.values()) == {"a", "b"}
        wait_for(lambda: _confirmed(db_url, sent), 60, "the study confirmed at Orthanc")
        assert orthanc.sop_instance_uids() == sent and orthanc.instance_count() == len(sent)

        study = str(pydicom.dcmread(first[0]).StudyInstanceUID)
        assert _find_image_uids(a.port, study) == sent  # A sees B's half too

        # B receives a second study while its forwarding is stopped, and dies mid-load
        forwarders = [pid for pid in descendants(b.process.pid)
                      if Path(f"/proc/{pid}/comm").read_text().strip() == "gw-forward"]
        assert forwarders, "node b's forward process"
        for pid in forwarders:
            os.kill(pid, signal.SIGSTOP)
        second = _study(tmp_path / "second", 40)
        study2 = str(pydicom.dcmread(second[0]).StudyInstanceUID)
        sender = subprocess.Popen(
            ["storescu", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1", str(b.port),
             *map(str, second)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        count = f"SELECT count(*) FROM instances WHERE study_instance_uid = '{study2}'"
        wait_for(lambda: rows(db_url, count)[0][0] >= 10, 60, "node b to keep 10 instances")
        _kill_tree(b)
        sender.wait(30)

        # While B is down: status on A's configuration names B, stale, and what waits on it
        wait_for(lambda: "b                    STALE" in _status(a.config_path), 30,
                 "node b reported stale")
        # Read once B is stale, not at the kill: a COMMIT that B sent just before it died is still
        # carried out by PostgreSQL, an instant after (one such row made a full run fail)
        kept = {r.sop_instance_uid for r in rows(
            db_url, "SELECT sop_instance_uid FROM instances WHERE study_instance_uid = :s "
                    "AND node_name = 'b'", s=study2)}
        assert len(kept) >= 10 and not kept & orthanc.sop_instance_uids()
        report = _status(a.config_path)
        line = next(x for x in report.splitlines() if x.strip().startswith("b "))
        assert f"{len(kept)} instances waiting on it" in line, report
        assert {x.split("waiting: ")[1] for x in report.splitlines()
                if "waiting: " in x} == kept

        # B returns (same spool, same ports): what it acknowledged reaches Orthanc, once
        with open(tmp_path / "b-again.log", "wb") as log:  # the child keeps its own descriptor
            restarted.append(subprocess.Popen(
                [str(GATEWAY_BIN), "serve", "--config", str(b.config_path)], stdout=log,
                stderr=subprocess.STDOUT, env={**os.environ, "GATEWAY_CLUSTER_SECRET": SECRET}))
        wait_for(lambda: port_open(b.port), 30, "node b to listen again")
        wait_for(lambda: _confirmed(db_url, kept), 90, "b's instances confirmed at Orthanc")
        at_orthanc = orthanc.sop_instance_uids()
        assert kept <= at_orthanc and orthanc.instance_count() == len(sent) + len(kept)
        assert "a                    alive" in _status(a.config_path)

        # C-MOVE on A of the study B holds: every instance, the bytes B kept
        status, _ = _final_move(cast(Gateway, _Port(a.port)), _identifier("STUDY", StudyInstanceUID=study2),
                                "ANY")
        assert status.Status == 0x0000
        arrived = {str(pydicom.dcmread(f).SOPInstanceUID): f
                   for f in (tmp_path / "moved").iterdir()}
        assert set(arrived) == kept
        paths = {r.sop_instance_uid: b.spool / r.spool_path for r in rows(
            db_url, "SELECT sop_instance_uid, spool_path FROM instances WHERE node_name = 'b'")}
        for uid, path in arrived.items():
            assert _after_meta(path) == _after_meta(paths[uid]), uid
    finally:
        for process in restarted:
            process.terminate()
            process.wait(30)
        move.terminate()
        move.wait(10)


class _Port:
    """What ``_final_move`` reads of a gateway: its DICOM port."""

    def __init__(self, port: int) -> None:
        self.config = type("C", (), {"dicom": type("D", (), {"port": port})()})()


