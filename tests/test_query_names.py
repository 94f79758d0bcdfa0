"""Person-name matching in every script the character sets allow, the same on SQLite and
PostgreSQL: names stored by real C-STOREs in their own Specific Character Set, queried by a real
findscu in its own; a property over random names at the SQL level; the migration that adds the
folded column; and names written by the remap stage (gateway.query.matching, .folding)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import unicodedata
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from gateway.app import Gateway
from gateway.config import QueryConfig
from gateway.db.engine import make_engine
from gateway.db.migrate import MIGRATIONS, upgrade
from gateway.db.models import Instance
from gateway.query.attributes import ledger_values
from gateway.query.find import STUDY_ROOT_FIND, parse, run
from gateway.query.folding import fold, fold_name
from tests.conftest import GATEWAY_BIN, rows, wait_for
from tests.factory import make_dataset, write_file
from tests.peers import dcmtk, require_tool

JIS = "\\ISO 2022 IR 87"  # ASCII, then JIS X 0208 (kanji, kana) through escape sequences
JIS_KATAKANA = "ISO 2022 IR 13\\ISO 2022 IR 87"  # JIS X 0201 (half-width katakana) as G1 too

# (label, Patient's Name, Specific Character Set): one study each, sent by storescu as is.
NAMES = [
    ("DE-MUELLER", "MÜLLER^JÜRGEN", "ISO_IR 100"),  # as modalities send names: upper case
    ("DE-STRAUSS", "Strauß^Änne", "ISO_IR 100"),
    ("FR-LEFEVRE", "Lefèvre^Hélène", "ISO_IR 100"),
    ("FR-DOEUVRE", "Dœuvre^Élodie", "ISO_IR 192"),  # œ is not in Latin-1
    ("EL-PAPADOP", "Παπαδόπουλος^Νίκος", "ISO_IR 126"),  # final sigma in both components
    ("RU-IVANOVA", "Иванова^Алёна", "ISO_IR 144"),
    ("JP-YAMADA", "Yamada^Tarou=山田^太郎=やまだ^たろう", JIS),  # PS3.5 H.3.2
    ("JP-HANAKO", "ﾔﾏﾀﾞ^ﾊﾅｺ=山田^花子=ﾔﾏﾀﾞ^ﾊﾅｺ", JIS_KATAKANA),  # PS3.5 H.3.1's form
    ("PL-LUKASIE", "Łukasiewicz^Zdzisław", "ISO_IR 192"),
    ("DE-KOENIG", "Ko\u0308nig^Eva", "ISO_IR 192"),  # decomposed: o + COMBINING DIAERESIS
    ("EN-SMITH", "Smith^Anna", None),
    ("EN-MULLER", "Muller^Hans", None),
]
REFERRING = {"EL-PAPADOP": ("Ηλίας^Σοφία", "ISO_IR 126")}

# (key, value, Specific Character Set of the query, labels expected) with names in any case.
ANY_CASE = [
    ("PatientName", "MÜLLER^JÜRGEN", "ISO_IR 100", {"DE-MUELLER"}),
    ("PatientName", "müller^jürgen", "ISO_IR 192", {"DE-MUELLER"}),
    ("PatientName", "Müller^Jürgen", "ISO_IR 100", {"DE-MUELLER"}),
    ("PatientName", "MÜLLER*", "ISO_IR 100", {"DE-MUELLER"}),
    ("PatientName", "müller*", "ISO_IR 100", {"DE-MUELLER"}),
    ("PatientName", "*JÜRGEN", "ISO_IR 100", {"DE-MUELLER"}),
    ("PatientName", "M?LLER^J?RGEN", None, {"DE-MUELLER"}),
    ("PatientName", "MÜLLER", "ISO_IR 100", set()),          # a whole group, not a component
    ("PatientName", "MÜLLER^*", "ISO_IR 100", {"DE-MUELLER"}),
    ("PatientName", "MULLER*", None, {"EN-MULLER"}),         # accents count
    ("PatientName", "STRAUSS^ÄNNE", "ISO_IR 100", {"DE-STRAUSS"}),  # ß folds to ss
    ("PatientName", "STRAUẞ*", "ISO_IR 192", {"DE-STRAUSS"}),
    ("PatientName", "LEFÈVRE^HÉLÈNE", "ISO_IR 100", {"FR-LEFEVRE"}),
    ("PatientName", "lefèvre*", "ISO_IR 100", {"FR-LEFEVRE"}),
    ("PatientName", "DŒUVRE^ÉLODIE", "ISO_IR 192", {"FR-DOEUVRE"}),
    ("PatientName", "*élodie", "ISO_IR 192", {"FR-DOEUVRE"}),
    ("PatientName", "ΠΑΠΑΔΌΠΟΥΛΟΣ^ΝΊΚΟΣ", "ISO_IR 126", {"EL-PAPADOP"}),
    ("PatientName", "παπαδόπουλοσ*", "ISO_IR 126", {"EL-PAPADOP"}),  # σ typed for ς
    ("PatientName", "*ΝΊΚΟΣ", "ISO_IR 126", {"EL-PAPADOP"}),
    ("PatientName", "ΠΑΠΑΔ?ΠΟΥΛΟΣ^*", "ISO_IR 126", {"EL-PAPADOP"}),
    ("PatientName", "ИВАНОВА^АЛЁНА", "ISO_IR 144", {"RU-IVANOVA"}),
    ("PatientName", "иванова*", "ISO_IR 144", {"RU-IVANOVA"}),
    ("PatientName", "*АЛЁНА", "ISO_IR 144", {"RU-IVANOVA"}),
    ("PatientName", "YAMADA^TAROU", None, {"JP-YAMADA"}),    # the alphabetic group alone
    ("PatientName", "yamada*", None, {"JP-YAMADA"}),
    ("PatientName", "*TAROU", None, {"JP-YAMADA"}),          # never across a group
    ("PatientName", "山田^太郎", JIS, {"JP-YAMADA"}),          # one group: any group matches
    ("PatientName", "山田*", JIS, {"JP-YAMADA", "JP-HANAKO"}),
    ("PatientName", "*たろう", JIS, {"JP-YAMADA"}),
    ("PatientName", "=山田^花子", JIS, {"JP-HANAKO"}),        # the ideographic group alone
    ("PatientName", "==やまだ^たろう", JIS, {"JP-YAMADA"}),    # the phonetic group alone
    ("PatientName", "Yamada^Tarou=山田^太郎", JIS, {"JP-YAMADA"}),
    ("PatientName", "Yamada^Tarou=山田^花子", JIS, set()),    # every group given must match
    ("PatientName", "ヤマダ^ハナコ", JIS, {"JP-HANAKO"}),      # full width finds half width
    ("PatientName", "ﾔﾏﾀﾞ*", JIS_KATAKANA, {"JP-HANAKO"}),
    ("PatientName", "ＹＡＭＡＤＡ^ＴＡＲＯＵ", JIS, {"JP-YAMADA"}),  # full-width Latin
    ("PatientName", "ŁUKASIEWICZ^ZDZISŁAW", "ISO_IR 192", {"PL-LUKASIE"}),
    ("PatientName", "KÖNIG^EVA", "ISO_IR 100", {"DE-KOENIG"}),  # composed finds decomposed
    ("PatientName", "SMITH^ANNA", None, {"EN-SMITH"}),
    ("PatientName", "s?ith*", None, {"EN-SMITH"}),
    ("PatientName", "*", None, {label for label, _, _ in NAMES}),
    ("ReferringPhysicianName", "ΗΛΊΑΣ*", "ISO_IR 126", {"EL-PAPADOP"}),
]
# The same archive with ``case_insensitive_names = false``: exact, also outside ASCII.
EXACT_CASE = [
    ("PatientName", "MÜLLER^JÜRGEN", "ISO_IR 100", {"DE-MUELLER"}),
    ("PatientName", "Müller^Jürgen", "ISO_IR 100", set()),
    ("PatientName", "MÜLLER*", "ISO_IR 100", {"DE-MUELLER"}),
    ("PatientName", "*JÜRGEN", "ISO_IR 100", {"DE-MUELLER"}),
    ("PatientName", "*jürgen", "ISO_IR 100", set()),
    ("PatientName", "Strauß^Änne", "ISO_IR 100", {"DE-STRAUSS"}),
    ("PatientName", "STRAUSS^ÄNNE", "ISO_IR 100", set()),
    ("PatientName", "παπαδόπουλος*", "ISO_IR 126", set()),
    ("PatientName", "Παπαδόπουλος^Νίκος", "ISO_IR 126", {"EL-PAPADOP"}),
    ("PatientName", "Yamada^Tarou", None, {"JP-YAMADA"}),
    ("PatientName", "YAMADA^TAROU", None, set()),
    ("PatientName", "山田^太郎", JIS, {"JP-YAMADA"}),
    ("PatientName", "ﾔﾏﾀﾞ*", JIS_KATAKANA, {"JP-HANAKO"}),
    ("PatientName", "ヤマダ*", JIS, set()),                    # no width folding either
    ("ReferringPhysicianName", "Ηλίας^Σοφία", "ISO_IR 126", {"EL-PAPADOP"}),
    ("ReferringPhysicianName", "ΗΛΊΑΣ^ΣΟΦΊΑ", "ISO_IR 126", set()),
]


def archive_of_names(start: Callable[..., Gateway], tmp_path: Path, db: str,
                     any_case: bool) -> Gateway:
    """A gateway holding one study per name of NAMES, stored by storescu in its character set."""
    app = start(db=db, query={"case_insensitive_names": any_case}, security={
        "unknown_callers": ["echo", "store"],
        "peers": [{"ae_title": "VIEWER", "services": ["find"]}]})
    files = []
    for label, name, charset in NAMES:
        ds = make_dataset(PatientID=f"PID-{label}", AccessionNumber=label, PatientName=name)
        if charset is not None:
            ds.SpecificCharacterSet = charset
        if label in REFERRING:
            ds.ReferringPhysicianName = REFERRING[label][0]
        files.append(write_file(ds, tmp_path / "names" / f"{label}.dcm"))
    sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1",
                 str(app.config.dicom.port), *map(str, files))
    assert sent.returncode == 0, sent.stderr
    return app


def find_names(port: int, tmp_path: Path, key: str, value: str,
               charset: str | None) -> list[Dataset]:
    """findscu with a query file written in ``charset`` (findscu sends its bytes as they are)."""
    query = Dataset()
    if charset is not None:
        query.SpecificCharacterSet = charset
    query.QueryRetrieveLevel = "STUDY"
    query.AccessionNumber = ""
    query.PatientName = ""
    query.ReferringPhysicianName = ""
    setattr(query, key, value)
    out = tmp_path / f"find-{generate_uid()[-12:]}"
    out.mkdir()
    query.save_as(out / "query.dcm", implicit_vr=False, little_endian=True)
    result = subprocess.run(
        [require_tool("findscu"), "-S", "-X", "-aet", "VIEWER", "-aec", "GATEWAY", "127.0.0.1",
         str(port), "query.dcm"],
        check=False, capture_output=True, text=True, cwd=out, timeout=60)
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(f) for f in sorted(out.glob("rsp*.dcm"))]


def answered(port: int, tmp_path: Path, table: list[tuple[str, str, str | None, set[str]]]
             ) -> dict[tuple[str, str], set[str]]:
    stored = {label: name for label, name, _ in NAMES}
    found = {}
    for key, value, charset, _ in table:
        answers = find_names(port, tmp_path, key, value, charset)
        for answer in answers:  # the name as stored, never its folded copy
            assert str(answer.PatientName) == stored[str(answer.AccessionNumber)]
        found[(key, value)] = {str(a.AccessionNumber) for a in answers}
    return found


@pytest.mark.parametrize(("any_case", "table"), [(True, ANY_CASE), (False, EXACT_CASE)],
                         ids=["any-case", "exact-case"])
def test_findscu_names_in_every_script(
    make_gateway: Callable[..., Gateway], tmp_path: Path, db_url: str, any_case: bool,
    table: list[tuple[str, str, str | None, set[str]]],
) -> None:
    """One table, both databases (db_url): the answers must be exactly the expected ones."""
    app = archive_of_names(make_gateway, tmp_path, db_url, any_case)
    found = answered(app.config.dicom.port, tmp_path, table)
    wrong = [f"{key}={value!r}: found {sorted(found[(key, value)])}, expected {sorted(expected)}"
             for key, value, _, expected in table if found[(key, value)] != expected]
    assert wrong == []


# -- the property: any name, any case, composed or not, whole or as a prefix ---------------------

def _letters(*ranges: tuple[int, int], extra: str = "") -> str:
    return "".join(c for low, high in ranges for c in map(chr, range(low, high + 1))
                   if c.isalpha()) + extra


SCRIPTS = {
    "latin": _letters((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xFF), extra="ŒœŸẞŁłŚśŹźŻżĆćĘęŃń"),
    "greek": _letters((0x386, 0x3CE)),  # with tonos, dialytika and final sigma
    "cyrillic": _letters((0x400, 0x45F)),
}
KANJI = "山田太郎花子鈴木佐藤高橋田中伊藤渡辺小林加藤"
KANA = _letters((0x3041, 0x3093), (0x30A1, 0x30F3), (0xFF66, 0xFF9D))


@st.composite
def person_names(draw: st.DrawFn) -> str:
    """family^given (sometimes ^middle) in one script, or a Japanese three-group name; composed
    or decomposed."""
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter Japanese
        romaji = "^".join(draw(st.lists(st.text("abcdefghijkmnoprstuwyz", min_size=1,
                                                max_size=8), min_size=1, max_size=2)))
        kanji = "^".join(draw(st.lists(st.text(KANJI, min_size=1, max_size=3), min_size=1,
                                       max_size=2)))
        kana = "^".join(draw(st.lists(st.text(KANA, min_size=1, max_size=5), min_size=1,
                                      max_size=2)))
        name = f"{romaji.title()}={kanji}={kana}"
    else:
        letters = SCRIPTS[draw(st.sampled_from(sorted(SCRIPTS)))]
        name = "^".join(draw(st.lists(st.text(letters, min_size=1, max_size=10), min_size=1,
                                      max_size=3)))
    return unicodedata.normalize(draw(st.sampled_from(["NFC", "NFD"])), name)


CASES: dict[str, Callable[[str], str]] = {
    "upper": str.upper, "lower": str.lower, "swapped": str.swapcase,
    "decomposed upper": lambda s: unicodedata.normalize("NFD", s.upper()),
    "composed lower": lambda s: unicodedata.normalize("NFC", s.lower()),
}


def _find_study(engine: sa.Engine, study: str, value: str, any_case: bool = True
                ) -> list[dict[str, Any]]:
    """Build the conditions as a C-FIND does (find.parse) and run them (find.run)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    identifier.PatientName = value
    query = parse(identifier, STUDY_ROOT_FIND, engine.dialect.name,
                  QueryConfig(case_insensitive_names=any_case))
    return run(engine, query, 10)


