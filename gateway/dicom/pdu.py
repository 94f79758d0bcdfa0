"""PDU framing (PS3.8 9.3 and Annex E), where the gateway writes or reads PDUs itself: the C-STORE
data path (``receive.streaming``), the pending C-FIND answers (``query.pending``) and the
Upper Layer's error paths (``receive.upper_layer``). Only the framing: the command sets and data
sets inside are pydicom's to encode."""

from __future__ import annotations

import struct
from enum import IntEnum

# PS3.8 Table 9-11 ... 9-26: the PDU types
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
PDU_NAMES = {
    A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ", A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ", P_DATA_TF: "P-DATA-TF", A_RELEASE_RQ: "A-RELEASE-RQ",
    A_RELEASE_RP: "A-RELEASE-RP", A_ABORT: "A-ABORT",
}
PDU_HEADER = struct.Struct(">BxI")  # type, reserved, length of what follows
PDV_HEADER = struct.Struct(">IBB")  # item length, presentation context ID, message control header
COMMAND, LAST = 0x01, 0x02  # message control header bits: a command fragment; the last fragment
_ABORT_BODY = struct.Struct(">xxBB")  # reserved, reserved, source, reason/diag.
_REJECT_BODY = struct.Struct(">xBBB")  # reserved, result, source, reason/diag.


class AbortSource(IntEnum):
    """A-ABORT Source (PS3.8 Table 9-26)."""

    SERVICE_USER = 0x00  # the DIMSE layer above the Upper Layer: a message it cannot take
    SERVICE_PROVIDER = 0x02  # the Upper Layer itself: a PDU it cannot take


class AbortReason(IntEnum):
    """A-ABORT Reason/Diag. (PS3.8 Table 9-26); significant only from the service-provider."""

    NOT_SPECIFIED = 0x00
    UNRECOGNIZED_PDU = 0x01
    UNEXPECTED_PDU = 0x02
    UNRECOGNIZED_PDU_PARAMETER = 0x04
    UNEXPECTED_PDU_PARAMETER = 0x05
    INVALID_PDU_PARAMETER_VALUE = 0x06


def pdv_item(context_id: int, control: int, value: bytes) -> bytes:
    """One Presentation Data Value item: a fragment of a command (``COMMAND``) or data set."""
    return PDV_HEADER.pack(len(value) + 2, context_id, control) + value


def p_data_tf(*items: bytes) -> bytes:
    """A P-DATA-TF PDU holding the given PDV items, in order."""
    body = b"".join(items)
    return PDU_HEADER.pack(P_DATA_TF, len(body)) + body


def a_abort(source: AbortSource, reason: AbortReason) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8); the reason is sent as 0 unless the provider aborts."""
    if source != AbortSource.SERVICE_PROVIDER:
        reason = AbortReason.NOT_SPECIFIED
    return PDU_HEADER.pack(A_ABORT, _ABORT_BODY.size) + _ABORT_BODY.pack(source, reason)


def a_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4) with the result, source and reason of Table 9-21."""
    return PDU_HEADER.pack(A_ASSOCIATE_RJ, _REJECT_BODY.size) + _REJECT_BODY.pack(
        result, source, reason
    )
