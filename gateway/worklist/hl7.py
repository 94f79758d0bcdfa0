"""HL7 v2 order messages (ORM^O01, OMI^O23) into the ``orders`` table, each answered with an ACK.

One job: one message, as MLLP delivered it (bytes), becomes changes of ``orders`` and the
original-mode acknowledgement saying what happened (HL7 v2.5 chapter 2, 2.9.2). Invariants:

- One database transaction per message: its orders are applied whole or not at all. Every
  message, accepted or not, is kept in ``hl7_messages`` with its ACK code and error. It is kept in
  full there because it holds patient data, and for the same reason never reaches the service log:
  log lines carry the peer, message type, control ID, ACK code and error location only.
- Idempotent, keyed by accession number: the same NW twice leaves one order, unchanged. Each
  change is one audit row (actor ``hl7:<MSH-3>``) whose detail says what changed and links the
  ``hl7_messages`` row.
- Every message gets an answer: MSA-1 ``AA`` (applied), ``AE`` (content error: a required field
  missing or invalid, an unknown order; ERR-2 names segment^sequence^field, e.g. ``PID^1^3``) or
  ``AR`` (rejected: not HL7, malformed MSH, unsupported message type or trigger, too large, or the
  gateway could not store it; the sender may send it again). MSA-2 echoes MSH-10. The ACK's MSH
  swaps sender and receiver (MSH-3/4 from ``[hl7]``), copies MSH-11, MSH-12 and MSH-18, and is
  encoded in the request's character set. ERR carries ERR-1 (for v2.3/2.4 readers), ERR-2, ERR-3
  (HL7 table 0357 code) and ERR-4 ``E``; MSA-3 and ERR-8 say it in words, naming fields, never
  values.

Library: python-hl7 (``hl7`` on PyPI, BSD). It parses any 2.x message into nested lists by
position, unescapes values (``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh\\``, HL7 v2.5 2.7) and parses DTM
values; it has no dependencies and is maintained (commits in 2025). hl7apy, the alternative, builds
messages from version-specific structure tables: a v2.3 ORM with a Z segment or an OMI declared
as 2.3 fits them badly, and it hands values back still escaped. Its MLLP support (``hl7.mllp``) is
not used: it decodes every message of a connection with one fixed encoding, before MSH-18 can be
read, and hands over no raw bytes to keep; the framing lives in ``gateway.worklist.mllp``. One
python-hl7 0.4.5 habit is contained here: on an escape sequence it cannot read it logs the field
(patient data) through the deprecated ``Logger.warn``, so its module loggers are replaced with one
that discards (``_Discard``); the sequence is dropped from the value, as python-hl7 drops it.

Character sets (HL7 table 0211, MSH-18 first repetition; ``hl7.default_charset`` when absent, the
standard's ASCII being a subset of the default UTF-8): the header is read as Latin-1 (every byte
is a character, and MSH-1..18 are ASCII in every set read here), then the whole message is decoded
in its own set. A set this gateway does not read is ``AR`` (MSH^1^18); bytes invalid in the declared
set are ``AE`` (MSH^1^18). Segments end in CR (2.5.4); CR LF and LF are read as CR.

Mapping (HL7 v2.5 chapter 4: ORC, OBR, TQ1, IPC; chapter 3: PID, PV1; as IHE Radiology Scheduled
Workflow maps them to the DICOM worklist):

======================= ============================================================
orders column           HL7 field
======================= ============================================================
mrn                     PID-3.1 (CX; the repetition with type MR, PID-3.5, else the first)
issuer_of_patient_id    PID-3.4.1 (assigning authority, namespace ID) of that repetition
patient_name            PID-5 (XPN, the legal name PID-5.7 = L, else the first) as DICOM PN
                        family^given^middle^prefix^suffix (PS3.5 6.2)
birth_date, sex         PID-7 (first 8 digits), PID-8 (F, M, O; A and N -> O; others none)
referring_physician     PV1-8 (XCN: family PV1-8.2, given .3, middle .4, suffix .5, prefix .6)
(order control)         ORC-1 (table 0119): NW new, XO change, CA cancel, DC discontinue
placer/filler number    ORC-2.1 / ORC-3.1, else OBR-2.1 / OBR-3.1
accession_number        IPC-1.1 when IPC is present, else ``hl7.accession_field`` (OBR-18)
requested_procedure_id  IPC-2.1, else OBR-19.1 (unless OBR-19 holds the accession)
requested_procedure_    OBR-4.2 (universal service ID text; else OBR-4.1), cut to 64 (LO)
description
study_instance_uid      IPC-3.1, else ZDS-1.1 (IHE's Z segment for ORM)
modality                IPC-5.1, else OBR-24 (table 0074 codes mapped by ``hl7.modalities``)
scheduled_at            TQ1-7, else ORC-7.4, OBR-27.4, OBR-36 (DTM; a zone converts to local
                        time, as ``orders.scheduled_at`` is local wall-clock time)
performing_physician    OBR-34.1 (technician, CNN subcomponents: family &2, given &3, ...)
scheduled_station_ae    IPC-9, else ``hl7.station_ae_by_modality[modality]``
scheduled_station_name  IPC-7.1
procedure_steps         one per IPC segment, JSON {step_id: IPC-4.1, description: IPC-6.2
                        else the procedure's, modality: IPC-5.1, station_ae: IPC-9, start: ISO
                        local date-time}
======================= ============================================================

Order control: NW creates the order (NW again with the same values: unchanged; with other values:
``AE`` 205, send XO). XO changes a scheduled or in-progress order found by accession, else filler,
else placer number: an empty field keeps the stored value, ``""`` (HL7 null) clears it. CA marks
it ``cancelled``, DC ``discontinued`` (again: unchanged); neither can end a completed order
(``AE``). XO, CA and DC for an unknown order are ``AE`` 204. A message may carry several ORC
groups: all or nothing.
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import hl7
import hl7.containers
import hl7.util
from pydantic import Field, ValidationError, field_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from gateway import audit
from gateway.db.models import Hl7Message, Order
from gateway.remap.imports import OrderRow

if TYPE_CHECKING:
    from gateway.config import Hl7Config
    from gateway.metrics import Metrics

log = logging.getLogger(__name__)


class _Discard:
    """Stands in for python-hl7 0.4.5's module loggers (``hl7.util``, ``hl7.containers``), which
    log a value they cannot unescape (patient data) and use the deprecated ``Logger.warn``."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return _ignore