def _insert_as_ingest(engine: sa.Engine, name: str, referring: str | None = None) -> str:
    """One instance row built as ingest builds it (attributes.ledger_values); its study UID."""
    ds = make_dataset(PatientName=name, ReferringPhysicianName=referring)
    with engine.begin() as c:
        c.execute(sa.insert(Instance).values(
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
            calling_ae="MODALITY", peer_address="127.0.0.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
            size_bytes=1, sha256="0" * 64, spool_path=f"{ds.SOPInstanceUID}.dcm",
            received_at=datetime.now(UTC), **ledger_values(ds, {})))
    return str(ds.StudyInstanceUID)


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=person_names(), data=st.data())
def test_any_name_is_found_in_any_case_and_as_a_prefix(
    engine: sa.Engine, name: str, data: st.DataObject
) -> None:
    study = _insert_as_ingest(engine, name)
    composed = unicodedata.normalize("NFC", name)
    for how, change in CASES.items():
        cut = data.draw(st.integers(1, len(composed)), label=f"prefix length ({how})")
        for value in (change(name), change(composed[:cut]) + "*"):
            found = _find_study(engine, study, value)
            assert [r["PatientName"] for r in found] == [name], (how, value)
    first_group = composed.split("=")[0]
    assert _find_study(engine, study, first_group + "q") == []  # one letter more: no match
    assert [r["PatientName"] for r in _find_study(engine, study, name, any_case=False)] == [name]


