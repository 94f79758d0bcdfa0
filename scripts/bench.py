"""Receive benchmark: how fast the gateway takes C-STOREs compared with DCMTK ``storescp`` and with
a bare pynetdicom SCP.

Why this shape: the targets are relative (gateway CT throughput at least half of ``storescp``'s;
with a Nagle-on sender of small images, at least 3x ``storescp``), so both receivers are measured
back to back on the same machine, with the same sender (DCMTK ``storescu``, one association, every
file), the same files and loopback only. A third receiver, ``scripts/bare_scp.py`` (a tuned
pynetdicom SCP that only writes what it receives), is measured the same way as a reference with no
target: it is the floor a pynetdicom-based receiver starts from, which the gateway has to beat while
doing more. A fourth, ``scripts/durable_floor.py``, is the gateway's own network path with a
handler that does only the durable steps (sync, link, then sync the folder while one row commits):
what a receiver can reach here while Success waits for the disk, which ``storescp`` never does.
The CT set also goes to the gateway with remap rules (``remap``). The repetitions rotate which
receiver goes first so that none always gets the warmer page cache or the quieter minute. Only the
``storescu`` command is timed; each receiver is started fresh in its own temp dir and must have
written every image, since a run that loses images is a bug, not a fast result.

Test data is synthetic and cached outside git (``~/.cache/gateway-bench``): N CT images of
512x512 16-bit (about 0.53 MB each, like a real CT slice) and 100 small 64x64 images, built from
pydicom's bundled ``CT_small.dcm`` with fresh UIDs and random pixel values.

Run ``scripts/bench --help`` for the options. Exit status: 0 when every run completed (whether or
not the targets were met: the report says), 1 on an error (a tool missing, a server that does not
start or exits badly, lost images, storescu failing).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

try:  # numpy is optional: os.urandom gives the same kind of bytes, a little slower.
    _numpy: Any = importlib.import_module("numpy")
except ImportError:
    _numpy = None

REPO = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "gateway-bench"
CONFIG = REPO / "config" / "gateway.toml"
GATEWAY_BIN = REPO / ".venv" / "bin" / "gateway"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
BARE_SCP = REPO / "scripts" / "bare_scp.py"
DURABLE_FLOOR = REPO / "scripts" / "durable_floor.py"
LOOPBACK = "127.0.0.1"
CALLING_AE = "BENCH"
STORESCP_PDU = 131072
SMALL_COUNT = 100
SMALL_SIDE = 64
CT_SIDE = 512
CT_TARGET = 0.5  # gateway/storescp instances per second, CT set: at least this
SMALL_TARGET = 3.0  # gateway/storescp instances per second, small set: at least this
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 90.0  # above the gateway's default 30 s shutdown grace
SIGTERM_AGAIN_S = 10.0
SEND_TIMEOUT_S = 1800.0
POLL_S = 0.02
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Pixel values 0..4095 (12 significant bits, like CT) in little-endian 16-bit words: clear the high
# nibble of every high byte.
_HIGH_BYTE_MASK = bytes(b & 0x0F for b in range(256))

SetName = Literal["ct", "small"]
TargetName = Literal["storescp", "gateway", "pynetdicom", "remap", "floor"]
TARGETS: tuple[TargetName, ...] = ("storescp", "gateway", "pynetdicom", "remap", "floor")
REMAP_TARGET = 0.9  # gateway with rules / gateway without, CT set: at least this
IDENTITY_ROWS = 100_000
DRAIN_TIMEOUT_S = 600.0
# Ten rules of the kinds a site writes: identity and order lookups, clean-ups, and some that match
# nothing here (other modalities), so matching costs what it costs in real use.
REMAP_RULES = """
[[rules]]
name = "identity"
match = { calling_ae = ["BENCH"] }
actions = [{ type = "map_identity", unmatched = "hold" }]
[[rules]]
name = "order"
match = { modality = ["CT", "MR"] }
actions = [{ type = "reconcile_order", unmatched = "hold" }]
[[rules]]
name = "institution"
actions = [{ type = "set", tag = "InstitutionName", value = "General Hospital" }]
[[rules]]
name = "no addresses"
match = { tags = [{ tag = "PatientAddress", present = true }] }
actions = [{ type = "delete", tag = "PatientAddress" }]
[[rules]]
name = "description prefix"
actions = [{ type = "regex_replace", tag = "StudyDescription", pattern = '^\\s+', replacement = "" }]
[[rules]]
name = "keep device id"
match = { tags = [{ tag = "OtherPatientIDs", missing = true }] }
actions = [{ type = "copy", source = "PatientID", tag = "OtherPatientIDs" }]
[[rules]]
name = "mr station"
match = { modality = ["MR"] }
actions = [{ type = "set", tag = "StationName", value = "MR1" }]
[[rules]]
name = "us site"
match = { modality = ["US"], calling_ae = ["US1", "US2"] }
actions = [{ type = "set", tag = "InstitutionalDepartmentName", value = "Ultrasound" }]
[[rules]]
name = "ct body part"
match = { sop_class = ["1.2.840.10008.5.1.4.1.1.2"], tags = [{ tag = "BodyPartExamined", missing = true }] }
actions = [{ type = "set", tag = "BodyPartExamined", value = "HEAD" }]
[[rules]]
name = "test patients"
match = { tags = [{ tag = "PatientName", regex = "^ZZTEST" }] }
actions = [{ type = "set", tag = "PatientComments", value = "test patient" }]
"""


class BenchError(Exception):
    """A failure that makes the numbers meaningless: reported, and the exit status is 1."""


# --- test data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    """A folder of cached test files that storescu sends in one association."""

    name: SetName
    folder: Path
    count: int
    side: int
    total_bytes: int
    nodelay: bool  # whether the sender disables Nagle (TCP_NODELAY=1 for DCMTK)

    @property
    def label(self) -> str:
        return f"{self.count} x {self.side}x{self.side}"


def pixel_bytes(side: int, rng: Any) -> bytes:
    """Random 12-bit values in 16-bit words: realistic size, incompressible, unique per file."""
    if _numpy is not None:
        values = rng.integers(0, 4096, size=(side, side), dtype=_numpy.uint16)
        return bytes(values.astype("<u2").tobytes())
    raw = bytearray(os.urandom(side * side * 2))
    raw[1::2] = raw[1::2].translate(_HIGH_BYTE_MASK)
    return bytes(raw)


def template(side: int) -> Dataset:
    """pydicom's CT example reshaped to ``side`` x ``side``: a real CT header (private tags and
    all), which is what the receivers spend their per-instance time on."""
    path = get_testdata_file("CT_small.dcm")
    if path is None:
        raise BenchError("pydicom's test file CT_small.dcm is missing; reinstall pydicom")
    ds = pydicom.dcmread(path)
    if (0xFFFC, 0xFFFC) in ds:  # trailing padding after the pixels: not part of a normal image
        del ds[0xFFFC, 0xFFFC]
    ds.Rows = side
    ds.Columns = side
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    return ds


def generate(folder: Path, count: int, side: int) -> None:
    """Write ``count`` instances of one study and series, each with its own SOP Instance UID.

    Built in a sibling folder and renamed into place, so an interrupted run never leaves a
    half-filled cache that a later run would trust.
    """
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    ds = template(side)
    rng = _numpy.random.default_rng(12345) if _numpy is not None else None
    print(f"bench: generating {count} instances of {side}x{side} in {folder} ...", file=sys.stderr)
    for number in range(1, count + 1):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = number
        ds.PixelData = pixel_bytes(side, rng)
        ds.save_as(partial / f"{number:06d}.dcm", enforce_file_format=True)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def image_set(name: SetName, count: int, side: int, nodelay: bool) -> ImageSet:
    """The cached set, generated first when the folder does not hold exactly ``count`` files of
    the right size."""
    folder = CACHE / f"{name}-{side}-{count}"
    files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
    usable = len(files) == count and len(list(folder.iterdir())) == count
    if usable:
        head = pydicom.dcmread(files[0], stop_before_pixels=True)
        usable = (head.Rows, head.Columns) == (side, side)
    if not usable:
        generate(folder, count, side)
        files = sorted(folder.glob("*.dcm"))
    total = sum(f.stat().st_size for f in files)
    return ImageSet(name, folder, count, side, total, nodelay)


# --- processes and /proc ---------------------------------------------------------------------


def find_dcmtk(tool: str) -> Path:
    """DCMTK's tool on PATH. pynetdicom installs scripts with the same names into the virtualenv,
    so its bin folder is skipped and the candidate must say it is DCMTK."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    search = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    search = [p for p in search if Path(p).resolve() != venv_bin] + ["/usr/bin", "/usr/local/bin"]
    found = shutil.which(tool, path=os.pathsep.join(search))
    if found is None:
        raise BenchError(f"DCMTK {tool} not found on PATH; install DCMTK (apt-get install dcmtk)")
    version = subprocess.run([found, "--version"], capture_output=True, text=True, check=False)
    if "dcmtk" not in (version.stdout + version.stderr).lower():
        raise BenchError(f"{found} is not DCMTK's {tool}; put DCMTK's bin folder first on PATH")
    return Path(found)


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def base_env() -> dict[str, str]:
    """Our environment without anything that would change a tool's behaviour behind our back:
    DCMTK reads TCP_NODELAY, the gateway reads GATEWAY_*."""
    return {
        k: v for k, v in os.environ.items() if k != "TCP_NODELAY" and not k.startswith("GATEWAY_")
    }


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return "(no output)"
    return "\n".join(text[-lines:]) or "(no output)"


