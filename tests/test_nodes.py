"""Several nodes on one database (gateway.cluster): which node holds each file, heartbeats,
forwarding and retention on the holder only, the internal endpoint, and retrieves across nodes.

The two-process cluster test (``gateway serve`` x2 on one PostgreSQL, behind HAProxy) is in
tests/test_cluster.py; here, the parts in one process on both databases."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from pydicom.uid import generate_uid

from gateway.app import Gateway
from gateway.cluster.nodes import NodeRegistry, list_nodes, waiting_on
from gateway.db.engine import make_engine, make_sessions
from gateway.db.migrate import MIGRATIONS, upgrade
from gateway.db.models import ForwardJob, Instance
from gateway.forward.outbox import Outbox, new_jobs
from gateway.web.auth import token_sha256
from tests.conftest import rows
from tests.factory import make_dataset, write_file
from tests.peers import dcmtk
from tests.test_forward import start_storescp
from tests.test_retrieve import COMPRESSED, NAME, _after_meta, _final_get, _final_move, _identifier

SECRET = "cluster-secret-for-tests-only"

T0 = datetime(2026, 12, 14, 9, 0, tzinfo=UTC)


def add_instance(engine: sa.Engine, node: str | None, study: str | None = None,
                 destinations: tuple[str, ...] = ("pacs",)) -> str:
    """A ledger row held by ``node`` (no file: these tests read rows), with forward jobs."""
    uid = generate_uid()
    study = study or generate_uid()
    with engine.begin() as c:
        key = c.execute(sa.insert(Instance).values(
            sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=study, series_instance_uid=generate_uid(), calling_ae="CT",
            peer_address="127.0.0.1", transfer_syntax_uid="1.2.840.10008.1.2.1", size_bytes=1,
            sha256="0" * 64, spool_path=f"{study}/{uid}.dcm", received_at=T0, node_name=node,
        )).inserted_primary_key
        assert key is not None
        new_jobs(c, int(key[0]), study, destinations, T0)
    return uid


def claimed_uids(outbox: Outbox, engine: sa.Engine) -> set[str]:
    taken: set[str] = set()
    while batch := outbox.claim("pacs", 100):
        with engine.connect() as c:
            taken |= set(c.scalars(sa.select(Instance.sop_instance_uid)
                                   .where(Instance.id.in_([j.instance_id for j in batch]))))
    return taken


def test_a_node_claims_only_the_jobs_of_files_it_holds(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    try:
        study = generate_uid()  # one study, half on each node, as a balancer spreads it
        on_a = {add_instance(engine, "a", study) for _ in range(3)}
        on_b = {add_instance(engine, "b", study) for _ in range(3)}
        legacy = {add_instance(engine, None)}  # before 0012, no node named: any node's
        clock = lambda: T0 + timedelta(seconds=1)
        assert claimed_uids(Outbox(engine, tmp_path, "a", clock), engine) == on_a | legacy
        assert claimed_uids(Outbox(engine, tmp_path, "b", clock), engine) == on_b
        with engine.connect() as c:
            owners = dict(c.execute(
                sa.select(Instance.sop_instance_uid, ForwardJob.owner)
                .join(ForwardJob, ForwardJob.instance_id == Instance.id)).all())
        assert {u for u, o in owners.items() if o == "b"} == on_b
    finally:
        engine.dispose()


def test_waiting_on_names_a_nodes_unsent_instances(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    try:
        on_b = sorted(add_instance(engine, "b") for _ in range(4))
        add_instance(engine, "a")
        add_instance(engine, "b", destinations=())  # nothing to forward: not waiting
        assert waiting_on(engine, "b", limit=2) == (4, on_b[:2])
        assert waiting_on(engine, "b") == (4, [])
        assert waiting_on(engine, "c") == (0, [])
    finally:
        engine.dispose()


def test_heartbeats_and_staleness(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    now = [T0]
    try:
        a = NodeRegistry(engine, "a", "http://a:9110", 5.0, lambda: now[0])
        b = NodeRegistry(engine, "b", "http://b:9110", 5.0, lambda: now[0])
        a.beat()
        b.beat()
        b.beat()  # a second beat updates, never a second row
        now[0] = T0 + timedelta(seconds=14)
        a.beat()
        states = {s.name: s for s in list_nodes(engine, now[0])}
        assert set(states) == {"a", "b"}
        assert states["a"].last_heartbeat == now[0] and not states["a"].stale
        assert not states["b"].stale  # 14 s < 3 x 5 s
        states = {s.name: s for s in list_nodes(engine, T0 + timedelta(seconds=15.5))}
        assert states["b"].stale and not states["a"].stale
        assert states["b"].url == "http://b:9110"
    finally:
        engine.dispose()


def test_migration_0012_up_down_and_backfill(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0011")
        with engine.begin() as c:
            c.execute(sa.text(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
                "series_instance_uid, calling_ae, peer_address, transfer_syntax_uid, size_bytes, "
                "sha256, spool_path, received_at, remap_state) VALUES ('1.2.3', '1.2', '1.3', "
                "'1.4', 'CT', 'h', '1.2.840.10008.1.2.1', 1, :h, 'p', :t, 'none')"),
                {"h": "0" * 64, "t": T0})
        upgrade(engine, "0012", node_name="node-α")
        inspector = sa.inspect(engine)
        assert "node_name" in {c["name"] for c in inspector.get_columns("instances")}
        assert "ix_instances_node_name" in {i["name"] for i in inspector.get_indexes("instances")}
        assert "nodes" in inspector.get_table_names()
        with engine.connect() as c:  # the node that upgraded holds what was there
            assert c.scalar(sa.text("SELECT node_name FROM instances")) == "node-α"
        downgrade(engine, "0011")
        inspector = sa.inspect(engine)
        assert "node_name" not in {c["name"] for c in inspector.get_columns("instances")}
        assert "nodes" not in inspector.get_table_names()
        upgrade(engine)  # no node named: the row stays NULL (any node's)
        with engine.connect() as c:
            assert c.scalar(sa.text("SELECT node_name FROM instances")) is None
    finally:
        engine.dispose()


def downgrade(engine: sa.Engine, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)




@pytest.fixture
def two_nodes(make_gateway: Callable[..., Gateway], tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[Gateway, Gateway]]]:
    """Nodes ``a`` and ``b`` in this process: own spools, one database, one cluster secret,
    and a storescp (``ANY``, keeps the bytes as received) as a move destination."""
    monkeypatch.setenv("GATEWAY_CLUSTER_SECRET", SECRET)
    started: list[subprocess.Popen[bytes]] = []

    def start(db: str, duplicate_policy: str = "keep_first",
              remap_b: dict[str, Any] | None = None) -> tuple[Gateway, Gateway]:
        """``remap_b``: node b's [remap] section (a rewriting node), if any."""
        process, port = start_storescp(tmp_path / "any", "+xa", "+B")
        started.append(process)
        peers = [{"ae_title": "VIEWER", "services": ["echo", "find", "move", "get"]},
                 {"ae_title": "MODALITY", "services": ["store"]},
                 {"ae_title": "ANY", "host": "127.0.0.1", "port": port}]
        nodes = tuple(
            make_gateway(db=db, storage={"spool_dir": str(tmp_path / f"spool-{n}"),
                                         "duplicate_policy": duplicate_policy},
                         forward={"node_name": n}, security={"peers": peers},
                         cluster={"secret_sha256": token_sha256(SECRET), "heartbeat_s": 1.0},
                         **({"remap": remap_b} if remap_b and n == "b" else {}))
            for n in ("a", "b"))
        return nodes[0], nodes[1]

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