def _ignore(*args: object, **kwargs: object) -> None:
    """Nothing: the value is dropped, as python-hl7 drops it; the message is kept in the DB."""


hl7.util.logger = _Discard()
hl7.containers.logger = _Discard()

# HL7 table 0211 -> Python codec, for the sets in which MSH and the separators are ASCII bytes.
CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "8859/1": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "ISO IR87": "iso2022_jp",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
}
SUPPORTED = {("ORM", "O01"), ("OMI", "O23")}
ORDER_CONTROLS = ("NW", "XO", "CA", "DC")
AckCode = Literal["AA", "AE", "AR"]
# HL7 table 0357 (message error condition codes)
REQUIRED_FIELD_MISSING = 101
DATA_TYPE_ERROR = 102
TABLE_VALUE_NOT_FOUND = 103
SEGMENT_SEQUENCE_ERROR = 100
UNSUPPORTED_MESSAGE_TYPE = 200
UNSUPPORTED_EVENT_CODE = 201
UNSUPPORTED_VERSION_ID = 203
UNKNOWN_KEY = 204
DUPLICATE_KEY = 205
INTERNAL_ERROR = 207
_CODE_TEXT = {
    100: "Segment sequence error", 101: "Required field missing", 102: "Data type error",
    103: "Table value not found", 200: "Unsupported message type", 201: "Unsupported event code",
    203: "Unsupported version id", 204: "Unknown key identifier", 205: "Duplicate key identifier",
    207: "Application internal error",
}
_DTM = re.compile(r"\d{8}(\d{2}(\d{2}(\d{2}(\.\d{1,4})?)?)?)?([+-]\d{4})?")
_MODALITY = re.compile(r"[A-Z0-9_]{1,16}")  # PS3.5 CS
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O"}
LONG_STRING = 64  # PS3.5 LO
NULL = '""'  # HL7 v2.5 2.5.3: "delete the value"


@dataclass(frozen=True)
class Location:
    """Where an error is: ERR-2 (ERL) segment ID ^ sequence ^ field position (HL7 v2.5 2.A.26)."""

    segment: str
    sequence: int = 1
    field: int | None = None

    def er7(self, component: str = "^") -> str:
        parts = [self.segment, str(self.sequence)] + ([str(self.field)] if self.field else [])
        return component.join(parts)

    def __str__(self) -> str:
        return self.er7()


class Hl7Error(Exception):
    """A message answered with AE or AR; ``text`` names fields, never values."""

    def __init__(self, ack: AckCode, code: int, where: Location, text: str) -> None:
        super().__init__(f"{where} {code}: {text}")
        self.ack: AckCode = ack
        self.code = code
        self.where = where
        self.text = text
        self.accession_number: str | None = None  # of the order it is about, when known


def _content(code: int, where: Location, text: str) -> Hl7Error:
    return Hl7Error("AE", code, where, text)


def _reject(code: int, where: Location, text: str) -> Hl7Error:
    return Hl7Error("AR", code, where, text)


# --- reading: bytes -> header and message ------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """What the ACK needs from MSH (HL7 v2.5 2.15.9), as ER7 text (escaped, so copied as is)."""

    field_separator: str
    encoding_characters: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    message_code: str
    trigger_event: str
    control_id: str
    processing_id: str
    version: str
    charset: str  # MSH-18 as sent (ER7), echoed in the ACK
    codec: str  # the Python codec these fields were decoded with; the ACK is encoded with it
    declared_codec: str | None  # the one MSH-18 (or the default) names; None: not one we read

    @property
    def message_type(self) -> str:
        return f"{self.message_code}^{self.trigger_event}".strip("^")

    @property
    def sender(self) -> str:
        """MSH-3.1 (namespace ID), for the audit actor."""
        return self.sending_application.split(self.encoding_characters[:1] or "^")[0]


def _segments(text: str) -> str:
    """CR-terminated segments (HL7 v2.5 2.5.4), whatever line ends an editor or engine wrote."""
    return text.replace("\r\n", "\r").replace("\n", "\r")


