"""C-FIND benchmark: is a study-level query answered in under 50 ms on a ledger the size of a
busy site's (100k studies, 1M instances), on SQLite and on PostgreSQL?

Why this shape: C-FIND is answered from the ``instances`` table alone, so what matters is how the
gateway's SQL behaves on a big table, plus the fixed cost of DIMSE; the images themselves are not
needed. The table is filled with generated rows (not files), deterministically (seeded), so that
every run queries the same data: 100k studies by default (``--studies``), 10 instances each in 2
series, about 30k patients (about 3 studies each), study dates over 3 years, modalities CT, MR,
US and CR, unique accession numbers. Studies are inserted in date order, as a gateway receives
them. Filling takes a while, so the result is cached: a SQLite file under
``~/.cache/gateway-bench/find-<studies>.db`` and a PostgreSQL database
``gateway_bench_find_<studies>`` on the machine's cluster, each reused when its row count and a
fingerprint row match (built under a temporary name and renamed when complete, so a half-filled
one is never trusted). The schema comes from ``gateway.db.migrate.upgrade``, as ``serve`` makes
it; the statistics are refreshed after filling (SQLite ``ANALYZE``, PostgreSQL ``VACUUM ANALYZE``:
a long-running database has been vacuumed and analysed by autovacuum).

What is timed is what a viewer sees: DCMTK ``findscu`` (Study Root, level STUDY, the keys a
worklist screen asks for) against ``gateway serve`` on loopback, wall clock from process start to
exit, by Patient ID, by a study date range (one day by default, about 90 studies; ``--date-days``)
and by Accession Number. Each query uses another existing value picked (seeded) from the table,
after 3 warm-up queries per kind. In the same loop ``echoscu`` (process start, association,
C-ECHO, release) is timed as the reference: the difference is what the query itself costs beyond
starting a DCMTK process and associating. The queries' SQL is also timed in this process
(``gateway.query.find.parse`` and ``run`` on an engine made like the gateway's) to tell database
time from DIMSE time. Every answer count is checked against a direct SQL count, and every study
answered must have 10 instances in 2 series.

The verdict compares findscu's median wall time with the 50 ms target. A kind over the target (or
every kind with ``--explain``) gets the SQL the gateway issued and the database's plan printed.

Exit status: 0 when every run completed (targets met or not: the table says), 1 on an error (a
missing tool, a server that does not start, a wrong answer).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydicom.dataset import Dataset
from sqlalchemy import Engine, create_engine, event, func, insert, select, text
from sqlalchemy.engine import make_url

from gateway.config import QueryConfig
from gateway.db.engine import make_engine
from gateway.db.migrate import upgrade
from gateway.db.models import Instance
from gateway.query.find import STUDY_ROOT_FIND, parse, run

REPO = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "gateway-bench"
GATEWAY_BIN = REPO / ".venv" / "bin" / "gateway"
LOOPBACK = "127.0.0.1"
OUR_AE, GATEWAY_AE = "BENCH", "GATEWAY"
TARGET_MS = 50.0
WARMUP = 3
SEED = 20261123
BATCH = 10_000
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
TOOL_TIMEOUT_S = 60.0

PATIENTS_PER_STUDY = 0.3  # 100k studies -> 30k patients, about 3 studies each
SERIES_PER_STUDY = 2
INSTANCES_PER_SERIES = 5
FIRST_DAY = date(2023, 1, 1)
DAYS = 3 * 365
UID_ROOT = "1.2.826.0.1.3680043.10.1137"  # synthetic UIDs: <root>.<study>[.<series>[.<instance>]]
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class Modality:
    sop_class_uid: str
    size_bytes: int
    descriptions: tuple[str, ...]
    body_parts: tuple[str, ...]


MODALITIES: dict[str, Modality] = {
    "CT": Modality("1.2.840.10008.5.1.4.1.1.2", 526_000,
                   ("CT THORAX", "CT ABDOMEN PELVIS", "CT HEAD", "CT ANGIO"),
                   ("CHEST", "ABDOMEN", "HEAD")),
    "MR": Modality("1.2.840.10008.5.1.4.1.1.4", 134_000,
                   ("MR BRAIN", "MR KNEE", "MR SPINE LUMBAR"), ("BRAIN", "KNEE", "LSPINE")),
    "US": Modality("1.2.840.10008.5.1.4.1.1.6.1", 820_000,
                   ("US ABDOMEN", "US THYROID", "US OBSTETRIC"), ("ABDOMEN", "NECK", "PELVIS")),
    "CR": Modality("1.2.840.10008.5.1.4.1.1.1", 9_400_000,
                   ("XR CHEST PA", "XR HAND", "XR KNEE"), ("CHEST", "HAND", "KNEE")),
}
LAST_NAMES = ("MULLER", "SMITH", "GARCIA", "ROSSI", "DUBOIS", "NOWAK", "JANSEN", "SILVA",
              "KOWALSKI", "OLSEN", "BROWN", "MARTIN", "WEBER", "LEROY", "FISCHER", "COSTA")
FIRST_NAMES = ("ANNA", "JOHN", "MARIA", "PETER", "SOFIA", "LUCAS", "EMMA", "NOAH", "LEA",
               "DAVID", "CLARA", "PAUL", "JULIA", "MARC", "EVA", "TOM")
PHYSICIANS = ("HOUSE^GREGORY", "GREY^MEREDITH", "ROSS^DOUG", "KILDARE^JAMES")

# What findscu asks for: the keys a study list shows. The matching key of each kind gets a value.
FIND_KEYS = ("PatientID", "StudyInstanceUID", "StudyDate", "AccessionNumber", "PatientName",
             "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries",
             "StudyDescription")
Kind = Literal["patient", "date", "accession"]
KINDS: tuple[Kind, ...] = ("patient", "date", "accession")
MATCH_KEY: dict[Kind, str] = {
    "patient": "PatientID", "date": "StudyDate", "accession": "AccessionNumber"
}
DatabaseName = Literal["sqlite", "postgresql"]


class BenchError(Exception):
    pass


# --- generated data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    id: str
    name: str
    birth_date: str
    sex: str


@dataclass(frozen=True)
class Study:
    number: int  # 1-based, in date order: also the order of insertion
    uid: str
    patient: Patient
    accession: str
    day: date
    time: str  # HHMMSS
    modality: str
    description: str
    body_part: str
    physician: str
    calling_ae: str


def generate_studies(count: int) -> list[Study]:
    """The same list for the same count, on every run and machine."""
    rng = random.Random(SEED)
    patients = [
        Patient(
            id=f"PID{p:07d}",
            name=f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES)}",
            birth_date=(date(1930, 1, 1) + timedelta(days=rng.randrange(90 * 365))).strftime(
                "%Y%m%d"),
            sex=rng.choice("MFMFO"),
        )
        for p in range(1, max(1, round(count * PATIENTS_PER_STUDY)) + 1)
    ]
    drafts = []
    for _ in range(count):
        patient = rng.choice(patients)
        day = FIRST_DAY + timedelta(days=rng.randrange(DAYS))
        seconds = rng.randrange(7 * 3600, 20 * 3600)
        modality = rng.choice(tuple(MODALITIES))
        drafts.append((day, seconds, patient, modality, rng.random()))
    drafts.sort(key=lambda d: (d[0], d[1], d[2].id))
    studies = []
    for number, (day, seconds, patient, modality, pick) in enumerate(drafts, start=1):
        spec = MODALITIES[modality]
        studies.append(Study(
            number=number,
            uid=f"{UID_ROOT}.{number}",
            patient=patient,
            accession=f"A{(number * 7919) % 100_000_000:08d}",  # unique below 1e8 studies
            day=day,
            time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
            modality=modality,
            description=spec.descriptions[int(pick * len(spec.descriptions))],
            body_part=spec.body_parts[int(pick * len(spec.body_parts))],
            physician=PHYSICIANS[number % len(PHYSICIANS)],
            calling_ae=f"{modality}_ROOM{number % 3 + 1}",
        ))
    return studies


def instance_rows(study: Study) -> Iterator[dict[str, Any]]:
    """Every NOT NULL column and every column C-FIND answers from, like ingest fills them."""
    spec = MODALITIES[study.modality]
    started = datetime.combine(study.day, datetime.min.time(), UTC) + timedelta(
        hours=int(study.time[:2]), minutes=int(study.time[2:4]), seconds=int(study.time[4:]))
    for s in range(1, SERIES_PER_STUDY + 1):
        series_uid = f"{study.uid}.{s}"
        for i in range(1, INSTANCES_PER_SERIES + 1):
            sop_uid = f"{series_uid}.{i}"
            yield {
                "sop_instance_uid": sop_uid,
                "sop_class_uid": spec.sop_class_uid,
                "study_instance_uid": study.uid,
                "series_instance_uid": series_uid,
                "patient_id": study.patient.id,
                "patient_name": study.patient.name,
                "accession_number": study.accession,
                "modality": study.modality,
                "study_date": study.day.strftime("%Y%m%d"),
                "calling_ae": study.calling_ae,
                "peer_address": f"10.20.1.{study.number % 3 + 11}:{40000 + study.number % 20000}",
                "transfer_syntax_uid": EXPLICIT_LE,
                "size_bytes": spec.size_bytes + (study.number * 31 + i) % 4096,
                "sha256": hashlib.sha256(sop_uid.encode()).hexdigest(),
                "spool_path": f"{study.uid}/{series_uid}/{sop_uid}.dcm",
                "received_at": started + timedelta(minutes=10, seconds=s * 30 + i),
                "association_id": None,
                "remap_state": "none",
                "remap_plan": None,
                "original_patient_id": None,
                "original_patient_name": None,
                "original_accession_number": None,
                "patient_birth_date": study.patient.birth_date,
                "patient_sex": study.patient.sex,
                "issuer_of_patient_id": None,
                "study_time": study.time,
                "study_id": str(study.number % 100_000),
                "study_description": study.description,
                "referring_physician_name": study.physician,
                "series_number": str(s),
                "series_description": f"{study.description} SERIES {s}",
                "body_part_examined": study.body_part,
                "instance_number": str(i),
                "spool_removed_at": None,
            }


def batches(studies: Sequence[Study]) -> Iterator[list[dict[str, Any]]]:
    per_study = SERIES_PER_STUDY * INSTANCES_PER_SERIES
    step = max(1, BATCH // per_study)
    for first in range(0, len(studies), step):
        yield [row for study in studies[first:first + step] for row in instance_rows(study)]


def expected_rows(studies: Sequence[Study]) -> int:
    return len(studies) * SERIES_PER_STUDY * INSTANCES_PER_SERIES


def matches_generated(engine: Engine, studies: Sequence[Study]) -> str | None:
    """None when the database holds exactly the generated rows (count, and the last study's
    identity); otherwise what differs."""
    with engine.connect() as c:
        count = c.execute(select(func.count()).select_from(Instance)).scalar_one()
        if count != expected_rows(studies):
            return f"{count} rows, not {expected_rows(studies)}"
        last = studies[-1]
        row = c.execute(
            select(Instance.patient_id, Instance.accession_number, Instance.study_date)
            .where(Instance.sop_instance_uid == f"{last.uid}.1.1")
        ).one_or_none()
    wanted = (last.patient.id, last.accession, last.day.strftime("%Y%m%d"))
    return None if row is not None and tuple(row) == wanted else "rows from another generator"


def fill(engine: Engine, studies: Sequence[Study], copy: bool) -> float:
    """Insert every row; seconds taken. SQLite: Core executemany, one transaction per batch.
    PostgreSQL: COPY (several times faster than executemany's multi-row INSERTs)."""
    started = time.perf_counter()
    total, done = expected_rows(studies), 0
    if copy:
        raw = engine.raw_connection()
        try:
            connection = raw.driver_connection
            assert connection is not None
            for rows in batches(studies):
                columns = list(rows[0])
                with connection.cursor() as cursor, cursor.copy(
                    f"COPY instances ({', '.join(columns)}) FROM STDIN"
                ) as out:
                    for row in rows:
                        out.write_row(tuple(row.values()))
                connection.commit()
                done += len(rows)
                progress(done, total, started)
        finally:
            raw.close()
    else:
        for rows in batches(studies):
            with engine.begin() as c:
                c.execute(insert(Instance), rows)
            done += len(rows)
            progress(done, total, started)
    print(file=sys.stderr)
    return time.perf_counter() - started


def progress(done: int, total: int, started: float) -> None:
    elapsed = time.perf_counter() - started
    print(f"\r  {done:,}/{total:,} rows, {done / max(elapsed, 1e-9):,.0f} rows/s",
          end="", file=sys.stderr, flush=True)


# --- databases ---------------------------------------------------------------------------------


@dataclass
class Prepared:
    name: DatabaseName
    url: str
    fill_s: float | None  # None: reused from the cache
    analyze_s: float


def prepare_sqlite(studies: Sequence[Study], refill: bool) -> Prepared:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"find-{len(studies)}.db"
    url = f"sqlite:///{path}"
    if path.exists() and not refill:
        engine = make_engine(url)
        try:
            upgrade(engine)  # a no-op unless the schema gained a migration since
            problem = matches_generated(engine, studies)
        finally:
            engine.dispose()
        if problem is None:
            print(f"sqlite: reusing {path}", file=sys.stderr)
            return Prepared("sqlite", url, None, 0.0)
        print(f"sqlite: {path} has {problem}; filling it again", file=sys.stderr)
    partial = path.with_suffix(".partial")
    for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm"),
                     Path(f"{partial}-journal")):
        leftover.unlink(missing_ok=True)
    print(f"sqlite: filling {partial} with {expected_rows(studies):,} rows", file=sys.stderr)
    engine = create_engine(f"sqlite:///{partial}")

    @event.listens_for(engine, "connect")
    def _fast(dbapi_connection: Any, _record: Any) -> None:
        # Only while filling a file that is renamed when complete: a crash leaves a .partial.
        dbapi_connection.execute("PRAGMA synchronous=OFF")
        dbapi_connection.execute("PRAGMA cache_size=-262144")

    try:
        upgrade(engine)
        fill_s = fill(engine, studies, copy=False)
        began = time.perf_counter()
        with engine.begin() as c:
            c.execute(text("ANALYZE"))
        analyze_s = time.perf_counter() - began
        problem = matches_generated(engine, studies)
        if problem is not None:
            raise BenchError(f"sqlite: after filling, {problem}")
    finally:
        engine.dispose()
    for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        stale.unlink(missing_ok=True)
    partial.rename(path)
    return Prepared("sqlite", url, fill_s, analyze_s)


