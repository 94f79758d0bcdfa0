"""Refusing a C-MOVE or C-GET before any sub-operation, with its status and Error Comment on the wire.

Why here: pynetdicom 3.0's retrieve SCPs (``service_class._move_scp`` and ``_get_scp``) ask the
event handler first for a destination, then for the number of sub-operations, and only then for
statuses. The one refusal a handler can express before the count is 0xA801 (a ``(None, None)``
destination); anything raised becomes 0xC513-0xC515 (or 0xC413) with a traceback in the log. So a
caller without the ``move`` service was told "move destination unknown" and an identifier without
its level's unique key "invalid number of sub-operations" (issue 16, items 9 and 10). A
failure status yielded after the count is no better: C-MOVE has already associated with the
destination by then, and the final response would count a phantom failed sub-operation.

So the decision is taken one step earlier, where the association hands a request to its service
class (``Association._serve_request``): a refused retrieve is answered there with one final
response (PS3.4 C.4.2.1.5 / C.4.3.1.4 statuses, Error Comment PS3.7 C.4), and pynetdicom never
sees it. An accepted one goes on to pynetdicom and the handlers unchanged. Pinned, like
``receive.fastpath``, to pynetdicom 3.0.x.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.presentation import PresentationContext

from gateway.dicom.status import status_dataset
from gateway.receive.fastpath import FastAssociation

__all__ = ["Gate", "GatedAssociation", "Retrieve", "status_dataset"]

log = logging.getLogger(__name__)

Retrieve = C_MOVE | C_GET
Gate = Callable[[Association, Retrieve, PresentationContext], Dataset | None]


class GatedAssociation(FastAssociation):
    """``FastAssociation`` whose C-MOVE and C-GET requests pass a gate before pynetdicom's SCP."""

    _retrieve_gate: Gate

    @classmethod
    def adopt_with_gate(cls, assoc: Association, gate: Gate,
                        on_end: Callable[[], None] = lambda: None) -> None:
        cls.adopt(assoc, on_end=on_end)
        cast(GatedAssociation, assoc)._retrieve_gate = gate

    def _serve_request(self, msg: Any, context_id: int) -> None:
        context = self._accepted_cx.get(context_id)
        if (isinstance(msg, (C_MOVE, C_GET)) and msg.is_valid_request and context is not None
                and not self._sent_release):
            refusal = self._retrieve_gate(self, msg, context)
            if refusal is not None:
                self._refuse(msg, context_id, refusal)
                return
        super()._serve_request(msg, context_id)

    def _refuse(self, request: Retrieve, context_id: int, refusal: Dataset) -> None:
        """The one and final response (PS3.7 9.1.3.1 / 9.1.4.1): no sub-operation was started,
        so the counts are not sent (they are conditional on sub-operations, PS3.4 C.4.2.3.1)."""
        response = C_MOVE() if isinstance(request, C_MOVE) else C_GET()
        response.MessageIDBeingRespondedTo = request.MessageID
        response.AffectedSOPClassUID = request.AffectedSOPClassUID
        response.Status = int(refusal.Status)
        response.ErrorComment = str(refusal.ErrorComment)  # type: ignore[assignment]
        self.dimse.send_msg(response, context_id)