def test_wildcard_characters_in_a_name_are_literal(engine: sa.Engine) -> None:
    """Literal ``[``, ``]``, ``%``, ``_`` in a name are escaped for GLOB and LIKE alike, in a
    wildcard query too; full-width ＊ and ？ are letters, never wildcards."""
    odd = {name: _insert_as_ingest(engine, name)
           for name in ("O[B]RIEN^ANN", "PERCENT%^A_B", "ＳＴＡＲ＊^Ｘ", "ASTERISK^Ｘ")}
    cases = [
        ("O[B]RIEN^ANN", "o[b]rien^ann", True), ("O[B]RIEN^ANN", "o[b]rien*", True),
        ("O[B]RIEN^ANN", "o?b?rien^*", True), ("O[B]RIEN^ANN", "obrien*", False),
        ("O[B]RIEN^ANN", "o[b]*]", False),
        ("PERCENT%^A_B", "percent%^a_b", True), ("PERCENT%^A_B", "percent%^*", True),
        ("PERCENT%^A_B", "percentx^*", False), ("PERCENT%^A_B", "percent%^axb*", False),
        ("PERCENT%^A_B", "percent%^a_*", True),
        ("ＳＴＡＲ＊^Ｘ", "star＊^x", True), ("ＳＴＡＲ＊^Ｘ", "star＊*", True),
        ("ASTERISK^Ｘ", "ASTERISK＊", False), ("ASTERISK^Ｘ", "ASTERISK＾Ｘ", False),
    ]
    for name, value, expected in cases:
        found = [r["PatientName"] for r in _find_study(engine, odd[name], value)]
        assert found == ([name] if expected else []), value


