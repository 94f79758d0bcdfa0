"""Forward benchmark: does putting the gateway between a modality and Orthanc cost the site
anything, and does forwarding slow down what the modality sees?

Why this shape: the targets are relative to what a site has without a gateway, so that path is
measured in the same run, on the same machine and with the same files: DCMTK ``storescu`` straight
into Orthanc's C-STORE SCP (done when storescu exits: Orthanc stores synchronously before it
answers). Against it, ``storescu`` -> gateway -> Orthanc, timed from the first byte until the
gateway's ledger says the last instance is *confirmed* (Orthanc was asked and holds it), because
that, not "received", is when the gateway has done its job. A third path, the gateway with no
``[forward]`` section, is ingest alone: the modality-facing rate with forwarding on must stay close
to it (the sender never waits on Orthanc). The three are alternated per repetition, rotating which
goes first, so none always gets the warmer page cache. Every measured run has a fresh Orthanc
(fresh storage) and a fresh gateway database and spool in its own temp dir, on loopback ports.

On these 2-core machines the gateway and Orthanc share the CPU, so each run records the CPU
seconds of each process (with its children) over its window: busy% = CPU s / wall s per process,
200% being both cores, and the machine's busy share from /proc/stat. For scale, Orthanc's own best
ingest of the same files is measured once: REST ``POST /instances`` from 4 threads.

Latency is measured in one extra run at half the median end-to-end rate, with a paced pynetdicom
sender (one association, TCP_NODELAY, one file at a time): p50/p99 of received -> forwarded and
received -> confirmed from the ledger (``forward_jobs.created_at``, ``forwarded_at``,
``confirmed_at``). Confirmation waits for a study to be quiet for ``stable_after_s``, so one big
study would make every instance wait for the last one; for this run the set is copied with a new
Study (and Series) Instance UID every 20 files, like a stream of small exams.

Orthanc runs with TCP_NODELAY=1 in its environment, like the senders and like bench.py's storescp:
its DCMTK does not turn Nagle off by itself, and without it every C-STORE-RSP waits out a delayed
ACK (about 20 CT images/s direct instead of about 150 here), a baseline not worth comparing against.

Helpers (test data, DCMTK lookup, /proc accounting, the gateway receiver) come from
``scripts/bench.py``. Exit status: 0 when every run completed (targets met or not: the report
says), 1 on an error (a missing tool, a server that does not start, lost or dead-lettered images).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, cast
from unittest import mock

import pydicom
import urllib3
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association

sys.path.insert(0, str(Path(__file__).resolve().parent))
# scripts/bench.py, the receive benchmark: its test data, process and /proc helpers, its gateway.
import bench
from bench import (
    CT_SIDE,
    LOOPBACK,
    BenchError,
    GatewayServer,
    ImageSet,
    Receiver,
    base_env,
    cpu_seconds,
    find_dcmtk,
    free_port,
    image_set,
    machine_ticks,
    peak_rss_kib,
    send,
    tail,
)

sys.path.insert(0, str(bench.REPO))  # for the tests' Orthanc configuration
from tests.orthanc_config import orthanc_config

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
ORTHANC_USER = "bench"
ORTHANC_PASSWORD = "bench"
ORTHANC_START_S = 60.0
ORTHANC_ENV = {"TCP_NODELAY": "1"}  # DCMTK inside Orthanc: Nagle off on its DICOM sockets
STABLE_AFTER_S = 0.5
CHECK_INTERVAL_S = 0.2
# Orthanc's REST ingest peaks at about 6 parallel POSTs here (2: 210/s, 4: 300/s, 6: 320/s,
# 8: 318/s); a site sizes a destination's concurrency the same way.
FORWARD_CONCURRENCY = 6
# The gateway's [forward] burst_hold_s (its default when unset); BENCH_BURST_HOLD_S=0 measures
# forwarding that runs beside the receiver during the burst instead of after it.
BURST_HOLD_S = os.environ.get("BENCH_BURST_HOLD_S")
FORWARD_BATCH = 20
REST_THREADS = 4
STUDY_SIZE = 20  # instances per study in the paced run
CONFIRM_TIMEOUT_S = 900.0
POLL_S = 0.05
E2E_TARGET = 0.9  # end-to-end through the gateway / direct C-STORE: at least this
INGEST_TARGET = 0.9  # ingest with forwarding / ingest alone: at least this
P99_TARGET_S = 2.0  # received -> confirmed at half load: under this
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPECTED = f"accepting unknown caller {bench.CALLING_AE} "  # config/gateway.toml allows any caller

PathName = Literal["direct", "forward", "ingest"]
PATHS: tuple[PathName, ...] = ("direct", "forward", "ingest")

# Every server this bench starts, killed (with its process group) on the way out, whatever happens.
_STARTED: list[subprocess.Popen[bytes]] = []


def kill_all() -> None:
    for process in _STARTED:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # each runs in its own session
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)


# --- servers ---------------------------------------------------------------------------------


class OrthancServer:
    """Debian's Orthanc with a generated config in ``<workdir>/orthanc``: fresh storage and index,
    loopback only, basic auth, C-STORE from anyone. Never the machine's service.

    ``name``, ``called_ae`` and ``port`` (the DICOM port) make it a target for ``bench.send``."""

    name = "orthanc"
    called_ae = "ORTHANC"

    def __init__(self, workdir: Path) -> None:
        if not ORTHANC_BIN.exists():
            raise BenchError(f"{ORTHANC_BIN} not found; apt-get install orthanc")
        # BENCH_ORTHANC_DIR: put Orthanc's storage elsewhere (e.g. /dev/shm), to see how much of
        # the gateway's slowdown is the two servers sharing one disk (Orthanc's writes against
        # the gateway's fsyncs), as they would not in a hospital.
        elsewhere = os.environ.get("BENCH_ORTHANC_DIR")
        base = workdir
        if elsewhere:
            base = Path(tempfile.mkdtemp(dir=elsewhere, prefix="bench-orthanc-"))
            atexit.register(shutil.rmtree, base, ignore_errors=True)
        self.root = base / "orthanc"
        self.root.mkdir()
        self.http_port = free_port()
        self.port = free_port()
        while self.port == self.http_port:
            self.port = free_port()
        self.log = self.root / "orthanc.log"
        config = self.root / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        token = base64.b64encode(f"{ORTHANC_USER}:{ORTHANC_PASSWORD}".encode()).decode("ascii")
        self._auth = f"Basic {token}"
        env = base_env() | ORTHANC_ENV
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(ORTHANC_BIN), str(config)], cwd=self.root, env=env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        _STARTED.append(self.process)
        self._wait_until_up()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def config(self) -> dict[str, object]:
        return orthanc_config(f"bench-orthanc-{self.http_port}", self.root, self.http_port,
                              self.port, self.called_ae, {ORTHANC_USER: ORTHANC_PASSWORD})

    def request(self, method: str, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, method=method,
                                     headers={"Authorization": self._auth})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as error:
            with error:
                return int(error.code), error.read()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + ORTHANC_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"Orthanc exited with status {self.process.returncode} at "
                                 f"start:\n{tail(self.log)}")
            with contextlib.suppress(OSError):
                if self.request("GET", "/system", timeout=1)[0] == 200:
                    return
            time.sleep(POLL_S)
        raise BenchError(f"Orthanc did not answer GET /system within {ORTHANC_START_S} s:\n"
                         f"{tail(self.log)}")

    def received(self) -> int:
        status, body = self.request("GET", "/statistics")
        if status != 200:
            raise BenchError(f"Orthanc GET /statistics: HTTP {status}")
        return int(json.loads(body)["CountInstances"])

    def errors(self) -> list[str]:
        """Orthanc's error lines (``E0101 ...``): none expected."""
        text = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        return [line for line in text if line.startswith("E")]

    def stop(self) -> None:
        """SIGKILL: its storage is thrown away, and a clean stop takes Orthanc 1.10 about 3.5 s."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class BenchGateway(GatewayServer):
    """bench.py's gateway receiver (same environment, spool, database, start and SIGTERM stop),
    with its config file written here: the default config plus, when ``orthanc`` is given, a
    ``[forward]`` section with one Orthanc destination."""

    def __init__(self, workdir: Path, orthanc: OrthancServer | None,
                 remap_db: Path | None = None) -> None:
        config = workdir / "gateway.toml"
        text = bench.CONFIG.read_text(encoding="utf-8")
        if orthanc is not None:
            secret = workdir / "orthanc-password"
            secret.write_text(ORTHANC_PASSWORD + "\n", encoding="utf-8")
            secret.chmod(0o600)
            destination = (
                f'{{ type = "orthanc", name = "orthanc", url = {json.dumps(orthanc.url)}, '
                f"username = {json.dumps(ORTHANC_USER)}, "
                f"password_file = {json.dumps(str(secret))}, "
                f"concurrency = {FORWARD_CONCURRENCY}, batch_size = {FORWARD_BATCH} }}"
            )
            hold = "" if BURST_HOLD_S is None else f"burst_hold_s = {float(BURST_HOLD_S)}\n"
            text += (f"\n[forward]\nstable_after_s = {STABLE_AFTER_S}\n{hold}"
                     f"check_interval_s = {CHECK_INTERVAL_S}\ndestinations = [ {destination} ]\n")
        config.write_text(text, encoding="utf-8")
        # GatewayServer starts ``gateway serve --config bench.CONFIG``: point that at this file.
        try:
            with mock.patch.object(bench, "CONFIG", config):
                super().__init__(workdir, remap_db)
        except BaseException:
            process: subprocess.Popen[bytes] | None = getattr(self, "process", None)
            if process is not None:
                _STARTED.append(process)
            raise
        _STARTED.append(self.process)

    def job_states(self) -> dict[str, int]:
        with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as db:
            rows = db.execute("SELECT state, count(*) FROM forward_jobs GROUP BY state").fetchall()
        return {str(state): int(count) for state, count in rows}

    def wait_confirmed(self, count: int) -> None:
        """Until ``count`` jobs are confirmed; a dead letter, a stall or a dead gateway fails."""
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        while time.monotonic() < deadline:
            states = self.job_states()
            if states.get("dead") or states.get("purged"):
                raise BenchError(f"forward jobs dead-lettered: {states}\n{tail(self.log)}")
            if states.get("confirmed", 0) >= count:
                return
            if self.process.poll() is not None:
                raise BenchError(f"gateway died while forwarding (status "
                                 f"{self.process.returncode}):\n{tail(self.log)}")
            time.sleep(POLL_S)
        raise BenchError(f"not all {count} instances confirmed within {CONFIRM_TIMEOUT_S} s: "
                         f"{self.job_states()}\n{tail(self.log)}")

    def ledger(self) -> list[tuple[datetime, datetime, datetime]]:
        """(received, forwarded, confirmed) of every confirmed job, as aware UTC datetimes."""
        with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as db:
            rows = db.execute("SELECT created_at, forwarded_at, confirmed_at FROM forward_jobs "
                              "WHERE state = 'confirmed'").fetchall()
        return [(utc(a), utc(b), utc(c)) for a, b, c in rows]

    def log_lines(self) -> list[str]:
        """The gateway logs warnings and worse here: anything is worth a look, except the one
        warning the default config gives by design for every association of our unlisted
        sender."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if line.strip() and EXPECTED not in line]


