"""Decompressing for a peer that takes only uncompressed data: one place for every sender."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from gateway.errors import PermanentError


def as_uncompressed(ds: Dataset) -> Dataset:
    """Decompress (pydicom with the pylibjpeg / Pillow plugins) in place; deflated and big endian
    objects are decoded already, and only need their transfer syntax restated."""
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        if syntax.is_compressed:
            ds.decompress()
        elif syntax == DeflatedExplicitVRLittleEndian or not syntax.is_little_endian:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    except Exception as exc:  # each codec raises its own kinds; the object itself is the problem
        raise PermanentError(f"cannot decompress {syntax.name}: {type(exc).__name__}: {exc}") from exc
    return ds
