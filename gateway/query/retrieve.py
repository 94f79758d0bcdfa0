"""C-MOVE and C-GET: which instances an identifier names, and each one as a dataset to send.

An instance held by another node of the cluster (``instances.node_name``) is fetched from that
node (``gateway.cluster.peers``, the bytes checked against the ledger's SHA-256 of the file as
kept: ``kept_sha256`` once the remap stage rewrote it, else ``sha256``). An instance
retention removed from the spool (it was confirmed at every destination), or whose holder cannot
give it, is fetched back from an Orthanc destination that confirmed it, so a retrieve still gets
it. One that can be found nowhere becomes a failed sub-operation, named in the Failed SOP
Instance UID List (PS3.4 C.4.2.1.4.1, C.4.3.1.3.1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import Engine, select

from gateway.cluster.peers import IN_MEMORY, PREFETCH_WINDOW, Peers
from gateway.db.models import ForwardJob, Instance, kept_hash
from gateway.dicom.status import Status
from gateway.errors import GatewayError
from gateway.forward.destinations.orthanc import Orthanc
from gateway.query.attributes import UNIQUE_KEY
from gateway.query.find import Query, QueryRefused

log = logging.getLogger(__name__)
# A SOP class no association ever negotiates: pynetdicom then counts the sub-operation as failed
# and lists its SOP Instance UID, which is what the caller must be told about a lost instance.
_UNSENDABLE_SOP_CLASS = "1.2.826.0.1.3680043.9.9999.0"


@dataclass(frozen=True)
class Stored:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path | None  # None: no longer in the spool
    copies: tuple[tuple[str, str], ...]  # (destination, remote id) that confirmed it
    holder: str | None = None  # the node whose spool holds ``path`` (None: whoever reads it)
    sha256: str = ""  # of the data set of the file as kept (``gateway.db.models.kept_hash``)
    # The ledger has no hash of the file as kept (rewritten by the remap stage before revision
    # 0014): only the transfer can be checked, against the holder's own hash of it.
    rewritten: bool = False


def check_retrievable(query: Query) -> None:
    """PS3.4 C.4.2.2.1: a retrieve names its level's unique key; without one it would move
    everything, so it is refused with 0xC000 (unable to process), saying which key."""
    if UNIQUE_KEY[query.level] not in query.keys or not query.where:
        raise QueryRefused(Status.UNABLE_TO_PROCESS,
                           f"a {query.level} retrieve needs {UNIQUE_KEY[query.level]} with a value")


def lookup(engine: Engine, query: Query, node: str | None = None) -> list[Stored]:
    """``node``: this node; the Orthanc copies of instances another node holds are looked up
    too (the way to them when that node cannot answer)."""
    check_retrievable(query)
    with engine.connect() as c:
        rows = c.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.sop_class_uid,
                   Instance.transfer_syntax_uid, Instance.spool_path, Instance.spool_removed_at,
                   Instance.node_name, Instance.sha256, Instance.kept_sha256,
                   Instance.remap_state)
            .where(*query.where).order_by(Instance.id)
        ).all()
        # Copies at destinations: for what retention removed, and for what another node holds
        # (the way to it when that node is down)
        removed = [r.id for r in rows if r.spool_removed_at is not None
                   or (node is not None and r.node_name not in (None, node))]
        copies: dict[int, list[tuple[str, str]]] = {}
        if removed:
            for instance_id, destination, remote_id in c.execute(
                select(ForwardJob.instance_id, ForwardJob.destination, ForwardJob.remote_id)
                .where(ForwardJob.instance_id.in_(removed), ForwardJob.state == "confirmed",
                       ForwardJob.remote_id.is_not(None))
            ):
                copies.setdefault(instance_id, []).append((destination, str(remote_id)))
    return [
        Stored(r.sop_instance_uid, r.sop_class_uid, r.transfer_syntax_uid,
               None if r.spool_removed_at is not None else Path(r.spool_path),
               tuple(copies.get(r.id, ())), r.node_name, kept or "", kept is None)
        for r in rows
        for kept in (kept_hash(r.sha256, r.kept_sha256, r.remap_state),)
    ]


class Loader:
    def __init__(self, spool_root: Path, orthancs: dict[str, Orthanc], node: str | None = None,
                 peers: Peers | None = None, prefetch_window: int = PREFETCH_WINDOW) -> None:
        """``node``: this node's name; ``peers``: how to reach the others (None: a single node,
        or no cluster secret configured: another node's instance is had from Orthanc only).
        ``prefetch_window``: how many of another node's instances a retrieve fetches ahead of
        the one it sends (``gateway.query.prefetch``; 0: each when it is sent)."""
        self.prefetch_window = prefetch_window
        self._root = spool_root
        self._orthancs = orthancs
        self._node = node
        self._peers = peers

    @property
    def node(self) -> str | None:
        return self._node

    def elsewhere(self, stored: Stored) -> bool:
        """Whether another node's spool holds the file."""
        return (stored.path is not None and stored.holder is not None
                and self._node is not None and stored.holder != self._node)

    def load(self, stored: Stored,
             fetched: Callable[[], BinaryIO | None] | None = None) -> Dataset:
        """The instance as kept (or fetched back); a stand-in that fails to send otherwise.
        ``fetched``: waits for and gives the holder's bytes already being fetched
        (``gateway.query.prefetch``), in place of fetching them now."""
        try:
            if stored.path is not None and not self.elsewhere(stored):
                return dcmread(self._root / stored.path)
            if self.elsewhere(stored):
                held = fetched() if fetched is not None else self.fetch_from_holder(stored)
                if held is not None:
                    with held:
                        return dcmread(held)
            data = self.fetch_back(stored)
            if data is not None:
                return dcmread(BytesIO(data))
            log.warning("retrieve: %s is neither in the spool, nor at its node, nor at an "
                        "Orthanc destination", stored.sop_instance_uid)
        except (OSError, GatewayError) as exc:
            log.warning("retrieve: cannot read %s: %s", stored.sop_instance_uid, exc)
        return unsendable(stored.sop_instance_uid)

    def fetch_from_holder(self, stored: Stored, on_disk: bool = False) -> BinaryIO | None:
        """The bytes from the node that holds them (checked against the ledger's SHA-256);
        None when that cannot be done (no cluster secret, node down, bytes wrong: logged), so
        the caller tries an Orthanc copy next. ``on_disk``: in a temporary file on disk from
        the first byte (fetched ahead, so kept a while). Safe to call from several threads."""
        if self._peers is None or stored.holder is None:
            return None
        try:
            return self._peers.fetch(stored.holder, stored.sop_instance_uid,
                                     None if stored.rewritten else stored.sha256,
                                     in_memory_bytes=0 if on_disk else IN_MEMORY)
        except GatewayError as exc:
            log.warning("retrieve: %s", exc)
            return None

    def fetch_back(self, stored: Stored) -> bytes | None:
        """The instance's file from the first Orthanc destination that confirmed it (as Orthanc
        keeps it: the bytes it was sent); None when no configured Orthanc has it. Raises
        ``GatewayError`` when that Orthanc cannot give it. Exports use this too."""
        for destination, remote_id in stored.copies:
            if destination in self._orthancs:
                return self._orthancs[destination].fetch(remote_id)
        return None

    def can_fetch_back(self, stored: Stored) -> bool:
        return any(destination in self._orthancs for destination, _ in stored.copies)

    def can_fetch_from_holder(self, stored: Stored) -> bool:
        return self._peers is not None and self.elsewhere(stored)

    def close(self) -> None:
        if self._peers is not None:
            self._peers.close()


def unsendable(sop_instance_uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = _UNSENDABLE_SOP_CLASS
    ds.SOPInstanceUID = sop_instance_uid
    return ds
