"""worklist: items, performed steps (MPPS), HL7 messages; orders gain worklist columns

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 08:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hl7_messages',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('peer', sa.String(length=80), nullable=False),
    sa.Column('message_type', sa.String(length=16), nullable=True),
    sa.Column('control_id', sa.String(length=64), nullable=True),
    sa.Column('accession_number', sa.String(length=16), nullable=True),
    sa.Column('ack_code', sa.String(length=2), nullable=False),
    sa.Column('error', sa.String(length=400), nullable=True),
    sa.Column('raw', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_hl7_messages_accession_number'), 'hl7_messages', ['accession_number'], unique=False)
    op.create_index(op.f('ix_hl7_messages_ack_code'), 'hl7_messages', ['ack_code'], unique=False)
    op.create_index(op.f('ix_hl7_messages_received_at'), 'hl7_messages', ['received_at'], unique=False)
    op.create_table('worklist_items',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('order_id', sa.Integer(), nullable=False),
    sa.Column('step_id', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('accession_number', sa.String(length=16), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('issuer_of_patient_id', sa.String(length=64), nullable=True),
    sa.Column('patient_name', sa.String(length=324), nullable=True),
    sa.Column('patient_name_folded', sa.String(length=324), nullable=True),
    sa.Column('birth_date', sa.String(length=8), nullable=True),
    sa.Column('sex', sa.String(length=16), nullable=True),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('requested_procedure_id', sa.String(length=16), nullable=True),
    sa.Column('requested_procedure_description', sa.String(length=64), nullable=True),
    sa.Column('modality', sa.String(length=16), nullable=False),
    sa.Column('station_ae', sa.String(length=16), nullable=True),
    sa.Column('station_name', sa.String(length=16), nullable=True),
    sa.Column('start_date', sa.String(length=8), nullable=False),
    sa.Column('start_time', sa.String(length=16), nullable=False),
    sa.Column('performing_physician', sa.String(length=324), nullable=True),
    sa.Column('performing_physician_folded', sa.String(length=324), nullable=True),
    sa.Column('step_description', sa.String(length=64), nullable=True),
    sa.Column('referring_physician', sa.String(length=324), nullable=True),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('built_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['order_id'], ['orders.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('order_id', 'step_id')
    )
    op.create_index(op.f('ix_worklist_items_accession_number'), 'worklist_items', ['accession_number'], unique=False)
    op.create_index(op.f('ix_worklist_items_expires_at'), 'worklist_items', ['expires_at'], unique=False)
    op.create_index(op.f('ix_worklist_items_modality'), 'worklist_items', ['modality'], unique=False)
    op.create_index(op.f('ix_worklist_items_order_id'), 'worklist_items', ['order_id'], unique=False)
    op.create_index(op.f('ix_worklist_items_patient_id'), 'worklist_items', ['patient_id'], unique=False)
    op.create_index(op.f('ix_worklist_items_patient_name_folded'), 'worklist_items', ['patient_name_folded'], unique=False)
    op.create_index(op.f('ix_worklist_items_start_date'), 'worklist_items', ['start_date'], unique=False)
    op.create_index(op.f('ix_worklist_items_station_ae'), 'worklist_items', ['station_ae'], unique=False)
    op.create_index(op.f('ix_worklist_items_status'), 'worklist_items', ['status'], unique=False)
    op.create_index(op.f('ix_worklist_items_study_instance_uid'), 'worklist_items', ['study_instance_uid'], unique=False)
    op.create_table('performed_steps',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=False),
    sa.Column('worklist_item_id', sa.Integer(), nullable=True),
    sa.Column('accession_number', sa.String(length=16), nullable=True),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('patient_id', sa.String(length=64), nullable=True),
    sa.Column('performed_series', sa.Text(), nullable=False),
    sa.Column('attributes', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['worklist_item_id'], ['worklist_items.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    op.create_index(op.f('ix_performed_steps_accession_number'), 'performed_steps', ['accession_number'], unique=False)
    op.create_index(op.f('ix_performed_steps_status'), 'performed_steps', ['status'], unique=False)
    op.create_index(op.f('ix_performed_steps_study_instance_uid'), 'performed_steps', ['study_instance_uid'], unique=False)
    op.add_column('orders', sa.Column('issuer_of_patient_id', sa.String(length=64), nullable=True))
    op.add_column('orders', sa.Column('scheduled_station_ae', sa.String(length=16), nullable=True))
    op.add_column('orders', sa.Column('scheduled_station_name', sa.String(length=16), nullable=True))
    op.add_column('orders', sa.Column('performing_physician', sa.String(length=324), nullable=True))
    op.add_column('orders', sa.Column('referring_physician', sa.String(length=324), nullable=True))
    op.add_column('orders', sa.Column('procedure_steps', sa.Text(), nullable=True))
    op.add_column('orders', sa.Column('placer_order_number', sa.String(length=64), nullable=True))
    op.add_column('orders', sa.Column('filler_order_number', sa.String(length=64), nullable=True))
    op.create_index(op.f('ix_orders_filler_order_number'), 'orders', ['filler_order_number'], unique=False)
    op.create_index(op.f('ix_orders_placer_order_number'), 'orders', ['placer_order_number'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_orders_placer_order_number'), table_name='orders')
    op.drop_index(op.f('ix_orders_filler_order_number'), table_name='orders')
    op.drop_column('orders', 'filler_order_number')
    op.drop_column('orders', 'placer_order_number')
    op.drop_column('orders', 'procedure_steps')
    op.drop_column('orders', 'referring_physician')
    op.drop_column('orders', 'performing_physician')
    op.drop_column('orders', 'scheduled_station_name')
    op.drop_column('orders', 'scheduled_station_ae')
    op.drop_column('orders', 'issuer_of_patient_id')
    op.drop_index(op.f('ix_performed_steps_study_instance_uid'), table_name='performed_steps')
    op.drop_index(op.f('ix_performed_steps_status'), table_name='performed_steps')
    op.drop_index(op.f('ix_performed_steps_accession_number'), table_name='performed_steps')
    op.drop_table('performed_steps')
    op.drop_index(op.f('ix_worklist_items_study_instance_uid'), table_name='worklist_items')
    op.drop_index(op.f('ix_worklist_items_status'), table_name='worklist_items')
    op.drop_index(op.f('ix_worklist_items_station_ae'), table_name='worklist_items')
    op.drop_index(op.f('ix_worklist_items_start_date'), table_name='worklist_items')
    op.drop_index(op.f('ix_worklist_items_patient_name_folded'), table_name='worklist_items')
    op.drop_index(op.f('ix_worklist_items_patient_id'), table_name='worklist_items')
    op.drop_index(op.f('ix_worklist_items_order_id'), table_name='worklist_items')
    op.drop_index(op.f('ix_worklist_items_modality'), table_name='worklist_items')
    op.drop_index(op.f('ix_worklist_items_expires_at'), table_name='worklist_items')
    op.drop_index(op.f('ix_worklist_items_accession_number'), table_name='worklist_items')
    op.drop_table('worklist_items')
    op.drop_index(op.f('ix_hl7_messages_received_at'), table_name='hl7_messages')
    op.drop_index(op.f('ix_hl7_messages_ack_code'), table_name='hl7_messages')
    op.drop_index(op.f('ix_hl7_messages_accession_number'), table_name='hl7_messages')
    op.drop_table('hl7_messages')
