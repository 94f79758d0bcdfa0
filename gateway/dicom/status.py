"""Every DIMSE status the gateway sends, named as in the standard.

PS3.4 Annex B.2.3 (Storage), PS3.7 Annex C (general statuses). Handlers return these members, never
bare numbers, so a grep for a name finds every place that can answer it.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    SUCCESS = 0x0000
    # PS3.7 C.4: general failures
    DUPLICATE_SOP_INSTANCE = 0x0111
    NOT_AUTHORIZED = 0x0124
    SOP_CLASS_NOT_SUPPORTED = 0x0122
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
