"""An instance held by another node, fetched from that node's ``/internal/instances/{uid}``
(``gateway.cluster.internal``) for a C-MOVE, C-GET or export on this node.

The bytes go to a temporary file as they arrive (a multi-frame object of hundreds of MB is never
whole in memory); the data set in it (after the File Meta Information, which is what the ledger's
``sha256`` covers: ``gateway.receive.spool.hash_dataset``) must hash to the ledger's SHA-256 of
the file as kept (``kept_sha256`` once the remap stage rewrote it, else ``sha256``), or the fetch
is an error naming the UID and the node (a truncated file, or one altered at rest or in transit,
is never sent on as the instance). Only for a file rewritten before revision 0013, of which the
ledger has no hash, is the holder's own hash of it (``X-Gateway-SHA256``) what the bytes must
match: a check of the transfer only.
The holder's URL comes from its heartbeat row (``nodes.url``), read at each fetch, so a node
that restarts elsewhere is found again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
from typing import BinaryIO

import urllib3
from sqlalchemy import Engine
from urllib3.exceptions import HTTPError

from gateway.cluster.internal import SHA256_HEADER
from gateway.cluster.nodes import node_url
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, RetriableError
from gateway.receive.validate import Refused, dataset_offset

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024
IN_MEMORY = 1024 * 1024  # a temporary file stays in memory up to this size, then goes to disk
# Fetches a C-MOVE or C-GET keeps ahead of the sub-operation being sent (gateway.query.prefetch)
PREFETCH_WINDOW = 4


class PeerFetchError(GatewayError):
    """The holder could not give the instance, or gave other bytes than the ledger's."""


class Peers:
    def __init__(self, engine: Engine, secret: str, timeout_s: float) -> None:
        self._engine = engine
        self._headers = {"Authorization": f"Bearer {secret}"}
        self._pool = urllib3.PoolManager(
            maxsize=max(4, PREFETCH_WINDOW), retries=False,
            timeout=urllib3.Timeout(connect=min(timeout_s, 5.0), read=timeout_s))

    def fetch(self, node: str, sop_instance_uid: str, sha256: str | None,
              in_memory_bytes: int = IN_MEMORY) -> BinaryIO:
        """A file positioned at 0 holding exactly the bytes node ``node`` keeps for the UID;
        ``sha256``: the ledger's hash of its data set as kept (None: unknown, see above).
        ``in_memory_bytes``: kept in memory up to that size; 0: on disk from the first byte.
        Safe to call from several threads (urllib3's pool is)."""
        url = node_url(self._engine, node)
        if not url:
            raise PeerFetchError(f"{sop_instance_uid} is held by node {node}, whose address is "
                                 "unknown (it has never sent a heartbeat with its HTTP port)")
        try:
            response = self._pool.request(
                "GET", f"{url}/internal/instances/{sop_instance_uid}", headers=self._headers,
                preload_content=False, redirect=False)
        except HTTPError as exc:
            raise RetriableError(f"{sop_instance_uid}: node {node} at {url} did not answer "
                                 f"({type(exc).__name__})") from None
        out: BinaryIO = (  # returned open
            tempfile.SpooledTemporaryFile(max_size=in_memory_bytes)  # type: ignore[assignment]  # noqa: SIM115
            if in_memory_bytes else tempfile.TemporaryFile())  # noqa: SIM115
        try:
            if response.status != 200:
                raise PeerFetchError(f"{sop_instance_uid}: node {node} answered HTTP "
                                     f"{response.status}")
            try:
                out.writelines(response.stream(CHUNK))
            except HTTPError as exc:
                raise RetriableError(f"{sop_instance_uid}: the transfer from node {node} broke "
                                     f"({type(exc).__name__})") from None
            expected = sha256 or response.headers.get(SHA256_HEADER)
            if _dataset_sha256(out) != expected:
                raise PeerFetchError(f"{sop_instance_uid}: the bytes from node {node} do not "
                                     "match the ledger's SHA-256; not used")
            out.seek(0)
            return out
        except BaseException:
            out.close()
            raise
        finally:
            response.release_conn()

    def close(self) -> None:
        self._pool.clear()


def _dataset_sha256(file: BinaryIO) -> str | None:
    """The SHA-256 of the data set after the File Meta Information; None when the file has no
    readable meta (it then matches no ledger hash)."""
    try:
        file.seek(dataset_offset(file))
    except (Refused, struct.error):
        return None
    digest = hashlib.sha256()
    while chunk := file.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def make_peers(config: GatewayConfig, engine: Engine | None = None) -> Peers | None:
    """The client of the other nodes, or None without a cluster secret (a single node). Reads
    the secret now (a missing or wrong one is a ``ConfigError``, so ``serve`` stops before it
    listens)."""
    secret = config.cluster.secret(os.environ)
    if secret is None:
        return None
    if engine is None:
        from gateway.db.engine import make_engine

        engine = make_engine(config.database.url, config.database.busy_timeout_s)
    return Peers(engine, secret, config.cluster.fetch_timeout_s)