YAMADA = "Yamada^Tarou=山田^太郎=やまだ^たろう"
# (stored, query, in any case?, found?): component groups and trailing delimiters, SQL only.
GROUPS = [
    (YAMADA, "y*う", True, False),               # "*" never spans a group: no group is y…う
    (YAMADA, "yamada^tarou?山田*", True, False),   # nor does "?"
    (YAMADA, "?amada^tarou", True, True),
    (YAMADA, "*^太郎", True, True),
    (YAMADA, "Yamada^Tarou=*=やまだ*", True, True),
    (YAMADA, "Yamada^Tarou=*=たろう", True, False),
    (YAMADA, "=*=*^たろう", True, True),
    (YAMADA, "Yamada^Tarou=", True, True),        # the ideographic group left empty: any
    ("Yamada^Tarou", "yamada^tarou=*", True, True),
    ("Yamada^Tarou", "yamada^tarou=山田*", True, False),
    ("DOE^JOHN^^", "doe^john", True, True),        # trailing empty components do not count
    ("DOE^JOHN^^", "DOE^JOHN", False, True),
    ("DOE^JOHN^^=ドウ^^", "DOE^JOHN=ドウ", False, True),
    ("DOE^JOHN^^=ドウ^^", "ドウ", False, True),
    ("DOE^JOHN^^=ドウ^^", "ド?", False, True),
    ("DOE^JOHN^^=ドウ^^", "DOE^J*", False, True),
    ("DOE^JOHN^^=ドウ^^", "*JOHN=ド*", False, True),
    ("DOE^JOHN", "DOE^JOHN^", False, True),
    ("DOE^JOHN", "doe^john", False, False),
]