def utc(value: str | datetime) -> datetime:
    """SQLite holds the ledger's times as naive UTC text."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# --- runs ------------------------------------------------------------------------------------


@dataclass
class Measure:
    """One run of one path. ``seconds`` is the path's headline time: storescu's wall time for
    direct and ingest-alone, until the last instance was confirmed for forward."""

    path: str
    rep: int
    count: int
    total_bytes: int
    seconds: float
    window_s: float  # what CPU is divided by
    gateway_cpu_s: float | None = None
    orthanc_cpu_s: float | None = None
    machine_busy: float = 0.0
    ingest_s: float | None = None  # forward: storescu's wall time
    forwarded_s: float | None = None  # forward: until the last instance was forwarded
    ingest_gateway_cpu_s: float | None = None  # forward: over storescu's time only
    ingest_orthanc_cpu_s: float | None = None
    batches: int = 0  # forward: batches sent (distinct forwarded_at: a batch is settled at once)
    gateway_rss_kib: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.count / self.seconds


@contextlib.contextmanager
def run_dir(label: str, keep: bool) -> Iterator[Path]:
    """A fresh temp dir for one run; kept with --keep or when the run fails."""
    workdir = Path(tempfile.mkdtemp(prefix=f"gateway-bench-forward-{label}-", dir="/tmp"))
    try:
        yield workdir
    except BaseException:
        kill_all()
        print(f"bench: kept {workdir}", file=sys.stderr)
        raise
    if keep:
        print(f"bench: kept {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def check_count(what: str, got: int, want: int, workdir: Path) -> None:
    if got != want:
        raise BenchError(f"{what} has {got} of {want} instances; see {workdir} (kept)")


def gateway_notes(gateway: BenchGateway) -> list[str]:
    return [f"gateway log: {line}" for line in gateway.log_lines()]


def run_direct(images: ImageSet, rep: int, storescu: Path, keep: bool) -> Measure:
    """storescu -> Orthanc's C-STORE SCP: what a site has without a gateway."""
    with run_dir("direct", keep) as workdir:
        orthanc = OrthancServer(workdir)
        try:
            o0, m0 = cpu_seconds(orthanc.process.pid), machine_ticks()
            seconds, _ = send(storescu, images, cast(Receiver, orthanc), workdir / "storescu.log")
            o1, m1 = cpu_seconds(orthanc.process.pid), machine_ticks()
            check_count("Orthanc (direct)", orthanc.received(), images.count, workdir)
            notes = [f"orthanc log: {line}" for line in orthanc.errors()]
        finally:
            orthanc.stop()
    return Measure("direct", rep, images.count, images.total_bytes, seconds, seconds,
                   orthanc_cpu_s=o1 - o0, machine_busy=busy(m0, m1), notes=notes)


