"""Presentation contexts the gateway accepts, in one place.

Instances are stored as received, so every transfer syntax a modality commonly sends is accepted.
pynetdicom picks, within one proposed context, the first syntax of *this* list that the requestor
offers. Encapsulated (compressed) syntaxes come first because a sender only offers one when it holds
the image that way, so accepting it keeps the sender's encoding and spares it a decompression;
then deflated, explicit VR (little, then big endian), and implicit VR last, as DCMTK's storescp
prefers explicit over implicit.
"""

from __future__ import annotations

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


def _context(abstract_syntax: str, syntaxes: tuple[UID, ...]) -> PresentationContext:
    cx = PresentationContext()
    cx.abstract_syntax = abstract_syntax
    cx.transfer_syntax = list(syntaxes)
    return cx


def scp_contexts() -> list[PresentationContext]:
    """Verification plus every Storage SOP class pynetdicom knows, each with all our syntaxes."""
    contexts = [_context(Verification, (ImplicitVRLittleEndian, ExplicitVRLittleEndian))]
    for storage in AllStoragePresentationContexts:
        contexts.append(_context(str(storage.abstract_syntax), STORE_TRANSFER_SYNTAXES))
    return contexts
