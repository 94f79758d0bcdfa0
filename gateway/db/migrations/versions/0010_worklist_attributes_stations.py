"""worklist items: their other attributes (DICOM JSON) and every Scheduled Station AE Title

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('worklist_items', sa.Column('attributes', sa.Text(), nullable=False,
                                              server_default='{}'))
    op.create_table(
        'worklist_item_stations',
        sa.Column('item_id', sa.Integer(), nullable=False),
        sa.Column('station_ae', sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(['item_id'], ['worklist_items.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('item_id', 'station_ae'),
    )
    op.create_index(op.f('ix_worklist_item_stations_station_ae'), 'worklist_item_stations',
                    ['station_ae'], unique=False)
    op.create_index('ix_worklist_items_listed', 'worklist_items',
                    ['start_date', 'status', 'expires_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_worklist_items_listed', table_name='worklist_items')
    op.drop_index(op.f('ix_worklist_item_stations_station_ae'),
                  table_name='worklist_item_stations')
    op.drop_table('worklist_item_stations')
    op.drop_column('worklist_items', 'attributes')