@pytest.mark.parametrize(("stored", "value", "any_case", "expected"), GROUPS)
def test_component_groups(engine: sa.Engine, stored: str, value: str, any_case: bool,
                          expected: bool) -> None:
    study = _insert_as_ingest(engine, stored)
    assert len(_find_study(engine, study, value, any_case)) == int(expected)


def _reference(stored: str, value: str, any_case: bool) -> bool:
    """The matching rules of gateway.query.matching, written plainly in Python."""
    def groups(name: str) -> list[str]:
        found = [g.rstrip("^") for g in name.split("=")] + ["", ""]
        return found[:3]

    def matches(group: str, query: str) -> bool:
        parts = re.split(r"([*?^])", query)
        text = "".join({"*": ".*", "?": "."}.get(p) or re.escape(fold(p) if any_case else p)
                       for p in parts)
        return re.fullmatch(text, group, re.DOTALL) is not None

    have = groups(fold_name(stored) or "" if any_case else stored)
    asked = [g.strip(" ").rstrip("^") for g in value.strip(" ").split("=")][:3]
    wanted = [(i, g) for i, g in enumerate(asked) if g.strip("*")]
    if not wanted:
        return True
    if len(asked) == 1:
        return any(matches(group, wanted[0][1]) for group in have)
    return all(matches(have[i], g) for i, g in wanted)


