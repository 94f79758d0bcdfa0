"""Pending C-FIND responses written straight to the socket; pinned to pynetdicom 3.0.

Why: pynetdicom builds, validates and encodes every C-FIND-RSP anew (a DIMSE message, its command
set, two P-DATA primitives) and hands each to its network thread, which runs it through the state
machine and encodes the PDU again: together more than half of the time a one-day study query with
ninety answers took. All pending responses of one query carry the same command set (PS3.7
9.1.2.1.4 / Table 9.1-3: Message ID Being Responded To, Affected SOP Class UID, a Data Set,
Status 0xFF00), so it is encoded once; each answer is then one P-DATA-TF PDU holding both PDVs
(PS3.8 9.3.5.1), framed here and written by the association's thread, which is the only writer
while a C-FIND is being answered (the peer may send only a C-CANCEL meanwhile, which the network
thread reads). Identifier elements are encoded by pydicom, each distinct value once per query.
The final response (Success, Cancel, a failure) is still pynetdicom's, queued after the last
pending one has been written.
"""

from __future__ import annotations

import time
from io import BytesIO
from typing import Any, cast

from pydicom.dataelem import DataElement
from pydicom.filebase import DicomIO
from pydicom.filewriter import write_data_element
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode

from gateway.dicom.pdu import COMMAND, LAST, p_data_tf, pdv_item
from gateway.query.find import Answer

PENDING = 0xFF00
_ENCODED_CACHE = 4096  # encoded elements kept per query
_PDU_OVERHEAD = 6 + 2 * 6  # P-DATA-TF header, two PDV item headers with their control bytes


class PendingSender:
    def __init__(self, event: Any) -> None:
        request = event.request
        context = event.context
        response = C_FIND()
        response.MessageIDBeingRespondedTo = request.MessageID
        response.AffectedSOPClassUID = request.AffectedSOPClassUID
        response.Status = PENDING
        response.Identifier = BytesIO(b"\x00")  # any: it only marks a data set as present
        message = C_FIND_RSP()
        message.primitive_to_message(response)
        self._command = cast(bytes, encode(message.command_set, True, True))
        self._context_id = int(context.context_id)
        syntax = UID(context.transfer_syntax)
        self._implicit, self._little = syntax.is_implicit_VR, syntax.is_little_endian
        self._deflated = syntax.is_deflated
        self._max_pdu = int(event.assoc.requestor.maximum_length or 0)
        self._dul = event.assoc.dul
        self._command_item = pdv_item(self._context_id, COMMAND | LAST, self._command)
        self._encoded: dict[Any, bytes] = {}
        self._raw = BytesIO()
        self._buffer = DicomIO(self._raw)
        self._buffer.is_implicit_VR, self._buffer.is_little_endian = self._implicit, self._little

    def _encode(self, answer: Answer) -> bytes:
        """Each element encoded by pydicom, and each distinct value only once per query: the
        answers of one query repeat most values (level, date, modalities, descriptions,
        counts), and pydicom's encoding was the larger part of a one-day study query's time."""
        parts = []
        fp = self._buffer
        for tag, vr, value in answer.elements:
            key: Any = (tag, value, answer.charset)
            try:
                encoded = self._encoded.get(key)
            except TypeError:  # a value that cannot be a key (a sequence): encode it each time
                key, encoded = None, None
            if encoded is None:
                self._raw.seek(0)
                self._raw.truncate()
                write_data_element(fp, DataElement(tag, vr, value), answer.charset)
                encoded = self._raw.getvalue()
                if key is not None and len(self._encoded) < _ENCODED_CACHE:
                    self._encoded[key] = encoded
            parts.append(encoded)
        return b"".join(parts)

    def send(self, answer: Answer) -> bool:
        """Write one pending response; False when it must go pynetdicom's way (too large for
        one PDU of the peer's maximum length, or not encodable here)."""
        if self._deflated:
            data = encode(answer.dataset(), self._implicit, self._little, self._deflated)
            if data is None:
                return False
        else:
            data = self._encode(answer)
        if self._max_pdu and len(self._command) + len(data) + _PDU_OVERHEAD > self._max_pdu:
            return False
        pdu = p_data_tf(self._command_item, pdv_item(self._context_id, LAST, data))
        # Whatever pynetdicom still has queued goes first: nothing, unless an answer too large for
        # one PDU went its way just before.
        while self._dul.to_provider_queue.qsize() and self._dul.socket is not None:
            time.sleep(0.0005)
        socket = self._dul.socket
        if socket is not None:
            socket.send(pdu)  # a broken connection becomes pynetdicom's Evt17 there
        return True
