"""Presentation contexts the gateway accepts, in one place.

Instances are stored as received, so every transfer syntax a modality commonly sends is accepted and
none is preferred over another: the acceptor takes the first syntax the requestor proposes that is
in this list (PS3.8 7.1.1.13), which keeps the sender's own encoding.
"""

from __future__ import annotations

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
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
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
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
