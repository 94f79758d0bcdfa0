"""Case folding for person-name matching, done in Python so every database agrees.

SQLite's ``lower()`` folds ASCII only (``MÜLLER`` never matched ``müller`` there) while PostgreSQL
folds by its locale; neither is what a radiologist typing a name expects from both. Ingest stores
``fold_name(name)`` beside each name, and a query folds its value the same way, so matching
compares two strings this module made: the same answer on SQLite and PostgreSQL, for every script.

``fold`` is Unicode canonical caseless matching (The Unicode Standard, 3.13, D145: full case
folding between canonical normalisations), so a decomposed ``U+0055 U+0308`` and a composed ``Ü``
fold alike, ``Σ``/``ς``/``σ`` all become ``σ``, and ``ß``/``ẞ``/``SS`` all become ``ss``; the
result is NFC, so a ``?`` wildcard stands for one composed character of the folded form (a ``ß``
is two there). Before that it folds the width variants a Japanese name meets: half-width katakana
(JIS X 0201, ISO 2022 IR 13) become full-width, full-width Latin letters and digits become ASCII,
and the ideographic space a plain space. PS3.4 C.2.2.2.1 lets an SCP match person names
"insensitive to some or all aspects of case, position, accent, or other character encoding
variants"; this is case and width, never accents (``Muller`` does not find ``Müller``).

It never makes a PN delimiter (``=`` ``^``), a wildcard (``*`` ``?``) or a backslash out of
another character (full NFKC would turn ``＝`` into ``=``), so a folded name splits into the same
component groups as the name, and a folded query keeps its wildcards where the caller put them.

``fold_name`` is the stored form of a PN value: each component folded, trailing empty components
and groups dropped (PS3.5 6.2.1: ``DOE^JOHN^^^`` is ``DOE^JOHN``), cut to the column's length.
Migration 0006 fills existing rows with a copy of this code; change both or neither.
"""

from __future__ import annotations

import unicodedata

FOLDED_LENGTH = 324  # instances.patient_name_folded, referring_physician_name_folded

# Width variants (Unicode "Halfwidth and Fullwidth Forms"): letters, digits, half-width katakana
# and their marks, and the ideographic space. Not the full-width punctuation: ＝ ＾ ＊ ？ ＼ stay.
_WIDTH_RANGES = ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0xFF61, 0xFF9F),
                 (0x3000, 0x3000))
_WIDTH = {
    code: unicodedata.normalize("NFKC", chr(code))
    for low, high in _WIDTH_RANGES for code in range(low, high + 1)
}


def fold(text: str) -> str:
    """The matching form of a piece of text (no PN structure): see the module docstring."""
    return unicodedata.normalize(
        "NFC", unicodedata.normalize("NFD", text.translate(_WIDTH)).casefold()
    )


def fold_name(value: str | None) -> str | None:
    """The stored matching form of a whole PN value; None for no name."""
    if value is None:
        return None
    groups = ["^".join(fold(c) for c in group.split("^")).rstrip("^")
              for group in value.rstrip(" ").split("=")]
    folded = "=".join(groups).rstrip("=")[:FOLDED_LENGTH]
    return folded or None
