"""Scheduled jobs (gateway.jobs): fire times as pure functions, the run ledger and its lease on
both databases, a missed run made up once at start, one run per fire time across nodes, and the
order drop folder as an operator uses it (``gateway jobs``, ``jobs run``, ``jobs history``)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.app import Gateway
from gateway.db.engine import make_engine
from gateway.db.migrate import upgrade
from gateway.jobs.ledger import RunLedger
from gateway.jobs.triggers import last_fire, make_trigger, missed, next_fire
from tests.conftest import GATEWAY_BIN, config_dict, free_port, rows, wait_for, write_toml
from tests.peers import unavailable

NOW = datetime(2026, 12, 3, 9, 30, 12, tzinfo=UTC)


# -- fire times ---------------------------------------------------------------------------------

def test_last_and_next_fire_of_cron_and_interval() -> None:
    daily = make_trigger("0 2 * * *", None)  # local time; the test machine's zone is UTC
    assert last_fire(daily, NOW) == datetime(2026, 12, 3, 2, 0, tzinfo=UTC)
    assert next_fire(daily, NOW) == datetime(2026, 12, 4, 2, 0, tzinfo=UTC)
    assert last_fire(daily, datetime(2026, 12, 3, 2, 0, tzinfo=UTC)) == \
        datetime(2026, 12, 3, 2, 0, tzinfo=UTC)  # at the fire time, it is the one
    every = make_trigger(None, 300)
    assert last_fire(every, NOW) == datetime(2026, 12, 3, 9, 30, tzinfo=UTC)
    assert next_fire(every, NOW) == datetime(2026, 12, 3, 9, 35, tzinfo=UTC)


def test_missed_runs_coalesce_into_one_and_a_new_job_missed_nothing() -> None:
    daily = make_trigger("0 2 * * *", None)
    three_days_ago = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)
    assert missed(daily, three_days_ago, NOW) == datetime(2026, 12, 3, 2, 0, tzinfo=UTC)
    assert missed(daily, datetime(2026, 12, 3, 2, 0, tzinfo=UTC), NOW) is None  # done already
    assert missed(daily, None, NOW) is None  # never ran: nothing to make up


@settings(max_examples=200, deadline=None)
@given(minute=st.integers(0, 59), hour=st.integers(0, 23), weekday=st.sampled_from(["*", "1", "5"]),
       offset_s=st.integers(0, 30 * 24 * 3600))
def test_last_fire_is_the_latest_fire_time_not_after_now(
    minute: int, hour: int, weekday: str, offset_s: int,
) -> None:
    trigger = make_trigger(f"{minute} {hour} * * {weekday}", None)
    now = NOW + timedelta(seconds=offset_s)
    fire = last_fire(trigger, now)
    assert fire is not None and fire <= now
    assert (fire.hour, fire.minute) == (hour, minute)
    following = next_fire(trigger, fire)
    assert following is not None and following > now  # nothing between


# -- the run ledger -----------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def engine(db_url: str) -> Any:
    engine = make_engine(db_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def test_one_run_per_fire_time_and_never_two_at_once(engine: Any) -> None:
    clock = Clock()
    a, b = RunLedger(engine, "node-a", clock, lease_s=60), RunLedger(engine, "node-b", clock, 60)
    fire = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)
    first = a.begin("nightly", "order_folder", "schedule", fire)
    assert first is not None
    assert b.begin("nightly", "order_folder", "schedule", fire) is None  # same time, other node
    assert b.begin("nightly", "order_folder", "operator", None) is None  # running: not twice
    a.finish("nightly", first, "success", {"files_done": 1}, None)
    assert a.begin("nightly", "order_folder", "schedule", fire) is None  # that time is done
    again = b.begin("nightly", "order_folder", "operator", None)
    assert again is not None  # the lease is free once the run ended
    clock.now += timedelta(seconds=61)  # node b died mid-run: its lease lapses
    third = a.begin("nightly", "order_folder", "schedule", fire + timedelta(days=1))
    assert third is not None
    assert b.interrupted() == 1  # node b restarts: its run is marked, not left running
    history = a.history("nightly")
    assert [(r.node, r.outcome) for r in history] == [
        ("node-a", "running"), ("node-b", "interrupted"), ("node-a", "success")]
    assert history[2].counts == {"files_done": 1}


@pytest.mark.postgres
def test_nodes_racing_for_one_fire_time_run_it_once(tmp_path: Path) -> None:
    from tests.conftest import POSTGRES_URL

    if not POSTGRES_URL:
        unavailable("GATEWAY_TEST_POSTGRES_URL not set (scripts/test sets it)")
    import uuid

    name = f"gw_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    try:
        upgrade(engine)
        won: list[int] = []
        start = threading.Barrier(8)

        def node(index: int, fire: datetime) -> None:
            ledger = RunLedger(engine, f"node-{index}")
            start.wait()
            run = ledger.begin("nightly", "order_folder", "schedule", fire)
            if run is not None:
                won.append(run)

        for day in range(5):
            fire = datetime(2026, 12, 1 + day, 2, 0, tzinfo=UTC)
            threads = [threading.Thread(target=node, args=(i, fire)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(won) == day + 1, won
            RunLedger(engine, "cleanup").finish("nightly", won[-1], "success", {}, None)
    finally:
        engine.dispose()
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# -- the order drop folder, as an operator runs it -----------------------------------------------

HEADER = "accession_number,mrn,modality,scheduled_at,patient_name\n"


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([str(GATEWAY_BIN), *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=env, check=False)


def _site(tmp_path: Path, db: str, **job: Any) -> tuple[Path, Path]:
    drop = tmp_path / "drop"
    drop.mkdir()
    data = config_dict(tmp_path, db, free_port())
    path = write_toml(tmp_path / "gateway.toml", data)
    job = {"name": "ris-drop", "kind": "order_folder", "folder": "drop", "every_s": 3600,
           "settle_s": 30, **job}  # a file written by the test stays "still changing"
    with open(path, "a", encoding="utf-8") as fp:
        fp.write("[[jobs]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in job.items()))
    return path, drop


def _toml(value: Any) -> str:
    from tests.conftest import toml_value

    return toml_value(value)


def _settled(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    old = time.time() - 60
    os.utime(path, (old, old))
    return path


def test_drop_folder_imports_whole_files_and_rejects_bad_ones_whole(
    tmp_path: Path, db_url: str,
) -> None:
    config, drop = _site(tmp_path, db_url)
    _settled(drop / "monday.csv", HEADER + "ACC1,MRN1,CT,2026-12-07T08:00,Ğürsoy^Ayşe\n"
                                           "ACC2,MRN2,MR,202612070930,Ørsted^Nils\n")
    _settled(drop / "broken.csv", HEADER + "ACC3,MRN3,CT,2026-12-07T10:00,Ok^Row\n"
                                           "ACC4,MRN4,CT,not-a-date,Bad^Row\n")
    (drop / "writing.csv").write_text(HEADER + "ACC5,MRN5,CT,2026-12-07T11:00,Half^Written\n")
    _settled(drop / ".hidden.csv", HEADER + "ACC6,MRN6,CT,2026-12-07T12:00,Hidden^File\n")
    _settled(drop / "notes.txt", "not orders")

    if db_url.startswith("sqlite"):  # read-only: it says where it looked, creates nothing
        listed = _cli(config, "jobs")
        assert listed.returncode == 1 and "no database at" in listed.stderr
    ran = _cli(config, "jobs", "run", "ris-drop")
    assert ran.returncode == 0, ran.stderr
    assert "monday.csv: added 2" in ran.stdout and "broken.csv: rejected" in ran.stdout
    assert "files_done 1" in ran.stdout and "files_rejected 1" in ran.stdout
    assert "files_waiting 1" in ran.stdout
    orders = {r.accession_number: r.patient_name for r in rows(
        db_url, "SELECT accession_number, patient_name FROM orders")}
    assert orders == {"ACC1": "Ğürsoy^Ayşe", "ACC2": "Ørsted^Nils"}  # nothing of broken.csv
    assert (drop / "done" / "monday.csv").is_file()
    reason = (drop / "rejected" / "broken.csv.reason.txt").read_text(encoding="utf-8")
    assert "line 3" in reason and "scheduled_at" in reason
    assert sorted(p.name for p in drop.iterdir() if p.is_file()) == [
        ".hidden.csv", "notes.txt", "writing.csv"]

    _settled(drop / "monday-again.csv", HEADER + "ACC1,MRN1,CT,2026-12-07T08:00,Ğürsoy^Ayşe\n")
    again = _cli(config, "jobs", "run", "ris-drop")
    assert again.returncode == 0 and "unchanged 1" in again.stdout
    history = _cli(config, "jobs", "history", "ris-drop")
    assert history.returncode == 0
    assert history.stdout.count("operator") == 2 and "success" in history.stdout
    shown = _cli(config, "jobs")
    assert "ris-drop" in shown.stdout and "success" in shown.stdout
    assert "Ğürsoy" not in shown.stdout + history.stdout  # counts and names of files only


def test_a_failing_run_is_recorded_and_the_next_run_tries_again(tmp_path: Path) -> None:
    config, drop = _site(tmp_path, f"sqlite:///{tmp_path / 'gw.db'}")
    drop.rmdir()
    failed = _cli(config, "jobs", "run", "ris-drop")
    assert failed.returncode == 1 and "does not exist" in failed.stderr
    drop.mkdir()
    assert _cli(config, "jobs", "run", "ris-drop").returncode == 0
    runs = rows(f"sqlite:///{tmp_path / 'gw.db'}",
                "SELECT outcome, error FROM job_runs ORDER BY id")
    assert [r.outcome for r in runs] == ["failed", "success"]
    assert "FileNotFoundError" in runs[0].error


def test_a_run_missed_while_down_is_made_up_once_at_start(
    make_gateway: Callable[..., Gateway], tmp_path: Path, db_url: str,
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    _settled(drop / "orders.csv", HEADER + "ACC9,MRN9,CT,2026-12-07T08:00,Late^Run\n")
    job = {"name": "nightly", "kind": "order_folder", "folder": str(drop), "cron": "0 2 * * *",
           "settle_s": 0}
    engine = make_engine(db_url)
    upgrade(engine)
    trigger = make_trigger("0 2 * * *", None)
    now = datetime.now(UTC)
    latest = last_fire(trigger, now)
    assert latest is not None
    three_days_ago = latest - timedelta(days=3)
    ledger = RunLedger(engine, "earlier")
    ran = ledger.begin("nightly", "order_folder", "schedule", three_days_ago)
    assert ran is not None
    ledger.finish("nightly", ran, "success", {}, None)
    engine.dispose()

    make_gateway(db=db_url, jobs=[job])
    made_up = wait_for(lambda: rows(db_url, "SELECT trigger, scheduled_for, outcome FROM job_runs "
                                            "WHERE trigger = 'missed' AND outcome != 'running'"),
                       30, "the missed run")
    assert [r.outcome for r in made_up] == ["success"]  # three missed nights, one run
    fire = made_up[0].scheduled_for
    fire = fire if isinstance(fire, datetime) else datetime.fromisoformat(str(fire))
    assert fire.replace(tzinfo=UTC) == latest  # for the latest fire time: once, by (job, time)
    assert rows(db_url, "SELECT accession_number FROM orders")[0].accession_number == "ACC9"


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # nodes share PostgreSQL
def test_two_gateways_on_one_postgresql_run_each_fire_time_once(
    served: Callable[..., Any], tmp_path: Path, db_url: str,
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    job = {"name": "every-second", "kind": "order_folder", "folder": str(drop), "every_s": 1,
           "settle_s": 0}
    nodes = [served(db=db_url, jobs=[job], forward={"node_name": f"node-{i}"},
                    storage={"spool_dir": str(tmp_path / f"spool-{i}")}) for i in range(2)]
    _settled(drop / "orders.csv", HEADER + "ACC7,MRN7,CT,2026-12-07T08:00,Two^Nodes\n")
    runs = wait_for(lambda: (found := rows(
        db_url, "SELECT node, scheduled_for, outcome FROM job_runs WHERE outcome = 'success'"))
        and len(found) >= 6 and found, 30, "six fire times run")
    times = [r.scheduled_for for r in runs]
    assert len(times) == len(set(times))  # each fire time once, whichever node took it
    assert (drop / "done" / "orders.csv").is_file() and not (drop / "orders.csv").exists()
    assert [r.accession_number for r in rows(db_url, "SELECT accession_number FROM orders")] == \
        ["ACC7"]
    for node in nodes:
        assert node.stop() == 0
        assert "Traceback" not in node.log() and "IntegrityError" not in node.log()