def postgres_server_url() -> str:
    """The URL of the cluster's ``postgres`` database as the test role, the way scripts/test
    makes it: GATEWAY_TEST_POSTGRES_URL if set, else the machine's first cluster (started if
    down) with the role ``gateway_test`` (created as superuser when we are root)."""
    given = os.environ.get("GATEWAY_TEST_POSTGRES_URL")
    if given:
        return given
    if not shutil.which("pg_lsclusters"):
        raise BenchError("no PostgreSQL: pg_lsclusters not found and GATEWAY_TEST_POSTGRES_URL "
                         "not set")
    clusters = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True,
                              check=True).stdout.split("\n")
    fields = clusters[0].split() if clusters and clusters[0].strip() else []
    if len(fields) < 4:
        raise BenchError("no PostgreSQL cluster (pg_lsclusters lists none)")
    version, cluster, port, status = fields[:4]
    if status != "online":
        subprocess.run(["pg_ctlcluster", version, cluster, "start"], check=False)
    if os.geteuid() == 0:
        probe = "SELECT 1 FROM pg_roles WHERE rolname='gateway_test'"
        found = subprocess.run(["su", "postgres", "-c", f'psql -p {port} -tAc "{probe}"'],
                               capture_output=True, text=True, check=False).stdout.strip()
        if found != "1":
            create = "CREATE ROLE gateway_test LOGIN SUPERUSER PASSWORD 'gateway_test'"
            subprocess.run(["su", "postgres", "-c", f'psql -p {port} -qc "{create}"'], check=True)
    return f"postgresql+psycopg://gateway_test:gateway_test@{LOOPBACK}:{port}/postgres"