def run_forward(images: ImageSet, rep: int, storescu: Path, keep: bool) -> Measure:
    """storescu -> gateway -> Orthanc, until the ledger says every instance is confirmed."""
    with run_dir("forward", keep) as workdir:
        orthanc = OrthancServer(workdir)
        gateway: BenchGateway | None = None
        try:
            gateway = BenchGateway(workdir, orthanc)
            gpid, opid = gateway.process.pid, orthanc.process.pid
            g0, o0, m0 = cpu_seconds(gpid), cpu_seconds(opid), machine_ticks()
            began_utc, began = datetime.now(UTC), time.perf_counter()
            ingest_s, _ = send(storescu, images, gateway, workdir / "storescu.log")
            gi, oi = cpu_seconds(gpid), cpu_seconds(opid)
            gateway.wait_confirmed(images.count)
            window = time.perf_counter() - began
            g1, o1, m1 = cpu_seconds(gpid), cpu_seconds(opid), machine_ticks()
            ledger = gateway.ledger()
            check_count("the gateway's spool", gateway.received(), images.count, workdir)
            check_count("Orthanc (via gateway)", orthanc.received(), images.count, workdir)
            e2e = max(c for _, _, c in ledger) - began_utc
            forwarded = max(f for _, f, _ in ledger) - began_utc
            rss = peak_rss_kib(gpid)
            notes = gateway_notes(gateway) + [f"orthanc log: {x}" for x in orthanc.errors()]
            to_stop, gateway = gateway, None
            to_stop.stop()  # SIGTERM, must exit 0
        finally:
            if gateway is not None:
                kill_all()
            orthanc.stop()
    return Measure("forward", rep, images.count, images.total_bytes, e2e.total_seconds(), window,
                   gateway_cpu_s=g1 - g0, orthanc_cpu_s=o1 - o0, machine_busy=busy(m0, m1),
                   ingest_s=ingest_s, forwarded_s=forwarded.total_seconds(),
                   ingest_gateway_cpu_s=gi - g0, ingest_orthanc_cpu_s=oi - o0,
                   batches=len({f for _, f, _ in ledger}), gateway_rss_kib=rss, notes=notes)


