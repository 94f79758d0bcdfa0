"""Every DIMSE status the gateway sends, named as in the standard.

PS3.4 Annex B.2.3 (Storage), PS3.7 Annex C (general statuses). Handlers return these members, never
bare numbers, so a grep for a name finds every place that can answer it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from pydicom.dataset import Dataset

ERROR_COMMENT_MAX = 64  # (0000,0902) Error Comment is LO: 64 characters (PS3.7 E.1, PS3.5 6.2)


class Status(IntEnum):
    SUCCESS = 0x0000
    # PS3.7 C.4: general failures
    DUPLICATE_SOP_INSTANCE = 0x0111
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    # PS3.4 B.2.3: Storage
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    # 0xCxxx is "cannot understand" with an implementation-specific low byte; ours says why.
    INVALID_UID = 0xC001
    COERCION_OF_DATA_ELEMENTS = 0xB000
    # PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4: Query/Retrieve
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    UNABLE_TO_PROCESS = 0xC000
    UNABLE_TO_PERFORM_SUBOPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    SUBOPERATIONS_COMPLETE_WITH_FAILURES = 0xB000
    # PS3.7 C.4 and 10.1.3 / 10.1.5 (N-SET, N-CREATE), as PS3.4 F.7.2 uses them for MPPS
    NO_SUCH_ATTRIBUTE = 0x0105
    INVALID_ATTRIBUTE_VALUE = 0x0106
    PROCESSING_FAILURE = 0x0110
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    INVALID_OBJECT_INSTANCE = 0x0117
    MISSING_ATTRIBUTE = 0x0120
    MISSING_ATTRIBUTE_VALUE = 0x0121
    RESOURCE_LIMITATION = 0x0213
    CANCEL = 0xFE00
    PENDING = 0xFF00

    @property
    def label(self) -> str:
        """Hex form used in logs, metrics labels and the association ledger."""
        return f"0x{int(self):04X}"


def error_comment(reason: str) -> str:
    """The Error Comment (0000,0902) sent with a non-success status (PS3.7 C.4, Annex E): why,
    in at most 64 characters of the default repertoire, without the backslash LO forbids. DCMTK
    tools print it with ``-v``; it is the only "why" a sender sees."""
    text = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in reason).strip()
    if len(text) > ERROR_COMMENT_MAX:
        text = text[: ERROR_COMMENT_MAX - 3].rstrip() + "..."
    return text


@dataclass(frozen=True)
class Answer:
    """What a handler answers: a status and, for any status but Success, why. The reason goes on
    the wire as Error Comment (0000,0902) and into the WARNING that logs the refusal."""

    status: Status
    reason: str | None = None

    @property
    def kept(self) -> bool:
        """Success or a warning (0xB000-0xBFFF): the instance was stored (PS3.4 B.2.3)."""
        return self.status == Status.SUCCESS or 0xB000 <= self.status <= 0xBFFF

    @property
    def error_comment(self) -> str | None:
        if self.status == Status.SUCCESS or not self.reason:
            return None
        return error_comment(self.reason)

    def dataset(self) -> Dataset:
        """As pynetdicom's handlers may return a status: Status, and the Error Comment unless a
        success (PS3.7 C.4)."""
        status = Dataset()
        status.Status = int(self.status)
        comment = self.error_comment
        if comment:
            status.ErrorComment = comment
        return status


def status_dataset(status: Status, reason: str | None) -> Dataset:
    """A refusal's status with its Error Comment, for handlers that answer in one line."""
    return Answer(status, reason).dataset()