def flip_last_byte(path: Path) -> None:
    """A kept file altered on its holder's disk: its last byte (pixel data) flipped."""
    with open(path, "r+b") as fp:
        fp.seek(-1, 2)
        last = fp.read(1)
        fp.seek(-1, 2)
        fp.write(bytes([last[0] ^ 0xFF]))


def send_study(app: Gateway, folder: Path) -> list[Path]:
    """Compressed and plain instances of one study, non-ASCII name, sent with dcmsend."""
    from pydicom.data import get_testdata_file

    study, series = generate_uid(), generate_uid()
    files = []
    for i, name in enumerate(COMPRESSED[:2]):
        ds = pydicom.dcmread(str(get_testdata_file(name)))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SpecificCharacterSet, ds.PatientName, ds.PatientID = "ISO_IR 192", NAME, "NODE-1"
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"c{i}.dcm", enforce_file_format=True)
        files.append(folder / f"c{i}.dcm")
    for i in range(2):
        plain = make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series,
                             PatientID="NODE-1", PatientName=NAME,
                             SpecificCharacterSet="ISO_IR 192")
        files.append(write_file(plain, folder / f"p{i}.dcm"))
    sent = dcmtk("dcmsend", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1",
                 str(app.config.dicom.port), *map(str, files))
    assert sent.returncode == 0, sent.stderr
    return files


