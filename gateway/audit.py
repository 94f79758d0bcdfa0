"""Audit rows: who decided what about a study, and when (PS3.15 A.5 asks the same of archives).

The detail may hold patient values (candidates' accession numbers, the operator's choice): audit
rows live in the database with the ledger, never in the service log.
"""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy.orm import Session

from gateway.db.models import AuditEvent


def record(
    session: Session, actor: str, action: str, study: str | None, at: datetime, **detail: object
) -> None:
    session.add(
        AuditEvent(
            at=at,
            actor=actor,
            action=action,
            study_instance_uid=study,
            detail=json.dumps(detail, sort_keys=True, default=str, ensure_ascii=False),
        )
    )
