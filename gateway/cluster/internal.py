"""``GET /internal/instances/{sop_instance_uid}``: this node's copy of an instance, for another
node's C-MOVE, C-GET or export (``gateway.cluster.peers``).

Invariants: only the shared cluster secret opens it (``gateway.web.auth.SharedSecretAuth``);
the URL names a SOP Instance UID, never a path: the file served is the one the ledger names for
that UID, held by this node and still in its spool, and a value that is not a UID (PS3.5 9.1)
is answered 404 before the database is asked. The body is the spool file exactly as kept,
streamed in chunks (Starlette's ``FileResponse``), with its length and the SHA-256 of its data
set in ``X-Gateway-SHA256``: the ledger's hash of the file as kept (``kept_sha256`` once the remap
stage rewrote it, else ``sha256``), never one computed from the file, so that the fetching node
checks the bytes end to end, against what the ledger recorded when the file was written, and a
file altered at rest is refused. Only a file rewritten before revision 0013 (no kept hash in the
ledger) is hashed now, which checks the transfer only.
"""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import Engine, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from gateway.cluster.holder import held_by
from gateway.db.models import Instance, kept_hash
from gateway.receive.spool import hash_dataset
from gateway.receive.validate import dataset_offset
from gateway.web.auth import SharedSecretAuth

SHA256_HEADER = "x-gateway-sha256"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # PS3.5 9.1
_UID_MAX = 64


def internal_app(engine: Engine, spool_root: Path, node: str, secret_sha256: str) -> SharedSecretAuth:
    root = spool_root.resolve()

    def instance(request: Request) -> Response:  # sync: Starlette runs it in its thread pool
        uid = request.path_params["uid"]
        if len(uid) > _UID_MAX or not _UID.fullmatch(uid):
            return _missing(uid, "is not a SOP Instance UID")
        with engine.connect() as c:
            row = c.execute(
                select(Instance.spool_path, Instance.sha256, Instance.kept_sha256,
                       Instance.remap_state)
                .where(Instance.sop_instance_uid == uid, Instance.spool_removed_at.is_(None),
                       held_by(node))
            ).first()
        if row is None:
            return _missing(uid, f"is not in node {node}'s spool")
        path = (root / row.spool_path).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return _missing(uid, f"has no file in node {node}'s spool")
        sha256 = kept_hash(row.sha256, row.kept_sha256, row.remap_state)
        if sha256 is None:  # rewritten before the ledger recorded kept hashes
            with open(path, "rb") as fp:
                sha256 = hash_dataset(path, dataset_offset(fp))
        return FileResponse(path, media_type="application/dicom",
                            headers={SHA256_HEADER: sha256})

    app = Starlette(routes=[Route("/instances/{uid}", instance, methods=["GET"])])
    return SharedSecretAuth(app, secret_sha256)


def _missing(uid: str, why: str) -> Response:
    shown = uid if _UID.fullmatch(uid) else "the value given"
    return JSONResponse({"error": f"{shown} {why}"}, 404)