def _parse(text: str) -> hl7.Message:
    """python-hl7's parse, with MSH-1 and MSH-2 checked first so that what it raises is rare."""
    if not text.startswith("MSH") or len(text) < 8:
        raise _reject(SEGMENT_SEQUENCE_ERROR, Location("MSH"),
                      "the message does not begin with an MSH segment")
    field_separator = text[3]
    ends = [i for i in (text.find(field_separator, 4), text.find("\r", 4)) if i >= 0]
    encoding = text[4:min(ends, default=len(text))]
    separators = field_separator + encoding
    if (len(encoding) not in (4, 5) or len(set(separators)) != len(separators)
            or any(c.isalnum() or c.isspace() for c in separators)):
        raise _reject(DATA_TYPE_ERROR, Location("MSH", 1, 2),
                      "MSH-1 and MSH-2 must be the separator characters, e.g. |^~\\&")
    try:
        return hl7.parse(text)
    except (hl7.ParseException, IndexError, ValueError, KeyError, TypeError) as exc:
        raise _reject(SEGMENT_SEQUENCE_ERROR, Location("MSH"),
                      f"not a readable HL7 v2 message ({type(exc).__name__})") from None


def _value(segment: Any, field_num: int, repeat: int = 1, component: int = 1,
           sub: int = 1) -> str:
    """One unescaped value by position (1-based, as HL7 numbers them); '' when absent."""
    try:
        value = segment.extract_field(1, field_num, repeat, component, sub)
    except (IndexError, KeyError, TypeError, AttributeError):
        return ""
    return str(value).strip()


def _raw(segment: Any, field_num: int) -> str:
    """A field as sent (ER7, escaped), for copying into the ACK."""
    try:
        return str(segment(field_num)) if field_num < len(segment) else ""
    except (IndexError, TypeError):
        return ""


def _header(message: hl7.Message, codec: str, default_charset: str) -> Header:
    msh = message.segment("MSH")
    name = _value(msh, 18).upper() or default_charset
    return Header(
        field_separator=str(msh(1)), encoding_characters=str(msh(2)),
        sending_application=_raw(msh, 3), sending_facility=_raw(msh, 4),
        receiving_application=_raw(msh, 5), receiving_facility=_raw(msh, 6),
        message_code=_value(msh, 9, 1, 1), trigger_event=_value(msh, 9, 1, 2),
        control_id=_value(msh, 10), processing_id=_raw(msh, 11), version=_value(msh, 12),
        charset=_raw(msh, 18), codec=codec, declared_codec=CHARSETS.get(name),
    )


def read_header(raw: bytes, default_charset: str) -> Header:
    """MSH from the raw bytes read as Latin-1 (see the module docstring); its ``codec`` is
    Latin-1 then, so that an ACK built from it gives the sender back its own bytes."""
    return _header(_parse(_segments(raw.decode("latin-1"))), "latin-1", default_charset)


def check_header(header: Header) -> None:
    """What makes a message unacceptable before its content is read (HL7 v2.5 2.9.2.1): AR."""
    if header.declared_codec is None:
        raise _reject(TABLE_VALUE_NOT_FOUND, Location("MSH", 1, 18),
                      f"MSH-18 names a character set this gateway does not read; use one of: "
                      f"{', '.join(CHARSETS)}")
    if not header.message_code:
        raise _reject(REQUIRED_FIELD_MISSING, Location("MSH", 1, 9),
                      "MSH-9 message type is missing")
    if not header.control_id:
        raise _reject(REQUIRED_FIELD_MISSING, Location("MSH", 1, 10),
                      "MSH-10 message control ID is missing")
    if header.version and not header.version.startswith("2."):
        raise _reject(UNSUPPORTED_VERSION_ID, Location("MSH", 1, 12),
                      "MSH-12 must name an HL7 version 2.x")
    if header.message_code not in {code for code, _ in SUPPORTED}:
        raise _reject(UNSUPPORTED_MESSAGE_TYPE, Location("MSH", 1, 9),
                      "only ORM (O01) and OMI (O23) order messages are read here")
    if (header.message_code, header.trigger_event) not in SUPPORTED:
        raise _reject(UNSUPPORTED_EVENT_CODE, Location("MSH", 1, 9),
                      "only ORM (O01) and OMI (O23) order messages are read here")


def read_message(raw: bytes, header: Header, default_charset: str) -> tuple[Header, hl7.Message]:
    """The message decoded in its own character set, and its header read again from it."""
    codec = header.declared_codec or "latin-1"
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError:
        raise _content(DATA_TYPE_ERROR, Location("MSH", 1, 18),
                       "the message has bytes that are not valid in the character set MSH-18 "
                       "names (or hl7.default_charset, when MSH-18 is empty)") from None
    message = _parse(_segments(text))
    return _header(message, codec, default_charset), message


# --- mapping: message -> orders ----------------------------------------------------------------


