"""folded person names for matching; verification misses per forward job

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 08:30:00

``patient_name_folded`` and ``referring_physician_name_folded`` hold
``gateway.query.folding.fold_name`` of the name (SQLite's ``lower()`` folds ASCII only); existing
rows are filled here with the fold as it was written on this date, copied so that this migration
never changes when that module does.
``forward_jobs.verify_misses`` counts how often a destination was asked and lacked the instance.
"""

from __future__ import annotations

import unicodedata

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

_BATCH = 5000


_WIDTH = {
    code: unicodedata.normalize("NFKC", chr(code))
    for low, high in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0xFF61, 0xFF9F),
                      (0x3000, 0x3000))
    for code in range(low, high + 1)
}


def _fold_text(text: str) -> str:
    return unicodedata.normalize(
        "NFC", unicodedata.normalize("NFD", text.translate(_WIDTH)).casefold()
    )


def _fold(value: str | None) -> str | None:
    if value is None:
        return None
    groups = ["^".join(_fold_text(c) for c in group.split("^")).rstrip("^")
              for group in value.rstrip(" ").split("=")]
    return "=".join(groups).rstrip("=")[:324] or None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patient_name_folded', sa.String(length=324), nullable=True))
        batch_op.add_column(
            sa.Column('referring_physician_name_folded', sa.String(length=324), nullable=True))
        batch_op.create_index('ix_instances_patient_name_folded', ['patient_name_folded'],
                              unique=False)
    with op.batch_alter_table('forward_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('verify_misses', sa.Integer(), nullable=False,
                                      server_default='0'))
    instances = sa.table('instances', sa.column('id', sa.Integer),
                         sa.column('patient_name', sa.String),
                         sa.column('referring_physician_name', sa.String),
                         sa.column('patient_name_folded', sa.String),
                         sa.column('referring_physician_name_folded', sa.String))
    connection = op.get_bind()
    last = 0
    while True:
        rows = connection.execute(
            sa.select(instances.c.id, instances.c.patient_name,
                      instances.c.referring_physician_name)
            .where(instances.c.id > last).order_by(instances.c.id).limit(_BATCH)
        ).all()
        if not rows:
            break
        connection.execute(
            sa.update(instances).where(instances.c.id == sa.bindparam('row_id')),
            [{'row_id': i, 'patient_name_folded': _fold(p),
              'referring_physician_name_folded': _fold(r)} for i, p, r in rows],
        )
        last = rows[-1][0]


def downgrade() -> None:
    with op.batch_alter_table('forward_jobs', schema=None) as batch_op:
        batch_op.drop_column('verify_misses')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index('ix_instances_patient_name_folded')
        batch_op.drop_column('referring_physician_name_folded')
        batch_op.drop_column('patient_name_folded')
