"""``as_uncompressed`` over the class of encoded inputs: every compressed, deflated and big endian
file in pydicom's bundled test data, and generated RLE objects with UIDs nested in sequences.

What a peer that takes only uncompressed data receives must be the same instance: every UI value
the same (sequences included; only the Transfer Syntax UID changes), pixels equal to what pydicom
decodes from the original. A file no installed codec decodes is refused as permanent, not sent.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom.dsutils import decode, encode

from gateway.dicom import transcode
from gateway.dicom.transcode import as_uncompressed
from gateway.errors import PermanentError
from tests.factory import make_dataset

# pydicom's own test files, read from its package: get_testdata_files() also asks GitHub for the
# pydicom-data files, which a machine without network waits on.
TEST_FILES = Path(DATA_ROOT) / "test_files"
MUST_COVER = {
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
}


def _encoded_files() -> list[tuple[Path, UID]]:
    """Every bundled file with pixel data whose transfer syntax is not little endian uncompressed."""
    found = []
    for path in sorted(TEST_FILES.rglob("*")):
        if not path.is_file() or path.suffix == ".py":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(path, stop_before_pixels=False)
            syntax = ds.file_meta.TransferSyntaxUID
        except (InvalidDicomError, AttributeError):  # not DICOM, or no file meta: not a case
            continue
        if "PixelData" in ds and (syntax.is_compressed or syntax == DeflatedExplicitVRLittleEndian
                                  or not syntax.is_little_endian):
            found.append((path, syntax))
    return found


ENCODED = _encoded_files()


def every_uid(ds: Dataset) -> list[tuple[str, str]]:
    """(tag, value) of each UI element in walk order, file meta first, nested sequences included;
    written apart from the code under test (pydicom's ``walk``), so that the two can disagree."""
    found: list[tuple[str, str]] = []

    def visit(_: Dataset, element: object) -> None:
        if getattr(element, "VR", None) == "UI":
            found.append((str(element.tag), str(element.value)))  # type: ignore[attr-defined]

    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        meta.walk(visit)
    ds.walk(visit)
    return [(tag, value) for tag, value in found if tag != "(0002,0010)"]


def read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few files are odd on purpose (e.g. implicit VR inside)
        return dcmread(path)


def reference_pixels(path: Path) -> object:
    """What pydicom decodes from the original, or the error when no installed codec can."""
    ds = read(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
    except (RuntimeError, NotImplementedError, ValueError) as exc:  # what pydicom's decoders raise
        return exc


def test_the_bundled_files_cover_the_class() -> None:
    """The table below is the class only if every kind of encoding is in it, each with at least
    one file the installed codecs decode (else the UID check would test refusals only)."""
    decodable = {syntax for path, syntax in ENCODED
                 if not isinstance(reference_pixels(path), Exception)}
    assert MUST_COVER <= decodable, sorted(str(s.name) for s in MUST_COVER - decodable)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's notes on odd files, not failures
@pytest.mark.parametrize(("path", "syntax"), ENCODED, ids=[p.name for p, _ in ENCODED])
def test_every_uid_is_kept_and_the_pixels_decode(path: Path, syntax: UID) -> None:
    original = read(path)
    before = every_uid(original)
    expected = reference_pixels(path)
    if isinstance(expected, Exception):
        with pytest.raises(PermanentError, match=re.escape(f"cannot decompress {syntax.name}")):
            as_uncompressed(read(path))
        return

    result = as_uncompressed(read(path))
    assert result.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert every_uid(result) == before
    assert result.SOPInstanceUID == original.SOPInstanceUID
    # What pynetdicom puts on the wire for an explicit VR little endian context, read back:
    sent = encode(result, False, True)
    assert sent is not None
    arrived = decode(io.BytesIO(sent), False, True)
    arrived.file_meta = result.file_meta
    assert every_uid(arrived) == before
    assert numpy.array_equal(arrived.pixel_array, expected)  # type: ignore[arg-type]


def test_uncompressed_input_is_left_as_it_is() -> None:
    ds = make_dataset(PatientName="Müller^Zoë")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    before = every_uid(ds)
    pixels = ds.PixelData
    assert as_uncompressed(ds) is ds
    assert every_uid(ds) == before and ds.PixelData == pixels


def test_a_codec_that_makes_up_a_uid_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom's default (a new SOP Instance UID) stands for any future library that changes a
    UID while decoding: the instance is refused, naming the UID, rather than sent as another."""
    decompress = Dataset.decompress

    def careless(self: Dataset, *args: object, **kwargs: object) -> None:
        kwargs["generate_instance_uid"] = True
        decompress(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Dataset, "decompress", careless)
    (rle,) = [p for p, s in ENCODED if p.name == "MR_small_RLE.dcm"]
    with pytest.raises(PermanentError, match="changed .*SOPInstanceUID.*not sent"):
        as_uncompressed(read(rle))


def test_a_uid_changed_inside_a_sequence_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    decompress = Dataset.decompress

    def rewrites_references(self: Dataset, *args: object, **kwargs: object) -> None:
        decompress(self, *args, **kwargs)  # type: ignore[arg-type]
        self.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = (
            generate_uid())

    monkeypatch.setattr(Dataset, "decompress", rewrites_references)
    with pytest.raises(PermanentError, match="ReferencedSOPInstanceUID"):
        as_uncompressed(rle_with_references([generate_uid()], "A^B"))


def rle_with_references(references: list[str], name: str) -> Dataset:
    """An RLE-compressed CT (pydicom encodes RLE itself) citing ``references`` two sequences deep."""
    ds = make_dataset(rows=8, columns=8, PatientName=name)
    ds.PixelRepresentation = 0
    series = Dataset()
    series.SeriesInstanceUID = generate_uid()
    series.ReferencedInstanceSequence = Sequence()
    for uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = uid
        series.ReferencedInstanceSequence.append(item)
    ds.ReferencedSeriesSequence = Sequence([series])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(RLELossless, generate_instance_uid=False)
    return ds


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    references=st.lists(st.builds(generate_uid), min_size=1, max_size=4),
    name=st.text(st.characters(codec="utf-8", categories=["L"]), min_size=1, max_size=12),
)
def test_generated_rle_objects_keep_every_nested_uid(references: list[str], name: str) -> None:
    ds = rle_with_references(references, name)
    pixels = ds.pixel_array.copy()
    before = every_uid(ds)
    assert as_uncompressed(ds) is ds
    assert every_uid(ds) == before
    assert (ds.pixel_array == pixels).all()


def test_uids_lists_each_value_with_where_it_is() -> None:
    """The module's own walk sees nested UIDs by position: one moved to another item differs."""
    ds = rle_with_references(["1.2.3", "1.2.4"], "A^B")
    swapped = rle_with_references(["1.2.4", "1.2.3"], "A^B")
    swapped.SOPInstanceUID, swapped.StudyInstanceUID = ds.SOPInstanceUID, ds.StudyInstanceUID
    swapped.SeriesInstanceUID = ds.SeriesInstanceUID
    swapped.file_meta.MediaStorageSOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    swapped.ReferencedSeriesSequence[0].SeriesInstanceUID = (
        ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    assert transcode.uids(ds) != transcode.uids(swapped)
    assert {v for _, v in transcode.uids(ds)} == {v for _, v in transcode.uids(swapped)}
