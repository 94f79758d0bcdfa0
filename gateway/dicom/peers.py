"""Who may associate, and what each caller may do once associated.

Pure policy over the configuration: no sockets, no pynetdicom objects, so every branch is tested
directly. Rejections use the A-ASSOCIATE-RJ result/source/reason triples of PS3.8 9.3.4.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gateway.config import Peer, SecurityConfig, Service


class RejectReason(Enum):
    """(result, source, diagnostic) as sent on the wire, PS3.8 Table 9-21."""

    CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)  # permanent, service-user
    CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)  # permanent, service-user
    LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # transient, service-provider (presentation)

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Admission:
    """The verdict on one association request."""

    reject: RejectReason | None
    services: frozenset[Service]
    known_peer: bool


class PeerPolicy:
    def __init__(self, security: SecurityConfig, own_ae_title: str) -> None:
        self._security = security
        self._own_ae_title = own_ae_title
        self._peers: dict[str, Peer] = {p.ae_title: p for p in security.peers}

    def admit(self, calling_ae: str, called_ae: str, peer_host: str) -> Admission:
        calling_ae, called_ae = calling_ae.strip(), called_ae.strip()
        peer = self._peers.get(calling_ae)
        if peer is not None and (peer.host is None or peer.host == peer_host):
            services = frozenset(peer.services)
            known = True
        else:
            services = frozenset(self._security.unknown_callers)
            known = False
        if not services:
            return Admission(RejectReason.CALLING_AE_NOT_RECOGNIZED, services, known)
        if self._security.check_called_ae_title and called_ae != self._own_ae_title:
            return Admission(RejectReason.CALLED_AE_NOT_RECOGNIZED, services, known)
        return Admission(None, services, known)