def run_ingest(images: ImageSet, rep: int, storescu: Path, keep: bool) -> Measure:
    """storescu -> gateway with no [forward] section: the modality-facing rate on its own."""
    with run_dir("ingest", keep) as workdir:
        gateway: BenchGateway | None = None
        try:
            gateway = BenchGateway(workdir, None)
            gpid = gateway.process.pid
            g0, m0 = cpu_seconds(gpid), machine_ticks()
            seconds, _ = send(storescu, images, gateway, workdir / "storescu.log")
            g1, m1 = cpu_seconds(gpid), machine_ticks()
            check_count("the gateway's spool", gateway.received(), images.count, workdir)
            rss = peak_rss_kib(gpid)
            notes = gateway_notes(gateway)
            to_stop, gateway = gateway, None
            to_stop.stop()
        finally:
            if gateway is not None:
                kill_all()
    return Measure("ingest", rep, images.count, images.total_bytes, seconds, seconds,
                   gateway_cpu_s=g1 - g0, machine_busy=busy(m0, m1), gateway_rss_kib=rss,
                   notes=notes)


def run_rest(images: ImageSet, keep: bool) -> tuple[Measure, float]:
    """Orthanc's own best ingest: ``POST /instances`` from 4 threads, one connection each.
    Returns the run and the CPU seconds of this (client) process over it."""
    files = sorted(images.folder.glob("*.dcm"))
    lock = threading.Lock()
    queue = iter(files)

    def post_all(url: str) -> int:
        sent = 0
        # urllib3, the client the gateway's Orthanc destination uses: the same cost per POST
        headers = {**urllib3.make_headers(basic_auth=f"{ORTHANC_USER}:{ORTHANC_PASSWORD}"),
                   "Content-Type": "application/dicom"}
        with urllib3.PoolManager(maxsize=1) as http:
            while True:
                with lock:
                    path = next(queue, None)
                if path is None:
                    return sent
                body = path.read_bytes()
                response = http.request("POST", f"{url}/instances", body=body, headers=headers,
                                        timeout=60.0, retries=False)
                if response.status != 200 or response.json().get("Status") != "Success":
                    raise BenchError(f"Orthanc POST /instances {path.name}: HTTP "
                                     f"{response.status} {response.data[:200]!r}")
                sent += 1

    with run_dir("rest", keep) as workdir:
        orthanc = OrthancServer(workdir)
        try:
            o0, m0 = cpu_seconds(orthanc.process.pid), machine_ticks()
            me0 = resource.getrusage(resource.RUSAGE_SELF)
            began = time.perf_counter()
            with ThreadPoolExecutor(REST_THREADS) as pool:
                sent = sum(pool.map(post_all, [orthanc.url] * REST_THREADS))
            seconds = time.perf_counter() - began
            me1 = resource.getrusage(resource.RUSAGE_SELF)
            o1, m1 = cpu_seconds(orthanc.process.pid), machine_ticks()
            check_count("the REST client", sent, images.count, workdir)
            check_count("Orthanc (REST)", orthanc.received(), images.count, workdir)
            notes = [f"orthanc log: {line}" for line in orthanc.errors()]
        finally:
            orthanc.stop()
    client = (me1.ru_utime - me0.ru_utime) + (me1.ru_stime - me0.ru_stime)
    return Measure("rest", 0, images.count, images.total_bytes, seconds, seconds,
                   orthanc_cpu_s=o1 - o0, machine_busy=busy(m0, m1), notes=notes), client