@st.composite
def name_queries(draw: st.DrawFn) -> tuple[str, str]:
    """A stored name and a query made from it or from another name: its case changed, letters
    turned to ``?``, runs to ``*``, groups dropped or emptied."""
    stored = draw(person_names())
    source = draw(st.sampled_from([stored, draw(person_names())]))
    source = draw(st.sampled_from(list(CASES.values())))(source)
    chars = list(source)
    for _ in range(draw(st.integers(0, 3))):
        if chars:
            at = draw(st.integers(0, len(chars) - 1))
            end = draw(st.integers(at, min(len(chars), at + 4)))
            chars[at:end] = [draw(st.sampled_from(["*", "?"]))]
    query = "".join(chars)
    if "=" in query and draw(st.booleans()):  # one wildcard over several groups
        query = "".join(draw(st.sampled_from("*?")) if c == "=" else c for c in query)
    groups = query.split("=")
    if len(groups) > 1 and draw(st.booleans()):
        groups[draw(st.integers(0, len(groups) - 1))] = draw(st.sampled_from(["", "*"]))
    if draw(st.booleans()):
        groups = groups[:draw(st.integers(1, len(groups)))]
    return stored, "=".join(groups)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=name_queries(), any_case=st.booleans())
def test_sql_matches_the_rules_on_both_databases(
    engine: sa.Engine, case: tuple[str, str], any_case: bool
) -> None:
    """Whatever the name and the query, the SQL conditions (GLOB on SQLite, LIKE on
    PostgreSQL, groups cut or not) answer what the plain rules answer."""
    stored, value = case
    study = _insert_as_ingest(engine, stored)
    found = len(_find_study(engine, study, value, any_case)) == 1
    assert found == _reference(stored, value, any_case), (stored, value)


