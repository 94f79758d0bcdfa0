"""What the receiver needs from the worklist side: the two DIMSE services a modality's workflow
uses, as Protocols, so ``receive.scp`` stays glue and the worklist package owns the policy.

- ``WorklistFinder.find``: Modality Worklist Information Model - FIND (PS3.4 K), a pynetdicom
  EVT_C_FIND generator yielding (status, identifier) pairs, as ``QueryService.find`` does.
- ``PerformedSteps.n_create`` / ``n_set``: Modality Performed Procedure Step (PS3.4 F.7), each
  returning pynetdicom's (status, attribute list) pair for EVT_N_CREATE / EVT_N_SET.

Both are reached only by a caller with the ``worklist`` service; the receiver refuses the others
with 0x0124 and an Error Comment before calling them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom import evt

NReply = tuple[int | Dataset, Dataset | None]


class WorklistFinder(Protocol):
    def find(self, event: evt.Event, calling_ae: str) -> Iterator[Any]: ...


class PerformedSteps(Protocol):
    def n_create(self, event: evt.Event, calling_ae: str) -> NReply: ...

    def n_set(self, event: evt.Event, calling_ae: str) -> NReply: ...
