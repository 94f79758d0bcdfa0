"""instances.node_name (which node's spool holds the file) and the nodes table (heartbeats)

Several gateway nodes may share one PostgreSQL (gateway.cluster). Each keeps its files on its
own disk, so the ledger says which node holds each one: forwarding stays on that node, and a
retrieve on another node fetches the bytes from it.

Backfill: rows from before this revision are given the name of the node that runs the upgrade
(``gateway serve`` or ``gateway db upgrade`` pass ``forward.node_name``). Before this revision a
ledger had one spool, and the node upgrading it is the one whose disk holds those files: naming
it keeps their forwarding and retention on the node that can do them once a second node joins.
Run without a node name (Alembic by hand), the rows stay NULL, which the code reads as "held by
whichever node reads it", the single-node behaviour.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-14 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('node_name', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_instances_node_name', ['node_name'], unique=False)
    node = context.config.attributes.get("node_name")
    if node:
        instances = sa.table('instances', sa.column('node_name', sa.String))
        op.execute(instances.update().where(instances.c.node_name.is_(None))
                   .values(node_name=node))
    op.create_table(
        'nodes',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_heartbeat', sa.DateTime(timezone=True), nullable=False),
        sa.Column('url', sa.String(length=300), nullable=True),
        sa.Column('version', sa.String(length=32), nullable=False),
        sa.Column('heartbeat_s', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )


def downgrade() -> None:
    op.drop_table('nodes')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index('ix_instances_node_name')
        batch_op.drop_column('node_name')
