"""Presentation contexts the gateway accepts, in one place.

Every Storage SOP Class is accepted (PS3.4 Annex B), retired ones included: old ultrasound devices
still send the retired Ultrasound Image Storage (1.2.840.10008.5.1.4.1.1.6), and DCMTK's storescp
takes it. The list is what pydicom's UID dictionary names as storage (plus the few pynetdicom knows
that this pydicom does not), and private classes come from ``dicom.extra_storage_sop_classes``.

Instances are stored as received, so every transfer syntax a modality commonly sends is accepted.
pynetdicom picks, within one proposed context, the first syntax of *this* list that the requestor
offers. Encapsulated (compressed) syntaxes come first because a sender only offers one when it holds
the image that way, so accepting it keeps the sender's encoding and spares it a decompression;
then deflated, explicit VR (little, then big endian), and implicit VR last, as DCMTK's storescp
prefers explicit over implicit.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

STORE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)


class _SharedContext(PresentationContext):
    """A presentation context that deep copies to itself.

    pynetdicom deep-copies the listening AE's contexts for every association (pynetdicom 3.0,
    ``RequestHandler._create_association``): 177 contexts with 2,700 transfer syntaxes cost about
    10 ms per association, a C-ECHO's whole budget. Negotiation only reads them
    (``presentation.negotiate_as_acceptor`` builds new result contexts), and these are never
    changed after ``scp_contexts`` builds them, so sharing them is safe.
    """

    def __deepcopy__(self, memo: dict[int, object]) -> _SharedContext:
        return self


def _context(abstract_syntax: str, syntaxes: tuple[UID, ...]) -> PresentationContext:
    cx = _SharedContext()
    cx.abstract_syntax = abstract_syntax
    cx.transfer_syntax = list(syntaxes)
    return cx


# pydicom names these "... Storage ..." but they store nothing through C-STORE: Storage Commitment
# Push and Pull (PS3.4 J) and the DICOMDIR's Media Storage Directory Storage (PS3.10 8.6).
_NOT_STORAGE = frozenset({"1.2.840.10008.1.20.1", "1.2.840.10008.1.20.2", "1.2.840.10008.1.3.10"})


def storage_sop_classes() -> tuple[str, ...]:
    """Every Storage SOP Class UID pydicom or pynetdicom knows, retired ones included."""
    known = {
        uid for uid, (name, kind, *_) in UID_dictionary.items()
        if kind == "SOP Class" and "Storage" in name
    }
    known |= {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    return tuple(sorted(known - _NOT_STORAGE))


# PS3.4 C.6: Patient Root and Study Root, FIND / MOVE / GET
QUERY_RETRIEVE = (
    "1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.1.3",
    "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.2.3",
)


# PS3.4 K.6 Modality Worklist Information Model - FIND; PS3.4 F.7 Modality Performed Procedure Step
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
MODALITY_PERFORMED_PROCEDURE_STEP = "1.2.840.10008.3.1.2.3.3"


def scp_contexts(extra_storage_sop_classes: Iterable[str] = ()) -> list[PresentationContext]:
    """Verification, Query/Retrieve, Modality Worklist and MPPS, every Storage SOP class (``storage_sop_classes``, then the
    configured private ones), each with all our syntaxes. Storage contexts also accept the
    SCP/SCU role selection a C-GET SCU proposes (PS3.7 D.3.3.4), so that its sub-operations can
    come back on the same association.

    About 220 contexts: pynetdicom looks each proposed one up by abstract syntax, and
    ``_SharedContext`` spares the per-association copy, so the count costs nothing measurable.
    """
    plain = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    contexts = [_context(Verification, (ImplicitVRLittleEndian, ExplicitVRLittleEndian))]
    contexts += [_context(model, plain) for model in QUERY_RETRIEVE]
    contexts += [_context(MODALITY_WORKLIST_FIND, plain),
                 _context(MODALITY_PERFORMED_PROCEDURE_STEP, plain)]
    standard = storage_sop_classes()
    extra = [uid for uid in dict.fromkeys(extra_storage_sop_classes) if uid not in standard]
    for storage in (*standard, *extra):
        cx = _context(storage, STORE_TRANSFER_SYNTAXES)
        cx.scu_role, cx.scp_role = True, True
        contexts.append(cx)
    return contexts


MAX_REQUESTED = 128  # PS3.8 9.3.2: presentation context IDs are odd numbers 1-255


def sending_contexts(
    stored: Iterable[tuple[str, str]], reserved: int = 0
) -> list[PresentationContext]:
    """For an association that sends instances: per (SOP class, stored syntax) a context offering
    the stored syntax alone, and per SOP class one offering explicit and implicit VR little endian
    (the stored one first when it is one of them), so that a peer that takes only uncompressed
    data can still be sent a decompressed copy.

    Apart, not in one context: an acceptor picks one syntax per context by its own preference
    (PS3.8 9.3.2.2 allows several contexts for one abstract syntax). Orthanc 1.10, offered JPEG
    and explicit VR little endian in one context, takes explicit VR, and every compressed image
    was decompressed on the way to a peer that stores JPEG. At most 128 contexts, less
    ``reserved`` (for Verification, say); instances beyond wait for the next association."""
    contexts: list[PresentationContext] = []
    seen: set[tuple[str, str]] = set()
    plain_for: set[str] = set()
    for sop_class, syntax in stored:
        if (sop_class, syntax) in seen:
            continue
        new = []
        if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            new.append(_context(sop_class, (UID(syntax),)))
        if sop_class not in plain_for:
            plain = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
            if syntax != ImplicitVRLittleEndian:
                plain = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
            new.append(_context(sop_class, plain))
        if len(contexts) + len(new) + reserved > MAX_REQUESTED:
            break
        seen.add((sop_class, syntax))
        plain_for.add(sop_class)
        contexts += new
    return contexts
