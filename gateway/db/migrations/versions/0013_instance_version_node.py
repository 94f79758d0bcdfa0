"""instance_versions.node_name: which node's spool holds each kept version's file

A version (a copy superseded under ``duplicate_policy = "replace"``, or one ``keep_first`` did
not make current) is a file on the disk of the node that received that copy, which need not be
the node holding the current copy: node B replacing what node A received leaves the superseded
file on A. Without the node, a node reading or removing version files would act on another
node's path (gateway.cluster.holder).

Backfill, as 0012 did for instances: rows from before this revision are given the name of the
node that runs the upgrade (``gateway serve`` or ``gateway db upgrade`` pass
``forward.node_name``), because before several nodes shared the ledger its one spool held them
all. Unlike in 0012, a ledger at 0012 may already be shared: when it names another node (an
instance held elsewhere, or another node's heartbeat), the upgrading node cannot know which
versions are its own, and the rows stay NULL ("any node's", the single-node reading) rather than
be attributed to it wrongly; NULL keeps a node from removing such a file as unrecorded
(``gateway.receive.ingest.is_recorded``). Run without a node name (Alembic by hand), they stay
NULL too.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-20 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instance_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('node_name', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_instance_versions_node_name', ['node_name'], unique=False)
    node = context.config.attributes.get("node_name")
    if node and not _names_another_node(node):
        versions = sa.table('instance_versions', sa.column('node_name', sa.String))
        op.execute(versions.update().where(versions.c.node_name.is_(None))
                   .values(node_name=node))


def _names_another_node(node: str) -> bool:
    """Whether the ledger is already shared: an instance or a heartbeat of another node."""
    instances = sa.table('instances', sa.column('node_name', sa.String))
    nodes = sa.table('nodes', sa.column('name', sa.String))
    connection = op.get_bind()
    held = connection.execute(
        sa.select(instances.c.node_name)
        .where(instances.c.node_name.is_not(None), instances.c.node_name != node).limit(1)
    ).first()
    beating = connection.execute(
        sa.select(nodes.c.name).where(nodes.c.name != node).limit(1)
    ).first()
    return held is not None or beating is not None


def downgrade() -> None:
    with op.batch_alter_table('instance_versions', schema=None) as batch_op:
        batch_op.drop_index('ix_instance_versions_node_name')
        batch_op.drop_column('node_name')
