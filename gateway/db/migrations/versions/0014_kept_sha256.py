"""instances.kept_sha256: the SHA-256 of the spool file's data set as kept, after a rewrite

``instances.sha256`` is the hash of the data set as received; duplicate detection compares each
arrival with it, so it must stay that. Once the remap stage rewrites the file it no longer
describes the file on disk, and a reader that wants to check a spool file end to end (a
cross-node fetch, a retrieve, an export) had nothing to check it against. ``kept_sha256`` is the
same hash (``gateway.receive.spool.hash_dataset``: from the data set's offset) of the file now
at ``spool_path``, set by the remap stage in the transaction that records the rewrite.

No backfill: NULL means "the file is the received one, ``sha256`` describes it", which is true
of every row not rewritten. Rows rewritten before this revision (``remap_state = 'done'``) also
stay NULL: their hash can only come from reading each file, which an upgrade must not do (a
spool holds millions), and a hash taken now would vouch for whatever is on disk today. Readers
treat such a row as "kept hash unknown" (``gateway.db.models.kept_hash``) and check only the
transfer, as before this revision.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 15:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kept_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('kept_sha256')
