"""instances.institution_name: Institution Name (0008,0080), indexed, for sites

A site (``[[sites]]``) is a hospital named by its calling AE titles and, optionally, the
Institution Name its instances carry; the export API and export jobs select by it from the
ledger, so the ledger keeps the value. Rows from before this revision have none (NULL): they
belong to a site by their calling AE only.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-10 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('institution_name', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_instances_institution_name', ['institution_name'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index('ix_instances_institution_name')
        batch_op.drop_column('institution_name')
