"""remap: identities, orders, study decisions, audit

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 14:30:44.749237
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_events_action'), ['action'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_study_instance_uid'), ['study_instance_uid'], unique=False)

    op.create_table('orders',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('accession_number', sa.String(length=64), nullable=False),
    sa.Column('mrn', sa.String(length=64), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=False),
    sa.Column('scheduled_at', sa.DateTime(), nullable=False),
    sa.Column('requested_procedure_id', sa.String(length=64), nullable=True),
    sa.Column('requested_procedure_description', sa.String(length=64), nullable=True),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('patient_name', sa.String(length=324), nullable=True),
    sa.Column('birth_date', sa.String(length=8), nullable=True),
    sa.Column('sex', sa.String(length=16), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('accession_number')
    )
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_orders_mrn'), ['mrn'], unique=False)
        batch_op.create_index(batch_op.f('ix_orders_scheduled_at'), ['scheduled_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_orders_study_instance_uid'), ['study_instance_uid'], unique=False)

    op.create_table('patient_identities',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('issuer', sa.String(length=64), nullable=False),
    sa.Column('local_id', sa.String(length=64), nullable=False),
    sa.Column('mrn', sa.String(length=64), nullable=False),
    sa.Column('patient_name', sa.String(length=324), nullable=True),
    sa.Column('birth_date', sa.String(length=8), nullable=True),
    sa.Column('sex', sa.String(length=16), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('issuer', 'local_id')
    )
    with op.batch_alter_table('patient_identities', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_patient_identities_mrn'), ['mrn'], unique=False)

    op.create_table('study_decisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('hold_reason', sa.String(length=200), nullable=True),
    sa.Column('identity', sa.Text(), nullable=True),
    sa.Column('order_match', sa.Text(), nullable=True),
    sa.Column('candidates', sa.Text(), nullable=False),
    sa.Column('mrn', sa.String(length=64), nullable=True),
    sa.Column('accession_number', sa.String(length=64), nullable=True),
    sa.Column('rules', sa.Text(), nullable=False),
    sa.Column('decided_by', sa.String(length=64), nullable=False),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_instance_uid')
    )
    with op.batch_alter_table('study_decisions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_decisions_state'), ['state'], unique=False)

    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('remap_state', sa.String(length=16), nullable=False, server_default='none'))
        batch_op.add_column(sa.Column('remap_plan', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('original_patient_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('original_patient_name', sa.String(length=324), nullable=True))
        batch_op.add_column(sa.Column('original_accession_number', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_instances_remap_state'), ['remap_state'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instances_remap_state'))
        batch_op.drop_column('original_accession_number')
        batch_op.drop_column('original_patient_name')
        batch_op.drop_column('original_patient_id')
        batch_op.drop_column('remap_plan')
        batch_op.drop_column('remap_state')

    with op.batch_alter_table('study_decisions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_decisions_state'))

    op.drop_table('study_decisions')
    with op.batch_alter_table('patient_identities', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_patient_identities_mrn'))

    op.drop_table('patient_identities')
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_orders_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_orders_scheduled_at'))
        batch_op.drop_index(batch_op.f('ix_orders_mrn'))

    op.drop_table('orders')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_events_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_audit_events_at'))
        batch_op.drop_index(batch_op.f('ix_audit_events_action'))

    op.drop_table('audit_events')