def children_of(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (a receiver may use worker processes)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        parents[int(entry.name)] = int(fields[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        kids = [child for child, ppid in parents.items() if ppid == parent]
        found.extend(kids)
        frontier.extend(kids)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, its live descendants and the children it has reaped."""
    total = 0
    for index, proc in enumerate([pid, *children_of(pid)]):
        try:
            fields = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # after the command name: state=0, ppid=1, ..., utime=11, stime=12, cutime=13, cstime=14
        total += int(fields[11]) + int(fields[12])
        if index == 0:
            total += int(fields[13]) + int(fields[14])
    return total / CLOCK_TICKS


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of the process itself, in KiB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    """Poll until something accepts TCP connections on the port; fail if the server exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(
                f"{what} exited with status {process.returncode} before listening:\n{tail(log)}"
            )
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
            return
        time.sleep(POLL_S)
    raise BenchError(f"{what} did not accept connections on port {port} in {START_TIMEOUT_S} s")


# --- receivers -------------------------------------------------------------------------------


class Receiver(Protocol):
    name: TargetName
    called_ae: str
    port: int
    process: subprocess.Popen[bytes]

    def received(self) -> int: ...

    def stop(self) -> None: ...


class Storescp:
    """DCMTK's reference receiver, single process, writing each image to ``-od``: the baseline.

    It runs at its best, with TCP_NODELAY=1 (Nagle off on its own socket, which this DCMTK build
    does not do by default): without it every C-STORE-RSP waits out a delayed ACK and storescp
    manages about 22 CT images a second instead of several hundred, a baseline not worth beating.
    """

    name: TargetName = "storescp"
    called_ae = "STORESCP"

    def __init__(self, binary: Path, workdir: Path) -> None:
        self.out = workdir / "received"
        self.out.mkdir()
        self.log = workdir / "storescp.log"
        self.port = free_port()
        command = [str(binary), "-aet", self.called_ae, "-pdu", str(STORESCP_PDU),
                   "-od", str(self.out), str(self.port)]
        env = base_env() | {"TCP_NODELAY": "1"}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        wait_for_port(self.port, self.process, self.log, "storescp")

    def received(self) -> int:
        return sum(1 for f in self.out.iterdir() if f.is_file())

    def stop(self) -> None:
        """storescp has no graceful stop; every image was acknowledged and counted before this."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class GatewayServer:
    """``gateway serve`` with the default config, pointed by environment at a throwaway spool and
    SQLite database, listening on loopback only, logging warnings and worse."""

    name: TargetName = "gateway"
    called_ae = "GATEWAY"

    def __init__(self, workdir: Path, remap_db: Path | None = None, floor: bool = False) -> None:
        self.spool = workdir / "spool"
        self.db = workdir / "gateway.db"
        if remap_db is not None:
            self.name = "remap"
            shutil.copyfile(remap_db, self.db)  # identities and orders, imported once per bench
            (workdir / "rules.toml").write_text(REMAP_RULES, encoding="utf-8")
        self.missed_sigterm = False
        self.log = workdir / "gateway.log"
        self.port = free_port()
        env = base_env() | {
            "GATEWAY_DICOM__PORT": str(self.port),
            "GATEWAY_DICOM__BIND_HOST": LOOPBACK,
            "GATEWAY_METRICS__PORT": "0",
            "GATEWAY_STORAGE__SPOOL_DIR": str(self.spool),
            "GATEWAY_DATABASE__URL": f"sqlite:///{self.db}",
            "GATEWAY_STORAGE__MIN_FREE_MB": "100",
            "GATEWAY_LOGGING__LEVEL": "WARNING",
        }
        if remap_db is not None:
            env["GATEWAY_REMAP__RULES_FILE"] = str(workdir / "rules.toml")
        command = [str(GATEWAY_BIN), "serve", "--config", str(CONFIG)]
        if floor:  # the durable minimum on the gateway's own network path (durable_floor.py)
            self.name = "floor"
            command = [str(VENV_PYTHON), str(DURABLE_FLOOR)] + command[1:]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        wait_for_port(self.port, self.process, self.log, "gateway")

    def drain(self) -> float:
        """Seconds until no instance waits for its rewrite (0 without rules)."""
        if self.name != "remap":
            return 0.0
        began = time.perf_counter()
        while time.perf_counter() - began < DRAIN_TIMEOUT_S:
            with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as db:
                states = dict(db.execute(
                    "SELECT remap_state, count(*) FROM instances GROUP BY remap_state").fetchall())
            if not states.get("pending") and not states.get("rewriting"):
                if states.get("held") or states.get("failed"):
                    raise BenchError(f"remap left instances held or failed: {states}")
                return time.perf_counter() - began
            time.sleep(0.05)
        raise BenchError(f"rewrites not drained within {DRAIN_TIMEOUT_S} s")

    def received(self) -> int:
        """Published instances: ``*.dcm`` under the spool, not what is still in ``incoming``."""
        incoming = self.spool / "incoming"
        return sum(1 for f in self.spool.rglob("*.dcm") if incoming not in f.parents)

    def stop(self) -> None:
        """SIGTERM is the documented stop; anything but a clean exit 0 is a bug worth failing on.

        Nothing is in flight by now (storescu has released its association), so the gateway
        should be gone in well under a second. If it is still there after ``SIGTERM_AGAIN_S`` it
        missed the signal (seen when SIGTERM lands right after start-up, while the main thread is
        entering ``Event.wait()``): that is reported as a warning and the signal sent once more,
        so one lost signal does not cost the whole benchmark.
        """
        if self.process.poll() is not None:
            raise BenchError(
                f"gateway died during the run (status {self.process.returncode}):\n{tail(self.log)}"
            )
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(SIGTERM_AGAIN_S)
        except subprocess.TimeoutExpired:
            self.missed_sigterm = True
            print(f"bench: warning: gateway still running {SIGTERM_AGAIN_S:.0f} s after SIGTERM; "
                  "sending it again", file=sys.stderr)
            self.process.send_signal(signal.SIGTERM)
            try:
                status = self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise BenchError(f"gateway did not stop within {STOP_TIMEOUT_S} s of SIGTERM")
        if status != 0:
            raise BenchError(f"gateway exited with status {status} on SIGTERM:\n{tail(self.log)}")


class BarePynetdicomScp:
    """``scripts/bare_scp.py``: a tuned pynetdicom SCP that renames each streamed dataset into
    ``received`` and answers Success, nothing more. A reference, not a target: the gateway's rate
    divided by this one says what the gateway's own work costs on top of pynetdicom."""

    name: TargetName = "pynetdicom"
    called_ae = "BARESCP"

    def __init__(self, workdir: Path) -> None:
        self.out = workdir / "received"
        self.log = workdir / "bare_scp.log"
        self.port = free_port()
        command = [str(VENV_PYTHON), str(BARE_SCP), "--port", str(self.port),
                   "--out", str(self.out), "--aet", self.called_ae]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=base_env(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        wait_for_port(self.port, self.process, self.log, "bare pynetdicom SCP")

    def received(self) -> int:
        return sum(1 for f in self.out.iterdir() if f.is_file())

    def stop(self) -> None:
        """SIGTERM; it blocks the signal from start-up and waits for it, so it must exit 0."""
        if self.process.poll() is not None:
            raise BenchError(f"bare pynetdicom SCP died during the run (status "
                             f"{self.process.returncode}):\n{tail(self.log)}")
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise BenchError(f"bare pynetdicom SCP did not stop within {STOP_TIMEOUT_S} s")
        if status != 0:
            raise BenchError(
                f"bare pynetdicom SCP exited with status {status} on SIGTERM:\n{tail(self.log)}"
            )


def make_receiver(
    target: TargetName, storescp: Path, workdir: Path, remap_db: Path | None
) -> Receiver:
    if target == "storescp":
        return Storescp(storescp, workdir)
    if target == "gateway":
        return GatewayServer(workdir)
    if target == "remap":
        assert remap_db is not None
        return GatewayServer(workdir, remap_db)
    if target == "floor":
        return GatewayServer(workdir, floor=True)
    return BarePynetdicomScp(workdir)


def remap_database(images: ImageSet, workdir: Path) -> Path:
    """A gateway database holding 100k identities (one of them the bench patient's) and one order
    per identity, imported with the gateway's own commands, as a site would load them."""
    head = pydicom.dcmread(next(iter(sorted(images.folder.glob("*.dcm")))), stop_before_pixels=True)
    identities = workdir / "identities.csv"
    orders = workdir / "orders.csv"
    with open(identities, "w", encoding="utf-8") as ids, open(orders, "w", encoding="utf-8") as ords:
        ids.write("issuer,local_id,mrn,patient_name,birth_date,sex\n")
        ords.write("accession_number,mrn,modality,scheduled_at,requested_procedure_id,"
                   "requested_procedure_description\n")
        study_day = str(head.StudyDate)
        for number in range(IDENTITY_ROWS):
            local = str(head.PatientID) if number == 0 else f"DEV{number:07d}"
            ids.write(f"{CALLING_AE},{local},MRN{number:07d},PATIENT^{number},19700101,O\n")
            ords.write(f"A{number:07d},MRN{number:07d},CT,{study_day}1200,RP{number % 997},"
                       "CT HEAD\n")
    db = workdir / "remap-template.db"
    env = base_env() | {"GATEWAY_DATABASE__URL": f"sqlite:///{db}"}
    for kind, path in (("identities", identities), ("orders", orders)):
        began = time.perf_counter()
        result = subprocess.run([str(GATEWAY_BIN), kind, "import", str(path), "--config", str(CONFIG)],
                                cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BenchError(f"gateway {kind} import failed:\n{result.stdout}{result.stderr}")
        print(f"bench: imported {IDENTITY_ROWS} {kind} in {time.perf_counter() - began:.1f} s: "
              f"{result.stdout.strip()}", file=sys.stderr)
    return db


# --- one run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    target: TargetName
    image_set: ImageSet
    rep: int
    seconds: float
    server_cpu_s: float
    sender_cpu_s: float
    machine_busy: float  # fraction of all CPUs busy during the send
    peak_rss_kib: int
    missed_sigterm: bool
    overall_s: float  # including the receiver's start and stop
    drain_s: float = 0.0  # after the send, until every rewrite was done (remap only)

    @property
    def per_second(self) -> float:
        return self.image_set.count / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.image_set.total_bytes / 1e6 / self.seconds


def send(storescu: Path, images: ImageSet, receiver: Receiver, log: Path) -> tuple[float, float]:
    """Send the whole folder in one association; return (wall seconds, storescu CPU seconds).

    Only this command is timed. TCP_NODELAY=1 turns Nagle off in DCMTK; for the small set it is
    left out so the sender behaves like DCMTK's (and many modalities') default.
    """
    env = base_env()
    if images.nodelay:
        env["TCP_NODELAY"] = "1"
    command = [str(storescu), "-aet", CALLING_AE, "-aec", receiver.called_ae,
               "+sd", LOOPBACK, str(receiver.port), str(images.folder)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "wb") as out:
        start = time.perf_counter()
        try:
            result = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=SEND_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise BenchError(f"storescu to {receiver.name} took over {SEND_TIMEOUT_S} s")
        seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise BenchError(
            f"storescu to {receiver.name} exited with status {result.returncode}:\n{tail(log)}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def run_once(target: TargetName, images: ImageSet, rep: int, storescu: Path, storescp: Path,
             keep: bool, remap_db: Path | None = None) -> Run:
    """Fresh receiver in a fresh temp dir, one timed send, count what arrived, stop, clean up."""
    began = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix=f"gateway-bench-{target}-{images.name}-", dir="/tmp"))
    receiver: Receiver | None = None
    try:
        receiver = make_receiver(target, storescp, workdir, remap_db)
        pid = receiver.process.pid
        cpu_before = cpu_seconds(pid)
        busy_before, total_before = machine_ticks()
        seconds, sender_cpu = send(storescu, images, receiver, workdir / "storescu.log")
        busy_after, total_after = machine_ticks()
        server_cpu = cpu_seconds(pid) - cpu_before
        drain_s = receiver.drain() if isinstance(receiver, GatewayServer) else 0.0
        received = receiver.received()
        if received != images.count:
            raise BenchError(
                f"{target} has {received} of {images.count} images after storescu succeeded "
                f"({images.name} set, rep {rep + 1}); see {workdir} (kept)"
            )
        rss = peak_rss_kib(pid)
        to_stop, receiver = receiver, None
        to_stop.stop()
        missed = isinstance(to_stop, GatewayServer) and to_stop.missed_sigterm
    except BaseException:
        keep = True  # leave the evidence
        if receiver is not None:
            with contextlib.suppress(Exception):
                receiver.process.kill()
                receiver.process.wait(10)
        print(f"bench: kept {workdir}", file=sys.stderr)
        raise
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if keep:
        print(f"bench: kept {workdir}", file=sys.stderr)
    ticks = max(total_after - total_before, 1)
    return Run(target, images, rep, seconds, server_cpu, sender_cpu,
               (busy_after - busy_before) / ticks, rss, missed, time.perf_counter() - began,
               drain_s)


# --- report ----------------------------------------------------------------------------------


def median_rate(runs: Sequence[Run]) -> float:
    return statistics.median(r.per_second for r in runs)


def report(runs: Sequence[Run], sets: Sequence[ImageSet]) -> str:
    """The table: per set and receiver the medians and every repetition, then the ratios against
    their targets and what the gateway cost in memory and CPU."""
    header = (
        f"{'set':<18} {'receiver':<10} {'inst/s':>8} {'MB/s':>7} {'recv CPU':>9} "
        f"{'send CPU':>9} {'machine':>8} {'peak RSS':>9}   inst/s of each rep (wall s)"
    )
    lines = ["", header]
    for images in sets:
        for target in TARGETS:
            mine = [r for r in runs if r.image_set is images and r.target == target]
            if not mine:
                continue
            wall = sum(r.seconds for r in mine)
            each = "  ".join(f"{r.per_second:.1f} ({r.seconds:.2f})" for r in mine)
            lines.append(
                f"{images.name + ' ' + images.label:<18} {target:<10} "
                f"{median_rate(mine):>8.1f} {statistics.median(r.mb_per_second for r in mine):>7.1f} "
                f"{sum(r.server_cpu_s for r in mine) / wall:>8.0%} "
                f"{sum(r.sender_cpu_s for r in mine) / wall:>8.0%} "
                f"{statistics.mean(r.machine_busy for r in mine):>7.0%} "
                f"{max(r.peak_rss_kib for r in mine) / 1024:>6.1f} MiB   {each}"
            )
    lines += [
        "",
        "inst/s and MB/s are medians (file bytes / storescu wall time); recv/send CPU = user+sys",
        "CPU seconds of the receiver (with its children) and of storescu, over wall time (100% =",
        f"one core); machine = share of all {os.cpu_count()} CPUs busy during the sends.",
        "",
    ]
    targets = {"ct": ("CT", CT_TARGET), "small": ("small, Nagle-on sender", SMALL_TARGET)}
    for images in sets:
        gateway = [r for r in runs if r.image_set is images and r.target == "gateway"]
        baseline = [r for r in runs if r.image_set is images and r.target == "storescp"]
        if not gateway or not baseline:
            continue
        title, goal = targets[images.name]
        ratio = median_rate(gateway) / median_rate(baseline)
        verdict = "met" if ratio >= goal else "MISSED"
        lines.append(
            f"ratio gateway/storescp, {title} ({images.label}): {ratio:.2f}"
            f"   target >= {goal:.1f}: {verdict}"
        )
    for images in sets:
        gateway = [r for r in runs if r.image_set is images and r.target == "gateway"]
        bare = [r for r in runs if r.image_set is images and r.target == "pynetdicom"]
        if not gateway or not bare:
            continue
        title = targets[images.name][0]
        lines.append(
            f"ratio gateway/pynetdicom-bare, {title} ({images.label}): "
            f"{median_rate(gateway) / median_rate(bare):.2f}   (reference, no target)"
        )
    for images in sets:
        gateway = [r for r in runs if r.image_set is images and r.target == "gateway"]
        floor = [r for r in runs if r.image_set is images and r.target == "floor"]
        baseline = [r for r in runs if r.image_set is images and r.target == "storescp"]
        if not gateway or not floor or not baseline:
            continue
        to_floor = median_rate(gateway) / median_rate(floor)
        lines.append(
            f"ratio durable floor/storescp, {targets[images.name][0]} ({images.label}): "
            f"{median_rate(floor) / median_rate(baseline):.2f}   (reference: only the durable steps "
            f"before each Success; gateway/floor {to_floor:.2f})"
        )
    for images in sets:
        gateway = [r for r in runs if r.image_set is images and r.target == "gateway"]
        remap = [r for r in runs if r.image_set is images and r.target == "remap"]
        if not gateway or not remap:
            continue
        ratio = median_rate(remap) / median_rate(gateway)
        drained = statistics.median(images.count / (r.seconds + r.drain_s) for r in remap)
        lines.append(
            f"ratio gateway with 10 rules and {IDENTITY_ROWS} identities / without, "
            f"{targets[images.name][0]} ({images.label}): {ratio:.2f}   target >= {REMAP_TARGET}: "
            f"{'met' if ratio >= REMAP_TARGET else 'MISSED'}"
        )
        lines.append(
            f"  counting until every file was rewritten: {drained:.1f} inst/s, "
            f"{drained / median_rate(gateway):.2f} of the gateway without rules; rewrites finished "
            f"a median {statistics.median(r.drain_s for r in remap):.2f} s after the send"
        )
    gateway_runs = [r for r in runs if r.target == "gateway"]
    if gateway_runs:
        rss = [r.peak_rss_kib / 1024 for r in gateway_runs]
        cpu = [r.server_cpu_s / r.seconds for r in gateway_runs]
        lines.append(
            f"gateway peak RSS (VmHWM): max {max(rss):.1f} MiB, median {statistics.median(rss):.1f}"
            f" MiB over {len(rss)} runs; gateway CPU per run {', '.join(f'{c:.0%}' for c in cpu)}"
        )
    missed = sum(r.missed_sigterm for r in runs)
    if missed:
        lines.append(
            f"WARNING: the gateway ignored the first SIGTERM in {missed} of {len(gateway_runs)} "
            f"runs and stopped only on a second one (see the gateway's signal handling)"
        )
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Time DCMTK storescu sending to DCMTK storescp, to the gateway and to a bare "
        "pynetdicom SCP (loopback, one association) and compare against the receive targets.",
    )
    parser.add_argument("--count", type=int, default=1000, help="CT instances (default 1000)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per receiver (default 3)")
    parser.add_argument("--only", choices=("ct", "small"), help="run one set only")
    parser.add_argument("--keep", action="store_true", help="keep each run's temp dir under /tmp")
    args = parser.parse_args(argv)
    if args.count < 1 or args.reps < 1:
        parser.error("--count and --reps must be at least 1")
    return args


def run(args: argparse.Namespace) -> int:
    storescu = find_dcmtk("storescu")
    storescp = find_dcmtk("storescp")
    if not GATEWAY_BIN.exists():
        raise BenchError(f"{GATEWAY_BIN} is missing; run scripts/bench (it installs the gateway)")
    if not VENV_PYTHON.exists():
        raise BenchError(f"{VENV_PYTHON} is missing; run scripts/bench (it sets up .venv)")
    sets: list[ImageSet] = []
    if args.only in (None, "ct"):
        sets.append(image_set("ct", args.count, CT_SIDE, nodelay=True))
    if args.only in (None, "small"):
        sets.append(image_set("small", SMALL_COUNT, SMALL_SIDE, nodelay=False))
    print(f"bench: storescu {storescu}, storescp {storescp} (-pdu {STORESCP_PDU}), "
          f"gateway {GATEWAY_BIN}, bare pynetdicom SCP {BARE_SCP.name}; {args.reps} rep(s)",
          file=sys.stderr)
    runs: list[Run] = []
    scratch = Path(tempfile.mkdtemp(prefix="gateway-bench-remap-", dir="/tmp"))
    try:
        remap_db = remap_database(sets[0], scratch) if sets[0].name == "ct" else None
        for rep in range(args.reps):
            shift = rep % len(TARGETS)  # rotate: each receiver goes first, second, ... in turn
            order = TARGETS[shift:] + TARGETS[:shift]
            for images in sets:
                for target in order:
                    if target in ("remap", "floor") and images.name != "ct":
                        continue  # the remap target and the durable floor are about the CT set
                    result = run_once(target, images, rep, storescu, storescp, args.keep,
                                      remap_db)
                    runs.append(result)
                    drained = f", rewrites done {result.drain_s:.2f} s later" if result.drain_s else ""
                    print(f"bench: rep {rep + 1} {images.name:<5} {target:<10} "
                          f"{result.seconds:7.2f} s {result.per_second:8.1f} inst/s "
                          f"{result.mb_per_second:7.1f} MB/s  ({result.overall_s:.1f} s with start "
                          f"and stop{drained})", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(report(runs, sets))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