class Hl7OrderRow(OrderRow):
    """An order as the import validates it (gateway.remap.imports), with the worklist columns."""

    issuer_of_patient_id: str | None = Field(None, max_length=64)
    scheduled_station_ae: str | None = Field(None, max_length=16, pattern=r"^[^\\]*$")
    scheduled_station_name: str | None = Field(None, max_length=16)
    performing_physician: str | None = Field(None, max_length=324)
    referring_physician: str | None = Field(None, max_length=324)
    procedure_steps: str | None = None
    placer_order_number: str | None = Field(None, max_length=64)
    filler_order_number: str | None = Field(None, max_length=64)

    @field_validator("*")
    @classmethod
    def _no_control_characters(cls, value: Any) -> Any:
        """DICOM's text VRs take no C0 control characters (PS3.5 6.1.3), nor does PostgreSQL
        take NUL: refused here (AE naming the field) rather than failing the store (AR)."""
        if isinstance(value, str) and _CONTROL.search(value):
            raise ValueError("control characters (below 0x20, or 0x7F) are not allowed")
        return value


COLUMNS = tuple(name for name in Hl7OrderRow.model_fields if name != "status")


@dataclass
class OrderRequest:
    """One ORC group. ``values``: None = not sent (kept on change), '' = HL7 null (cleared)."""

    control: str
    orc: Location
    values: dict[str, Any] = field(default_factory=dict)
    where: dict[str, Location] = field(default_factory=dict)

    def put(self, column: str, value: Any, where: Location) -> None:
        if value is None or value == "":
            value = None
        elif value == NULL:
            value = ""
        self.values[column] = value
        self.where[column] = where

    def sent(self, column: str) -> Any:
        value = self.values.get(column)
        return None if value == "" else value


@dataclass
class _Segment:
    name: str
    sequence: int  # its occurrence in the message, from 1 (ERL-2)
    segment: Any

    def at(self, field_num: int) -> Location:
        return Location(self.name, self.sequence, field_num)

    def get(self, field_num: int, repeat: int = 1, component: int = 1, sub: int = 1) -> str:
        return _value(self.segment, field_num, repeat, component, sub)


def _walk(message: hl7.Message) -> Iterator[_Segment]:
    seen: dict[str, int] = {}
    for segment in message:
        name = str(segment[0]).strip()
        seen[name] = seen.get(name, 0) + 1
        yield _Segment(name, seen[name], segment)


def _person_name(family: str, given: str, middle: str, suffix: str, prefix: str) -> str | None:
    """DICOM PN family^given^middle^prefix^suffix (PS3.5 6.2.1), trailing empties dropped;
    '^', '=' and '\\' inside a component (after unescaping) become spaces."""
    parts = [re.sub(r"[\^=\\]", " ", p).strip() for p in (family, given, middle, prefix, suffix)]
    name = "^".join(parts).rstrip("^")
    return name or None


def _xpn(seg: _Segment, field_num: int) -> str | None:
    repeat = 1
    for r in range(1, 10):
        if not seg.get(field_num, r, 1) and not seg.get(field_num, r, 2):
            break
        if seg.get(field_num, r, 7) == "L":
            repeat = r
            break
    if seg.get(field_num, repeat, 1) == NULL:
        return NULL
    return _person_name(seg.get(field_num, repeat, 1), seg.get(field_num, repeat, 2),
                        seg.get(field_num, repeat, 3), seg.get(field_num, repeat, 4),
                        seg.get(field_num, repeat, 5))


def _xcn(seg: _Segment, field_num: int) -> str | None:
    if seg.get(field_num) == NULL:
        return NULL
    return _person_name(seg.get(field_num, 1, 2), seg.get(field_num, 1, 3),
                        seg.get(field_num, 1, 4), seg.get(field_num, 1, 5),
                        seg.get(field_num, 1, 6))


def _cnn(seg: _Segment, field_num: int) -> str | None:
    if seg.get(field_num) == NULL:
        return NULL
    return _person_name(*(seg.get(field_num, 1, 1, s) for s in (2, 3, 4, 5, 6)))


def _dtm(value: str, where: Location) -> datetime | str | None:
    """A DTM (YYYYMMDD[HH[MM[SS[.S]]]][+/-ZZZZ]) as local wall-clock time."""
    if not value or value == NULL:
        return value or None
    if not _DTM.fullmatch(value):
        raise _content(DATA_TYPE_ERROR, where,
                       f"{where.segment}-{where.field} must be a date and time, YYYYMMDDHHMM[SS]")
    try:
        parsed: datetime = hl7.parse_datetime(value)
    except ValueError:
        raise _content(DATA_TYPE_ERROR, where,
                       f"{where.segment}-{where.field} is not a valid date and time") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone().replace(tzinfo=None)
    return parsed


def _patient(request: OrderRequest, pid: _Segment | None, pv1: _Segment | None) -> None:
    if pid is not None:
        repeat = 1
        for r in range(1, 10):
            if not pid.get(3, r, 1):
                break
            if pid.get(3, r, 5) == "MR":
                repeat = r
                break
        request.put("mrn", pid.get(3, repeat, 1), pid.at(3))
        request.put("issuer_of_patient_id", pid.get(3, repeat, 4, 1), pid.at(3))
        request.put("patient_name", _xpn(pid, 5), pid.at(5))
        birth = pid.get(7)
        request.put("birth_date", birth if birth == NULL else birth[:8], pid.at(7))
        sex = pid.get(8).upper()
        request.put("sex", NULL if sex == NULL else _SEX.get(sex), pid.at(8))
    if pv1 is not None:
        request.put("referring_physician", _xcn(pv1, 8), pv1.at(8))


