"""The DICOM Upper Layer's error paths: every PDU or message the gateway cannot take ends its
association in order. Written for pynetdicom 3.0.x (``fastpath.check_version`` pins it).

Why: pynetdicom 3.0's state machine lets an exception out of an action and the DUL thread dies
with it: a P-DATA-TF whose command set does not decode, a PDV on a presentation context that was
never accepted, an A-ASSOCIATE-RQ with an even presentation context ID. The socket was then closed
with no A-ABORT, no end-of-association event fired (``gateway_associations_active`` stayed up
for good) and a C-STORE data set pynetdicom had begun to write stayed in ``incoming/``.

What happens instead (PS3.8 9.2, Table 9-10), in the DUL thread:

- Association established (Sta6 to Sta12): AA-8. An A-ABORT PDU with the source and reason the
  problem calls for (PS3.8 9.3.8, Table 9-26), an A-P-ABORT indication to the association (which
  ends as aborted and is counted out), ARTIM started, Sta13.
- Awaiting the A-ASSOCIATE-RQ (Sta2): one that decodes but cannot be accepted (AE-6 raised) is
  answered with A-ASSOCIATE-RJ, as AE-6's "otherwise" branch says; any other PDU, or one that
  does not decode, with A-ABORT (AA-1).
- In Sta13 after such an abort the stream is out of step, so what the peer still sends is read
  and dropped, not parsed, until it closes, falls silent for ``IDLE_WAIT_S``, or ARTIM expires.
  A peer still sending a long PDU then reads the A-ABORT instead of a connection reset.
- A primitive from the local user that is not valid in the current state (an answer finished
  after the abort) is dropped; pynetdicom raised there too.
- One WARNING per abort or rejection, naming the peer's AE title and address and the reason.
"""

from __future__ import annotations

import logging
import os
import queue
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import ACTIONS, TRANSITION_TABLE, StateMachine
from pynetdicom.pdu_primitives import A_P_ABORT

from gateway.dicom.pdu import PDU_NAMES, AbortReason, AbortSource, a_abort, a_associate_rj

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ for an A-ASSOCIATE-RQ the provider cannot accept (PS3.8 Table 9-21):
# rejected-permanent, DICOM UL service-provider (ACSE related function), no-reason-given.
REJECT_INVALID_REQUEST = (0x01, 0x02, 0x01)
# Events that are a PDU received from the peer (PS3.8 Table 9-9), by the PDU's name
_PDU_EVENTS = {"Evt3": 0x02, "Evt4": 0x03, "Evt6": 0x01, "Evt10": 0x04, "Evt12": 0x05,
               "Evt13": 0x06}
# Events that are a primitive from the local user: outside their states there is nobody to
# send them to any more
_LOCAL_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})


@dataclass(frozen=True)
class Problem:
    """Why an association is aborted: logged, and sent as the A-ABORT's source and reason."""

    why: str
    source: AbortSource = AbortSource.SERVICE_PROVIDER
    reason: AbortReason = AbortReason.NOT_SPECIFIED