def prepare_postgresql(studies: Sequence[Study], refill: bool) -> Prepared:
    server = make_url(postgres_server_url())
    name = f"gateway_bench_find_{len(studies)}"
    partial = f"{name}_partial"
    url = server.set(database=name).render_as_string(hide_password=False)
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            exists = c.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                               {"n": name}).first() is not None
        if exists and not refill:
            engine = make_engine(url)
            try:
                upgrade(engine)
                problem = matches_generated(engine, studies)
            finally:
                engine.dispose()
            if problem is None:
                print(f"postgresql: reusing database {name}", file=sys.stderr)
                return Prepared("postgresql", url, None, 0.0)
            print(f"postgresql: {name} has {problem}; filling it again", file=sys.stderr)
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{partial}" WITH (FORCE)'))
            c.execute(text(f'CREATE DATABASE "{partial}"'))
        print(f"postgresql: filling {partial} with {expected_rows(studies):,} rows",
              file=sys.stderr)
        engine = make_engine(server.set(database=partial).render_as_string(hide_password=False))
        try:
            upgrade(engine)
            fill_s = fill(engine, studies, copy=True)
            began = time.perf_counter()
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.execute(text("VACUUM ANALYZE"))
            analyze_s = time.perf_counter() - began
            problem = matches_generated(engine, studies)
            if problem is not None:
                raise BenchError(f"postgresql: after filling, {problem}")
        finally:
            engine.dispose()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            c.execute(text(f'ALTER DATABASE "{partial}" RENAME TO "{name}"'))
        return Prepared("postgresql", url, fill_s, analyze_s)
    finally:
        admin.dispose()