@settings(max_examples=200, deadline=None)
@given(name=person_names())
def test_migration_copy_of_the_fold_is_the_fold(name: str) -> None:
    """Migration 0006 fills existing rows with its own copy of fold_name: they must agree."""
    assert _migration_0006()._fold(name) == fold_name(name)


def test_fold_never_makes_a_delimiter_or_wildcard() -> None:
    """Every code point: a folded name splits into the same groups and components, and a folded
    query keeps its wildcards only where the caller typed them."""
    special = set("=^*?\\")
    made = [hex(code) for code in range(0x110000) if not 0xD800 <= code <= 0xDFFF
            and chr(code) not in special and special & set(fold(chr(code)))]
    assert made == []


def _migration_0006() -> Any:
    path = MIGRATIONS / "versions" / "0006_folded_names_verify_misses.py"
    spec = importlib.util.spec_from_file_location("migration_0006", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_from_before_the_folded_column_match_after_the_upgrade(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0005")
        instances = sa.table("instances", *(sa.column(c) for c in (
            "sop_instance_uid", "sop_class_uid", "study_instance_uid", "series_instance_uid",
            "calling_ae", "peer_address", "transfer_syntax_uid", "size_bytes", "sha256",
            "spool_path", "received_at", "patient_name", "referring_physician_name")))
        studies = {}
        with engine.begin() as c:
            for label, name, _ in NAMES:
                studies[label] = generate_uid()
                c.execute(sa.insert(instances).values(
                    sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    study_instance_uid=studies[label], series_instance_uid=generate_uid(),
                    calling_ae="MODALITY", peer_address="127.0.0.1",
                    transfer_syntax_uid="1.2.840.10008.1.2.1", size_bytes=1, sha256="0" * 64,
                    spool_path=f"{label}.dcm", received_at=datetime.now(UTC), patient_name=name,
                    referring_physician_name=REFERRING.get(label, (None,))[0]))
        upgrade(engine)

        folded = {tuple(r) for r in rows(db_url, "SELECT patient_name, patient_name_folded, "
                                         "referring_physician_name, referring_physician_name_folded "
                                         "FROM instances")}
        assert folded == {(name, fold_name(name), REFERRING.get(label, (None,))[0],
                           fold_name(REFERRING.get(label, (None,))[0]))
                          for label, name, _ in NAMES}
        for value, label in (("müller^jürgen", "DE-MUELLER"), ("*ΝΊΚΟΣ", "EL-PAPADOP"),
                             ("ИВАНОВА^АЛЁНА", "RU-IVANOVA"), ("=山田^花子", "JP-HANAKO"),
                             ("ヤマダ^ハナコ", "JP-HANAKO"), ("KÖNIG^EVA", "DE-KOENIG")):
            assert len(_find_study(engine, studies[label], value)) == 1, value
    finally:
        engine.dispose()


# -- names the remap stage writes: at ingest (a plan) and on release (an operator's assignment) --

REMAP_RULES = ('[[rules]]\nname = "identity"\nmatch = { calling_ae = ["CT1"] }\n'
               'actions = [{ type = "map_identity", unmatched = "hold" }]\n')


def test_remapped_names_are_matched_as_they_now_read(
    served: Any, tmp_path: Path, db_url: str
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(REMAP_RULES, encoding="utf-8")
    server = served(db=db_url, remap={"rules_file": str(rules), "issuer_of_patient_id": "HOSPITAL"},
                    security={"unknown_callers": ["echo", "store"],
                              "peers": [{"ae_title": "VIEWER", "services": ["find"]}]})
    gateway = str(GATEWAY_BIN)
    (tmp_path / "identities.csv").write_text(
        'issuer,local_id,mrn,patient_name\nCT1,DEV-EL,MRN-EL,"Ηλιόπουλος^Σοφία"\n', encoding="utf-8")
    (tmp_path / "orders.csv").write_text(
        "accession_number,mrn,modality,scheduled_at,patient_name\n"
        "ACC-RU,MRN-RU,CT,2026-11-23T10:00,Кузнецова^Дарья\n", encoding="utf-8")
    for kind in ("identities", "orders"):
        done = subprocess.run([gateway, kind, "import", str(tmp_path / f"{kind}.csv"),
                               "--config", str(server.config_path)],
                              check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    known = write_file(make_dataset(PatientID="DEV-EL", AccessionNumber="ACC-EL"),
                       tmp_path / "remap" / "known.dcm")
    unknown = write_file(make_dataset(PatientID="DEV-XX", AccessionNumber="ACC-RU"),
                         tmp_path / "remap" / "unknown.dcm")
    held_study = pydicom.dcmread(unknown).StudyInstanceUID
    sent = dcmtk("storescu", "-aet", "CT1", "-aec", "GATEWAY", "127.0.0.1", str(server.port),
                 str(known), str(unknown))
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: {r.remap_state for r in rows(server.db_url, "SELECT remap_state FROM instances")}
             == {"done", "held"}, 30, "one instance remapped, one held")
    assigned = subprocess.run([gateway, "reconcile", "assign", held_study, "ACC-RU", "--by", "alice",
                               "--config", str(server.config_path)],
                              check=False, capture_output=True, text=True, timeout=60)
    assert assigned.returncode == 0, assigned.stderr

    def accessions(value: str, charset: str) -> set[str]:
        return {str(a.AccessionNumber) for a in find_names(server.port, tmp_path, "PatientName",
                                                           value, charset)}

    assert accessions("ΗΛΙΌΠΟΥΛΟΣ^ΣΟΦΊΑ", "ISO_IR 126") == {"ACC-EL"}  # planned at ingest
    assert accessions("кузнецова*", "ISO_IR 144") == {"ACC-RU"}          # released on assignment
    assert accessions("test^patient", "ISO_IR 192") == set()             # the received name


def test_orthanc_finds_names_in_any_case(
    make_gateway: Callable[..., Gateway], orthanc_factory: Callable[..., Any], tmp_path: Path,
) -> None:
    """Orthanc querying the gateway through its REST API, as a PACS would. Orthanc encodes its
    queries in its DefaultEncoding (Latin1 unless configured; it drops what Latin1 lacks, so a
    Greek query reaches any SCP as ``*``): Latin-1 names here, the other scripts above."""
    from tests.conftest import free_port

    port = free_port()
    orthanc = orthanc_factory(modalities={"gateway": ("GATEWAY", "127.0.0.1", port)})
    app = make_gateway(dicom={"port": port}, security={
        "unknown_callers": ["echo", "store"],
        "peers": [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
                   "services": ["echo", "find"]}]})
    archive_of_names(lambda **_: app, tmp_path, "", True)
    expected = {
        "müller*": {("DE-MUELLER", "MÜLLER^JÜRGEN")},
        "*jürgen": {("DE-MUELLER", "MÜLLER^JÜRGEN")},
        "Müller^Jürgen": {("DE-MUELLER", "MÜLLER^JÜRGEN")},
        "STRAUSS^ÄNNE": {("DE-STRAUSS", "Strauß^Änne")},
        "LEFÈVRE^HÉLÈNE": {("FR-LEFEVRE", "Lefèvre^Hélène")},
        # stored decomposed: Orthanc's Latin1 keeps the o and drops the combining diaeresis
        "könig*": {("DE-KOENIG", "Konig^Eva")},
    }
    found = {}
    for value in expected:
        query = orthanc.post_json("/modalities/gateway/query", {
            "Level": "Study", "Query": {"PatientName": value, "AccessionNumber": ""}})
        answers = orthanc.get_json(f"/queries/{query['ID']}/answers?expand")
        found[value] = {(a["0008,0050"]["Value"], a["0010,0010"]["Value"]) for a in answers}
    assert found == expected
