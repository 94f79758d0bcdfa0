"""Several nodes on one database (gateway.cluster): which node holds each file, heartbeats,
forwarding and retention on the holder only, the internal endpoint, and retrieves across nodes.

The two-process cluster test (``gateway serve`` x2 on one PostgreSQL, behind HAProxy) is in
tests/test_cluster.py; here, the parts in one process on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from pydicom.uid import generate_uid

from gateway.cluster.nodes import NodeRegistry, list_nodes, waiting_on
from gateway.db.engine import make_engine
from gateway.db.migrate import MIGRATIONS, upgrade
from gateway.db.models import ForwardJob, Instance
from gateway.forward.outbox import Outbox, new_jobs

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