def _modality(value: str, where: Location, config: Hl7Config) -> str | None:
    if not value or value == NULL:
        return value or None
    modality = config.modalities.get(value.upper(), value.upper())
    if not _MODALITY.fullmatch(modality):
        raise _content(DATA_TYPE_ERROR, where,
                       f"{where.segment}-{where.field} must be a modality code (CT, MR, ...) or "
                       "one that hl7.modalities maps to one")
    return modality


def _keys(request: OrderRequest, orc: _Segment, group: list[_Segment],
          config: Hl7Config) -> None:
    """The numbers that identify the order: placer, filler, accession (never raises)."""
    obr = next((s for s in group if s.name == "OBR"), None)
    ipcs = [s for s in group if s.name == "IPC"]
    by_name = {"ORC": orc, "OBR": obr}

    request.put("placer_order_number", orc.get(2) or (obr.get(2) if obr else ""),
                orc.at(2) if orc.get(2) or not obr else obr.at(2))
    request.put("filler_order_number", orc.get(3) or (obr.get(3) if obr else ""),
                orc.at(3) if orc.get(3) or not obr else obr.at(3))
    if ipcs:
        request.put("accession_number", ipcs[0].get(1), ipcs[0].at(1))
    else:
        name, _, number = config.accession_field.partition("-")
        source = by_name[name]
        where = source.at(int(number)) if source else Location(name, 1, int(number))
        request.put("accession_number", source.get(int(number)) if source else None, where)


def _order(request: OrderRequest, orc: _Segment, group: list[_Segment],
           config: Hl7Config) -> None:
    """Everything else the order says, after ``_keys``."""
    obr = next((s for s in group if s.name == "OBR"), None)
    tq1 = next((s for s in group if s.name == "TQ1"), None)
    zds = next((s for s in group if s.name == "ZDS"), None)
    ipcs = [s for s in group if s.name == "IPC"]

    # The start: TQ1-7 (v2.5), else the deprecated TQ in ORC-7.4 / OBR-27.4, else OBR-36
    starts = [(tq1.get(7), tq1.at(7))] if tq1 is not None else []
    starts.append((orc.get(7, 1, 4), orc.at(7)))
    if obr is not None:
        starts += [(obr.get(27, 1, 4), obr.at(27)), (obr.get(36), obr.at(36))]
    preferred = tq1.at(7) if tq1 is not None else obr.at(27) if obr is not None else orc.at(7)
    start, where = next(((v, w) for v, w in starts if v), ("", preferred))
    request.put("scheduled_at", _dtm(start, where), where)

    if obr is not None:
        description = obr.get(4, 1, 2) or obr.get(4, 1, 1)
        request.put("requested_procedure_description",
                    description if description == NULL else description[:LONG_STRING], obr.at(4))
        request.put("modality", _modality(obr.get(24), obr.at(24), config), obr.at(24))
        request.put("performing_physician", _cnn(obr, 34), obr.at(34))
        if config.accession_field != "OBR-19":
            request.put("requested_procedure_id", obr.get(19), obr.at(19))
    if zds is not None:
        request.put("study_instance_uid", zds.get(1), zds.at(1))
    if ipcs:
        _steps(request, ipcs, config)
    if request.values.get("scheduled_station_ae") is None:
        modality = request.sent("modality")
        if modality and modality in config.station_ae_by_modality:
            request.put("scheduled_station_ae", config.station_ae_by_modality[modality],
                        Location("IPC", 1, 9))


def _steps(request: OrderRequest, ipcs: list[_Segment], config: Hl7Config) -> None:
    first = ipcs[0]
    request.put("requested_procedure_id", first.get(2), first.at(2))
    request.put("study_instance_uid", first.get(3), first.at(3))
    modality = _modality(first.get(5), first.at(5), config)
    if modality:
        request.put("modality", modality, first.at(5))
    request.put("scheduled_station_name", first.get(7), first.at(7))
    request.put("scheduled_station_ae", first.get(9), first.at(9))
    start = request.sent("scheduled_at")
    steps = []
    for ipc in ipcs:
        step_id = ipc.get(4)
        if not step_id or step_id == NULL:
            raise _content(REQUIRED_FIELD_MISSING, ipc.at(4),
                           "IPC-4 scheduled procedure step ID is missing")
        if len(step_id) > 16:
            raise _content(DATA_TYPE_ERROR, ipc.at(4),
                           "IPC-4 scheduled procedure step ID is longer than 16 characters (SH)")
        if ipc.sequence > 1 and ipc.get(1) and ipc.get(1) != first.get(1):
            raise _content(DATA_TYPE_ERROR, ipc.at(1),
                           "every IPC of one order must carry the same IPC-1 accession number")
        step_modality = _modality(ipc.get(5), ipc.at(5), config) or request.sent("modality")
        station = ipc.get(9) or config.station_ae_by_modality.get(step_modality or "")
        if station and (len(station) > 16 or "\\" in station):
            raise _content(DATA_TYPE_ERROR, ipc.at(9),
                           "IPC-9 must be an AE title: at most 16 characters, no backslash")
        description = ipc.get(6, 1, 2) or request.sent("requested_procedure_description")
        steps.append({
            "step_id": step_id,
            "description": description[:LONG_STRING] if description else None,
            "modality": step_modality,
            "station_ae": station or None,
            "start": start.isoformat() if isinstance(start, datetime) else None,
        })
    if len({s["step_id"] for s in steps}) != len(steps):
        raise _content(DUPLICATE_KEY, ipcs[-1].at(4),
                       "two IPC segments of one order carry the same IPC-4 step ID")
    request.put("procedure_steps", json.dumps(steps, ensure_ascii=False), first.at(4))


