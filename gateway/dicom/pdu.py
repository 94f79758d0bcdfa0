"""P-DATA-TF framing (PS3.8 9.3.5 and Annex E), where the gateway writes or reads PDUs itself:
the C-STORE data path (``receive.streaming``) and the pending C-FIND answers (``query.pending``).
Only the framing: the command sets and data sets inside are pydicom's to encode."""

from __future__ import annotations

import struct

P_DATA_TF = 0x04
PDU_HEADER = struct.Struct(">BxI")  # type, reserved, length of what follows
PDV_HEADER = struct.Struct(">IBB")  # item length, presentation context ID, message control header
COMMAND, LAST = 0x01, 0x02  # message control header bits: a command fragment; the last fragment


def pdv_item(context_id: int, control: int, value: bytes) -> bytes:
    """One Presentation Data Value item: a fragment of a command (``COMMAND``) or data set."""
    return PDV_HEADER.pack(len(value) + 2, context_id, control) + value


def p_data_tf(*items: bytes) -> bytes:
    """A P-DATA-TF PDU holding the given PDV items, in order."""
    body = b"".join(items)
    return PDU_HEADER.pack(P_DATA_TF, len(body)) + body