@dataclass(frozen=True)
class Paced:
    rate: float  # asked for
    achieved: float
    studies: int
    forwarded: list[float]  # received -> forwarded, s, per instance
    confirmed: list[float]  # received -> confirmed
    gateway_busy: float
    orthanc_busy: float
    notes: list[str]


def split_studies(images: ImageSet, folder: Path) -> list[Path]:
    """Copies of the set with a new Study and Series Instance UID every ``STUDY_SIZE`` files."""
    folder.mkdir()
    copies: list[Path] = []
    for number, source in enumerate(sorted(images.folder.glob("*.dcm"))):
        if number % STUDY_SIZE == 0:
            study, series = generate_uid(), generate_uid()
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        target = folder / source.name
        ds.save_as(target, enforce_file_format=True)
        copies.append(target)
    return copies


def associate(port: int, called_ae: str, sop_class: str, syntax: str) -> Association:
    """One association from a pynetdicom SCU, Nagle off on its socket (like TCP_NODELAY=1 for
    storescu), sending files as they are on disk (no decode)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(bench.CALLING_AE)
    ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(LOOPBACK, port, ae_title=called_ae)
    if not assoc.is_established:
        raise BenchError(f"the paced sender could not associate with the gateway on port {port}")
    raw = assoc.dul.socket.socket if assoc.dul.socket else None
    if raw is None:
        raise BenchError("the paced sender's association has no socket")
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def run_paced(images: ImageSet, rate: float, keep: bool) -> Paced:
    """The gateway forwarding while a paced sender holds ``rate`` instances/s, studies of 20."""
    with run_dir("paced", keep) as workdir:
        print(f"bench: copying the set into studies of {STUDY_SIZE} ...", file=sys.stderr)
        files = split_studies(images, workdir / "split")
        head = pydicom.dcmread(files[0], stop_before_pixels=True)
        sop_class = str(head.SOPClassUID or CT_IMAGE_STORAGE)
        syntax = str(head.file_meta.TransferSyntaxUID)
        orthanc = OrthancServer(workdir)
        gateway: BenchGateway | None = None
        try:
            gateway = BenchGateway(workdir, orthanc)
            gpid, opid = gateway.process.pid, orthanc.process.pid
            g0, o0 = cpu_seconds(gpid), cpu_seconds(opid)
            assoc = associate(gateway.port, gateway.called_ae, sop_class, syntax)
            began = time.perf_counter()
            try:
                for number, path in enumerate(files):
                    delay = began + number / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    status = assoc.send_c_store(path)
                    if status.get("Status") != 0:
                        raise BenchError(f"paced C-STORE of {path.name}: status "
                                         f"{status.get('Status')!r}")
            finally:
                if assoc.is_established:
                    assoc.release()
            sent_s = time.perf_counter() - began
            gateway.wait_confirmed(len(files))
            window = time.perf_counter() - began
            g1, o1 = cpu_seconds(gpid), cpu_seconds(opid)
            ledger = gateway.ledger()
            check_count("Orthanc (paced)", orthanc.received(), len(files), workdir)
            notes = gateway_notes(gateway) + [f"orthanc log: {x}" for x in orthanc.errors()]
            to_stop, gateway = gateway, None
            to_stop.stop()
        finally:
            if gateway is not None:
                kill_all()
            orthanc.stop()
    # (N - 1) intervals between the first and the last send start, plus the last send
    achieved = len(files) / sent_s
    return Paced(rate, achieved, (len(files) + STUDY_SIZE - 1) // STUDY_SIZE,
                 [(f - r).total_seconds() for r, f, _ in ledger],
                 [(c - r).total_seconds() for r, _, c in ledger],
                 (g1 - g0) / window, (o1 - o0) / window, notes)


def busy(before: tuple[int, int], after: tuple[int, int]) -> float:
    return (after[0] - before[0]) / max(after[1] - before[1], 1)


# --- report ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def pct(cpu: float | None, wall: float) -> str:
    return "-" if cpu is None else f"{cpu / wall:.0%}"


def report(runs: Sequence[Measure], rest: Measure, rest_client_cpu: float, paced: Paced | None,
           images: ImageSet) -> str:
    def of(path: str) -> list[Measure]:
        return [r for r in runs if r.path == path]

    def rate(values: Sequence[float]) -> float:
        return statistics.median(values)

    direct, forward, ingest = of("direct"), of("forward"), of("ingest")
    rows: list[tuple[str, list[Measure], list[float], list[float]]] = [
        ("direct: storescu -> Orthanc C-STORE", direct,
         [r.per_second for r in direct], [r.seconds for r in direct]),
        ("via gateway: end-to-end (last confirmed)", forward,
         [r.per_second for r in forward], [r.seconds for r in forward]),
        ("via gateway: last forwarded", forward,
         [r.count / (r.forwarded_s or 1) for r in forward], [r.forwarded_s or 0 for r in forward]),
        ("via gateway: ingest (storescu done)", forward,
         [r.count / (r.ingest_s or 1) for r in forward], [r.ingest_s or 0 for r in forward]),
        ("gateway ingest alone (no [forward])", ingest,
         [r.per_second for r in ingest], [r.seconds for r in ingest]),
        (f"Orthanc REST, {REST_THREADS} threads", [rest], [rest.per_second], [rest.seconds]),
    ]
    title_line = (f"CT set: {images.label} ({images.total_bytes / 1e6:.0f} MB), "
                  f"{len(direct)} rep(s), {os.cpu_count()} CPUs")
    header = (f"{'path':<42} {'inst/s':>7} {'MB/s':>6} {'gateway':>8} {'Orthanc':>8} "
              f"{'machine':>8}   inst/s of each rep (wall s)")
    lines = ["", title_line, "", header]
    for title, measures, rates, walls in rows:
        each = "  ".join(f"{r:.1f} ({w:.2f})" for r, w in zip(rates, walls, strict=True))
        median = rate(rates)
        if title.startswith(("via gateway: last", "via gateway: ingest")):
            cpu = ("", "", "")
        else:
            cpu = (
                cpu_column([m.gateway_cpu_s for m in measures], [m.window_s for m in measures]),
                cpu_column([m.orthanc_cpu_s for m in measures], [m.window_s for m in measures]),
                f"{statistics.mean(m.machine_busy for m in measures):.0%}",
            )
        mb_s = median * images.total_bytes / images.count / 1e6
        lines.append(f"{title:<42} {median:>7.1f} {mb_s:>6.1f} "
                     f"{cpu[0]:>8} {cpu[1]:>8} {cpu[2]:>8}   {each}")
    if forward:
        wall = sum(r.ingest_s or 0 for r in forward)
        lines.append(
            f"{'  via gateway, CPU while storescu sent':<42} {'':>7} {'':>6} "
            f"{sum(r.ingest_gateway_cpu_s or 0 for r in forward) / wall:>8.0%} "
            f"{sum(r.ingest_orthanc_cpu_s or 0 for r in forward) / wall:>8.0%}"
        )
        lag = statistics.median((r.forwarded_s or 0) - (r.ingest_s or 0) for r in forward)
        confirm_tail = statistics.median(r.seconds - (r.forwarded_s or 0) for r in forward)
        per_batch = statistics.median(r.count / max(r.batches, 1) for r in forward)
        lines.append(
            f"  via gateway, medians: last forwarded {lag:.2f} s after storescu was done, last "
            f"confirmed {confirm_tail:.2f} s after that; {per_batch:.1f} instances per forward "
            f"batch (batch_size {FORWARD_BATCH}, concurrency {FORWARD_CONCURRENCY}, burst_hold_s "
            f"{BURST_HOLD_S if BURST_HOLD_S is not None else 'default'})"
        )
    lines += [
        "",
        "gateway/Orthanc = CPU s (user+sys, with children) / wall s of the run: 100% = one core,",
        "200% = both; machine = share of all CPUs busy (the rest idle). End-to-end CPU is over",
        "storescu start -> last confirmed. REST client CPU (this Python process, 4 threads): "
        + f"{rest_client_cpu / rest.seconds:.0%}.",
        "",
    ]
    e2e = rate([r.per_second for r in forward]) / rate([r.per_second for r in direct])
    fwd_ingest = rate([r.count / (r.ingest_s or 1) for r in forward])
    alone = rate([r.per_second for r in ingest])
    lines.append(f"end-to-end via gateway / direct C-STORE: {e2e:.2f}   target >= {E2E_TARGET}: "
                 f"{verdict(e2e >= E2E_TARGET)}")
    lines.append(f"ingest with forwarding / ingest alone: {fwd_ingest / alone:.2f}   target >= "
                 f"{INGEST_TARGET}: {verdict(fwd_ingest / alone >= INGEST_TARGET)}")
    if paced is not None:
        p99 = percentile(paced.confirmed, 99)
        lines.append(
            f"received -> confirmed p99 at half load: {p99:.2f} s   target < {P99_TARGET_S:.0f} s: "
            f"{verdict(p99 < P99_TARGET_S)}"
        )
        lines.append(
            f"  half load: asked {paced.rate:.1f} inst/s, held {paced.achieved:.1f}, "
            f"{paced.studies} studies of {STUDY_SIZE}; received -> forwarded p50 "
            f"{percentile(paced.forwarded, 50):.2f} s p99 {percentile(paced.forwarded, 99):.2f} s;"
            f" received -> confirmed p50 {percentile(paced.confirmed, 50):.2f} s p99 {p99:.2f} s"
        )
        lines.append(
            f"  (stable_after_s {STABLE_AFTER_S}, check_interval_s {CHECK_INTERVAL_S}); CPU "
            f"gateway {paced.gateway_busy:.0%}, Orthanc {paced.orthanc_busy:.0%}"
        )
    lines.append(
        f"Orthanc REST {REST_THREADS} threads: {rest.per_second:.1f} inst/s; direct C-STORE is "
        f"{rate([r.per_second for r in direct]) / rest.per_second:.2f} of it, end-to-end via the "
        f"gateway {rate([r.per_second for r in forward]) / rest.per_second:.2f}"
    )
    rss = [r.gateway_rss_kib / 1024 for r in runs if r.gateway_rss_kib]
    if rss:
        lines.append(f"gateway peak RSS (VmHWM): max {max(rss):.1f} MiB over {len(rss)} runs")
    notes = [n for r in [*runs, rest] for n in r.notes] + (paced.notes if paced else [])
    if notes:
        lines.append(f"log lines worth a look ({len(notes)}; first 10):")
        lines += [f"  {n[:300]}" for n in notes[:10]]
    else:
        lines.append("no warnings or errors in the gateway's or Orthanc's logs (other than "
                     f"'{EXPECTED.strip()}', once per association)")
    return "\n".join(lines)


def cpu_column(cpu: Sequence[float | None], walls: Sequence[float]) -> str:
    known = [(c, w) for c, w in zip(cpu, walls, strict=True) if c is not None]
    if not known:
        return "-"
    return f"{sum(c for c, _ in known) / sum(w for _, w in known):.0%}"


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench --forward",
        description="Time the CT set storescu -> gateway -> Orthanc (until confirmed) against "
        "storescu -> Orthanc directly and against the gateway's ingest alone, then the latency "
        "at half load, and Orthanc's REST ingest for scale (loopback only).",
    )
    parser.add_argument("--forward", action="store_true", help="this benchmark (scripts/bench)")
    parser.add_argument("--count", type=int, default=1000, help="CT instances (default 1000)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per path (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep each run's temp dir under /tmp")
    args = parser.parse_args(argv)
    if args.count < 1 or args.reps < 1:
        parser.error("--count and --reps must be at least 1")
    return args


def progress(measure: Measure) -> None:
    extra = ""
    if measure.path == "forward":
        extra = (f" (storescu done {measure.ingest_s:.2f} s, last forwarded "
                 f"{measure.forwarded_s:.2f} s, last confirmed {measure.seconds:.2f} s)")
    print(f"bench: rep {measure.rep + 1} {measure.path:<8} {measure.seconds:7.2f} s "
          f"{measure.per_second:7.1f} inst/s{extra}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    storescu = find_dcmtk("storescu")
    if not bench.GATEWAY_BIN.exists():
        raise BenchError(f"{bench.GATEWAY_BIN} is missing; run scripts/bench (it sets up .venv)")
    images = image_set("ct", args.count, CT_SIDE, nodelay=True)
    print(f"bench: forward, {images.label} CT, {args.reps} rep(s); storescu {storescu}, "
          f"Orthanc {ORTHANC_BIN}, gateway {bench.GATEWAY_BIN}", file=sys.stderr)
    runners = {"direct": run_direct, "forward": run_forward, "ingest": run_ingest}
    runs: list[Measure] = []
    for rep in range(args.reps):
        shift = rep % len(PATHS)  # rotate: each path goes first, second, ... in turn
        for path in PATHS[shift:] + PATHS[:shift]:
            measure = runners[path](images, rep, storescu, args.keep)
            runs.append(measure)
            progress(measure)
    rest, client_cpu = run_rest(images, args.keep)
    print(f"bench: Orthanc REST {REST_THREADS} threads {rest.seconds:7.2f} s "
          f"{rest.per_second:7.1f} inst/s", file=sys.stderr)
    half = statistics.median(r.per_second for r in runs if r.path == "forward") / 2
    print(f"bench: paced run at {half:.1f} inst/s ...", file=sys.stderr)
    paced = run_paced(images, half, args.keep)
    print(f"bench: paced held {paced.achieved:.1f} inst/s", file=sys.stderr)
    print(report(runs, rest, client_cpu, paced, images))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so every server is killed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return run(parse_args(argv))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        kill_all()


if __name__ == "__main__":
    sys.exit(main())
