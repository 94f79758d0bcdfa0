"""performed series: the series each MPPS lists, indexed, so remap links images to orders

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('performed_series',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('performed_step_id', sa.Integer(), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['performed_step_id'], ['performed_steps.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('performed_step_id', 'series_instance_uid')
    )
    op.create_index(op.f('ix_performed_series_performed_step_id'), 'performed_series',
                    ['performed_step_id'], unique=False)
    op.create_index(op.f('ix_performed_series_series_instance_uid'), 'performed_series',
                    ['series_instance_uid'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_performed_series_series_instance_uid'), table_name='performed_series')
    op.drop_index(op.f('ix_performed_series_performed_step_id'), table_name='performed_series')
    op.drop_table('performed_series')
