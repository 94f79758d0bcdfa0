"""forward: outbox jobs, destination states, spool removal

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 14:59:00.063140
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('destination_states',
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('breaker', sa.String(length=16), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('since', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_error', sa.String(length=400), nullable=True),
    sa.PrimaryKeyConstraint('destination')
    )
    op.create_table('forward_jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('instance_id', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('forwarded_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('confirmed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('sent_study_uid', sa.String(length=64), nullable=True),
    sa.Column('sent_series_uid', sa.String(length=64), nullable=True),
    sa.Column('sent_sop_uid', sa.String(length=64), nullable=True),
    sa.Column('remote_id', sa.String(length=64), nullable=True),
    sa.Column('last_error', sa.String(length=400), nullable=True),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('instance_id', 'destination')
    )
    with op.batch_alter_table('forward_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_forward_jobs_instance_id'), ['instance_id'], unique=False)
        batch_op.create_index('ix_forward_jobs_ready', ['destination', 'state', 'next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_forward_jobs_state'), ['state'], unique=False)
        batch_op.create_index('ix_forward_jobs_study', ['destination', 'study_instance_uid', 'state'], unique=False)

    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('spool_removed_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('spool_removed_at')

    with op.batch_alter_table('forward_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_forward_jobs_study')
        batch_op.drop_index(batch_op.f('ix_forward_jobs_state'))
        batch_op.drop_index('ix_forward_jobs_ready')
        batch_op.drop_index(batch_op.f('ix_forward_jobs_instance_id'))

    op.drop_table('forward_jobs')
    op.drop_table('destination_states')