def order_requests(message: hl7.Message, config: Hl7Config) -> list[OrderRequest]:
    """Every ORC group of an ORM^O01 / OMI^O23, with the patient's PID and PV1."""
    segments = list(_walk(message))
    pid = next((s for s in segments if s.name == "PID"), None)
    pv1 = next((s for s in segments if s.name == "PV1"), None)
    groups: list[tuple[_Segment, list[_Segment]]] = []
    for seg in segments:
        if seg.name == "ORC":
            groups.append((seg, []))
        elif groups and seg.name in ("OBR", "TQ1", "IPC", "ZDS"):
            groups[-1][1].append(seg)
    if not groups:
        raise _content(REQUIRED_FIELD_MISSING, Location("ORC"), "the message has no ORC segment")
    requests = []
    for orc, group in groups:
        request = OrderRequest(orc.get(1).upper(), Location("ORC", orc.sequence, 1))
        _keys(request, orc, group, config)
        try:
            if not request.control:
                raise _content(REQUIRED_FIELD_MISSING, orc.at(1), "ORC-1 order control is missing")
            if request.control not in ORDER_CONTROLS:
                raise _content(TABLE_VALUE_NOT_FOUND, orc.at(1),
                               "ORC-1 order control must be NW, XO, CA or DC")
            _patient(request, pid, pv1)
            _order(request, orc, group, config)
            if request.control == "NW":
                _require_new(request)
        except Hl7Error as exc:  # kept with the refused message, so that it can be found
            exc.accession_number = request.sent("accession_number")
            raise
        requests.append(request)
    return requests


def _require_new(request: OrderRequest) -> None:
    """What a new order cannot do without; the location names the field to fill."""
    needed = [("accession_number", "the accession number"), ("mrn", "the patient ID"),
              ("modality", "the modality"), ("scheduled_at", "the scheduled start")]
    absent = {"mrn": Location("PID", 1, 3), "modality": Location("OBR", 1, 24)}
    for column, what in needed:
        if request.sent(column) is None:
            where = request.where.get(column) or absent.get(column, request.orc)
            raise _content(REQUIRED_FIELD_MISSING, where,
                           f"{what} ({where.segment}-{where.field}) is required for a new order")


# --- applying: requests -> rows ----------------------------------------------------------------


@dataclass
class Applied:
    outcome: str  # added, updated, unchanged, cancelled, discontinued
    accession_number: str


def _validated(values: dict[str, Any], request: OrderRequest) -> dict[str, Any]:
    try:
        row = Hl7OrderRow.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        column = str(first["loc"][0]) if first["loc"] else "accession_number"
        where = request.where.get(column, request.orc)
        message = str(first["msg"]).removeprefix("Value error, ")
        raise _content(DATA_TYPE_ERROR, where,
                       f"{where.segment}-{where.field} ({column}): {message}") from None
    return row.model_dump(exclude={"status"})


def _find(session: Session, request: OrderRequest) -> Order | None:
    """By accession number; a change or cancel may name the order by its numbers instead."""
    keys = ["accession_number"]
    if request.control != "NW":
        keys += ["filler_order_number", "placer_order_number"]
    for column in keys:
        key = request.sent(column)
        if key is None:
            continue
        found = session.scalars(
            select(Order).where(getattr(Order, column) == key).limit(2)).all()
        if len(found) == 1 or (found and column == "accession_number"):
            return found[0]
    return None


def _key_location(request: OrderRequest) -> Location:
    for column in ("accession_number", "filler_order_number", "placer_order_number"):
        if request.sent(column) is not None:
            return request.where[column]
    return request.where.get("accession_number", request.orc)


def apply(session: Session, request: OrderRequest, actor: str, now: datetime,
          detail: dict[str, Any]) -> Applied:
    """One ORC group against the orders table (the caller owns the transaction)."""
    order = _find(session, request)
    if request.control == "NW":
        values = _validated({c: request.sent(c) for c in COLUMNS}, request)
        if order is None:
            order = Order(**values, status="scheduled", updated_at=now)
            session.add(order)
            session.flush()
            audit.record(session, actor, "order_added", order.study_instance_uid, now,
                         accession_number=order.accession_number, **detail)
            return Applied("added", order.accession_number)
        # Compared on what this message sends: a column set since (a study UID the worklist
        # assigned, say) does not make a resent NW a different order.
        if any(getattr(order, c) != v for c, v in values.items() if request.sent(c) is not None):
            raise _content(DUPLICATE_KEY, _key_location(request),
                           "an order with this accession number exists with other values; "
                           "send XO to change it")
        return Applied("unchanged", order.accession_number)
    if order is None:
        where = _key_location(request)
        raise _content(UNKNOWN_KEY, where,
                       f"{where.segment}-{where.field}: no order with this number; send NW first")
    if request.control == "XO":
        return _change(session, order, request, actor, now, detail)
    status = "cancelled" if request.control == "CA" else "discontinued"
    if order.status in ("cancelled", "discontinued"):
        return Applied("unchanged", order.accession_number)
    if order.status == "completed":
        raise _content(INTERNAL_ERROR, request.orc,
                       "the order is completed; it can no longer be cancelled or discontinued")
    before = order.status
    order.status = status
    order.updated_at = now
    audit.record(session, actor, f"order_{status}", order.study_instance_uid, now,
                 accession_number=order.accession_number, status=[before, status], **detail)
    return Applied(status, order.accession_number)


