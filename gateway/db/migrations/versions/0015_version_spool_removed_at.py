"""instance_versions.spool_removed_at: retention removes other versions' files too

Before this revision retention removed only current copies, so every copy superseded under
``duplicate_policy = "replace"`` (and every one ``keep_first`` did not make current) stayed in
the spool for ever. Retention now removes a version's file once the current copy is confirmed at
every destination (gateway.forward.retention) and, as for current files, marks the row instead of
deleting it: the ledger keeps the history (``sha256`` still tells a resent identical copy), and
``gateway status`` counts only the versions still on disk.

No backfill: every version row from before this revision has its file (nothing removed them).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03 16:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instance_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('spool_removed_at', sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.create_index('ix_instance_versions_in_spool',
                              ['spool_removed_at', 'received_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('instance_versions', schema=None) as batch_op:
        batch_op.drop_index('ix_instance_versions_in_spool')
        batch_op.drop_column('spool_removed_at')
