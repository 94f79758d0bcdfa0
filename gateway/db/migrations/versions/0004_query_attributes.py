"""query attributes

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 15:15:42.188940
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patient_birth_date', sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column('patient_sex', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('issuer_of_patient_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('study_time', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('study_id', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('study_description', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('referring_physician_name', sa.String(length=324), nullable=True))
        batch_op.add_column(sa.Column('series_number', sa.String(length=12), nullable=True))
        batch_op.add_column(sa.Column('series_description', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('body_part_examined', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('instance_number', sa.String(length=12), nullable=True))
        batch_op.create_index(batch_op.f('ix_instances_study_date'), ['study_date'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instances_study_date'))
        batch_op.drop_column('instance_number')
        batch_op.drop_column('body_part_examined')
        batch_op.drop_column('series_description')
        batch_op.drop_column('series_number')
        batch_op.drop_column('referring_physician_name')
        batch_op.drop_column('study_description')
        batch_op.drop_column('study_id')
        batch_op.drop_column('study_time')
        batch_op.drop_column('issuer_of_patient_id')
        batch_op.drop_column('patient_sex')
        batch_op.drop_column('patient_birth_date')