def _change(session: Session, order: Order, request: OrderRequest, actor: str, now: datetime,
            detail: dict[str, Any]) -> Applied:
    if order.status not in ("scheduled", "in_progress"):
        raise _content(INTERNAL_ERROR, request.orc,
                       f"the order is {order.status}; it can no longer be changed")
    merged = {c: getattr(order, c) for c in COLUMNS}
    for column, value in request.values.items():
        if value is not None:
            merged[column] = None if value == "" else value
    values = _validated(merged, request)
    changes = {c: [getattr(order, c), v] for c, v in values.items() if getattr(order, c) != v}
    if not changes:
        return Applied("unchanged", order.accession_number)
    for column, (_, new) in changes.items():
        setattr(order, column, new)
    order.updated_at = now
    session.flush()
    audit.record(session, actor, "order_updated", order.study_instance_uid, now,
                 accession_number=order.accession_number, changes=changes, **detail)
    return Applied("updated", order.accession_number)


# --- acknowledging -----------------------------------------------------------------------------


def build_ack(header: Header | None, code: AckCode, error: Hl7Error | None, config: Hl7Config,
              now: datetime) -> bytes:
    """An original-mode ACK (HL7 v2.5 2.9.2, 2.15.8 MSA, 2.15.5 ERR), in the request's set."""
    separators = (header.field_separator + header.encoding_characters) if header else "|^~\\&"
    ack = hl7.parse(f"MSH{separators}{separators[0]}")
    component = separators[1]
    sub = separators[4] if len(separators) > 4 else "&"
    msh = ack.segment("MSH")
    msh.assign_field(config.sending_application, 3)  # HD, as ER7 (config forbids | and CR)
    msh.assign_field(config.sending_facility, 4)
    if header is not None:
        msh.assign_field(header.sending_application, 5)
        msh.assign_field(header.sending_facility, 6)
    msh.assign_field(now.astimezone().strftime("%Y%m%d%H%M%S%z"), 7)  # local, with its offset
    trigger = header.trigger_event if header else ""
    msh.assign_field(component.join(["ACK", ack.escape(trigger), "ACK"] if trigger else ["ACK"]), 9)
    msh.assign_field(hl7.generate_message_control_id(), 10)
    msh.assign_field((header.processing_id if header else "") or "P", 11)
    msh.assign_field(ack.escape(header.version if header and header.version else "2.5"), 12)
    if header is not None and header.charset:
        msh.assign_field(header.charset, 18)
    msa = ack.create_segment([ack.create_field(["MSA"])])
    msa.assign_field(code, 1)
    msa.assign_field(ack.escape(header.control_id if header else ""), 2)
    segments = [msh, msa]
    if error is not None:
        text = ack.escape(error.text)
        msa.assign_field(text[:80], 3)
        err = ack.create_segment([ack.create_field(["ERR"])])
        where = error.where.er7(component)
        label = ack.escape(_CODE_TEXT.get(error.code, ""))
        err.assign_field(f"{where}{component}{sub.join([str(error.code), label, 'HL70357'])}", 1)
        err.assign_field(where, 2)
        err.assign_field(component.join([str(error.code), label, "HL70357"]), 3)
        err.assign_field("E", 4)
        err.assign_field(text, 8)
        segments.append(err)
    reply = str(ack.create_message(segments))
    codec = header.codec if header else "ascii"
    return reply.encode(codec, errors="replace")


# --- the intake: one message in, one ACK out ---------------------------------------------------


@dataclass(frozen=True)
class Received:
    """A message as the listener hands it over: its bytes (the first ``max_message_bytes`` when
    it was longer), its full size, and the peer's address."""

    data: bytes
    size: int
    peer: str

    @property
    def truncated(self) -> bool:
        return self.size > len(self.data)


@dataclass
class _Outcome:
    header: Header | None = None
    ack: AckCode = "AA"
    error: Hl7Error | None = None
    accession_number: str | None = None
    applied: list[Applied] = field(default_factory=list)


