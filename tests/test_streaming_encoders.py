"""The C-STORE path packs the elements it writes for every image itself
(``receive.streaming``): each must be byte for byte what pydicom writes, in both VR encodings,
for every value the path can hand it (Hypothesis)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.receive.streaming import _element, lo_element, ui_element, ul_element, us_element

UIDS = st.from_regex(r"[1-9][0-9]{0,8}(\.(0|[1-9][0-9]{0,8})){0,7}", fullmatch=True).filter(
    lambda uid: len(uid) <= 64)
TAGS = st.sampled_from([0x00000002, 0x00001000, 0x00020003, 0x00000902, 0x00000120])
ASCII_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64).filter(
    lambda text: text == text.strip())


@given(TAGS, UIDS, st.booleans())
def test_ui_matches_pydicom(tag: int, uid: str, implicit: bool) -> None:
    assert ui_element(tag, uid, implicit) == _element(tag, "UI", uid, implicit)


@given(TAGS, st.integers(0, 0xFFFF), st.booleans())
def test_us_matches_pydicom(tag: int, value: int, implicit: bool) -> None:
    assert us_element(tag, value, implicit) == _element(tag, "US", value, implicit)


@given(TAGS, st.integers(0, 0xFFFFFFFF), st.booleans())
def test_ul_matches_pydicom(tag: int, value: int, implicit: bool) -> None:
    assert ul_element(tag, value, implicit) == _element(tag, "UL", value, implicit)


@given(ASCII_TEXT.filter(bool), st.booleans())
def test_lo_matches_pydicom(text: str, implicit: bool) -> None:
    assert lo_element(0x00000902, text, implicit) == _element(0x00000902, "LO", text, implicit)


@given(st.text(max_size=64))
def test_lo_outside_the_default_repertoire_is_sent_as_question_marks(text: str) -> None:
    """The command set has no Specific Character Set (PS3.5 6.1.2.1): never an exception, never
    an odd length, and ASCII text untouched."""
    encoded = lo_element(0x00000902, text)
    assert len(encoded) % 2 == 0
    assert encoded[8:].rstrip(b" ") == text.encode("ascii", "replace").rstrip(b" ")