def forget_bench_traffic(url: str) -> None:
    """Each C-FIND leaves an audit row; earlier runs' rows are dropped so every run starts from
    the same table. Association rows (two per query) stay: deleting one makes the database check
    ``instances.association_id``, which has no index, so a scan of the whole table per row."""
    engine = make_engine(url)
    try:
        with engine.begin() as c:
            c.execute(text("DELETE FROM audit_events"))
    finally:
        engine.dispose()


# --- the gateway -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def clean_env() -> dict[str, str]:
    """Our environment without what would change a tool's behaviour behind our back: DCMTK reads
    TCP_NODELAY, the gateway reads GATEWAY_*."""
    return {k: v for k, v in os.environ.items()
            if k != "TCP_NODELAY" and not k.startswith("GATEWAY_")}


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(no output)"
    except FileNotFoundError:
        return "(no output)"


class GatewayServer:
    """``gateway serve`` with its own TOML config, on loopback, answering unknown callers' C-ECHO
    and C-FIND."""

    def __init__(self, workdir: Path, url: str) -> None:
        self.port = free_port()
        self.log = workdir / "gateway.log"
        config = workdir / "gateway.toml"
        config.write_text(
            "[dicom]\n"
            f'ae_title = "{GATEWAY_AE}"\nbind_host = "{LOOPBACK}"\nport = {self.port}\n\n'
            "[security]\n"
            'check_called_ae_title = true\nunknown_callers = ["echo", "find"]\n\n'
            "[storage]\n"
            f"spool_dir = {json.dumps(str(workdir / 'spool'))}\nmin_free_mb = 1\n\n"
            "[database]\n"
            f"url = {json.dumps(url)}\n\n"
            "[metrics]\nenabled = false\n\n"
            '[logging]\nlevel = "WARNING"\n',
            encoding="utf-8",
        )
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(GATEWAY_BIN), "serve", "--config", str(config)], cwd=REPO, env=clean_env(),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise BenchError(f"gateway exited with status {self.process.returncode} before "
                                 f"listening:\n{tail(self.log)}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), 1):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"gateway did not listen on {self.port} in {START_TIMEOUT_S} s")
            time.sleep(0.1)

    def alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(f"gateway died (status {self.process.returncode}):\n{tail(self.log)}")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print("bench_find: gateway ignored SIGTERM; killing it", file=sys.stderr)
            self.process.kill()
            self.process.wait()


# --- queries -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    kind: Kind
    value: str  # the matching key's value, as findscu sends it


@dataclass
class Answer:
    seconds: float
    results: int


@dataclass
class Outcome:
    database: DatabaseName
    kind: Kind
    find_s: list[float]
    echo_s: list[float]
    run_s: list[float]
    results: list[int]
    busy: float = 0.0  # the machine's busy share (both CPUs) while the queries ran


def pick_questions(engine: Engine, count: int, date_days: int) -> dict[Kind, list[Question]]:
    """``count`` values per kind, from rows picked at random (seeded) out of the table."""
    rng = random.Random(SEED + 1)
    with engine.connect() as c:
        low, high = c.execute(select(func.min(Instance.id), func.max(Instance.id))).one()
        picked: dict[Kind, list[Question]] = {k: [] for k in KINDS}
        while any(len(v) < count for v in picked.values()):
            row = c.execute(
                select(Instance.patient_id, Instance.study_date, Instance.accession_number)
                .where(Instance.id == rng.randint(low, high))
            ).one_or_none()
            if row is None:
                continue
            first = datetime.strptime(row.study_date, "%Y%m%d").date()
            last = first + timedelta(days=date_days - 1)
            values: dict[Kind, str] = {
                "patient": row.patient_id,
                "date": f"{first:%Y%m%d}-{last:%Y%m%d}",
                "accession": row.accession_number,
            }
            for kind, value in values.items():
                question = Question(kind, value)
                if len(picked[kind]) < count and question not in picked[kind]:
                    picked[kind].append(question)
    return picked


def expected_studies(engine: Engine, question: Question) -> int:
    """The answer count by SQL of its own, not the gateway's statement."""
    column = {"patient": Instance.patient_id, "accession": Instance.accession_number}
    statement = select(func.count(Instance.study_instance_uid.distinct()))
    if question.kind == "date":
        low, high = question.value.split("-")
        statement = statement.where(Instance.study_date >= low, Instance.study_date <= high)
    else:
        statement = statement.where(column[question.kind] == question.value)
    with engine.connect() as c:
        return int(c.execute(statement).scalar_one())


def timed(
    command: Sequence[str], env: dict[str, str]
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall time of one tool run, process start to exit."""
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT_S, check=False)
    return time.perf_counter() - began, done


_PENDING = re.compile(r"Find Response: \d+ \(Pending\)")
_FINAL = re.compile(r"Final Find Response[: \d]*\((\w[^)]*)\)")
_INSTANCES = re.compile(r"\(0020,1208\) IS \[(\d+) ?\]")
_SERIES = re.compile(r"\(0020,1206\) IS \[(\d+) ?\]")


class Client:
    def __init__(self, port: int) -> None:
        self.port = port
        self.env = clean_env() | {"TCP_NODELAY": "1"}
        findscu, echoscu = shutil.which("findscu"), shutil.which("echoscu")
        if not findscu or not echoscu:
            raise BenchError("DCMTK findscu/echoscu not found on PATH (apt-get install dcmtk)")
        self.findscu: str = findscu
        self.echoscu: str = echoscu

    def find(self, question: Question) -> Answer:
        command = [self.findscu, "-S", "-v", "+sr", "-aet", OUR_AE, "-aec", GATEWAY_AE,
                   LOOPBACK, str(self.port), "-k", "QueryRetrieveLevel=STUDY"]
        for key in FIND_KEYS:
            wanted = key == MATCH_KEY[question.kind]
            command += ["-k", f"{key}={question.value}" if wanted else key]
        seconds, done = timed(command, self.env)
        output = done.stdout + done.stderr
        final = _FINAL.search(output)
        if done.returncode != 0 or final is None or final.group(1) != "Success":
            raise BenchError(f"findscu {question.kind}={question.value} failed "
                             f"(exit {done.returncode}):\n{output[-2000:]}")
        results = len(_PENDING.findall(output))
        instances = [int(v) for v in _INSTANCES.findall(output)]
        series = [int(v) for v in _SERIES.findall(output)]
        per_study = SERIES_PER_STUDY * INSTANCES_PER_SERIES
        if instances != [per_study] * results or series != [SERIES_PER_STUDY] * results:
            raise BenchError(f"findscu {question.kind}={question.value}: {results} studies but "
                             f"instance counts {instances[:5]}..., series counts {series[:5]}...")
        return Answer(seconds, results)

    def echo(self) -> float:
        command = [self.echoscu, "-aet", OUR_AE, "-aec", GATEWAY_AE, LOOPBACK, str(self.port)]
        seconds, done = timed(command, self.env)
        if done.returncode != 0:
            raise BenchError(f"echoscu failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        return seconds


def identifier(question: Question) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for key in FIND_KEYS:
        setattr(ds, key, question.value if key == MATCH_KEY[question.kind] else None)
    return ds


class StatementLog:
    """The SQL (with parameters) an engine ran, for EXPLAIN."""

    def __init__(self, engine: Engine) -> None:
        self.statements: list[tuple[str, Any]] = []
        self.recording = False
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if self.recording:
            self.statements.append((statement, parameters))

    @contextlib.contextmanager
    def record(self) -> Iterator[list[tuple[str, Any]]]:
        self.statements, self.recording = [], True
        try:
            yield self.statements
        finally:
            self.recording = False


def run_in_process(engine: Engine, question: Question) -> tuple[float, int]:
    """The gateway's own parse + run, timed: the database's share of a C-FIND."""
    began = time.perf_counter()
    query = parse(identifier(question), STUDY_ROOT_FIND, engine.dialect.name, QueryConfig())
    rows = run(engine, query, QueryConfig().max_results)
    return time.perf_counter() - began, len(rows)


def explain(engine: Engine, log: StatementLog, question: Question) -> None:
    with log.record() as statements:
        run_in_process(engine, question)
    sqlite = engine.dialect.name == "sqlite"
    prefix = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN (ANALYZE, BUFFERS) "
    for statement, parameters in statements:
        print(f"\n-- {engine.dialect.name}, {question.kind} = {question.value}: gateway SQL")
        print(statement.strip())
        shown = repr(parameters)
        print(f"-- parameters: {shown if len(shown) < 300 else shown[:300] + ' ...'}")
        with engine.connect() as c:
            plan = c.exec_driver_sql(prefix + statement, parameters).all()
        for row in plan:
            print("   " + (" | ".join(str(v) for v in row[-1:]) if sqlite else str(row[0])))


def measure(prepared: Prepared, reps: int, date_days: int, workdir: Path,
            explain_all: bool) -> list[Outcome]:
    forget_bench_traffic(prepared.url)
    engine = make_engine(prepared.url)
    log = StatementLog(engine)
    try:
        questions = pick_questions(engine, WARMUP + reps, date_days)
        expected = {q: expected_studies(engine, q) for qs in questions.values() for q in qs}
        server = GatewayServer(workdir, prepared.url)
        try:
            client = Client(server.port)
            outcomes = {k: Outcome(prepared.name, k, [], [], [], []) for k in KINDS}
            before = cpu_jiffies()
            for rep in range(WARMUP + reps):
                for kind in KINDS:
                    question = questions[kind][rep]
                    # alternate which goes first, so neither always follows the other
                    if rep % 2:
                        answer, echo_s = client.find(question), client.echo()
                    else:
                        echo_s = client.echo()
                        answer = client.find(question)
                    if answer.results != expected[question]:
                        raise BenchError(f"{prepared.name}: {kind} = {question.value} answered "
                                         f"{answer.results} studies; SQL counts "
                                         f"{expected[question]}")
                    if rep >= WARMUP:
                        outcome = outcomes[kind]
                        outcome.find_s.append(answer.seconds)
                        outcome.echo_s.append(echo_s)
                        outcome.results.append(answer.results)
            server.alive()
            busy = busy_share(before, cpu_jiffies())
            for outcome in outcomes.values():
                outcome.busy = busy
        finally:
            server.stop()
        complaints = [line for line in tail(server.log, 10_000).splitlines()
                      if "ERROR" in line or "Traceback" in line]
        if complaints:
            print(f"{prepared.name}: the gateway logged errors:\n" + "\n".join(complaints[:20]),
                  file=sys.stderr)
        for kind in KINDS:
            for rep in range(WARMUP + reps):
                seconds, rows = run_in_process(engine, questions[kind][rep])
                if rows != expected[questions[kind][rep]]:
                    raise BenchError(f"{prepared.name}: run() gave {rows} rows for "
                                     f"{questions[kind][rep]}")
                if rep >= WARMUP:
                    outcomes[kind].run_s.append(seconds)
        for kind in KINDS:
            if explain_all or ms(statistics.median(outcomes[kind].find_s)) >= TARGET_MS:
                explain(engine, log, questions[kind][WARMUP])
        return [outcomes[k] for k in KINDS]
    finally:
        engine.dispose()


# --- report ------------------------------------------------------------------------------------


def ms(seconds: float) -> float:
    return seconds * 1000


def p90(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 \
        else values[0]


def report(outcomes: Sequence[Outcome], date_days: int) -> None:
    header = (f"{'database':<11} {'query':<10} {'median ms':>9} {'p90 ms':>7} {'results':>7} "
              f"{'echoscu ms':>10} {'net ms':>7} {'run() ms':>8}  verdict (< {TARGET_MS:.0f} ms)")
    print()
    print(header)
    print("-" * len(header))
    for o in outcomes:
        median = ms(statistics.median(o.find_s))
        echo = ms(statistics.median(o.echo_s))
        label = o.kind if o.kind != "date" else f"date/{date_days}d"
        verdict = "ok" if median < TARGET_MS else "OVER TARGET"
        print(f"{o.database:<11} {label:<10} {median:>9.1f} {ms(p90(o.find_s)):>7.1f} "
              f"{statistics.median(o.results):>7g} {echo:>10.1f} {median - echo:>7.1f} "
              f"{ms(statistics.median(o.run_s)):>8.1f}  {verdict}")
    print()
    for database in dict.fromkeys(o.database for o in outcomes):
        busy = next(o.busy for o in outcomes if o.database == database)
        print(f"{database}: machine busy {busy:.0%} of {os.cpu_count()} CPUs while querying "
              "(this benchmark alone keeps about one CPU busy; more means another load ran)")
    print("median/p90: findscu wall time, process start to exit; results: studies answered "
          "(median);\nechoscu: association + C-ECHO + release, same loop; net = median - echoscu "
          "median;\nrun(): the gateway's parse + run() on the same values in this process (SQL "
          "only).")


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat; (0, 0) where there is none."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    return (after[0] - before[0]) / max(after[1] - before[1], 1)


def load() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100_000,
                        help="studies in the database, 10 instances each (default 100000)")
    parser.add_argument("--reps", type=int, default=30,
                        help="timed queries per kind, after 3 warm-up queries (default 30)")
    parser.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--date-days", type=int, default=1,
                        help="days in the study date range queried (default 1)")
    parser.add_argument("--explain", action="store_true",
                        help="print the gateway's SQL and its plan for every kind, not only those "
                             "over the target")
    parser.add_argument("--refill", action="store_true",
                        help="fill the databases again even when the cached ones match")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (gateway config and log); the filled "
                             "databases are always kept")
    args = parser.parse_args(argv)
    if args.studies < 1 or args.reps < 2 or args.date_days < 1:
        parser.error("--studies and --date-days must be at least 1, --reps at least 2")
    if not GATEWAY_BIN.exists():
        raise BenchError(f"{GATEWAY_BIN} not found: run scripts/bench once to set up .venv")
    names: list[DatabaseName] = (["sqlite", "postgresql"] if args.database == "both"
                                 else [args.database])
    began = time.perf_counter()
    studies = generate_studies(args.studies)
    print(f"generated {len(studies):,} studies, {expected_rows(studies):,} instances, "
          f"{len({s.patient.id for s in studies}):,} patients in "
          f"{time.perf_counter() - began:.1f} s", file=sys.stderr)
    preparers: dict[DatabaseName, Callable[[Sequence[Study], bool], Prepared]] = {
        "sqlite": prepare_sqlite, "postgresql": prepare_postgresql,
    }
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-find-"))
    outcomes: list[Outcome] = []
    fills: list[str] = []
    try:
        for name in names:
            prepared = preparers[name](studies, args.refill)
            if prepared.fill_s is None:
                fills.append(f"{name}: reused the cached database (filled by an earlier run)")
            else:
                rate = expected_rows(studies) / prepared.fill_s
                fills.append(f"{name}: filled {expected_rows(studies):,} rows in "
                             f"{prepared.fill_s:.1f} s ({rate:,.0f} rows/s), statistics in "
                             f"{prepared.analyze_s:.1f} s")
            print(f"{name}: querying (load average {load()})", file=sys.stderr)
            folder = workdir / name
            folder.mkdir()
            outcomes += measure(prepared, args.reps, args.date_days, folder, args.explain)
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{len(studies):,} studies, {expected_rows(studies):,} instances; "
          f"{args.reps} queries per kind after {WARMUP} warm-up; load average {load()}")
    for line in fills:
        print(line)
    report(outcomes, args.date_days)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench_find: {exc}", file=sys.stderr)
        sys.exit(1)
