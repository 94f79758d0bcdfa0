"""Modality Worklist benchmark: the MWL C-FIND SCP and the build job on 10,000 scheduled items.

Two questions, each against a reference measured in the same run:

1. A modality's query, ``findscu -W`` for one station's steps today (about 40 answered, the keys a
   modality asks for), wall clock from process start to exit, against DCMTK ``wlmscpfs`` serving
   the same 10,000 items as ``.wl`` files (written by the gateway's own ``wl_folder`` code; it
   reads every file for every query, the gateway reads indexes), and against an ``echoscu`` round
   trip to the gateway timed in the same loop (process start, association, C-ECHO, release): what
   the query itself costs beyond starting a DCMTK process and associating. Targets: gateway /
   wlmscpfs at most 0.2, gateway / echoscu at most 1.3. Each answer set is checked: the same
   accession numbers from both servers, as many as the table holds.
2. The build job for 10,000 orders (``gateway.worklist.build.build_worklist``, in this process)
   against the plain ``orders import`` of the same CSV file (``gateway.remap.imports
   .import_orders``, in this process) in the same run, as orders per second; and a second build
   with nothing changed (what every scheduled run costs). Target: the build costs no more than the
   import. The CSV has no station column (``orders import`` has none), so each order's Scheduled
   Station AE Title is set afterwards, untimed, as HL7 intake would have set it.

The data is generated, deterministically (seeded): 25 stations x 10 days (today - 4 .. today + 5),
40 steps each, patients with non-ASCII names among them. The database is SQLite (default) or
PostgreSQL (``--database postgresql``), fresh each run.

Run: ``scripts/bench --worklist [--orders N] [--reps N] [--database sqlite|postgresql] [--keep]``.
Exit status 0 when every run completed (the table says whether the targets were met), 1 on an
error (a missing tool, a server that does not start, a wrong answer).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from bench_find import (  # scripts/ is on sys.path when run as a script
    BenchError,
    busy_share,
    clean_env,
    cpu_jiffies,
    free_port,
    load,
    postgres_server_url,
    tail,
    timed,
)
from sqlalchemy import Table, bindparam, create_engine, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from gateway.config import WorklistConfig
from gateway.db.engine import make_engine, make_sessions
from gateway.db.migrate import upgrade
from gateway.db.models import Order
from gateway.remap.imports import import_orders
from gateway.worklist.build import build_worklist
from gateway.worklist.files import sync_wl_folder

REPO = Path(__file__).resolve().parent.parent
GATEWAY_BIN = Path(sys.executable).with_name("gateway")
LOOPBACK = "127.0.0.1"
OUR_AE, GATEWAY_AE, WLM_AE = "CT_ROOM07", "GATEWAY", "WORKLIST"
SEED = 20261203
STATIONS, DAYS, PER_STATION_DAY = 25, 10, 40
WARMUP = 3
START_TIMEOUT_S = 60.0
RATIO_WLMSCPFS, RATIO_ECHO = 0.2, 1.3
FAMILY = ("MÜLLER", "SMITH", "GARCÍA", "ROSSI", "DUBOIS", "NOWAK", "JANSEN", "SILVA", "ØSTERGÅRD",
          "BROWN", "MARTIN", "WEBER", "LEROY", "FISCHER", "COSTA", "YAMADA")
GIVEN = ("ANNA", "JOHN", "MARÍA", "PETER", "SOFIA", "LUCAS", "EMMA", "NOAH", "LÉA", "JÜRGEN")
PROCEDURES = ("CT HEAD", "CT THORAX", "CT ABDOMEN", "CT ANGIO", "CT SPINE")
# What a modality asks for (typical conformance statements): the SPS keys inside the sequence.
TOP_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
            "StudyInstanceUID", "RequestedProcedureID", "RequestedProcedureDescription",
            "ReferringPhysicianName")
SPS_KEYS = ("Modality", "ScheduledProcedureStepStartTime", "ScheduledProcedureStepID",
            "ScheduledProcedureStepDescription", "ScheduledPerformingPhysicianName",
            "ScheduledStationName")


def station(n: int) -> str:
    return f"CT_ROOM{n:02d}"


def write_orders(path: Path, count: int, today: datetime) -> dict[str, str]:
    """The CSV ``gateway orders import`` reads; returns accession -> station."""
    rng = random.Random(SEED)
    stations: dict[str, str] = {}
    first_day = today.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=4)
    with open(path, "w", newline="", encoding="utf-8") as fp:
        out = csv.writer(fp)
        out.writerow(["accession_number", "mrn", "modality", "scheduled_at",
                      "requested_procedure_id", "requested_procedure_description",
                      "patient_name", "birth_date", "sex"])
        for n in range(count):
            day, rest = divmod(n, STATIONS * PER_STATION_DAY)
            room, slot = divmod(rest, PER_STATION_DAY)
            start = first_day + timedelta(days=day % DAYS, hours=7, minutes=slot * 15)
            accession = f"A{n:07d}"
            stations[accession] = station(room + 1)
            out.writerow([accession, f"MRN{rng.randrange(10**7):07d}", "CT",
                          start.strftime("%Y-%m-%dT%H:%M:%S"), f"RP{n:07d}",
                          rng.choice(PROCEDURES),
                          f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}",
                          f"{rng.randrange(1930, 2020)}0{rng.randrange(1, 10)}1{rng.randrange(10)}",
                          rng.choice("MFO")])
    return stations


@dataclass
class BuildTimes:
    orders: int
    import_s: float
    build_s: float
    rebuild_s: float
    added: int


def median_times(runs: list[BuildTimes]) -> BuildTimes:
    return BuildTimes(runs[0].orders, statistics.median(r.import_s for r in runs),
                      statistics.median(r.build_s for r in runs),
                      statistics.median(r.rebuild_s for r in runs), runs[0].added)


def fill(url: str, workdir: Path, count: int, today: datetime) -> BuildTimes:
    engine = make_engine(url)
    try:
        upgrade(engine)
        csv_path = workdir / "orders.csv"
        stations = write_orders(csv_path, count, today)
        sessions = make_sessions(engine)
        began = time.perf_counter()
        with sessions() as session, session.begin():
            report = import_orders(session, csv_path, "bench", datetime.now(UTC))
        import_s = time.perf_counter() - began
        if report.added != count:
            raise BenchError(f"orders import added {report.added}, not {count}: {report.lines()}")
        with Session(engine) as session, session.begin():  # untimed: HL7 would carry it
            orders = cast(Table, Order.__table__)
            session.execute(update(orders).where(orders.c.accession_number == bindparam("a"))
                            .values(scheduled_station_ae=bindparam("s")),
                            [{"a": a, "s": s} for a, s in stations.items()])
        config = WorklistConfig(expire_after_h=24 * 8)
        began = time.perf_counter()
        built = build_worklist(sessions, config, "2.25", datetime.now(UTC))
        build_s = time.perf_counter() - began
        began = time.perf_counter()
        again = build_worklist(sessions, config, "2.25", datetime.now(UTC))
        rebuild_s = time.perf_counter() - began
        if again.added or again.updated:
            raise BenchError(f"a second build changed something: {again.lines[-1]}")
        return BuildTimes(count, import_s, build_s, rebuild_s, built.added)
    finally:
        engine.dispose()


def write_wl_files(url: str, folder: Path) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            written, _ = sync_wl_folder(connection, folder, datetime.now(UTC), set())
        return written
    finally:
        engine.dispose()


class Server:
    def __init__(self, command: list[str], port: int, log: Path, env: dict[str, str]) -> None:
        self.port, self.log = port, log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise BenchError(f"{command[0]} exited before listening:\n{tail(log)}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 1):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{command[0]} did not listen on {port}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def gateway(workdir: Path, url: str, metrics_port: int) -> Server:
    port = free_port()
    config = workdir / "gateway.toml"
    config.write_text(
        f'[dicom]\nae_title = "{GATEWAY_AE}"\nbind_host = "{LOOPBACK}"\nport = {port}\n\n'
        '[security]\ncheck_called_ae_title = true\nunknown_callers = ["echo", "worklist"]\n\n'
        f"[storage]\nspool_dir = {json.dumps(str(workdir / 'spool'))}\nmin_free_mb = 1\n\n"
        f"[database]\nurl = {json.dumps(url)}\n\n"
        f'[metrics]\nenabled = true\nhost = "{LOOPBACK}"\nport = {metrics_port}\n\n'
        '[worklist]\nexpire_after_h = 192\n\n[logging]\nlevel = "WARNING"\n', encoding="utf-8")
    return Server([str(GATEWAY_BIN), "serve", "--config", str(config)], port,
                  workdir / "gateway.log", clean_env())


def find_command(port: int, called: str, day: str, room: str, extract: bool) -> list[str]:
    command = [shutil.which("findscu") or "findscu", "-W", "-v", "-aet", OUR_AE, "-aec", called,
               LOOPBACK, str(port), "-k", "ScheduledProcedureStepSequence[0].Modality=CT",
               "-k", f"ScheduledProcedureStepSequence[0].ScheduledStationAETitle={room}",
               "-k", f"ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate={day}"]
    command += [a for k in TOP_KEYS for a in ("-k", k)]
    command += [a for k in SPS_KEYS for a in ("-k", f"ScheduledProcedureStepSequence[0].{k}")]
    return command + (["-X"] if extract else [])


def accessions(folder: Path) -> list[str]:
    import pydicom

    return sorted(str(pydicom.dcmread(f).AccessionNumber) for f in folder.glob("rsp*.dcm"))


def answered(output: str) -> int:
    if "Final Find Response (Success)" not in output:
        raise BenchError(f"findscu did not succeed:\n{output[-2000:]}")
    return output.count("(Pending)")


@dataclass
class Loop:
    gateway_s: list[float]
    wlmscpfs_s: list[float]
    echo_s: list[float]
    results: list[int]
    busy: float


def query_loop(ours: Server, theirs: Server, reps: int, today: datetime, workdir: Path) -> Loop:
    env = clean_env() | {"TCP_NODELAY": "1"}
    echoscu = shutil.which("echoscu") or "echoscu"
    day = today.strftime("%Y%m%d")
    # first, the answers themselves: the same steps from both, as many as were scheduled
    for room in (station(7), station(19)):
        folders = []
        for server, called in ((ours, GATEWAY_AE), (theirs, WLM_AE)):
            folder = workdir / f"check-{called}-{room}"
            folder.mkdir()
            subprocess.run(find_command(server.port, called, day, room, True), cwd=folder,
                           env=env, capture_output=True, timeout=120, check=True)
            folders.append(accessions(folder))
        if folders[0] != folders[1] or len(folders[0]) != PER_STATION_DAY:
            raise BenchError(f"{room}: gateway answered {len(folders[0])}, wlmscpfs "
                             f"{len(folders[1])}; they differ or are not {PER_STATION_DAY}")
    loop = Loop([], [], [], [], 0.0)
    before = cpu_jiffies()
    for rep in range(WARMUP + reps):
        room = station(rep % STATIONS + 1)
        runs = [("gateway", find_command(ours.port, GATEWAY_AE, day, room, False)),
                ("wlmscpfs", find_command(theirs.port, WLM_AE, day, room, False)),
                ("echo", [echoscu, "-aet", OUR_AE, "-aec", GATEWAY_AE, LOOPBACK,
                          str(ours.port)])]
        if rep % 2:
            runs.reverse()  # neither always follows the other
        for name, command in runs:
            seconds, done = timed(command, env)
            if done.returncode != 0:
                raise BenchError(f"{name} failed:\n{(done.stdout + done.stderr)[-2000:]}")
            if rep < WARMUP:
                continue
            if name == "gateway":
                loop.gateway_s.append(seconds)
                loop.results.append(answered(done.stdout + done.stderr))
            elif name == "wlmscpfs":
                loop.wlmscpfs_s.append(seconds)
            else:
                loop.echo_s.append(seconds)
    loop.busy = busy_share(before, cpu_jiffies())
    return loop


def handler_time(metrics_port: int) -> float:
    """Mean seconds from a worklist C-FIND request to its final response, in the gateway."""
    import urllib.request

    with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=10) as page:
        text_ = page.read().decode()
    found = {line.split()[0]: float(line.split()[1]) for line in text_.splitlines()
             if line.startswith("gateway_worklist_query_seconds_")}
    return found.get("gateway_worklist_query_seconds_sum", 0.0) / max(
        found.get("gateway_worklist_query_seconds_count", 1.0), 1.0)


def database_url(kind: str, workdir: Path) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'gateway.db'}", None
    server = make_url(postgres_server_url())
    name = f"gateway_bench_worklist_{time.time_ns()}"  # fresh databases come within a second
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return server.set(database=name).render_as_string(hide_password=False), name


def drop_database(name: str) -> None:
    admin = create_engine(make_url(postgres_server_url()), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=STATIONS * DAYS * PER_STATION_DAY)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--build-reps", type=int, default=3,
                        help="import + build pairs, each on a fresh database (medians)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    for tool in ("findscu", "echoscu", "wlmscpfs"):
        if shutil.which(tool) is None:
            print(f"bench_worklist: {tool} not found (apt-get install dcmtk)", file=sys.stderr)
            return 1
    workdir = Path(tempfile.mkdtemp(prefix="bench-worklist-"))
    url, pg_name = database_url(args.database, workdir)
    servers: list[Server] = []
    try:
        today = datetime.now()
        print(f"{args.database}: importing and building {args.orders:,} orders "
              f"(load average {load()})", file=sys.stderr)
        runs = []
        for rep in range(args.build_reps):  # import and build on a fresh database each time
            if rep < args.build_reps - 1:
                scratch = workdir / f"build-{rep}"
                scratch.mkdir()
                scratch_url, scratch_pg = database_url(args.database, scratch)
                try:
                    runs.append(fill(scratch_url, scratch, args.orders, today))
                finally:
                    if scratch_pg:
                        drop_database(scratch_pg)
            else:  # the last one is the database queried below
                runs.append(fill(url, workdir, args.orders, today))
        times = median_times(runs)
        wl_root = workdir / "wlm"
        files = write_wl_files(url, wl_root / WLM_AE)
        print(f"wrote {files:,} .wl files for wlmscpfs; querying", file=sys.stderr)
        metrics_port = free_port()
        ours = gateway(workdir, url, metrics_port)
        servers.append(ours)
        wlm_port = free_port()
        theirs = Server([shutil.which("wlmscpfs") or "wlmscpfs", "-dfp", str(wl_root),
                         str(wlm_port)], wlm_port, workdir / "wlmscpfs.log", clean_env())
        servers.append(theirs)
        loop = query_loop(ours, theirs, args.reps, today, workdir)
        handler_ms = handler_time(metrics_port) * 1000
    except BenchError as exc:
        print(f"bench_worklist: {exc}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            server.stop()
        if pg_name:
            drop_database(pg_name)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    gateway_ms, wlm_ms = statistics.median(loop.gateway_s), statistics.median(loop.wlmscpfs_s)
    echo_ms = statistics.median(loop.echo_s)
    to_wlm, to_echo = gateway_ms / wlm_ms, gateway_ms / echo_ms
    print(f"\nModality Worklist, {args.database}, {times.added:,} scheduled steps, "
          f"{args.reps} queries each (medians, process start to exit; machine busy "
          f"{loop.busy:.0%} of both CPUs)")
    print(f"  findscu -W to the gateway  {ms(gateway_ms):>8} ms   "
          f"({statistics.median(loop.results):.0f} items answered)")
    print(f"  findscu -W to wlmscpfs     {ms(wlm_ms):>8} ms")
    print(f"  echoscu to the gateway     {ms(echo_ms):>8} ms")
    print(f"  the gateway's C-FIND handler, mean (gateway_worklist_query_seconds) "
          f"{handler_ms:.1f} ms")
    print(f"  gateway / wlmscpfs  {to_wlm:.3f}  (target <= {RATIO_WLMSCPFS}: "
          f"{'met' if to_wlm <= RATIO_WLMSCPFS else 'NOT met'})")
    print(f"  gateway / echoscu   {to_echo:.3f}  (target <= {RATIO_ECHO}: "
          f"{'met' if to_echo <= RATIO_ECHO else 'NOT met'})")
    import_rate, build_rate = times.orders / times.import_s, times.orders / times.build_s
    print(f"\nBuild job, {times.orders:,} orders (medians of {args.build_reps}, each on a fresh "
          "database):")
    print(f"  orders import   {times.import_s:6.2f} s  {import_rate:8,.0f} orders/s")
    print(f"  worklist build  {times.build_s:6.2f} s  {build_rate:8,.0f} orders/s   "
          f"(build / import time {times.build_s / times.import_s:.2f}; target <= 1: "
          f"{'met' if times.build_s <= times.import_s else 'NOT met'})")
    print(f"  rebuild, nothing changed  {times.rebuild_s:6.2f} s  "
          f"{times.orders / times.rebuild_s:8,.0f} orders/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
