"""Case folding for person-name matching, done in Python so every database agrees.

SQLite's ``lower()`` folds ASCII only (``MÜLLER`` never matched ``müller`` there) while PostgreSQL
folds by its locale; neither is what a radiologist typing a name expects from both. Ingest stores
``fold(name)`` beside each name, and a query folds its value the same way, so matching compares
two strings this function made: the same answer on SQLite and PostgreSQL, for every script.

NFC first, so a decomposed ``U+0055 U+0308`` and a composed ``Ü`` fold alike; then
``str.casefold`` (Unicode full case folding: ``Σ``/``ς``/``σ`` all become ``σ``). Full folding maps
``ß`` to ``ss``, so a ``?`` wildcard stands for one character of the folded form there.
"""

from __future__ import annotations

import unicodedata


def fold(text: str) -> str:
    return unicodedata.normalize("NFC", text).casefold()


def fold_or_none(text: str | None) -> str | None:
    return None if text is None else fold(text)
