"""De-identified copies of exported instances: PS3.15 Annex E, Basic Application Level
Confidentiality Profile, with the Retain Longitudinal Temporal Information Full Dates (E.3.6) and
Clean Descriptors (E.3.5) Options.

One job: ``Deidentifier.apply(ds)`` returns a de-identified copy of ``ds`` (or None when the
instance must be left out of the export). What happens to each attribute comes from the
generated ``deid_table`` (Table E.1-1 of the edition it names), never from a list in this file.

Invariants:
- ``ds`` is never modified (the copy is deep).
- UIDs with action U are replaced by ``2.25.<uuid>`` where the UUID is a keyed hash (HMAC-SHA-256
  with the export's secret) of the old UID: one old UID gives one new UID for the whole export
  (one study keeps one new Study Instance UID across its series and instances; references inside
  sequences and the file meta's Media Storage SOP Instance UID follow), and a re-run with the same
  secret gives the same UIDs. Without the secret the mapping cannot be reversed or recomputed.
- Private attributes are removed (Retain Safe Private Option not supported), as is every public
  attribute unknown to pydicom's data dictionary (it cannot be judged), group lengths, and whole
  Overlay Plane modules (60xx): Table E.1-1 removes Overlay Data (60xx,3000), and the module's
  other attributes cannot stay without it (it is Type 1 there).
- Patient Identity Removed (0012,0062) = YES, De-identification Method (0012,0063) and its Code
  Sequence (0012,0064, CID 7050 codes) and Longitudinal Temporal Information Modified (0028,0303)
  are set, as PS3.15 E.1.1 and E.2 require.
- Instances whose pixels are likely to carry burned-in identification are excluded unless
  ``allow_burned_in``: Burned In Annotation (0028,0301) YES, or absent on a SOP Class that
  routinely burns in annotation (PS3.15 E.3.1 Note 1: ultrasound does, CT does not; Secondary
  Capture, which is screen captures, and Encapsulated PDF/CDA, whose document is the payload, are
  treated the same way). This profile does not clean pixel data (that is the Clean Pixel Data
  Option, not offered), so leaving such instances out is the only safe default.

How the Table E.1-1 action codes are carried out (Table E.1-1a):
- X remove; Z zero length (an empty sequence for SQ), except Study Date, Study Time and Study ID,
  which get a dummy because a DICOMDIR's STUDY record requires them; K keep; U replace the UIDs.
- D a dummy of the VR (``ANONYMIZED``, 19000101, 000000, 0, ...). Patient ID (Z/D) gets a
  pseudonym ``ANON-`` + a keyed hash of the old ID instead, so that the patients of one export stay
  apart. D on a sequence keeps its items and de-identifies them in "dummy" mode: inside, every
  text, person name, date and time that the table does not otherwise treat becomes a dummy too
  (so a Content Sequence or a Person Identification Code Sequence keeps its structure and loses
  its values).
- Compound codes (Z/D, X/Z, X/D, X/Z/D, X/Z/U*) mean "the first unless the later ones are required
  by the IOD (Type 3 / 2 / 1)". The extract carries no IOD Types, so the choice is the one that
  can never break IOD conformance: the last (D, Z, or keep-and-replace-UIDs for U*), since a
  dummy or empty value identifies no one either; an attribute that was already empty stays empty.
- C (only from the Clean Descriptors column here) "replace with values of similar meaning known
  not to contain identifying information": the text is kept with every word removed that occurs
  in a value this profile removes or replaces in the same instance (names, IDs, institution,
  addresses, ... compared without case or accents), and every word with 4 or more digits (dates,
  numbers that may be IDs). It cannot know of identifying words the instance does not hold
  elsewhere (a name typed only into a description): a user who needs that guarantee leaves the
  option off, and the descriptions are removed. C on a sequence de-identifies its items in the
  same "clean" mode.
- Sequences that the table does not list are kept and their items de-identified the same way
  (Table E.1-1 applies wherever an attribute occurs).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import re
import unicodedata
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from pydicom.datadict import get_entry
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    EncapsulatedCDAStorage,
    EncapsulatedPDFStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from gateway.export import deid_table
from gateway.export.deid_table import Row

# SOP Classes that routinely carry burned-in identification when Burned In Annotation is absent.
LIKELY_BURNED_IN = frozenset(
    {
        UltrasoundImageStorage,
        UltrasoundMultiFrameImageStorage,
        "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (Retired)
        "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (Retired)
        SecondaryCaptureImageStorage,
        MultiFrameSingleBitSecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
        EncapsulatedPDFStorage,
        EncapsulatedCDAStorage,
    }
)

# PS3.16 CID 7050 De-identification Method.
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
CLEAN_DESCRIPTORS_CODE = ("113105", "Clean Descriptors Option")
RETAIN_FULL_DATES_CODE = ("113106", "Retain Longitudinal Temporal Information Full Dates Option")

DUMMY_TEXT = "ANONYMIZED"
_DUMMIES: dict[str, object] = {
    "AE": DUMMY_TEXT,
    "AS": "000Y",
    "CS": DUMMY_TEXT,
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": DUMMY_TEXT,
    "LT": DUMMY_TEXT,
    "PN": DUMMY_TEXT,
    "SH": DUMMY_TEXT,
    "ST": DUMMY_TEXT,
    "TM": "000000",
    "UC": DUMMY_TEXT,
    "UR": "https://example.invalid/",
    "UT": DUMMY_TEXT,
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "SV": 0,
    "UL": 0,
    "US": 0,
    "UV": 0,
    "AT": 0,
}
_TEXT_VRS = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_TEMPORAL_VRS = frozenset({"DA", "DT", "TM"})
_PATIENT_ID = 0x00100020
# Z allows "a non-zero length value that may be a dummy value": these get one, because the
# STUDY record of a DICOMDIR needs them (PS3.3 F.5, Type 1) and the export builds DICOMDIRs
# from the de-identified instances (pydicom's FileSet refuses them empty).
_Z_AS_DUMMY = frozenset({0x00080020, 0x00080030, 0x00200010})  # Study Date, Study Time, Study ID
_OVERLAY_GROUPS = range(0x6000, 0x6020, 2)
# File meta attributes naming the sending or receiving site (PS3.10 7.1); not in Table E.1-1,
# which covers the data set, but they identify the institution the instance came from.
_FILE_META_SITE = (
    "SourceApplicationEntityTitle",
    "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle",
    "SourcePresentationAddress",
    "SendingPresentationAddress",
    "ReceivingPresentationAddress",
    "PrivateInformationCreatorUID",
    "PrivateInformation",
)
_WORD = re.compile(r"\w+")
_TOKEN = re.compile(r"\S+")
_DIGITS = re.compile(r"\d{4}")


@dataclass(frozen=True)
class DeidOptions:
    retain_longitudinal_temporal: bool = False  # PS3.15 E.3.6 (full dates)
    clean_descriptors: bool = False  # PS3.15 E.3.5
    allow_burned_in: bool = False  # else objects with Burned In Annotation YES are excluded


class _Mode(Enum):
    """How attributes that the table leaves alone are treated inside a sequence."""

    NORMAL = "normal"  # kept
    CLEAN = "clean"  # text cleaned (inside a sequence with action C)
    DUMMY = "dummy"  # text, names, dates and times replaced by dummies (inside D)


def _fold(word: str) -> str:
    """Case- and accent-insensitive form, so MÜLLER, Müller and muller compare equal."""
    decomposed = unicodedata.normalize("NFKD", word)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _row(tag: int) -> Row | None:
    if (tag >> 16) & 1:
        return deid_table.PRIVATE
    row = deid_table.ATTRIBUTES.get(tag)
    if row is not None:
        return row
    for (mask, value), repeating in deid_table.REPEATING.items():
        if tag & mask == value:
            return repeating
    return None


def _clone(ds: Dataset) -> Dataset:
    """A copy of ``ds`` that shares its raw (undecoded, immutable) elements and deep-copies the
    decoded ones, so that changing the copy never changes ``ds``. Cheaper than ``deepcopy``,
    which rebuilds every raw element. Private elements are left out (the profile removes them).
    The preamble is not copied (it may hold application
    data); the writer puts 128 zero bytes there."""
    out = Dataset()
    implicit, little = ds.original_encoding
    if implicit is not None and little is not None:
        out.set_original_encoding(implicit, little, ds.original_character_set)
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset itself decodes every element
        if tag.is_private:  # removed anyway; adding them to a Dataset decodes them
            continue
        elem = ds.get_item(tag)  # reads a deferred value
        out[tag] = elem if isinstance(elem, RawDataElement) else copy.deepcopy(elem)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        out.file_meta = copy.deepcopy(meta)
    return out


def _vr(elem: DataElement | RawDataElement) -> str:
    """The element's VR; a raw element read as implicit VR has none, so the dictionary's."""
    if elem.VR is not None and elem.VR != "UN":
        return str(elem.VR)
    try:
        return str(get_entry(elem.tag)[0])
    except KeyError:
        return "UN"


def _known(tag: BaseTag) -> bool:
    try:
        get_entry(tag)
    except KeyError:
        return False
    return True


def _values(elem: DataElement) -> list[object]:
    if elem.value is None:
        return []
    if isinstance(elem.value, (MultiValue, list, tuple)):
        return list(elem.value)
    return [elem.value]


def _is_empty(elem: DataElement) -> bool:
    if elem.VR == "SQ":
        return len(elem.value) == 0
    return elem.value is None or elem.value == "" or elem.value == b"" or elem.VM == 0


class Deidentifier:
    """One per export: its UID mapping is what keeps a study's new UIDs consistent.

    Safe to share between threads: the mapping is a pure function of the secret and the old UID,
    so two threads filling the cache at once store the same value.
    """

    def __init__(self, options: DeidOptions, secret: bytes) -> None:
        if not secret:
            raise ValueError("a de-identification secret is required (the UIDs derive from it)")
        self._options = options
        self._secret = secret
        self._uids: dict[str, str] = {}

    def replaced_uid(self, uid: str) -> str:
        """The new UID for an old one: ``2.25.`` and a version-8 UUID (RFC 9562) made of the
        first 16 bytes of HMAC-SHA-256(secret, old UID) (PS3.5 B.2, UUID-derived UIDs)."""
        old = str(uid).strip("\0 ")
        new = self._uids.get(old)
        if new is None:
            digest = self._keyed(b"uid", old)
            number = int.from_bytes(digest[:16], "big")
            number = (number & ~(0xF << 76)) | (0x8 << 76)  # version 8
            number = (number & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant
            new = f"2.25.{uuid.UUID(int=number).int}"
            self._uids[old] = new
        return new

    def apply(self, ds: Dataset) -> Dataset | None:
        """The de-identified copy of ``ds``, or None when it must be excluded (burned-in
        annotation not allowed). ``ds`` is not modified."""
        if not self._options.allow_burned_in and self._burned_in(ds):
            return None
        out = _clone(ds)
        words = self._identifying_words(out) if self._options.clean_descriptors else set()
        self._walk(out, _Mode.NORMAL, words)
        self._mark(out)
        meta = getattr(out, "file_meta", None)
        if meta is not None:
            for keyword in _FILE_META_SITE:
                if keyword in meta:
                    delattr(meta, keyword)
            if "MediaStorageSOPInstanceUID" in meta:
                meta.MediaStorageSOPInstanceUID = self.replaced_uid(
                    meta.MediaStorageSOPInstanceUID
                )
        return out

    # -- decisions -------------------------------------------------------------------------

    def _burned_in(self, ds: Dataset) -> bool:
        """PS3.15 E.3.1: identification burned into the pixels is not removed by this profile."""
        flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
        if flag == "YES":
            return True
        if flag == "NO":
            return False
        return str(ds.get("SOPClassUID", "")) in LIKELY_BURNED_IN

    def _code(self, row: Row) -> str:
        """The Table E.1-1 code for this row under the options (compound codes unresolved)."""
        if self._options.retain_longitudinal_temporal and row.retain_longitudinal_full_dates:
            return row.retain_longitudinal_full_dates
        if self._options.clean_descriptors and row.clean_descriptors:
            return row.clean_descriptors
        return row.basic_profile

    def _action(self, elem: DataElement, row: Row) -> str:
        """One of X Z D K C U for this element, after the options and the compound codes."""
        code = self._code(row)
        if "/" not in code:
            return code
        choices = code.split("/")
        if "Z" in choices and _is_empty(elem):
            return "Z"
        last = choices[-1]
        return "U" if last == "U*" else last

    # -- the walk --------------------------------------------------------------------------

    def _walk(self, ds: Dataset, mode: _Mode, words: set[str]) -> None:
        """De-identify ``ds`` in place (it is the copy). Elements kept as they are stay raw
        (never decoded): decoding every value cost more than the rest of the work."""
        for tag in list(ds.keys()):
            tag = Tag(tag)
            if tag.element == 0 or tag.group in _OVERLAY_GROUPS:
                del ds[tag]
                continue
            row = _row(tag)
            if row is None:
                if not _known(tag):
                    del ds[tag]
                    continue
                vr = _vr(ds.get_item(tag))
                if vr == "SQ" or (mode is not _Mode.NORMAL and vr in _TEXT_VRS | _TEMPORAL_VRS):
                    self._unlisted(ds, ds[tag], mode, words)
                continue
            if self._code(row) == "X":
                del ds[tag]
                continue
            elem = ds[tag]
            action = self._action(elem, row)
            if action == "X":
                del ds[tag]
            elif action == "Z" and tag in _Z_AS_DUMMY and not _is_empty(elem):
                self._dummy(ds, elem, words)
            elif action == "Z":
                empty = Sequence() if elem.VR == "SQ" else empty_value_for_VR(elem.VR)
                ds[tag] = DataElement(tag, elem.VR, empty)
            elif action == "K":
                if elem.VR == "SQ":
                    self._items(elem, mode, words)
            elif action == "U" and elem.VR == "SQ":
                self._items(elem, mode, words)
            elif action == "U" and elem.VR == "UI":
                self._replace_uids(ds, elem)
            elif action == "C":
                self._clean(ds, elem, words, needs_value="D" in row.basic_profile.split("/"))
            else:  # D, and U on a VR other than UI
                self._dummy(ds, elem, words)

    def _items(self, elem: DataElement, mode: _Mode, words: set[str]) -> None:
        for item in elem.value:
            self._walk(item, mode, words)

    def _unlisted(self, ds: Dataset, elem: DataElement, mode: _Mode, words: set[str]) -> None:
        """An attribute that Table E.1-1 does not list: kept, unless inside a sequence the
        table replaces (D) or cleans (C)."""
        if elem.VR == "SQ":
            self._items(elem, mode, words)
        elif mode is _Mode.DUMMY and (elem.VR in _TEXT_VRS or elem.VR in _TEMPORAL_VRS):
            if not _is_empty(elem):
                self._dummy(ds, elem, words)
        elif mode is _Mode.CLEAN and elem.VR in _TEXT_VRS:
            self._clean(ds, elem, words)

    def _replace_uids(self, ds: Dataset, elem: DataElement) -> None:
        new = [self.replaced_uid(str(v)) if str(v).strip("\0 ") else "" for v in _values(elem)]
        ds[elem.tag] = DataElement(elem.tag, "UI", new if len(new) > 1 else (new or [""])[0])

    def _dummy(self, ds: Dataset, elem: DataElement, words: set[str]) -> None:
        tag, vr = elem.tag, elem.VR
        if vr == "UN" or " or " in vr:
            vr = self._dictionary_vr(tag, vr)
        if vr == "SQ":
            self._items(elem, _Mode.DUMMY, words)
            return
        if vr == "UI":
            self._replace_uids(ds, elem)
            return
        if tag == _PATIENT_ID and not _is_empty(elem):
            value: object = "ANON-" + self._keyed(b"patient-id", str(elem.value)).hex()[:16]
        elif vr in _DUMMIES:
            value = _DUMMIES[vr]
        else:  # OB, OD, OF, OL, OV, OW, UN: bytes
            value = b"\0" * 8
        ds[tag] = DataElement(tag, vr, value)

    def _clean(
        self, ds: Dataset, elem: DataElement, words: set[str], needs_value: bool = False
    ) -> None:
        """``needs_value``: the Basic Profile would put a dummy here (D: Type 1 somewhere), so
        a text cleaned down to nothing gets the dummy rather than staying empty."""
        if elem.VR == "SQ":
            self._items(elem, _Mode.CLEAN, words)
            return
        if elem.VR not in _TEXT_VRS:
            self._dummy(ds, elem, words)
            return
        cleaned = [self._scrub(str(v), words) for v in _values(elem)]
        if needs_value and not any(cleaned) and not _is_empty(elem):
            self._dummy(ds, elem, words)
            return
        value = cleaned if len(cleaned) > 1 else (cleaned[0] if cleaned else "")
        ds[elem.tag] = DataElement(elem.tag, elem.VR, value)

    @staticmethod
    def _scrub(text: str, words: set[str]) -> str:
        def word(match: re.Match[str]) -> str:
            found = match.group()
            return "" if _fold(found) in words or _DIGITS.search(found) else found

        def token(match: re.Match[str]) -> str:
            # "Müller^Hans," -> "" rather than "^,": punctuation left alone by the words goes too
            cleaned = _WORD.sub(word, match.group())
            return cleaned if cleaned == match.group() or _WORD.search(cleaned) else ""

        return re.sub(r"  +", " ", _TOKEN.sub(token, text)).strip()

    @staticmethod
    def _dictionary_vr(tag: BaseTag, vr: str) -> str:
        try:
            known = str(get_entry(tag)[0])
        except KeyError:
            return "UN"
        return known.split(" or ")[0] if known != "UN" else vr.split(" or ")[0]

    def _identifying_words(self, ds: Dataset) -> set[str]:
        """Every word of every text value this instance holds in an attribute the profile
        removes or replaces: what a cleaned description must not contain."""
        words: set[str] = set()
        for elem in self._iter_elements(ds):
            row = _row(elem.tag)
            if row is None and elem.VR != "PN":
                continue
            if row is not None and self._action(elem, row) in ("K", "C", "U"):
                continue
            if elem.VR in _TEXT_VRS or elem.VR in _TEMPORAL_VRS or elem.VR == "UN":
                for value in _values(elem):
                    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                    words.update(_fold(w) for w in _WORD.findall(text))
        return words

    @staticmethod
    def _iter_elements(ds: Dataset) -> Iterable[DataElement]:
        for elem in ds:
            yield elem
            if elem.VR == "SQ":
                for item in elem.value:
                    yield from Deidentifier._iter_elements(item)

    def _keyed(self, purpose: bytes, value: str) -> bytes:
        message = purpose + b"\0" + value.encode("utf-8", "surrogateescape")
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    # -- the attributes that record what was done (PS3.15 E.1.1, E.2, E.3) ----------------

    def _mark(self, ds: Dataset) -> None:
        codes = [BASIC_PROFILE_CODE]
        methods = [f"DICOM PS3.15 {deid_table.EDITION} E.2 Basic Profile"]
        if self._options.retain_longitudinal_temporal:
            codes.append(RETAIN_FULL_DATES_CODE)
            methods.append("Retain Longitudinal Temporal Info Full Dates")
        if self._options.clean_descriptors:
            codes.append(CLEAN_DESCRIPTORS_CODE)
            methods.append("Clean Descriptors")
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = (
            "UNMODIFIED" if self._options.retain_longitudinal_temporal else "REMOVED"
        )