class ProtocolError(Exception):
    """The peer broke PS3.8 (framing) or PS3.7 (a message that cannot be answered): abort."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.why)
        self.problem = problem


def framing(why: str, reason: AbortReason) -> ProtocolError:
    """A PDU the Upper Layer cannot take: aborted by the service-provider, with a reason."""
    return ProtocolError(Problem(why, AbortSource.SERVICE_PROVIDER, reason))


def message(why: str) -> ProtocolError:
    """A DIMSE message that cannot be answered (no status can say it): aborted by the
    service-user, the DIMSE layer above the Upper Layer, which gives no reason (PS3.8 9.3.8)."""
    return ProtocolError(Problem(why, AbortSource.SERVICE_USER, AbortReason.NOT_SPECIFIED))


class GuardedDUL(DULServiceProvider):
    """pynetdicom's DUL whose error paths end the association in order (see the module)."""

    draining: bool  # an abort was sent: what arrives is read and dropped
    _calling_ae: str  # from the A-ASSOCIATE-RQ, once decoded
    _problem: Problem | None  # found while reading, acted on when the state machine gets Evt19

    @classmethod
    def guard(cls, dul: DULServiceProvider) -> None:
        """In place, before the thread starts: the association already holds this object."""
        dul.__class__ = cls
        guarded = cast(GuardedDUL, dul)
        guarded.draining = False
        guarded._calling_ae = ""
        guarded._problem = None
        dul.state_machine.__class__ = GuardedStateMachine

    # -- called in the DUL thread --------------------------------------------------------------

    def fail(self, problem: Problem) -> None:
        """A problem found while reading: the abort follows, after the events already queued
        (Evt19 is "invalid PDU", which in every established state is AA-8)."""
        if self._problem is None:
            self._problem = problem
        self.event_queue.put("Evt19")

    def abandon_messages(self) -> None:
        """Remove what a message in progress had written. pynetdicom's C-STORE reader writes the
        data set to a file in ``incoming/`` as it arrives (``fastpath.receive_datasets_into``)."""
        partial = getattr(self.assoc.dimse.message, "_data_set_file", None)
        if partial is not None:
            partial.close()
            try:
                os.unlink(partial.name)
            except OSError:
                pass  # already gone
        self.assoc.dimse.message = None

    def _read_pdu_data(self) -> None:
        if self.draining:
            self._drain()
        elif self._problem is None:  # else an abort is queued: read nothing more
            super()._read_pdu_data()

    def _drain(self) -> None:
        wrapped = cast(Any, self.socket)
        try:
            data = wrapped.socket.recv(1 << 16)
        except (OSError, AttributeError):
            data = b""
        if not data:
            wrapped.close()  # Evt17: Sta13 -> AR-5 -> Sta1

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """pynetdicom's, with a PDU that does not decode turned into Evt19 here, with its name
        and without pynetdicom's ERROR log and traceback."""
        try:
            decoded, event = super()._decode_pdu(bytestream)
            if event == "Evt6":  # kept for the log line, should the request not be accepted
                self._calling_ae = str(getattr(decoded, "calling_ae_title", "") or "").strip()
            return decoded, event
        except Exception as exc:  # noqa: BLE001 - untrusted bytes can fail any way
            name = PDU_NAMES.get(bytestream[0], f"PDU type 0x{bytestream[0]:02X}")
            if self._problem is None:
                self._problem = Problem(f"{name} could not be decoded ({type(exc).__name__})",
                                        AbortSource.SERVICE_PROVIDER,
                                        AbortReason.INVALID_PDU_PARAMETER_VALUE)
            return None, "Evt19"

    # -- the actions that replace pynetdicom's on these paths -----------------------------------

    def abort(self, event: str, state: str) -> str:
        """AA-8 (established) or AA-1 (Sta2), with the problem's source and reason."""
        problem = self._problem or _default_problem(event, state)
        self._problem = None
        self._warn("aborting association", problem.why)
        self._send_bytes(a_abort(problem.source, problem.reason))
        self._after_sending(problem.reason)
        return "Sta13"

    def reject(self, why: str) -> str:
        """AE-6 "otherwise": an A-ASSOCIATE-RQ the provider cannot accept is rejected."""
        self._warn("rejecting association request", why)
        self._send_bytes(a_associate_rj(*REJECT_INVALID_REQUEST))
        self._after_sending(AbortReason.INVALID_PDU_PARAMETER_VALUE)
        return "Sta13"

    def action_failed(self, action: str, state: str, exc: Exception) -> str:
        """A pynetdicom action raised: an A-ASSOCIATE-RQ it could not turn into a request
        (Sta2, AE-6) is rejected; anything else is aborted."""
        log.debug("pynetdicom action %s failed in %s", action, state, exc_info=exc)
        if state == "Sta2":
            return self.reject(f"A-ASSOCIATE-RQ not acceptable ({_describe(exc)})")
        if self._problem is None:
            self._problem = Problem(f"{action} failed in {state} ({type(exc).__name__})")
        return self.abort("Evt19", state)

    def _after_sending(self, reason: AbortReason) -> None:
        """What AA-1 and AA-8 do after sending: tell the association, start ARTIM, and drop
        whatever the peer still sends."""
        self.abandon_messages()
        while True:  # PDUs decoded before the problem, never to be acted on
            try:
                self._recv_pdu.get_nowait()
            except queue.Empty:
                break
        indication = A_P_ABORT()
        indication.provider_reason = int(reason)
        self.to_user_queue.put(indication)  # the association ends as aborted, and is counted out
        self.artim_timer.restart()
        self.draining = True

    def _send_bytes(self, pdu: bytes) -> None:
        if self.socket is not None:
            self.socket.send(pdu)  # a broken connection becomes Evt17 there

    def _warn(self, what: str, why: str) -> None:
        requestor = self.assoc.requestor
        calling = str(requestor.ae_title or "").strip() or self._calling_ae or "an unknown AE"
        log.warning("%s from %s at %s:%s: %s", what, calling, requestor.address,
                    requestor.port, why)


class GuardedStateMachine(StateMachine):
    """pynetdicom 3.0.4's ``StateMachine.do_action`` (same order: action, EVT_FSM_TRANSITION,
    transition) with AA-8, AA-1 in Sta2, failing actions and invalid events handled by
    ``GuardedDUL`` instead of an exception that kills the DUL thread."""

    dul: GuardedDUL

    def do_action(self, event: str) -> None:
        state = self.current_state
        action = TRANSITION_TABLE.get((event, state))
        if action is None:
            self._invalid(event, state)
            return
        if action == "AA-8" or (action == "AA-1" and state == "Sta2"):
            next_state = self.dul.abort(event, state)
        else:
            try:
                next_state = ACTIONS[action][1](self.dul)
            except Exception as exc:  # noqa: BLE001 - any failure ends the association in order
                next_state = self.dul.action_failed(action, state, exc)
        evt.trigger(self.dul.assoc, evt.EVT_FSM_TRANSITION, {
            "action": action, "current_state": state, "fsm_event": event,
            "next_state": next_state,
        })
        self.transition(next_state)

    def _invalid(self, event: str, state: str) -> None:
        if event in _LOCAL_EVENTS:
            try:
                self.dul.to_provider_queue.get_nowait()  # else it would be offered again
            except queue.Empty:
                pass
            log.debug("dropped a local %s in %s: the association has ended", event, state)
        else:
            log.debug("ignored %s in %s", event, state)


def _default_problem(event: str, state: str) -> Problem:
    pdu = _PDU_EVENTS.get(event)
    if pdu is not None:
        return Problem(f"unexpected {PDU_NAMES[pdu]} in {state}", AbortSource.SERVICE_PROVIDER,
                       AbortReason.UNEXPECTED_PDU)
    return Problem("a PDU or message that could not be decoded")


def _describe(exc: Exception) -> str:
    """An exception from decoding an A-ASSOCIATE-RQ: AE titles and UIDs, no patient data."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__
