"""Who may associate, and what each caller may do once associated.

Pure policy over the configuration: no sockets, no pynetdicom objects, so every branch is tested
directly. Rejections use the A-ASSOCIATE-RJ result/source/reason triples of PS3.8 9.3.4.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gateway.config import Peer, SecurityConfig, Service


class RejectReason(Enum):
    """Why an association was rejected, as recorded (ledger row, metric label, log). The value is
    the label, not the wire triple: two reasons share one triple (the node's limit and a peer's
    limit are both "local-limit-exceeded" on the wire), and an Enum would make members with one
    value aliases of each other, so the operator could no longer tell them apart."""

    CALLING_AE_NOT_RECOGNIZED = "calling_ae_not_recognized"
    CALLED_AE_NOT_RECOGNIZED = "called_ae_not_recognized"
    # dicom.max_associations open on the node
    LOCAL_LIMIT_EXCEEDED = "local_limit_exceeded"
    # this calling AE title's own limit (security.max_associations_per_peer, or its peer entry's)
    PEER_LIMIT_EXCEEDED = "peer_limit_exceeded"

    @property
    def label(self) -> str:
        return self.value

    @property
    def wire(self) -> tuple[int, int, int]:
        """(result, source, reason/diag.) of the A-ASSOCIATE-RJ PDU, PS3.8 9.3.4, Table 9-21."""
        return _WIRE[self]


_WIRE: dict[RejectReason, tuple[int, int, int]] = {
    RejectReason.CALLING_AE_NOT_RECOGNIZED: (0x01, 0x01, 0x03),  # permanent, service-user
    RejectReason.CALLED_AE_NOT_RECOGNIZED: (0x01, 0x01, 0x07),  # permanent, service-user
    # transient, service-provider (presentation): the device retries later
    RejectReason.LOCAL_LIMIT_EXCEEDED: (0x02, 0x03, 0x02),
    RejectReason.PEER_LIMIT_EXCEEDED: (0x02, 0x03, 0x02),
}


@dataclass(frozen=True)
class Admission:
    """The verdict on one association request."""

    reject: RejectReason | None
    services: frozenset[Service]
    known_peer: bool
    # How many associations this calling AE title may hold open at once; None: no own limit
    max_associations: int | None = None


class PeerPolicy:
    def __init__(self, security: SecurityConfig, own_ae_title: str) -> None:
        self._security = security
        self._own_ae_title = own_ae_title
        self._peers: dict[str, Peer] = {p.ae_title: p for p in security.peers}

    def peer_limit(self, calling_ae: str) -> int | None:
        """The limit on ``calling_ae``'s open associations: its peer entry's own
        ``max_associations``, else ``max_associations_per_peer``. Keyed by the title alone, whatever
        host it calls from: associations are counted per title, so one title has one limit."""
        peer = self._peers.get(calling_ae.strip())
        if peer is not None and peer.max_associations is not None:
            return peer.max_associations
        return self._security.max_associations_per_peer

    def admit(self, calling_ae: str, called_ae: str, peer_host: str) -> Admission:
        calling_ae, called_ae = calling_ae.strip(), called_ae.strip()
        limit = self.peer_limit(calling_ae)
        peer = self._peers.get(calling_ae)
        if peer is not None and (peer.host is None or peer.host == peer_host):
            services = frozenset(peer.services)
            known = True
        else:
            services = frozenset(self._security.unknown_callers)
            known = False
        if not services:
            return Admission(RejectReason.CALLING_AE_NOT_RECOGNIZED, services, known, limit)
        if self._security.check_called_ae_title and called_ae != self._own_ae_title:
            return Admission(RejectReason.CALLED_AE_NOT_RECOGNIZED, services, known, limit)
        return Admission(None, services, known, limit)