class Hl7Intake:
    """Handles one received message at a time per caller; thread-safe (a session per call)."""

    def __init__(self, config: Hl7Config, sessions: Callable[[], Session], metrics: Metrics,
                 now: Callable[[], datetime]) -> None:
        self._config = config
        self._sessions = sessions
        self._metrics = metrics
        self._now = now

    def __call__(self, received: Received) -> bytes:
        now = self._now()
        outcome = _Outcome()
        try:
            self._read_and_store(received, outcome, now)
        except Hl7Error as exc:
            outcome.ack, outcome.error = exc.ack, exc
            outcome.accession_number = outcome.accession_number or exc.accession_number
            self._store_refusal(received, outcome, now)
        except Exception as exc:  # noqa: BLE001 - the boundary: every message gets its answer
            _log_failure("read the message", exc)
            outcome.ack = "AR"
            outcome.error = _reject(INTERNAL_ERROR, Location("MSH"),
                                    "the gateway could not read the message; it is kept for the "
                                    "operator")
            self._store_refusal(received, outcome, now)
        self._report(received, outcome)
        return build_ack(outcome.header, outcome.ack, outcome.error, self._config, now)

    def _read_and_store(self, received: Received, outcome: _Outcome, now: datetime) -> None:
        default = self._config.default_charset
        too_large = _reject(INTERNAL_ERROR, Location("MSH"),
                            f"the message has {received.size} bytes, more than "
                            f"hl7.max_message_bytes ({self._config.max_message_bytes})")
        try:
            outcome.header = read_header(received.data, default)
        except Hl7Error:
            if received.truncated:
                raise too_large from None
            raise
        if received.truncated:
            raise too_large
        check_header(outcome.header)
        outcome.header, message = read_message(received.data, outcome.header, default)
        requests = order_requests(message, self._config)
        outcome.accession_number = next(
            (r.sent("accession_number") for r in requests if r.sent("accession_number")), None)
        self._store(received, outcome, requests, now)

    def _store(self, received: Received, outcome: _Outcome, requests: list[OrderRequest],
               now: datetime) -> None:
        """The orders and the message row in one transaction; once more on a unique-key race
        (two connections adding the same accession: the second then finds it)."""
        assert outcome.header is not None
        actor = f"hl7:{outcome.header.sender}"[:64]
        for attempt in (1, 2):
            try:
                with self._sessions() as session:
                    row = self._row(received, outcome, "AA", None, now)
                    session.add(row)
                    session.flush()
                    detail = {"control_id": outcome.header.control_id, "hl7_message_id": row.id,
                              "order_control": ""}
                    outcome.applied = []
                    for request in requests:
                        detail["order_control"] = request.control
                        outcome.applied.append(apply(session, request, actor, now, detail))
                    session.commit()
                return
            except IntegrityError:
                if attempt == 2:
                    raise _content(DUPLICATE_KEY, _key_location(requests[0]),
                                   "another order already holds this accession or number") from None
            except SQLAlchemyError as exc:
                _log_failure("store", exc)
                raise _reject(INTERNAL_ERROR, Location("MSH"),
                              "the gateway could not store the message; send it again") from None

    def _store_refusal(self, received: Received, outcome: _Outcome, now: datetime) -> None:
        try:
            with self._sessions() as session:
                session.add(self._row(received, outcome, outcome.ack, outcome.error, now))
                session.commit()
        except SQLAlchemyError as exc:
            _log_failure("record the refused message", exc)
            if outcome.ack == "AE":  # unrecorded: the sender must keep it, as for any AR
                outcome.ack = "AR"

    def _row(self, received: Received, outcome: _Outcome, ack: AckCode, error: Hl7Error | None,
             now: datetime) -> Hl7Message:
        header = outcome.header
        codec = header.codec if header else "latin-1"
        try:
            raw = received.data.decode(codec)
        except UnicodeDecodeError:
            raw = received.data.decode("latin-1")
        accession = _printable(outcome.accession_number or "")
        return Hl7Message(
            received_at=now, peer=received.peer[:80],
            message_type=(_printable(header.message_type)[:16] or None) if header else None,
            control_id=(_printable(header.control_id)[:64] or None) if header else None,
            accession_number=accession if accession and len(accession) <= 16 else None,
            ack_code=ack,
            error=f"{error.where} {error.code}: {error.text}"[:400] if error else None,
            # PostgreSQL text holds no NUL; written as HL7's hex escape for it
            raw=raw.replace("\x00", "\\X00\\"),
        )

    def _report(self, received: Received, outcome: _Outcome) -> None:
        header = outcome.header
        kind = "unknown"
        if header is not None:
            kind = header.message_type if (header.message_code, header.trigger_event) in \
                SUPPORTED else "other"
        self._metrics.hl7_messages.labels(kind, outcome.ack).inc()
        control = header.control_id[:64] if header else ""
        outcomes = ",".join(a.outcome for a in outcome.applied)
        if outcome.error is None:
            log.info("hl7 %s control %r from %s: AA (%s)", kind, control, received.peer, outcomes)
        else:
            log.warning("hl7 %s control %r from %s: %s at %s (code %d)", kind, control,
                        received.peer, outcome.ack, outcome.error.where, outcome.error.code)


def _printable(value: str) -> str:
    """For the columns of ``hl7_messages`` other than ``raw``: no control characters."""
    return _CONTROL.sub("?", value)


def _log_failure(what: str, exc: BaseException) -> None:
    """The exception's type and where it arose: its message may quote SQL parameters (patient
    values), so it is not logged."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f" at {frame.filename}:{frame.lineno}" if frame else ""
    log.error("hl7 intake could not %s: %s%s", what, type(exc).__name__, place)
