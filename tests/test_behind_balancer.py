"""Behind HAProxy in TCP mode with ``send-proxy-v2`` (``dicom.proxy_protocol_from``): the gateway
sees the modality's address, not the balancer's, in its peer checks, its association ledger and
its logs; a trusted balancer's connection without a header is closed and logged; a header from
an address not listed is not honoured. With one receiver process and with two.

Addresses (loopback has all of 127/8): DCMTK's dcmsend and echoscu cannot choose its source address, so it
connects from 127.0.0.1 and HAProxy connects on to the gateway from 127.0.0.3 (``source``): the
modality's address and the balancer's differ, as on a site. A second HAProxy backend connects
from 127.0.0.4, which the gateway does not trust.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from gateway.receive.proxy_protocol import ProxyHeader, build_v1, build_v2
from tests.conftest import Served, free_port, port_open, rows, wait_for
from tests.factory import make_dataset, write_file
from tests.peers import dcmtk, require_tool, spool_files

BALANCER = "127.0.0.3"  # trusted: HAProxy's source towards the gateway
UNTRUSTED = "127.0.0.4"  # HAProxy too, but not listed in dicom.proxy_protocol_from
ACSE_TIMEOUT_S = 3.0


@pytest.fixture
def balanced(served: Callable[..., Served], tmp_path: Path,
             request: pytest.FixtureRequest) -> Iterator[tuple[Served, int, int]]:
    """A gateway trusting BALANCER, and HAProxy in front of it: (gateway, trusted front port,
    untrusted front port)."""
    binary = require_tool("haproxy")
    gateway = served(
        dicom={"workers": request.param, "proxy_protocol_from": [BALANCER],
               "acse_timeout_s": ACSE_TIMEOUT_S},
        security={"check_called_ae_title": True, "unknown_callers": [], "peers": [
            {"ae_title": "MODALITY", "host": "127.0.0.1", "services": ["echo", "store"]},
            {"ae_title": "FAR", "host": "10.9.8.7", "services": ["echo"]},
            # Pinned to the balancer's address: must never pass for what comes through it
            {"ae_title": "BALANCER", "host": BALANCER, "services": ["echo", "store"]}]},
    )
    trusted, untrusted = free_port(), free_port()
    lines = ["global", "  maxconn 64", "defaults", "  mode tcp", "  timeout connect 5s",
             "  timeout client 1m", "  timeout server 1m"]
    for name, port, source in (("trusted", trusted, BALANCER),
                               ("untrusted", untrusted, UNTRUSTED)):
        lines += [f"frontend {name}", f"  bind 127.0.0.1:{port}", f"  default_backend {name}",
                  f"backend {name}",
                  f"  server gw 127.0.0.1:{gateway.port} send-proxy-v2 source {source}"]
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("\n".join(lines) + "\n", encoding="utf-8")
    haproxy = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(trusted) and port_open(untrusted), 10, "haproxy to listen")
        yield gateway, trusted, untrusted
    finally:
        haproxy.terminate()
        haproxy.wait(10)


def _associations(gateway: Served) -> list[tuple[str, str, str]]:
    return [(r.calling_ae, r.peer_host, r.result) for r in rows(
        gateway.db_url, "SELECT calling_ae, peer_host, result FROM associations ORDER BY id")]


def _send(port: int, calling_ae: str, files: list[Path]) -> subprocess.CompletedProcess[str]:
    """DCMTK's dcmsend: proposes each file's own (here compressed) transfer syntax."""
    return dcmtk("dcmsend", "-aet", calling_ae, "-aec", "GATEWAY", "127.0.0.1", str(port),
                 *map(str, files), timeout=60)


@pytest.mark.parametrize("balanced", [1, 2], indirect=True, ids=["workers1", "workers2"])
def test_the_modality_address_comes_through_haproxy(
    balanced: tuple[Served, int, int], tmp_path: Path,
) -> None:
    gateway, trusted, untrusted = balanced
    ds = make_dataset(PatientName="Müller^Jürgen", SpecificCharacterSet="ISO_IR 192")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(RLELossless, generate_instance_uid=False)
    sent = write_file(ds, tmp_path / "ct.dcm", transfer_syntax=RLELossless)

    # The modality's own address passes its pinned host check through the balancer
    done = _send(trusted, "MODALITY", [sent])
    assert done.returncode == 0, done.stderr
    assert _associations(gateway) == [("MODALITY", "127.0.0.1", "accepted")]
    assert len(spool_files(gateway.spool)) == 1

    # The balancer's address is not the caller's: a peer pinned to it is refused
    done = _send(trusted, "BALANCER", [sent])
    assert done.returncode != 0
    assert _associations(gateway)[-1] == ("BALANCER", "127.0.0.1", "rejected")
    assert "rejected association from BALANCER at 127.0.0.1:" in gateway.log()

    # From an address not listed, HAProxy's header is not honoured: no association at all,
    # so nobody reaching that path can claim an address
    before = _associations(gateway)
    done = _send(untrusted, "MODALITY", [sent])
    assert done.returncode != 0
    assert _associations(gateway) == before
    assert len(spool_files(gateway.spool)) == 1


@pytest.mark.parametrize("balanced", [1, 2], indirect=True, ids=["workers1", "workers2"])
def test_a_trusted_balancer_without_a_header_is_closed_and_logged_without_holding_others(
    balanced: tuple[Served, int, int],
) -> None:
    gateway, trusted, _ = balanced
    # Silent: holds only its own connection until acse_timeout_s
    silent = socket.create_connection(("127.0.0.1", gateway.port), source_address=(BALANCER, 0))
    try:
        started = time.monotonic()
        done = dcmtk("echoscu", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1", str(trusted),
                     timeout=30)
        echo_s = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        assert echo_s < ACSE_TIMEOUT_S, f"C-ECHO waited {echo_s:.2f} s behind a silent client"
        silent.settimeout(ACSE_TIMEOUT_S + 10)
        assert silent.recv(100) == b""  # closed by the gateway, nothing answered
        assert "no complete PROXY header within 3 s" in gateway.log()
    finally:
        silent.close()

    # Straight from the balancer's address, DICOM without a header (an A-ASSOCIATE-RQ's start,
    # PS3.8 9.3.2): closed, nothing answered, logged with the balancer's address and why
    with socket.create_connection(("127.0.0.1", gateway.port), source_address=(BALANCER, 0),
                                  timeout=10) as direct:
        direct.sendall(b"\x01\x00\x00\x00\x00\xcd\x00\x01" + bytes(197))
        assert direct.recv(100) == b""
    wait_for(lambda: "no PROXY protocol signature" in gateway.log(), 10, "the warning")
    line = next(x for x in gateway.log().splitlines() if "no PROXY protocol signature" in x)
    assert f"connection from {BALANCER}:" in line and "WARNING" in line, line
    assert not any(r[0] == "BALANCER" for r in _associations(gateway))

    # After the dropped connections the node still admits associations
    assert dcmtk("echoscu", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1",
                 str(trusted), timeout=30).returncode == 0


@contextmanager
def _relay(target: int, source: str, header: bytes) -> Iterator[int]:
    """A balancer written out: connects to ``target`` from ``source``, sends ``header``, then
    pipes both ways. For the headers HAProxy sends only in its health checks (LOCAL), and v1."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    opened: list[socket.socket] = []

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", target), source_address=(source, 0))
            upstream.sendall(header)
            opened.extend((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in opened:
            conn.close()


@pytest.mark.parametrize("balanced", [2], indirect=True, ids=["workers2"])
@pytest.mark.parametrize(("header", "calling_ae", "peer_host"), [
    # LOCAL (HAProxy's own health check): the balancer's address stands
    (build_v2(ProxyHeader(2, "local")), "BALANCER", BALANCER),
    # v1 text, as HAProxy's `send-proxy`
    (build_v1(ProxyHeader(1, "proxy", ("10.9.8.7", 4000), ("10.0.0.1", 11112))), "FAR",
     "10.9.8.7"),
    # v2 with TLVs after the addresses (HAProxy's unique-id, ALPN...)
    (build_v2(ProxyHeader(2, "proxy", ("10.9.8.7", 4000), ("10.0.0.1", 11112)),
              b"\x05\x00\x03abc"), "FAR", "10.9.8.7"),
], ids=["local", "v1", "v2-tlv"])
def test_local_v1_and_tlvs_from_a_trusted_balancer(
    balanced: tuple[Served, int, int], header: bytes, calling_ae: str, peer_host: str,
) -> None:
    gateway, _, _ = balanced
    with _relay(gateway.port, BALANCER, header) as port:
        done = dcmtk("echoscu", "-aet", calling_ae, "-aec", "GATEWAY", "127.0.0.1", str(port),
                     timeout=30)
    assert done.returncode == 0, done.stderr
    assert _associations(gateway) == [(calling_ae, peer_host, "accepted")]


@pytest.mark.parametrize("balanced", [1], indirect=True, ids=["workers1"])
def test_a_forged_header_from_an_address_not_listed_is_not_honoured(
    balanced: tuple[Served, int, int],
) -> None:
    """Anyone can write a PROXY header: one claiming FAR's pinned address, from 127.0.0.1."""
    gateway, _, _ = balanced
    forged = build_v2(ProxyHeader(2, "proxy", ("10.9.8.7", 4000), ("10.0.0.1", 11112)))
    with _relay(gateway.port, "127.0.0.1", forged) as port:
        done = dcmtk("echoscu", "-aet", "FAR", "-aec", "GATEWAY", "127.0.0.1", str(port),
                     timeout=30)
    assert done.returncode != 0
    assert not any(host == "10.9.8.7" for _, host, _ in _associations(gateway))


@pytest.mark.parametrize("workers", [1, 2])
def test_stopping_does_not_wait_for_a_silent_balancer_connection(
    served: Callable[..., Served], workers: int,
) -> None:
    """SIGTERM with a connection still owing its header: cut, not waited for (acse_timeout_s)."""
    gateway = served(dicom={"workers": workers, "proxy_protocol_from": [BALANCER],
                            "acse_timeout_s": 60.0, "shutdown_grace_s": 5.0})
    with socket.create_connection(("127.0.0.1", gateway.port), source_address=(BALANCER, 0)):
        time.sleep(0.5)  # accepted and handed to the reader thread (nothing to poll for)
        started = time.monotonic()
        assert gateway.stop(timeout=60) == 0
        assert time.monotonic() - started < 5.0
