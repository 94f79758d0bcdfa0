"""Previews (gateway.export.preview): what a user opens from an export's previews folder.

The class of inputs is covered three ways: every image bundled with pydicom (only local files,
never the download-on-demand ones) renders to one valid PNG per frame or fails with
``PreviewError`` exactly when pydicom's own handlers cannot decode it; generated images over the
pixel module's variations (signedness, unused high bits, rescale, windows, MONOCHROME1, palette,
RGB planar configuration, YBR, RLE) match DCMTK's ``dcmj2pnm`` as an independent reference; and
Hypothesis checks the window arithmetic of PS3.3 C.11.2.1.2 against the formula.
"""

from __future__ import annotations

import copy
import io
import os
import shutil
import struct
import subprocess
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    RLELossless,
    generate_uid,
)

from gateway.export.preview import (
    PreviewError,
    iter_frames,
    key_image_jpeg,
    render_frames,
)
from tests.factory import CANARY_ID, CANARY_NAME, make_dataset, write_file

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PALETTES = Path(pydicom.__file__).parent / "data" / "palettes"
NOT_DICOM = {".txt", ".json", ".icc", ".gz", ".dump", ".py", ".pyc"}
DCMJ2PNM = shutil.which("dcmj2pnm")
needs_dcmtk = pytest.mark.skipif(DCMJ2PNM is None and os.environ.get("CI") != "true",
                                 reason="DCMTK dcmj2pnm is not installed (in CI it must be)")


def bundled_files() -> list[Path]:
    """pydicom's local test files that pydicom reads as data sets (not
    ``get_testdata_files()``, which may try to download); chosen here, at collection, so that
    no test skips at run time for a file that is not DICOM at all."""
    return sorted(
        p for p in TEST_FILES.rglob("*")
        if p.is_file() and p.suffix not in NOT_DICOM and "__pycache__" not in p.parts
        and _reads(p)
    )


