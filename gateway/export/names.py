"""Names in and of an export: built only from validated UIDs and sanitised IDs.

An archive's name and every entry in it are made here and nowhere else, so a Patient ID such as
``../../etc`` or one with slashes, control characters or 200 characters can never name a path
outside the export's folder, and two patients never share an archive name:

- a UID is used as is once it passes the UID grammar (PS3.5 9.1: digit components separated by
  single dots, at most 64 characters), which leaves no separator and no ``..`` to abuse; anything
  else is refused;
- a Patient ID keeps ``[A-Za-z0-9._-]`` (every other character becomes ``_``) up to 48 characters.
  An ID that was not already upper-case letters, digits, ``.``, ``_`` and ``-`` only, or that was
  cut, gets ``_h`` and 12 hex digits of the SHA-256 of the original appended. Unchanged IDs never
  contain a lower-case letter and changed ones always do, so they cannot collide with each other,
  even on a file system that ignores case; two changed ones would need the same 48-bit hash.
"""

from __future__ import annotations

import hashlib
import re

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_KEPT_AS_IS = re.compile(r"[A-Z0-9._-]{1,48}")
SAFE_ID_LENGTH = 48
ARCHIVE_SUFFIX = {"zip": ".zip", "json": ".json", "folder": ""}


class UnsafeName(ValueError):
    """A value meant for a name is not a UID; the message names the value's role, not the value."""


def check_uid(value: str, role: str = "UID") -> str:
    """``value`` when it is a UID (PS3.5 9.1), else ``UnsafeName``."""
    if len(value) > 64 or not _UID.fullmatch(value):
        raise UnsafeName(f"{role} is not a UID (digits and dots, at most 64 characters)")
    return value


def safe_id(value: str) -> str:
    """A Patient ID as one safe file name component (see the module docstring)."""
    kept = _UNSAFE.sub("_", value)[:SAFE_ID_LENGTH]
    if _KEPT_AS_IS.fullmatch(value):
        return kept
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{kept}_h{digest}"


def study_stem(study_uid: str) -> str:
    return f"study_{check_uid(study_uid, 'Study Instance UID')}_export"


def patient_stem(patient_id: str | None) -> str:
    return f"patient_{safe_id(patient_id or '')}_export"


def archive_name(stem: str, format: str) -> str:
    """``study_<UID>_export.zip``, ``..._export.json`` or the folder ``..._export``."""
    return stem + ARCHIVE_SUFFIX[format]


def study_folder(study_uid: str) -> str:
    """A study's folder inside a patient archive: ``studies/<StudyInstanceUID>/``."""
    return f"studies/{check_uid(study_uid, 'Study Instance UID')}/"


def dicom_entry(folder: str, number: int) -> str:
    return f"{folder}dicom/{number}.dcm"


def preview_entry(folder: str, number: int, frame: int) -> str:
    """``previews/<n>_frame_<k>.png``; ``k`` counts from 1, as DICOM frame numbers do (PS3.3
    C.7.6.6)."""
    return f"{folder}previews/{number}_frame_{frame}.png"


def is_inside(entry: str) -> bool:
    """An entry name that stays inside the archive's root once extracted."""
    parts = entry.split("/")
    return (bool(entry) and not entry.startswith("/") and "\\" not in entry
            and all(p not in ("", ".", "..") for p in parts[:-1]) and parts[-1] not in (".", "..")
            and all(32 <= ord(c) < 127 for c in entry))