def _uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def test_a_retrieve_on_one_node_fetches_what_another_node_holds(
    two_nodes: Any, tmp_path: Path, db_url: str,
) -> None:
    a, b = two_nodes(db_url)
    files = send_study(b, tmp_path / "sent")
    sent = {_uids(f) for f in files}
    study = next(iter(sent))[0]
    held = {r.sop_instance_uid: (r.node_name, b.config.storage.spool_dir / r.spool_path)
            for r in rows(db_url, "SELECT sop_instance_uid, node_name, spool_path FROM instances")}
    assert {node for node, _ in held.values()} == {"b"}

    status, _ = _final_move(a, _identifier("STUDY", StudyInstanceUID=study), "ANY")
    assert status.Status == 0x0000
    arrived = {_uids(f): f for f in (tmp_path / "any").iterdir()}
    assert set(arrived) == sent  # the same UIDs, each once
    for uids, path in arrived.items():  # the bytes node b kept
        assert _after_meta(path) == _after_meta(held[uids[2]][1]), uids

    status, _, stored = _final_get(a, _identifier("STUDY", StudyInstanceUID=study))
    assert status.Status == 0x0000 and sorted(stored) == sorted(u[2] for u in sent)


def test_bytes_that_do_not_match_the_ledger_are_a_failed_sub_operation(
    two_nodes: Any, tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = two_nodes(db_url)
    files = send_study(b, tmp_path / "sent")
    (changed,) = rows(db_url, "SELECT sop_instance_uid, spool_path, study_instance_uid "
                              "FROM instances ORDER BY id LIMIT 1")
    flip_last_byte(b.config.storage.spool_dir / changed.spool_path)
    status, failed = _final_move(a, _identifier("STUDY", StudyInstanceUID=changed.study_instance_uid),
                                 "ANY")
    assert status.Status == 0xB000  # PS3.4 C.4.2.1.5: one sub-operation failed
    assert failed is not None and failed.FailedSOPInstanceUIDList == changed.sop_instance_uid
    assert status.NumberOfCompletedSuboperations == len(files) - 1
    assert any(changed.sop_instance_uid in r.getMessage() and "SHA-256" in r.getMessage()
               for r in caplog.records)


def _get(app: Gateway, path: str, secret: str | None) -> tuple[int, bytes, Any]:
    assert app.http is not None
    request = urllib.request.Request(f"http://127.0.0.1:{app.http.port}{path}")
    if secret is not None:
        request.add_header("Authorization", f"Bearer {secret}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


@pytest.mark.parametrize("asked", [
    "../gateway.db", "..%2Fgateway.db", "%2E%2E/%2E%2E/etc/passwd", "1.2/../../gateway.db",
    "%2Fetc%2Fpasswd", "1.2.3.dcm", "incoming", "1." + "2" * 70, "1..2", "",
])
def test_the_internal_endpoint_serves_uids_never_paths(
    two_nodes: Any, tmp_path: Path, sqlite_url: str, asked: str,
) -> None:
    a, _ = two_nodes(sqlite_url)
    (tmp_path / "spool-a" / "1.2.3.dcm").write_bytes(b"not for anyone")
    code, body, _ = _get(a, f"/internal/instances/{asked}", SECRET)
    assert code == 404, body
    assert b"not for anyone" not in body and b"SQLite" not in body


def test_the_internal_endpoint_needs_the_cluster_secret(
    two_nodes: Any, tmp_path: Path, sqlite_url: str,
) -> None:
    a, _ = two_nodes(sqlite_url)
    send_study(a, tmp_path / "sent")
    (uid, path, sha256) = rows(sqlite_url, "SELECT sop_instance_uid, spool_path, sha256 "
                                           "FROM instances ORDER BY id LIMIT 1")[0]
    url = f"/internal/instances/{uid}"
    for secret, error in ((None, b"needs the cluster secret"), ("wrong", b"secret is wrong"),
                          (SECRET[:-1], b"secret is wrong"), (token_sha256(SECRET), b"wrong")):
        code, body, headers = _get(a, url, secret)
        assert code == 401 and error in body, (secret, body)
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert SECRET.encode() not in body
    code, body, headers = _get(a, url, SECRET)
    assert code == 200
    assert body == (tmp_path / "spool-a" / path).read_bytes()
    assert headers["x-gateway-sha256"] == sha256
    healthz = _get(a, "/healthz", None)
    assert healthz[0] == 200


def test_retention_removes_only_the_files_this_node_holds(db_url: str, tmp_path: Path) -> None:
    """Node a's retention must not mark node b's instances removed: the files are on b's disk,
    and b's retrieves would then look for them at Orthanc only."""
    from gateway.config import RetentionConfig
    from gateway.forward.retention import Retention
    from gateway.receive.spool import Spool

    engine = make_engine(db_url)
    upgrade(engine)
    try:
        on_a = {add_instance(engine, "a") for _ in range(2)}
        on_b = {add_instance(engine, "b") for _ in range(2)}
        with engine.begin() as c:
            c.execute(sa.update(ForwardJob).values(state="confirmed", confirmed_at=T0))
        spool = Spool(tmp_path / "spool-a", 0)
        later = T0 + timedelta(days=30)
        assert Retention(engine, spool, RetentionConfig(keep_days=1), lambda: later,
                         node="a").run_once() == 2
        removed = {r.sop_instance_uid for r in rows(
            db_url, "SELECT sop_instance_uid FROM instances WHERE spool_removed_at IS NOT NULL")}
        assert removed == on_a and not removed & on_b
    finally:
        engine.dispose()


def test_an_export_on_one_node_reads_what_another_node_holds(
    two_nodes: Any, tmp_path: Path, sqlite_url: str,
) -> None:
    from gateway.db.engine import make_sessions
    from gateway.export import select as export_select
    from gateway.export.service import make_sources

    a, b = two_nodes(sqlite_url)
    files = send_study(b, tmp_path / "sent")
    study = _uids(files[0])[0]
    sources = make_sources(a.config)
    with make_sessions(a.engine)() as session:
        items = export_select.items(session, [study])
    assert len(items) == len(files) and {i.node_name for i in items} == {"b"}
    for item in items:
        assert sources.problem(item) is None
        assert item.spool_path is not None
        with sources.open(item) as opened:
            assert opened.path is None  # not a file of a's spool
            got = opened.file.read()
        assert len(got) == opened.size
        assert got == (b.config.storage.spool_dir / item.spool_path).read_bytes()
    sources.loader.close()


def test_healthz_reports_a_stale_peer_and_stays_200(two_nodes: Any, sqlite_url: str) -> None:
    import json

    from tests.conftest import wait_for

    a, b = two_nodes(sqlite_url)

    def nodes() -> dict[str, Any]:
        code, body, _ = _get(a, "/healthz", None)
        assert code == 200, body  # this node's own health, whatever its peers do
        return {n["name"]: n for n in json.loads(body)["nodes"]}

    assert set(nodes()) == {"a", "b"} and not any(n["stale"] for n in nodes().values())
    b.heartbeat.stop()  # b falls silent (heartbeat_s = 1: stale after 3 s)
    wait_for(lambda: nodes()["b"]["stale"], 10, "node b reported stale")
    assert not nodes()["a"]["stale"]
    assert nodes()["b"]["url"].startswith("http://127.0.0.1:")


def _store(app: Gateway, path: Path) -> None:
    sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1",
                 str(app.config.dicom.port), str(path))
    assert sent.returncode == 0, sent.stderr


@pytest.mark.parametrize(("policy", "disposition", "version_on"), [
    ("replace", "superseded", "a"),  # the copy a received stays on a's disk
    ("keep_first", "not_kept", "b"),  # the copy b received and did not make current: on b's
])
def test_a_version_names_the_node_whose_disk_holds_its_file(
    two_nodes: Any, tmp_path: Path, db_url: str, policy: str, disposition: str, version_on: str,
) -> None:
    """Node a receives an instance, node b other content under the same SOP Instance UID. The
    version row names the node holding its file; b's retention, b's crash recovery and
    ``gateway status`` act on b's files only (a's spool path may be the same relative name)."""
    from gateway.config import RetentionConfig
    from gateway.forward.retention import Retention
    from gateway.receive.ingest import is_recorded
    from gateway.report import _size, status_report

    a, b = two_nodes(db_url, policy)
    nodes = {"a": a, "b": b}
    first = make_dataset(PatientName=NAME, SpecificCharacterSet="ISO_IR 192", PatientID="V-1",
                         SeriesDescription="first")
    second = make_dataset(PatientName=NAME, SpecificCharacterSet="ISO_IR 192", PatientID="V-1",
                          SeriesDescription="second", SOPInstanceUID=first.SOPInstanceUID,
                          StudyInstanceUID=first.StudyInstanceUID,
                          SeriesInstanceUID=first.SeriesInstanceUID)
    _store(a, write_file(first, tmp_path / "first.dcm"))
    _store(b, write_file(second, tmp_path / "second.dcm"))

    (current,) = rows(db_url, "SELECT id, node_name, spool_path FROM instances")
    (version,) = rows(db_url, "SELECT disposition, node_name, spool_path, size_bytes "
                              "FROM instance_versions")
    assert (version.disposition, version.node_name) == (disposition, version_on)
    version_file = nodes[version_on].config.storage.spool_dir / version.spool_path
    current_file = nodes[current.node_name].config.storage.spool_dir / current.spool_path
    assert version_file.is_file() and current_file.is_file()
    kept_first = pydicom.dcmread(current_file).SeriesDescription
    assert kept_first == ("second" if policy == "replace" else "first")

    # Crash recovery: a name only the other node's version row holds is not recorded here
    other = "b" if version_on == "a" else "a"
    assert is_recorded(a.engine, version.spool_path, version_on)
    assert not is_recorded(a.engine, version.spool_path, other)

    # gateway status: each node's line counts the versions on its own disk
    with make_sessions(b.engine)() as session:
        report = status_report(session, b.config.storage.spool_dir, 0, node=version_on)
    node_lines = {line.split()[0]: line for line in report.splitlines()
                  if line.startswith("  ") and ("alive" in line or "STALE" in line)}
    size = f"(other versions {_size(version.size_bytes)})"
    assert size in node_lines[version_on] and "(other versions 0 B)" in node_lines[other], report
    spool_line = next(line for line in report.splitlines() if line.startswith("Spool "))
    assert size in spool_line, report
    with make_sessions(b.engine)() as session:
        report = status_report(session, b.config.storage.spool_dir, 0, node=other)
    spool_line = next(line for line in report.splitlines() if line.startswith("Spool "))
    assert "(other versions 0 B)" in spool_line, report

    # Retention on b (every destination confirmed, long ago): b's files only, the version
    # among them when b holds it (gateway.forward.retention), never a's
    with b.engine.begin() as c:
        new_jobs(c, current.id, str(first.StudyInstanceUID), ("pacs",), T0)
        c.execute(sa.update(ForwardJob).values(state="confirmed", confirmed_at=T0))
    later = datetime.now(UTC) + timedelta(days=30)
    Retention(b.engine, b.spool, RetentionConfig(keep_days=1), lambda: later,
              node="b").run_once()
    assert version_file.is_file() == (version_on != "b")
    assert current_file.is_file() == (current.node_name != "b")
    (marked,) = rows(db_url, "SELECT spool_removed_at FROM instance_versions")
    assert (marked.spool_removed_at is None) == (version_on != "b")


def test_migration_0013_names_the_upgrading_node_on_existing_versions(db_url: str) -> None:
    engine = make_engine(db_url)
    version = sa.text(
        "INSERT INTO instance_versions (sop_instance_uid, disposition, sha256, size_bytes, "
        "spool_path, calling_ae, received_at) VALUES ('1.2.3', 'superseded', :h, 1, 'p', "
        "'CT', :t)")
    try:
        upgrade(engine, "0012")
        with engine.begin() as c:
            c.execute(version, {"h": "0" * 64, "t": T0})
        upgrade(engine, "0013", node_name="node-α")
        inspector = sa.inspect(engine)
        assert "node_name" in {c["name"] for c in inspector.get_columns("instance_versions")}
        assert "ix_instance_versions_node_name" in {
            i["name"] for i in inspector.get_indexes("instance_versions")}
        with engine.connect() as c:  # a single node's ledger: its one spool holds them
            assert c.scalar(sa.text("SELECT node_name FROM instance_versions")) == "node-α"

        downgrade(engine, "0012")
        assert "node_name" not in {
            c["name"] for c in sa.inspect(engine).get_columns("instance_versions")}
        upgrade(engine, "0013")  # no node named: the row stays NULL (any node's)
        with engine.connect() as c:
            assert c.scalar(sa.text("SELECT node_name FROM instance_versions")) is None

        # A ledger already shared at 0012 (another node's instance or heartbeat): which node
        # holds a version is unknown, so no node is named rather than the wrong one
        downgrade(engine, "0012")
        for other in ("instance", "heartbeat"):
            with engine.begin() as c:
                c.execute(sa.delete(ForwardJob))
                c.execute(sa.delete(Instance))
                c.execute(sa.text("DELETE FROM nodes"))
            if other == "instance":
                add_instance(engine, "node-b")
            else:
                NodeRegistry(engine, "node-b", None, 5.0, lambda: T0).beat()
            upgrade(engine, "0013", node_name="node-α")
            with engine.connect() as c:
                assert c.scalar(sa.text("SELECT node_name FROM instance_versions")) is None, other
            downgrade(engine, "0012")
    finally:
        engine.dispose()


def test_a_move_of_a_large_study_another_node_holds_fetches_ahead_and_fails_only_the_bad_one(
    two_nodes: Any, tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """C-MOVE with movescu on node a of 33 instances node b holds (non-ASCII name, compressed
    ones among them): each arrives once, with its UIDs and b's bytes, while a fetches ahead
    (gateway.query.prefetch). Then b's file of one instance in the middle of the study is
    altered: that one sub-operation fails, named in the Failed SOP Instance UID List, and every
    other completes (PS3.4 C.4.2.1.6, C.4.2.3.1)."""
    from tests.test_retrieve import _move

    a, b = two_nodes(db_url)
    files = send_study(b, tmp_path / "sent")  # two compressed, two plain
    study = _uids(files[0])[0]
    series = _uids(files[0])[1]
    more = [write_file(make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series,
                                    InstanceNumber=i + 10, PatientID="NODE-1", PatientName=NAME,
                                    SpecificCharacterSet="ISO_IR 192"),
                       tmp_path / "more" / f"{i}.dcm") for i in range(29)]
    sent_more = dcmtk("storescu", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1",
                      str(b.config.dicom.port), *map(str, more))
    assert sent_more.returncode == 0, sent_more.stderr
    files += more
    sent = {_uids(f) for f in files}
    held = {r.sop_instance_uid: b.config.storage.spool_dir / r.spool_path
            for r in rows(db_url, "SELECT sop_instance_uid, spool_path FROM instances "
                                  "WHERE node_name = 'b'")}
    assert len(held) == len(sent) == 33

    moved = _move(a, "ANY", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
    assert moved.returncode == 0, moved.stderr
    arrived = {_uids(f): f for f in (tmp_path / "any").iterdir()}
    assert set(arrived) == sent  # the same UIDs, each once
    for uids, path in arrived.items():  # b's bytes, in the syntax b kept
        assert _after_meta(path) == _after_meta(held[uids[2]]), uids
        assert (pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
                == pydicom.dcmread(held[uids[2]], stop_before_pixels=True)
                .file_meta.TransferSyntaxUID)

    for path in (tmp_path / "any").iterdir():
        path.unlink()
    (bad,) = rows(db_url, "SELECT sop_instance_uid, spool_path FROM instances ORDER BY id "
                          "LIMIT 1 OFFSET 16")
    flip_last_byte(b.config.storage.spool_dir / bad.spool_path)
    status, failed = _final_move(a, _identifier("STUDY", StudyInstanceUID=study), "ANY")
    assert status.Status == 0xB000  # some sub-operations failed
    assert failed is not None and failed.FailedSOPInstanceUIDList == bad.sop_instance_uid
    assert status.NumberOfCompletedSuboperations == len(sent) - 1
    assert status.NumberOfFailedSuboperations == 1
    assert status.NumberOfWarningSuboperations == 0
    arrived_uids = {_uids(f)[2] for f in (tmp_path / "any").iterdir()}
    assert arrived_uids == {u[2] for u in sent} - {bad.sop_instance_uid}
    assert any(bad.sop_instance_uid in r.getMessage() and "SHA-256" in r.getMessage()
               for r in caplog.records)


def _open_temporary_files() -> int:
    """This process's open files in the temporary folder (fetched instances: unlinked, so
    only /proc shows them)."""
    import os
    import tempfile

    folder = os.path.realpath(tempfile.gettempdir())
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(folder + "/") and target.endswith("(deleted)")
    return count


def test_a_cancelled_move_leaves_no_fetched_file_open(
    two_nodes: Any, tmp_path: Path, sqlite_url: str,
) -> None:
    """C-CANCEL (movescu --cancel) while node a sends what node b holds: the final response
    says Cancel, and the files fetched ahead are closed (gateway.query.prefetch)."""
    from tests.conftest import wait_for

    a, b = two_nodes(sqlite_url)
    study, series = generate_uid(), generate_uid()
    files = [write_file(make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series,
                                     rows=256, columns=256, InstanceNumber=i + 1,
                                     PatientName=NAME, SpecificCharacterSet="ISO_IR 192"),
                        tmp_path / "sent" / f"{i}.dcm") for i in range(40)]
    sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1",
                 str(b.config.dicom.port), *map(str, files))
    assert sent.returncode == 0, sent.stderr
    before = _open_temporary_files()
    moved = dcmtk("movescu", "-v", "-S", "-aet", "VIEWER", "-aec", "GATEWAY", "-aem", "ANY",
                  "--cancel", "2", "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(a.config.dicom.port))
    assert "Cancel" in moved.stderr, moved.stderr  # 0xFE00
    assert len(list((tmp_path / "any").iterdir())) < len(files)
    wait_for(lambda: _open_temporary_files() <= before, 10, "every fetched file closed")


def test_fetches_on_a_kept_alive_connection_do_not_wait_for_delayed_acks(
    two_nodes: Any, tmp_path: Path, sqlite_url: str,
) -> None:
    """What another node's fetches (``gateway.cluster.peers``: one kept-alive connection) see:
    an answer as quick as on a fresh connection. With Nagle's algorithm left on by the HTTP
    server, each kept-alive answer waited ~40 ms for the client's delayed ACK."""
    import statistics
    import time

    import urllib3

    a, _ = two_nodes(sqlite_url)
    send_study(a, tmp_path / "sent")
    uid = rows(sqlite_url, "SELECT sop_instance_uid FROM instances ORDER BY id LIMIT 1")[0][0]
    assert a.http is not None
    url = f"http://127.0.0.1:{a.http.port}/internal/instances/{uid}"
    pool = urllib3.PoolManager(maxsize=1)

    def median_ms(**headers: str) -> float:
        taken = []
        for _ in range(12):
            started = time.perf_counter()
            answer = pool.request("GET", url, headers={"Authorization": f"Bearer {SECRET}",
                                                       **headers})
            taken.append((time.perf_counter() - started) * 1000)
            assert answer.status == 200
        return statistics.median(taken[2:])

    fresh = median_ms(Connection="close")
    kept_alive = median_ms()
    pool.clear()
    assert kept_alive < fresh + 20, (kept_alive, fresh)