def _reads(path: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on its deliberately odd files
        try:
            pydicom.dcmread(path, force=True, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - whichever way pydicom fails, it is not a data set
            return False
    return True


def pngs(previews: list[bytes]) -> list[Image.Image]:
    images: list[Image.Image] = []
    for data in previews:
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.format == "PNG"
        assert image.mode in ("L", "RGB")
        images.append(image)
    return images


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def image(arr: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
          **attributes: object) -> Dataset:
    """A CT-like data set (fake patient) holding ``arr`` natively, plus ``attributes``."""
    ds = make_dataset(PatientName=CANARY_NAME, PatientID=CANARY_ID)
    for keyword in ("PixelData", "NumberOfFrames"):
        if keyword in ds:
            delattr(ds, keyword)
    bits = bits_stored if bits_stored is not None else arr.dtype.itemsize * 8
    ds.set_pixel_data(arr, photometric, bits, generate_instance_uid=False)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def gradient(rows: int = 32, columns: int = 48, low: int = -1000, high: int = 1000) -> np.ndarray:
    values = np.linspace(low, high, rows * columns).round().astype(np.int16)
    return values.reshape(rows, columns)


# --- the class of bundled images ------------------------------------------------------------


def decodable_frames(ds: Dataset) -> int | None:
    """What pydicom's installed handlers make of ``ds``: frames, 0 without pixels, None: fails."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return 0
    try:
        arr = pixel_array(ds)
    except Exception:  # noqa: BLE001 - whichever way pydicom fails, the object is undecodable
        return None
    frames = int(ds.get("NumberOfFrames") or 1)
    assert arr.shape[0] == frames if frames > 1 else True
    return frames


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's warnings about its own test files
@pytest.mark.parametrize("path", bundled_files(), ids=lambda p: str(p.relative_to(TEST_FILES)))
def test_every_bundled_image_renders_one_png_per_frame(path: Path) -> None:
    ds = pydicom.dcmread(path, force=True)
    expected = decodable_frames(ds)
    if expected is None:
        with pytest.raises(PreviewError):
            render_frames(ds, 128)
        return
    previews = render_frames(ds, 128)
    assert len(previews) == expected
    for preview in pngs(previews):
        assert max(preview.size) <= 128
        assert preview.size[0] >= 1 and preview.size[1] >= 1
    if hasattr(ds, "preamble") and ds.preamble is not None and expected:
        # From the path, frame by frame, the same previews.
        assert list(iter_frames(path, 128)) == previews


def test_objects_without_pixel_data_get_no_previews(tmp_path: Path) -> None:
    kos = make_dataset(SOPClassUID=KeyObjectSelectionDocumentStorage, Modality="KO")
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(kos, keyword)
    kos_path = write_file(kos, tmp_path / "kos.dcm")
    sr_path = TEST_FILES / "test-SR.dcm"
    for source in (kos, kos_path, pydicom.dcmread(sr_path), sr_path, TEST_FILES / "rtplan.dcm"):
        assert list(iter_frames(source, 64)) == []
        assert render_frames(pydicom.dcmread(source) if isinstance(source, Path) else source,
                             64) == []
        with pytest.raises(PreviewError, match="no pixel data"):
            key_image_jpeg(source, 64)


# --- what a user sees: not blank, windowed, inverted -----------------------------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_ct_and_mr_previews_are_not_blank(name: str) -> None:
    (preview,) = render_frames(pydicom.dcmread(TEST_FILES / name), 512)
    assert pixels(preview).std() > 30


def test_windowing_changes_the_ct_preview_as_expected() -> None:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    hu = pixel_array(ds) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    center = float(np.median(hu))

    def with_window(c: float, w: float) -> np.ndarray:
        copy_ = copy.deepcopy(ds)
        copy_.WindowCenter, copy_.WindowWidth = c, w
        return pixels(render_frames(copy_, 512)[0])

    narrow, wide = with_window(center, 50), with_window(center, 5000)
    assert narrow.std() > 2 * wide.std()  # a narrow window shows more contrast
    assert (with_window(hu.max() + 1000, 10) == 0).all()  # window above every value: black
    assert (with_window(hu.min() - 1000, 10) == 255).all()  # below every value: white
    # Several windows: the first one is used (PS3.3 C.11.2.1.2).
    copy_ = copy.deepcopy(ds)
    copy_.WindowCenter, copy_.WindowWidth = [center, hu.max() + 1000], [50, 10]
    assert np.array_equal(pixels(render_frames(copy_, 512)[0]), narrow)


def test_monochrome1_is_the_inverse_of_monochrome2() -> None:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    inverted = copy.deepcopy(ds)
    inverted.PhotometricInterpretation = "MONOCHROME1"
    normal = pixels(render_frames(ds, 512)[0]).astype(int)
    assert np.array_equal(pixels(render_frames(inverted, 512)[0]).astype(int), 255 - normal)


def expected_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT), C.11.2.1.3.1 (SIGMOID) to 0-255."""
    if function == "SIGMOID":
        with np.errstate(over="ignore"):
            return 255 / (1 + np.exp(-4 * (values - center) / width))
    if function == "LINEAR_EXACT":
        out = ((values - center) / width + 0.5) * 255
        return np.clip(out, 0, 255)
    c, w = center - 0.5, width - 1
    out = ((values - c) / w + 0.5) * 255 if w > 0 else np.where(values > c, 255.0, 0.0)
    out = np.where(values <= c - w / 2, 0, out)
    return np.clip(np.where(values > c + w / 2, 255, out), 0, 255)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(center=st.floats(-500, 500), width=st.floats(1, 2000),
       slope=st.sampled_from([1.0, 0.5, 2.0]), intercept=st.sampled_from([0.0, -1024.0, 100.0]),
       function=st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID"]), signed=st.booleans(),
       bits=st.sampled_from([12, 16]))
def test_window_follows_the_standard_formula(center: float, width: float, slope: float,
                                             intercept: float, function: str, signed: bool,
                                             bits: int) -> None:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    stored = np.linspace(max(low, -3000), min(high, 3000), 40 * 40).round()
    arr = stored.astype(np.int16 if signed else np.uint16).reshape(40, 40)
    ds = image(arr, bits_stored=bits, RescaleSlope=slope, RescaleIntercept=intercept,
               WindowCenter=center, WindowWidth=width, VOILUTFunction=function)
    values = arr.astype(float) * slope + intercept
    want = expected_window(values, center, width, function)
    got = pixels(render_frames(ds, 64)[0]).astype(float)
    assert np.abs(got - want).max() <= 1.0


def test_without_a_window_the_frame_min_and_max_span_black_to_white() -> None:
    ds = image(gradient(low=-300, high=1700))
    got = pixels(render_frames(ds, 64)[0])
    assert got.min() == 0 and got.max() == 255
    assert (np.diff(got.astype(int).ravel()) >= 0).all()  # a ramp stays a ramp


def test_unused_high_bits_are_ignored() -> None:
    """Bits Stored 12 of 16: whatever the four high bits hold (overlays, old devices), the
    preview is that of the 12 stored bits (PS3.5 8.1.1)."""
    clean = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 3) % 4096
    ds = image(clean, bits_stored=12)
    dirty = copy.deepcopy(ds)
    dirty.PixelData = (clean | 0xA000).astype("<u2").tobytes()
    assert render_frames(dirty, 64) == render_frames(ds, 64)


def test_voi_lut_sequence_is_applied() -> None:
    arr = np.arange(64, dtype=np.uint16).reshape(8, 8)
    item = Dataset()
    item.LUTDescriptor = [64, 0, 8]
    item.LUTData = [255 - 4 * i for i in range(64)]  # an inverting LUT
    ds = image(arr, bits_stored=8, VOILUTSequence=Sequence([item]))
    ds["VOILUTSequence"].value[0]["LUTData"].VR = "US"
    got = pixels(render_frames(ds, 8)[0]).astype(int)
    assert np.array_equal(got, 255 - 4 * arr.astype(int))


def test_float_pixel_data_renders_with_min_max() -> None:
    ds = make_dataset()
    del ds.PixelData
    ds.BitsAllocated, ds.Rows, ds.Columns = 32, 16, 16
    for keyword in ("BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, keyword)
    values = np.linspace(-2.5, 7.5, 256, dtype="<f4")
    ds.FloatPixelData = values.tobytes()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    got = pixels(render_frames(ds, 16)[0]).ravel()
    assert got[0] == 0 and got[-1] == 255


# --- colour ----------------------------------------------------------------------------------


def test_rgb_planar_configuration_1_gives_the_same_colours() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    interleaved = image(rgb, "RGB")
    planar = copy.deepcopy(interleaved)
    planar.PlanarConfiguration = 1
    planar.PixelData = rgb.transpose(2, 0, 1).tobytes()
    assert np.array_equal(pixels(render_frames(interleaved, 64)[0]), rgb)
    assert np.array_equal(pixels(render_frames(planar, 64)[0]), rgb)


def test_rgb_of_16_bits_keeps_the_top_8_bits() -> None:
    rgb = (np.arange(4 * 4 * 3, dtype=np.uint16).reshape(4, 4, 3) * 1000)
    ds = image(rgb, "RGB")
    assert np.array_equal(pixels(render_frames(ds, 8)[0]), (rgb >> 8).astype(np.uint8))


def with_palette(arr: np.ndarray, palette: str) -> Dataset:
    """``arr`` as PALETTE COLOR with one of pydicom's well-known palettes (PS3.6 Annex B)."""
    lut = pydicom.dcmread(PALETTES / palette)
    ds = image(arr, "PALETTE COLOR")
    for element in lut:
        if "PaletteColorLookupTable" in element.keyword:
            ds[element.tag] = element
    return ds


def test_palette_colour_maps_each_value_through_the_lut() -> None:
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    lut = pydicom.dcmread(PALETTES / "hotiron.dcm")  # 8-bit entries, not segmented
    want = np.stack([np.frombuffer(lut[f"{c}PaletteColorLookupTableData"].value, np.uint8)
                     for c in ("Red", "Green", "Blue")], axis=-1)[arr]
    got = pixels(render_frames(with_palette(arr, "hotiron.dcm"), 16)[0])
    assert np.array_equal(got, want)


def test_segmented_palette_is_expanded() -> None:
    """PS3.3 C.7.9.2: a discrete segment then a linear one per colour, 16-bit entries."""
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ds = image(arr, "PALETTE COLOR")
    segments = {"Red": [0, 1, 0, 1, 255, 65535], "Green": [0, 1, 65535, 1, 255, 0],
                "Blue": [0, 256, *[32768] * 256]}
    for colour, words in segments.items():
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"Segmented{colour}PaletteColorLookupTableData",
                np.asarray(words, dtype="<u2").tobytes())
    got = pixels(render_frames(ds, 16)[0]).astype(int)
    values = arr.astype(int)
    assert np.abs(got[..., 0] - values).max() <= 1
    assert np.abs(got[..., 1] - (255 - values)).max() <= 1
    assert (got[..., 2] == 128).all()


def test_palette_of_16_bit_entries_is_scaled_to_8_bits() -> None:
    arr = np.arange(16, dtype=np.uint8).reshape(4, 4)
    ds = image(arr, "PALETTE COLOR")
    for colour, scale in (("Red", 4096), ("Green", 2048), ("Blue", 1024)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [16, 0, 16])
        data = np.arange(16, dtype="<u2") * scale
        setattr(ds, f"{colour}PaletteColorLookupTableData", data.tobytes())
    got = pixels(render_frames(ds, 4)[0]).astype(int)
    assert np.array_equal(got[..., 0], (arr.astype(int) * 4096) >> 8)
    assert np.array_equal(got[..., 2], (arr.astype(int) * 1024) >> 8)


def test_ybr_full_422_jpeg_is_shown_in_rgb() -> None:
    """The same colour bars, stored as RGB and as YBR_FULL_422 JPEG by DCMTK: same preview."""
    reference = pixels(render_frames(pydicom.dcmread(TEST_FILES / "SC_rgb_dcmtk_+eb+cr.dcm"),
                                     128)[0]).astype(int)
    ybr = pydicom.dcmread(TEST_FILES / "SC_rgb_dcmtk_+eb+cy+np.dcm")
    assert ybr.PhotometricInterpretation == "YBR_FULL_422"
    got = pixels(render_frames(ybr, 128)[0]).astype(int)
    assert np.abs(got - reference).mean() < 3


# --- DCMTK as the independent reference -------------------------------------------------------


def dcmj2pnm(path: Path, out: Path, *options: str) -> np.ndarray:
    assert DCMJ2PNM is not None
    subprocess.run([DCMJ2PNM, "--quiet", *options, "-O", "+on", str(path), str(out)],
                   check=True, timeout=60)
    return np.asarray(Image.open(out))


def generated_cases() -> dict[str, Callable[[], Dataset]]:
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 40, (48, 64))
    ct = (gradient(48, 64, -1024, 1500) + noise).astype(np.int16)
    return {
        "ct-signed-window": lambda: image(ct, RescaleIntercept=-1024, RescaleSlope=1,
                                          WindowCenter=40, WindowWidth=400),
        "ct-slope-2-sigmoid": lambda: image(ct // 4, RescaleIntercept=-100, RescaleSlope=2,
                                            WindowCenter=100, WindowWidth=800,
                                            VOILUTFunction="SIGMOID"),
        "mr-12-bit-no-window": lambda: image((ct.astype(np.int32) + 1024).clip(0, 4095)
                                             .astype(np.uint16), bits_stored=12),
        "monochrome1-window": lambda: image(ct, "MONOCHROME1", WindowCenter=0, WindowWidth=1000),
        "8-bit": lambda: image((ct // 16 + 128).clip(0, 255).astype(np.uint8)),
        "rgb": lambda: image(colours(), "RGB"),
        "ybr-full-native": lambda: ybr_full(colours()),
        "palette-16-bit": lambda: palette_16(),
        "rle-ct-window": lambda: rle(image(ct, WindowCenter=200, WindowWidth=1000)),
    }


def colours(rows: int = 40, columns: int = 60) -> np.ndarray:
    """Smooth colour ramps (noise would compare the two resampling filters, not the colours)."""
    y, x = np.mgrid[0:rows, 0:columns]
    return np.stack([x * 255 // (columns - 1), y * 255 // (rows - 1),
                     (x + y) * 255 // (rows + columns - 2)], axis=-1).astype(np.uint8)


def ybr_full(rgb: np.ndarray) -> Dataset:
    ycc = pydicom.pixels.convert_color_space(rgb, "RGB", "YBR_FULL")
    return image(ycc, "YBR_FULL")


def palette_16() -> Dataset:
    ds = image(np.arange(256, dtype=np.uint8).reshape(16, 16), "PALETTE COLOR")
    ramp = np.arange(256, dtype="<u2") * 257
    for colour, values in (("Red", ramp), ("Green", ramp[::-1].copy()), ("Blue", ramp // 2)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", values.tobytes())
    return ds


def rle(ds: Dataset) -> Dataset:
    ds.compress(RLELossless, generate_instance_uid=False)
    return ds


@needs_dcmtk
@pytest.mark.parametrize("case", list(generated_cases()))
@pytest.mark.parametrize("size", [None, 24])
def test_previews_match_dcmtk(case: str, size: int | None, tmp_path: Path) -> None:
    ds = generated_cases()[case]()
    path = write_file(ds, tmp_path / "in.dcm", ds.file_meta.TransferSyntaxUID)
    longest = max(int(ds.Rows), int(ds.Columns))
    ours = pixels(next(iter_frames(path, size or longest)))
    window = ["+Wi", "1"] if "WindowCenter" in ds else ["+Wm"]
    scale = ["+Sxv", str(ours.shape[1])] if size else []
    theirs = dcmj2pnm(path, tmp_path / "out.png", *window, *scale)
    assert theirs.shape == ours.shape
    difference = np.abs(theirs.astype(int) - ours.astype(int)).mean()
    assert difference < (4.0 if size else 1.0), difference


@needs_dcmtk
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("name", "options"), [
    ("CT_small.dcm", ["+Wm"]), ("MR_small.dcm", ["+Wi", "1"]), ("MR_small_RLE.dcm", ["+Wi", "1"]),
    ("examples_overlay.dcm", ["+Wi", "1"]), ("JPGExtended.dcm", ["+Wm"]),
    ("examples_palette.dcm", []), ("examples_ybr_color.dcm", []),
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", []), ("SC_rgb_rle_16bit.dcm", []),
])
def test_bundled_previews_match_dcmtk(name: str, options: list[str], tmp_path: Path) -> None:
    ours = pixels(render_frames(pydicom.dcmread(TEST_FILES / name), 2048)[0])
    theirs = dcmj2pnm(TEST_FILES / name, tmp_path / "out.png", *options)
    assert theirs.shape == ours.shape
    assert np.abs(theirs.astype(int) - ours.astype(int)).mean() < 1.0


# --- size ------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 300), columns=st.integers(1, 300), max_size=st.integers(1, 400))
def test_longest_side_fits_max_size_and_is_never_enlarged(rows: int, columns: int,
                                                          max_size: int) -> None:
    ds = image(np.zeros((rows, columns), dtype=np.uint8))
    (preview,) = pngs(render_frames(ds, max_size))
    width, height = preview.size
    if max(rows, columns) <= max_size:
        assert (height, width) == (rows, columns)
    else:
        scale = max_size / max(rows, columns)
        assert max(width, height) == max_size
        assert abs(width - columns * scale) <= 1 and abs(height - rows * scale) <= 1


def test_non_square_pixels_shrink_the_longer_side() -> None:
    ds = image(np.zeros((100, 100), dtype=np.uint8), PixelAspectRatio=[2, 1])
    assert pngs(render_frames(ds, 500))[0].size == (50, 100)  # pixels twice as tall as wide
    ds = image(np.zeros((100, 100), dtype=np.uint8), PixelSpacing=[0.5, 1.0])
    assert pngs(render_frames(ds, 500))[0].size == (100, 50)


# --- multi-frame -----------------------------------------------------------------------------


def test_enhanced_multi_frame_uses_each_frames_functional_groups() -> None:
    arr = np.stack([gradient(16, 16, 0, 2000).astype(np.uint16)] * 3)
    ds = image(arr, bits_stored=16)
    shared = Dataset()
    transform = Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = -1000, 1, "HU"
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    windows = [(0, 500), (500, 100), (-800, 50)]
    frames = []
    for center, width in windows:
        item, voi = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        item.FrameVOILUTSequence = Sequence([voi])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    previews = render_frames(ds, 64)
    assert len(previews) == 3
    for preview, (center, width) in zip(previews, windows, strict=True):
        single = image(arr[0], bits_stored=16, RescaleIntercept=-1000, RescaleSlope=1,
                       WindowCenter=center, WindowWidth=width)
        assert preview == render_frames(single, 64)[0]
    assert len(set(previews)) == 3


def write_multiframe(path: Path, frames: int, side: int) -> None:
    """A multi-frame object written without holding its pixel data: the header with pydicom,
    then the Pixel Data element frame by frame; frame i is filled with the value i."""
    ds = make_dataset(side, side)
    del ds.PixelData
    ds.NumberOfFrames = frames
    ds.BitsStored, ds.HighBit = 16, 15
    write_file(ds, path)
    with path.open("ab") as f:
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, frames * side * side * 2))
        ramp = np.arange(side * side, dtype="<u2").reshape(side, side)
        for i in range(frames):
            f.write((ramp + i * 64).astype("<u2").tobytes())


@pytest.mark.parametrize("source", ["path", "deferred data set"])
def test_a_large_multi_frame_is_rendered_frame_by_frame(source: str, tmp_path: Path) -> None:
    """120 frames of 512x512 (63 MB): decoding them whole would allocate all of it at once."""
    path = tmp_path / "mf.dcm"
    write_multiframe(path, 120, 512)
    src: Path | Dataset = path if source == "path" else pydicom.dcmread(path, defer_size=1024)
    tracemalloc.start()
    try:
        count = 0
        for preview in iter_frames(src, 64):
            count += 1
            assert preview.startswith(b"\x89PNG")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 120
    assert peak < 16_000_000, f"peak {peak / 1e6:.1f} MB while rendering a 63 MB object"


def test_key_image_is_a_jpeg_of_the_middle_frame(tmp_path: Path) -> None:
    values = [0, 60, 120, 180, 240]
    arr = np.stack([np.full((40, 40), v, dtype=np.uint8) for v in values])
    arr[:, 0, 0], arr[:, -1, -1] = 0, 255  # the same min/max in every frame: value v shows as v
    ds = image(arr)
    for source in (ds, write_file(ds, tmp_path / "mf.dcm")):
        jpeg = key_image_jpeg(source, 32)
        shown = Image.open(io.BytesIO(jpeg))
        assert shown.format == "JPEG" and max(shown.size) == 32
        assert abs(float(np.median(np.asarray(shown))) - 120) < 3


# --- errors and invariants -------------------------------------------------------------------


def test_undecodable_pixels_raise_a_preview_error_without_patient_data(tmp_path: Path) -> None:
    ds = image(gradient())
    ds.PixelData = ds.PixelData[:-100]  # truncated
    with pytest.raises(PreviewError) as raised:
        render_frames(ds, 64)
    path = write_file(ds, tmp_path / "cut.dcm")
    with pytest.raises(PreviewError) as from_path:
        list(iter_frames(path, 64))
    for message in (str(raised.value), str(from_path.value)):
        assert message.startswith("frame 0 (Explicit VR Little Endian, MONOCHROME2): ")
        assert CANARY_NAME.split("^")[0] not in message and CANARY_ID not in message


@pytest.mark.parametrize(("photometric", "samples"), [("CMYK", 4), ("YBR_PARTIAL_420", 3),
                                                      ("RGB", 1)])
def test_unsupported_colour_models_raise_a_preview_error(photometric: str, samples: int) -> None:
    ds = image(np.zeros((4, 4, 3), dtype=np.uint8), "RGB")
    ds.PhotometricInterpretation, ds.SamplesPerPixel = photometric, samples
    with pytest.raises(PreviewError):
        render_frames(ds, 8)


def test_the_callers_data_set_is_not_modified() -> None:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = [40, 400], [400, 2000]
    before = copy.deepcopy(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        render_frames(ds, 64)
        key_image_jpeg(ds, 64)
    assert ds == before


def test_unique_sop_instance_uid_is_kept_when_compressed_in_tests() -> None:
    """Guard on the test helper: compressing must not mint a new SOP Instance UID."""
    ds = image(gradient(), SOPInstanceUID=generate_uid())
    uid = ds.SOPInstanceUID
    assert rle(ds).SOPInstanceUID == uid
