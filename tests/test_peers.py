"""Admission policy: who may associate and with which services."""

from __future__ import annotations

import pytest

from gateway.config import Peer, SecurityConfig
from gateway.dicom.peers import PeerPolicy, RejectReason


def policy(**security: object) -> PeerPolicy:
    return PeerPolicy(SecurityConfig.model_validate(security), "GATEWAY")


def test_known_peer_gets_its_services_unknown_gets_the_default() -> None:
    p = policy(unknown_callers=["echo"], peers=[Peer(ae_title="CT1", services=("store",))])
    known = p.admit("CT1", "GATEWAY", "10.0.0.1")
    assert (known.reject, known.services, known.known_peer) == (None, {"store"}, True)
    stranger = p.admit("OTHER", "GATEWAY", "10.0.0.1")
    assert (stranger.reject, stranger.services, stranger.known_peer) == (None, {"echo"}, False)


def test_closed_list_rejects_unknown_callers_and_wrong_hosts() -> None:
    p = policy(peers=[Peer(ae_title="CT1", host="10.0.0.1")])
    assert p.admit("CT1", "GATEWAY", "10.0.0.1").reject is None
    assert p.admit("CT1", "GATEWAY", "10.0.0.2").reject is RejectReason.CALLING_AE_NOT_RECOGNIZED
    assert p.admit("CT2", "GATEWAY", "10.0.0.1").reject is RejectReason.CALLING_AE_NOT_RECOGNIZED


def test_called_ae_is_checked_unless_turned_off() -> None:
    strict = policy(unknown_callers=["echo"])
    assert strict.admit("X", "NOT_US", "h").reject is RejectReason.CALLED_AE_NOT_RECOGNIZED
    assert strict.admit("X", "GATEWAY  ", "h").reject is None  # AE titles are space-padded
    lax = policy(unknown_callers=["echo"], check_called_ae_title=False)
    assert lax.admit("X", "ANYTHING", "h").reject is None


def test_reject_reasons_are_the_standard_triples() -> None:
    assert RejectReason.CALLING_AE_NOT_RECOGNIZED.wire == (1, 1, 3)
    assert RejectReason.CALLED_AE_NOT_RECOGNIZED.wire == (1, 1, 7)
    assert RejectReason.LOCAL_LIMIT_EXCEEDED.wire == (2, 3, 2)


def test_a_peer_limit_shares_the_node_limit_wire_triple_but_not_its_label() -> None:
    peer, node = RejectReason.PEER_LIMIT_EXCEEDED, RejectReason.LOCAL_LIMIT_EXCEEDED
    assert peer.wire == node.wire == (2, 3, 2)  # transient, service-provider (presentation)
    assert peer is not node and peer.label == "peer_limit_exceeded" != node.label
    assert len({r.label for r in RejectReason}) == len(list(RejectReason)) == 4


@pytest.mark.parametrize(("peers", "default", "calling", "limit"), [
    ([], None, "CT1", None),  # no limit but the node's
    ([], 2, "CT1", 2),  # the default applies to unknown callers
    ([{"ae_title": "CT1"}], 2, "CT1", 2),  # and to listed ones without their own
    ([{"ae_title": "CT1", "max_associations": 5}], 2, "CT1", 5),  # own limit above the default
    ([{"ae_title": "CT1", "max_associations": 1}], 2, "CT1", 1),  # and below it
    ([{"ae_title": "CT1", "max_associations": 1}], None, "CT1", 1),  # own limit, no default
    ([{"ae_title": "CT1", "max_associations": 1}], None, "CT2", None),  # not someone else's
    ([{"ae_title": "CT1", "max_associations": 1}], 3, "  CT1  ", 1),  # titles are stripped
    ([{"ae_title": "CT1", "host": "10.0.0.1", "max_associations": 1}], 3, "CT1", 1),  # any host
])
def test_a_callers_limit_is_its_own_else_the_default(
        peers: list[dict[str, object]], default: int | None, calling: str,
        limit: int | None) -> None:
    p = policy(unknown_callers=["echo"], peers=peers, max_associations_per_peer=default)
    assert p.peer_limit(calling) == limit
    assert p.admit(calling, "GATEWAY", "10.0.0.9").max_associations == limit
