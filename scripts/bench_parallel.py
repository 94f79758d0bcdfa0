"""Parallel receive benchmark (issue 20): N concurrent ``storescu`` associations (N = 1, 4, 8 by
default, 250 CT images each, ``TCP_NODELAY=1``, loopback) to the gateway (``dicom.workers`` at its
default, the number of cores), to DCMTK ``storescp --fork`` and to Orthanc's C-STORE, in the same
run, alternating (each repetition rotates which receiver goes first).

Reported per receiver and N: aggregate images/s (all images over the wall time from the first
``storescu`` start to the last exit), the ratios gateway/Orthanc and gateway(N)/gateway(1), the
receiver's CPU per image (its whole process tree), and for the gateway the CPU split by role,
read from each process's name (``gw-receiver-N``, ``gw-forward``, ``gw-remap``; the supervisor is
the rest) and the senders' CPU. Targets (issue 20, 2-core machines): with 4 associations the
gateway at least Orthanc's rate (1.0x) and at least 1.6x its own single-association rate.

``--full`` adds the receiver ``gateway-full``: the gateway with bench.py's ten remap rules over
100k identities and forwarding to an Orthanc of its own, timed for the senders as the others are
(the modality-facing rate), its CPU followed until the last instance is confirmed at that Orthanc,
so that the split covers every stage an image goes through (receivers, remap, forward, the
supervisor; the destination Orthanc's own CPU is not the gateway's and is left out).

    scripts/bench --parallel [1,4,8] [--count 250] [--reps 2] [--full] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import bench_forward
from bench import (
    CLOCK_TICKS,
    LOOPBACK,
    BenchError,
    GatewayServer,
    base_env,
    children_of,
    find_dcmtk,
    free_port,
    image_set,
    machine_ticks,
    wait_for_port,
)

TARGETS = ("gateway", "storescp-fork", "orthanc")
FULL = "gateway-full"
ORTHANC_TARGET = 1.0  # gateway / Orthanc with 4 associations: at least this
SCALE_TARGET = 1.6  # gateway with 4 associations / gateway with 1: at least this


class StorescpFork:
    """DCMTK ``storescp --fork``: one child process per association, writing to ``-od``."""

    name = "storescp-fork"
    called_ae = "STORESCP"

    def __init__(self, binary: Path, workdir: Path) -> None:
        self.out = workdir / "received"
        self.out.mkdir()
        self.log = workdir / "storescp.log"
        self.port = free_port()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(binary), "--fork", "-aet", self.called_ae, "-pdu", str(bench.STORESCP_PDU),
                 "-od", str(self.out), str(self.port)],
                env=base_env() | {"TCP_NODELAY": "1"}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for_port(self.port, self.process, self.log, "storescp --fork")

    def received(self) -> int:
        return sum(1 for f in self.out.iterdir() if f.is_file())

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(bench.STOP_TIMEOUT_S)


class CpuTracker:
    """CPU seconds per role of a process tree, sampled while it runs: a worker that exits (or a
    storescp child whose association ended) keeps what it used when it was last seen."""

    def __init__(self, root: int) -> None:
        self._root = root
        self._seen: dict[int, tuple[str, float]] = {}

    def sample(self) -> None:
        for pid in [self._root, *children_of(self._root)]:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except (FileNotFoundError, ProcessLookupError):
                continue
            fields = stat.rsplit(")", 1)[1].split()
            self._seen[pid] = (comm, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)

    def by_role(self) -> dict[str, float]:
        roles: dict[str, float] = defaultdict(float)
        for comm, seconds in self._seen.values():
            role = ("receivers" if comm.startswith("gw-receiver") else
                    comm.removeprefix("gw-") if comm.startswith("gw-") else "supervisor/other")
            roles[role] += seconds
        return dict(roles)


@dataclass
class Run:
    target: str
    parallel: int
    images: int
    seconds: float
    server_cpu: dict[str, float]
    sender_cpu: float
    machine_busy: float
    per_second: float = field(init=False)

    def __post_init__(self) -> None:
        self.per_second = self.images / self.seconds


def run_once(target: str, parallel: int, files: list[Path], storescu: Path, storescp: Path,
             keep: bool, remap_db: Path | None = None) -> Run:
    workdir = Path(tempfile.mkdtemp(prefix=f"gateway-bench-par-{target}-{parallel}-", dir="/tmp"))
    receiver: object = None
    destination: bench_forward.OrthancServer | None = None
    try:
        if target == "gateway":
            receiver = GatewayServer(workdir)
        elif target == FULL:
            (workdir / "destination").mkdir()
            destination = bench_forward.OrthancServer(workdir / "destination")
            receiver = bench_forward.BenchGateway(workdir, destination, remap_db)
        elif target == "storescp-fork":
            receiver = StorescpFork(storescp, workdir)
        else:
            receiver = bench_forward.OrthancServer(workdir)
        port, called = receiver.port, receiver.called_ae  # type: ignore[attr-defined]
        tracker = CpuTracker(receiver.process.pid)  # type: ignore[attr-defined]
        tracker.sample()
        before_roles = tracker.by_role()
        per = len(files) // parallel
        env = base_env() | {"TCP_NODELAY": "1"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy_before = machine_ticks()
        start = time.perf_counter()
        senders = [subprocess.Popen(
            [str(storescu), "-aet", calling(target, i), "-aec", called, LOOPBACK, str(port),
             *map(str, files[i * per:(i + 1) * per])],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            for i in range(parallel)]
        while any(s.poll() is None for s in senders):
            tracker.sample()
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        tracker.sample()
        busy_after = machine_ticks()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        for s in senders:
            _, err = s.communicate()
            if s.returncode:
                raise BenchError(f"storescu to {target} failed: {err.decode()[-400:]}")
        received = receiver.received()  # type: ignore[attr-defined]
        if received != per * parallel:
            raise BenchError(f"{target} has {received} of {per * parallel} images; see {workdir}")
        if isinstance(receiver, bench_forward.BenchGateway):  # every stage's CPU, to the end
            sampler = threading.Event()
            thread = threading.Thread(target=_sample_until, args=(tracker, sampler), daemon=True)
            thread.start()
            try:
                receiver.wait_confirmed(per * parallel)
            finally:
                sampler.set()
                thread.join()
            tracker.sample()
        roles = {k: v - before_roles.get(k, 0.0) for k, v in tracker.by_role().items()}
        receiver.stop()  # type: ignore[attr-defined]
        receiver = None
        if destination is not None:
            destination.stop()
            destination = None
    except BaseException:
        keep = True
        if receiver is not None:
            with contextlib.suppress(Exception):
                os.killpg(receiver.process.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        if destination is not None:
            with contextlib.suppress(Exception):
                destination.stop()
        raise
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: kept {workdir}", file=sys.stderr)
    sender_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    ticks = max(busy_after[1] - busy_before[1], 1)
    return Run(target, parallel, per * parallel, seconds, roles, sender_cpu,
               (busy_after[0] - busy_before[0]) / ticks)


def calling(target: str, sender: int) -> str:
    """Each sender its own AE title; for ``gateway-full`` the one its remap rules look identities
    up under (bench.py's), so that every image is rewritten rather than held."""
    return bench.CALLING_AE if target == FULL else f"{bench.CALLING_AE}{sender}"


def _sample_until(tracker: CpuTracker, done: threading.Event) -> None:
    while not done.wait(0.1):
        tracker.sample()


def report(runs: Sequence[Run], parallels: Sequence[int]) -> str:
    def median(target: str, n: int) -> float | None:
        rates = [r.per_second for r in runs if r.target == target and r.parallel == n]
        return statistics.median(rates) if rates else None

    lines = [(f"{'receiver':<14} {'N':>2} {'images/s':>9} {'CPU ms/image':>13}  "
              "CPU split (s) / senders (s) / machine busy")]
    for n in parallels:
        for target in (*TARGETS, FULL):
            mine = [r for r in runs if r.target == target and r.parallel == n]
            if not mine:
                continue
            cpu = statistics.median(sum(r.server_cpu.values()) / r.images * 1000 for r in mine)
            split = ", ".join(f"{k} {statistics.median(r.server_cpu.get(k, 0.0) for r in mine):.1f}"
                              for k in sorted({k for r in mine for k in r.server_cpu}))
            lines.append(
                f"{target:<14} {n:>2} {median(target, n):>9.1f} {cpu:>13.2f}  {split} / "
                f"{statistics.median(r.sender_cpu for r in mine):.1f} / "
                f"{statistics.median(r.machine_busy for r in mine):.0%}")
    one = median("gateway", 1)
    for n in parallels:
        gateway, orthanc, fork = median("gateway", n), median("orthanc", n), median(
            "storescp-fork", n)
        if gateway is None:
            continue
        parts = [f"N={n}: gateway/orthanc {gateway / orthanc:.2f}" if orthanc else f"N={n}:"]
        if fork:
            parts.append(f"gateway/storescp-fork {gateway / fork:.2f}")
        if one and n != 1:
            parts.append(f"gateway N={n}/N=1 {gateway / one:.2f}")
        lines.append(", ".join(parts))
    four, orthanc4 = median("gateway", 4), median("orthanc", 4)
    if four and orthanc4 and one:
        lines.append(f"targets (N=4): gateway/orthanc >= {ORTHANC_TARGET}: "
                     f"{'met' if four / orthanc4 >= ORTHANC_TARGET else 'not met'}; "
                     f"gateway N=4/N=1 >= {SCALE_TARGET}: "
                     f"{'met' if four / one >= SCALE_TARGET else 'not met'}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench --parallel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", nargs="?", default="1,4,8", const="1,4,8",
                        help="concurrent associations, comma-separated (default 1,4,8)")
    parser.add_argument("--count", type=int, default=250, help="CT images per association")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--only", choices=(*TARGETS, FULL), action="append",
                        help="these receivers only")
    parser.add_argument("--full", action="store_true",
                        help=f"also {FULL}: remap rules and forwarding to an Orthanc")
    parser.add_argument("--keep", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    parallels = [int(p) for p in args.parallel.split(",") if p]
    remap_db: Path | None = None
    targets = tuple(args.only) if args.only else TARGETS + ((FULL,) if args.full else ())
    if not bench.GATEWAY_BIN.exists():  # run from a checkout without .venv: this interpreter's
        bench.GATEWAY_BIN = Path(sys.executable).with_name("gateway")
    try:
        storescu, storescp = find_dcmtk("storescu"), find_dcmtk("storescp")
        images = image_set("ct", max(parallels) * args.count, bench.CT_SIDE, nodelay=True)
        files = sorted(images.folder.glob("*.dcm"))
        if FULL in targets:
            scratch = Path(tempfile.mkdtemp(prefix="gateway-bench-par-remap-", dir="/tmp"))
            remap_db = bench.remap_database(images, scratch)
        print(f"bench: load average {os.getloadavg()}, {os.cpu_count()} cores", file=sys.stderr)
        runs: list[Run] = []
        for rep in range(args.reps):
            for n in parallels:
                shift = rep % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    result = run_once(target, n, files[:n * args.count], storescu, storescp,
                                      args.keep, remap_db)
                    runs.append(result)
                    print(f"bench: rep {rep + 1} N={n} {target:<14} {result.seconds:7.2f} s "
                          f"{result.per_second:7.1f} images/s", file=sys.stderr)
        print(f"bench: load average {os.getloadavg()}", file=sys.stderr)
        print(report(runs, parallels))
        return 0
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        bench_forward.kill_all()
        if remap_db is not None:
            shutil.rmtree(remap_db.parent, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
