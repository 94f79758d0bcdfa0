"""The gateway's configuration: one TOML file, overlaid by environment variables, validated once.

Invariants: every model is frozen and forbids unknown keys, so a typo is an error, not a silent
default; defaults live only here; secrets never appear in ``repr``. ``load`` is the only way in.
An environment variable ``GATEWAY_<SECTION>__<KEY>`` overrides ``[section] key``; its value is read
as a TOML value when it parses as one (``true``, ``11112``, ``["echo"]``) and as a string otherwise.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import ConfigError
from gateway.remap.rules import Match

ENV_PREFIX = "GATEWAY_"
# dicom.max_associations at most: also the size of each receiver's table of open associations
# (gateway.receive.workers), so that a reload may raise the limit up to it
MAX_ASSOCIATIONS = 1000
# "worklist": Modality Worklist C-FIND and MPPS N-CREATE/N-SET (a modality's workflow services)
Service = Literal["echo", "store", "find", "move", "get", "worklist"]
DuplicatePolicy = Literal["keep_first", "replace", "reject"]
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 chars, no backslash
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # PS3.5 9.1


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("an AE title is 1 to 16 printable characters, not only spaces, no backslash")
    return value.strip()


AETitle = Annotated[str, Field(min_length=1, max_length=16)]


def _check_peer_limit(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError("a limit on a caller's open associations is at least 1; to refuse a "
                         "caller, leave it out of [[security.peers]] and unknown_callers; to "
                         "limit nothing, leave the key out")
    return value


class DicomConfig(_Model):
    """The listening Application Entity (PS3.8 association parameters)."""

    ae_title: AETitle = "GATEWAY"
    bind_host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(40, ge=1, le=MAX_ASSOCIATIONS)
    # Receiver processes of `gateway serve` (gateway.receive.workers): one C-STORE path per core;
    # 1 is a single process. max_associations holds for all of them together.
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    max_pdu_size: int = Field(4_194_304, ge=0, description="0 means unlimited")
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(120.0, gt=0)
    shutdown_grace_s: float = Field(30.0, ge=0)
    # Private Storage SOP Classes to accept besides every standard one (retired included).
    extra_storage_sop_classes: tuple[str, ...] = ()
    # Addresses/networks of trusted TCP balancers (HAProxy `send-proxy-v2`): a connection from
    # one must start with a PROXY protocol header naming the modality (gateway.receive.server).
    proxy_protocol_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("proxy_protocol_from", mode="before")
    @classmethod
    def _networks(cls, values: Any) -> Any:
        if not isinstance(values, (list, tuple)):
            return values
        for value in values:
            try:
                ipaddress.ip_network(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"{value!r} is not an address or network ({exc}): list the balancer's address "
                    'as the gateway sees it, e.g. "10.0.0.5" or "172.30.0.0/24", not a host name'
                ) from None
        return values

    @field_validator("extra_storage_sop_classes")
    @classmethod
    def _storage_uids(cls, uids: tuple[str, ...]) -> tuple[str, ...]:
        for uid in uids:
            if len(uid) > 64 or not _UID.fullmatch(uid):
                raise ValueError(
                    f"{uid!r} is not a UID: digits and dots, at most 64 characters (PS3.5 9.1), "
                    "e.g. the SOP Class UID in the device's conformance statement"
                )
        return uids


class Peer(_Model):
    """A known remote AE and what it may do."""

    ae_title: AETitle
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535, description="where C-MOVE sends to this AE")
    services: tuple[Service, ...] = ("echo", "store")
    # This calling AE title's own limit on open associations (over every receiver process);
    # None: security.max_associations_per_peer, if set.
    max_associations: int | None = None

    _ae = field_validator("ae_title")(_check_ae_title)
    _limit = field_validator("max_associations")(_check_peer_limit)


class SecurityConfig(_Model):
    """Who may talk to the gateway. Unknown callers are allowed only where this says so."""

    check_called_ae_title: bool = True
    unknown_callers: tuple[Service, ...] = ()
    peers: tuple[Peer, ...] = ()
    # Open associations any one calling AE title (listed or not) may hold at once, unless its
    # [[security.peers]] entry sets its own max_associations; None: only dicom.max_associations.
    max_associations_per_peer: int | None = None

    _limit = field_validator("max_associations_per_peer")(_check_peer_limit)

    @field_validator("peers")
    @classmethod
    def _unique_peers(cls, peers: tuple[Peer, ...]) -> tuple[Peer, ...]:
        seen: set[str] = set()
        for peer in peers:
            if peer.ae_title in seen:
                raise ValueError(f"peer {peer.ae_title!r} is listed twice; keep one entry per AE title")
            seen.add(peer.ae_title)
        return peers


class StorageConfig(_Model):
    """Where received instances are kept, and what to do with a second copy of one."""

    spool_dir: Path = Path("data/spool")
    min_free_mb: int = Field(1024, ge=0)
    duplicate_policy: DuplicatePolicy = "keep_first"


class DatabaseConfig(_Model):
    url: str = Field("sqlite:///data/gateway.db", repr=False)
    busy_timeout_s: float = Field(10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://")):
            raise ValueError(
                "use sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB"
            )
        return url


class RemapConfig(_Model):
    """Tag remapping at ingest (gateway.remap). Without a rules file instances are kept as received."""

    rules_file: Path | None = None
    issuer_of_patient_id: str = Field("HOSPITAL", min_length=1, max_length=64)
    modifying_system: str = Field("GATEWAY", min_length=1, max_length=64)
    uid_root: str = Field("2.25", description="root under which regenerated UIDs are derived")
    coerced_status: Literal["success", "warning"] = "success"
    order_window_h: float = Field(24.0, gt=0)
    workers: int = Field(1, ge=1, le=16)
    max_defer_s: float = Field(
        5.0, ge=0, le=600,
        description="while C-STOREs saturate the receiver, rewrites wait, at most this long",
    )

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, root: str) -> str:
        if not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", root) or len(root) > 24:
            raise ValueError(
                "a UID root is digits and dots, at most 24 characters (e.g. 2.25, or your "
                "organisation's registered root)"
            )
        return root


class RetryPolicy(_Model):
    """Exponential backoff with full jitter, capped; after ``max_attempts`` or ``max_age_h`` a job
    goes to the dead letters, where an operator sees it and can retry it."""

    first_delay_s: float = Field(2.0, gt=0)
    max_delay_s: float = Field(300.0, gt=0)
    max_attempts: int = Field(100, ge=1)
    max_age_h: float = Field(72.0, gt=0)


class BreakerConfig(_Model):
    """After ``failures_to_open`` failed sends in a row the destination is left alone and only
    probed (C-ECHO, ``GET /system``, QIDO) every ``probe_interval_s`` until it answers."""

    failures_to_open: int = Field(3, ge=1)
    probe_interval_s: float = Field(5.0, gt=0)


_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class _Destination(_Model):
    name: str = Field(pattern=_NAME)
    concurrency: int = Field(1, ge=1, le=16, description="parallel sends (threads)")
    batch_size: int = Field(20, ge=1, le=500, description="instances taken per claim")
    timeout_s: float = Field(60.0, gt=0)


class _HttpDestination(_Destination):
    url: str = Field(pattern=r"^https?://")
    username: str | None = None
    password_env: str | None = Field(None, description="environment variable holding the password")
    password_file: Path | None = Field(None, description="file holding the password")
    verify_tls: bool = True
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _one_password_source(self) -> _HttpDestination:
        if self.password_env and self.password_file:
            raise ValueError("give password_env or password_file, not both")
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("a password needs a username; add username")
        return self

    def password(self, environ: Mapping[str, str]) -> str | None:
        """Read when the destination is built, so a secret never sits in the config model."""
        if self.password_env:
            if self.password_env not in environ:
                raise ConfigError(
                    [(f"destination {self.name}: environment variable {self.password_env} is not "
                      "set; export it or use password_file")]
                )
            return environ[self.password_env]
        if self.password_file:
            try:
                return self.password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    [(f"destination {self.name}: cannot read password_file {self.password_file} "
                      f"({exc.strerror}); fix the path or its permissions")]
                ) from None
        return None


class OrthancDestination(_HttpDestination):
    """Orthanc's REST API: ``POST /instances`` per instance, answers checked."""

    type: Literal["orthanc"]
    concurrency: int = Field(2, ge=1, le=16)


class DicomwebDestination(_HttpDestination):
    """STOW-RS to ``{url}/studies`` (``url`` is the service root, e.g. .../dicom-web)."""

    type: Literal["dicomweb"]
    instances_per_request: int = Field(10, ge=1, le=200)


class DimseDestination(_Destination):
    """C-STORE SCU; ``verify`` says how delivery is proven: C-FIND at IMAGE level, or ``none``
    (trust the C-STORE status, for peers without a query service)."""

    type: Literal["dimse"]
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    verify: Literal["find", "none"] = "find"
    batch_size: int = Field(100, ge=1, le=1000)

    _ae = field_validator("ae_title")(_check_ae_title)


Destination = Annotated[
    OrthancDestination | DicomwebDestination | DimseDestination, Field(discriminator="type")
]


class Route(_Model):
    """Instances whose received header fits ``match`` go to ``destinations``; every matching
    route adds its destinations. ``match`` is the remap rules' match (gateway.remap.rules)."""

    name: str = Field(pattern=_NAME)
    match: Match = Match()
    destinations: tuple[str, ...] = Field(min_length=1)


class ForwardConfig(_Model):
    """Where instances go after they are kept (gateway.forward). Without destinations, nowhere.

    Instances that no route matches go to ``default_destinations`` (all destinations when it is
    not given)."""

    destinations: tuple[Destination, ...] = ()
    routes: tuple[Route, ...] = ()
    default_destinations: tuple[str, ...] | None = None
    stable_after_s: float = Field(60.0, ge=0, description="a study is complete after this quiet")
    check_interval_s: float = Field(2.0, gt=0)
    batch_wait_s: float = Field(
        0.2, ge=0, description="after a partial batch, wait this long for more before claiming"
    )
    burst_hold_s: float = Field(
        30.0, ge=0, le=3600,
        description="while C-STOREs keep the receiver saturated, forwarding holds each instance "
        "back up to this long after it arrived, so that the modalities get the machine; 0 = never",
    )
    max_verify_misses: int = Field(
        3, ge=1, le=100,
        description="proof of delivery: an instance the destination still lacks after this many "
        "verifications goes to the dead letters instead of being sent again",
    )
    node_name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=64)
    retry: RetryPolicy = RetryPolicy()
    breaker: BreakerConfig = BreakerConfig()

    @model_validator(mode="after")
    def _known_names(self) -> ForwardConfig:
        names = [d.name for d in self.destinations]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"destination names must be unique: {', '.join(twice)} given twice")
        wanted = [(f"route {r.name}", d) for r in self.routes for d in r.destinations]
        wanted += [("default_destinations", d) for d in self.default_destinations or ()]
        for where, name in wanted:
            if name not in names:
                raise ValueError(
                    f"{where} names destination {name!r}, which is not defined; define it under "
                    f"[[forward.destinations]] or use one of: {', '.join(names) or '(none yet)'}"
                )
        return self


class RetentionConfig(_Model):
    """When spool files may go: only once confirmed at every destination, and older than
    ``keep_days``; below ``cleanup_below_free_mb`` free, confirmed files go early, oldest first.
    Files not confirmed everywhere are never removed."""

    keep_days: float = Field(7.0, ge=0)
    cleanup_below_free_mb: int = Field(0, ge=0, description="0 turns early cleanup off")
    check_interval_s: float = Field(60.0, gt=0)


class QueryConfig(_Model):
    """C-FIND / C-MOVE / C-GET over what the gateway holds (gateway.query)."""

    max_results: int = Field(1000, ge=1, description="a C-FIND answers at most this many matches")
    case_insensitive_names: bool = Field(
        True, description="person names match regardless of case (PS3.4 C.2.2.2.1 allows it)"
    )


# Single-byte character sets a modality may be limited to (PS3.3 C.12.1.1.2, without code
# extensions), with the Python codec that holds exactly their repertoire.
WORKLIST_CHARSETS: dict[str, str] = {
    "ISO_IR 6": "ascii", "ISO_IR 100": "latin_1", "ISO_IR 101": "iso8859_2",
    "ISO_IR 109": "iso8859_3", "ISO_IR 110": "iso8859_4", "ISO_IR 144": "iso8859_5",
    "ISO_IR 127": "iso8859_6", "ISO_IR 126": "iso8859_7", "ISO_IR 138": "iso8859_8",
    "ISO_IR 148": "iso8859_9", "ISO_IR 203": "iso8859_15", "ISO_IR 166": "tis_620",
    "ISO_IR 192": "utf_8",
}
_MODALITY = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # CS: upper case, digits, space, underscore


class WorklistConfig(_Model):
    """Modality Worklist (gateway.worklist): what the build job makes of orders, and how the MWL
    C-FIND SCP answers (PS3.4 Annex K)."""

    max_results: int = Field(500, ge=1, description="an MWL C-FIND answers at most this many items")
    expire_after_h: float = Field(
        24.0, gt=0, le=1_000_000,
        description="an item leaves the list this long after its step's scheduled start",
    )
    station_ae_by_modality: dict[str, AETitle] = Field(
        default_factory=dict,
        description='Scheduled Station AE Title for orders that name none, e.g. { CT = "CT_ROOM1" }',
    )
    character_sets: dict[AETitle, str] = Field(
        default_factory=dict,
        description='per calling AE: the only Specific Character Set it reads, e.g. '
        '{ OLD_US = "ISO_IR 100" }; values are transcoded, characters it lacks become "?"',
    )
    wl_folder: Path | None = Field(
        None, description="also write DCMTK .wl files here (a wlmscpfs AE folder), one per item",
    )

    @field_validator("station_ae_by_modality")
    @classmethod
    def _modalities(cls, table: dict[str, str]) -> dict[str, str]:
        for modality, ae in table.items():
            if not _MODALITY.match(modality):
                raise ValueError(f"{modality!r} is not a modality code (CS: upper case, e.g. CT)")
            _check_ae_title(ae)
        return {m: ae.strip() for m, ae in table.items()}

    @field_validator("character_sets")
    @classmethod
    def _charsets(cls, table: dict[str, str]) -> dict[str, str]:
        for ae, charset in table.items():
            _check_ae_title(ae)
            if charset not in WORKLIST_CHARSETS:
                raise ValueError(f"{ae}: {charset!r} is not one of "
                                 f"{', '.join(WORKLIST_CHARSETS)} (PS3.3 C.12.1.1.2)")
        return {ae.strip(): charset for ae, charset in table.items()}


class _Job(_Model):
    """A periodic job (gateway.jobs): ``cron`` (five crontab fields, local time) or ``every_s``."""

    name: str = Field(pattern=_NAME)
    cron: str | None = Field(None, description='e.g. "0 2 * * *": every day at 02:00')
    every_s: float | None = Field(None, gt=0)
    enabled: bool = True

    @model_validator(mode="after")
    def _one_schedule(self) -> _Job:
        if (self.cron is None) == (self.every_s is None):
            raise ValueError(f"job {self.name}: give cron or every_s, exactly one")
        if self.cron is not None:
            from gateway.jobs.triggers import make_trigger

            try:
                make_trigger(self.cron, None)
            except ValueError as exc:
                raise ValueError(f"job {self.name}: cron {self.cron!r} is not a crontab "
                                 f"expression ({exc}); e.g. \"0 2 * * *\"") from None
        return self


class OrderFolderJob(_Job):
    """Imports every new CSV or JSON file of ``folder`` into the orders table (as ``gateway
    orders import``), then moves it to ``done/``, or to ``rejected/`` with a ``.reason.txt``."""

    kind: Literal["order_folder"]
    folder: Path
    settle_s: float = Field(
        10.0, ge=0, description="a file is read once unchanged for this long (still being written)"
    )


class WorklistBuildJob(_Job):
    """Turns orders into Modality Worklist items (gateway.worklist.build): one Scheduled
    Procedure Step per order or per listed step, demographics from the identities table where the
    order lacks them; items of cancelled, completed or expired orders leave the list."""

    kind: Literal["worklist_build"]




_HD = r"^[^|~\\&\r\n]*$"  # no HL7 separator but the component one
Hl7Field = Literal["OBR-18", "OBR-19", "OBR-20", "ORC-2", "ORC-3"]


class Hl7Config(_Model):
    """HL7 v2 order intake over MLLP (gateway.worklist.hl7, gateway.worklist.mllp): ORM^O01 and
    OMI^O23 into the orders table, each answered with an ACK. Off unless enabled."""

    enabled: bool = False
    bind_host: str = "0.0.0.0"
    port: int = Field(2575, ge=0, le=65535, description="2575: IANA's port for HL7 over MLLP")
    max_message_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    max_connections: int = Field(32, ge=1, le=1000)
    # MSH-3 and MSH-4 of every ACK the gateway sends (HD: components joined with ^)
    sending_application: str = Field("GATEWAY", min_length=1, max_length=180, pattern=_HD)
    sending_facility: str = Field("", max_length=180, pattern=_HD)
    default_charset: str = Field(
        "UNICODE UTF-8", description="HL7 table 0211 name, for messages without MSH-18")
    # Where a RIS writes the accession number in ORM^O01 (OMI^O23 carries it in IPC-1): IHE
    # Scheduled Workflow uses OBR-18 (placer field 1).
    accession_field: Hl7Field = "OBR-18"
    # OBR-24 / IPC-5 values (HL7 table 0074 codes) that are not DICOM modalities, and what to write
    modalities: dict[str, str] = Field(default_factory=lambda: {
        "RAD": "CR", "RX": "CR", "NMR": "MR", "NMS": "NM", "RUS": "US", "OUS": "US",
        "CUS": "US", "VUS": "US", "XRC": "RF", "CTH": "XA",
    })
    # Scheduled Station AE Title for an order whose message names none (no IPC-9), by modality
    station_ae_by_modality: dict[str, AETitle] = {}

    @field_validator("default_charset")
    @classmethod
    def _known_charset(cls, name: str) -> str:
        from gateway.worklist.hl7 import CHARSETS

        if name not in CHARSETS:
            raise ValueError(f"not an HL7 table 0211 character set this gateway reads; use one "
                             f"of: {', '.join(CHARSETS)}")
        return name

    @field_validator("station_ae_by_modality")
    @classmethod
    def _station_aes(cls, aes: dict[str, str]) -> dict[str, str]:
        return {modality: _check_ae_title(ae) for modality, ae in aes.items()}
_DICOM_DATE_RANGE = re.compile(r"(\d{8})?(-)?(\d{8})?")
ExportFormat = Literal["zip", "json", "folder"]


class ExportOptions(_Model):
    """What an export archive holds (gateway.export); the same for ``gateway export`` and jobs.

    ``include_images = false`` writes the metadata JSON (and manifest) only; ``format`` is a ZIP,
    the metadata JSON alone, or the ZIP's layout as a folder. ``dicomdir`` stores the DICOM files
    under PS3.10 file IDs with a DICOMDIR (PS3.10 7.2) so that a viewer opens the archive;
    ``key_image`` adds ``image.jpg`` (the study's middle image) and its ``metadata.json``;
    ``deidentify`` applies PS3.15 Annex E's Basic Profile (with the options below).
    ``allow_partial`` exports what can be found and lists the rest, instead of failing."""

    include_images: bool = True
    format: ExportFormat = "zip"
    previews: bool = True
    preview_max_size: int = Field(512, ge=16, le=8192, description="longest side, pixels")
    dicomdir: bool = True
    key_image: bool = False
    deidentify: bool = False
    deid_retain_longitudinal_temporal: bool = False  # PS3.15 E.3.6
    deid_clean_descriptors: bool = False  # PS3.15 E.3.5
    deid_allow_burned_in: bool = False  # else objects with Burned In Annotation YES are left out
    allow_partial: bool = False


class ExportSelector(_Model):
    """Which studies an export job takes; every given criterion must hold (AND), and a study is
    exported whole when any of its instances matches. ``study_date`` is a date or range in the
    DICOM form (PS3.4 C.2.2.2.5: ``20261101``, ``20261101-20261130``, ``-20261130``) or
    ``yesterday`` / ``today`` (local dates, as DICOM dates are). ``new_since_last_run``: studies
    with an instance received since the job's last successful run (all of them the first time)."""

    patients: tuple[str, ...] = ()
    studies: tuple[str, ...] = ()
    accession_numbers: tuple[str, ...] = ()
    study_date: str | None = None
    modalities: tuple[str, ...] = ()
    calling_aes: tuple[str, ...] = ()
    # names of [[sites]]: only studies every instance of which comes from one of them
    sites: tuple[str, ...] = ()
    new_since_last_run: bool = False

    @field_validator("studies")
    @classmethod
    def _study_uids(cls, uids: tuple[str, ...]) -> tuple[str, ...]:
        for uid in uids:
            if len(uid) > 64 or not _UID.fullmatch(uid):
                raise ValueError(f"{uid!r} is not a Study Instance UID (digits and dots)")
        return uids

    @field_validator("study_date")
    @classmethod
    def _date_range(cls, value: str | None) -> str | None:
        if value is None or value in ("yesterday", "today"):
            return value
        found = _DICOM_DATE_RANGE.fullmatch(value)
        if not found or not (found.group(1) or found.group(3)) or (
                found.group(1) and found.group(3) and not found.group(2)):
            raise ValueError('use "yesterday", "today", YYYYMMDD, YYYYMMDD-YYYYMMDD, '
                             "-YYYYMMDD or YYYYMMDD-")
        return value


class ExportJob(_Job):
    """Exports the selected studies to ``destination``, one archive per study (``per =
    "study"``) or per patient; archives there older than ``keep_days`` are removed (only the
    export's own names: ``study_*_export*``, ``patient_*_export*``). A run cut short (a crash,
    SIGKILL) is continued by the next run from its last checkpoint; ``checkpoint_mb`` bounds
    the work redone."""

    kind: Literal["export"]
    destination: Path
    select: ExportSelector = ExportSelector()
    options: ExportOptions = ExportOptions()
    per: Literal["study", "patient"] = "study"
    keep_days: float | None = Field(None, gt=0)
    checkpoint_mb: int = Field(64, ge=1, le=65536)


Job = Annotated[OrderFolderJob | WorklistBuildJob | ExportJob, Field(discriminator="kind")]


class SiteConfig(_Model):
    """A hospital whose data the gateway holds: its instances are those sent by one of its
    ``calling_aes`` or carrying one of its ``institution_names`` (Institution Name, 0008,0080).
    Tokens and export jobs name sites; a study belongs to a site only when every one of its
    instances does (gateway.export.select.site_scope)."""

    name: str = Field(pattern=_NAME)
    calling_aes: tuple[AETitle, ...] = Field(min_length=1)
    institution_names: tuple[str, ...] = ()

    @field_validator("calling_aes")
    @classmethod
    def _aes(cls, aes: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(ae) for ae in aes)

    @field_validator("institution_names")
    @classmethod
    def _institutions(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not name.strip() or len(name) > 64:
                raise ValueError(f"{name!r} is not an Institution Name: 1 to 64 characters "
                                 "(LO), as the modality writes it in (0008,0080)")
        return names


ALL_SITES = "*"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ApiToken(_Model):
    """A bearer token of the HTTP API, stored as the SHA-256 of the token (``gateway token new``
    prints a token and this entry): the token itself is never in the configuration. ``role``:
    ``admin`` may also export everything (``/api/export/all``); ``sites``: the sites whose
    studies it sees, or ``["*"]`` for every study the gateway holds."""

    name: str = Field(pattern=_NAME)
    sha256: str = Field(repr=False)
    role: Literal["admin", "exporter"]
    sites: tuple[str, ...] = Field(min_length=1)

    @field_validator("sha256")
    @classmethod
    def _digest(cls, value: str) -> str:
        if not _SHA256_HEX.fullmatch(value):
            raise ValueError("should be the SHA-256 of the token, 64 lowercase hex digits "
                             "(never the token itself); run `gateway token new` for a token "
                             "and its entry")
        return value

    @field_validator("sites")
    @classmethod
    def _all_alone(cls, sites: tuple[str, ...]) -> tuple[str, ...]:
        if ALL_SITES in sites and len(sites) > 1:
            raise ValueError('"*" (every site) stands alone: use ["*"] or a list of site names')
        return sites


class ApiConfig(_Model):
    """The export HTTP API (gateway.web.api) on the metrics port (``[metrics]`` host and port):
    ``GET /api/export/study/{uid}``, ``/patient/{id}``, ``/all``; off without tokens.
    ``export_options``: what its archives hold (``includeImages`` and ``format`` of a request
    override those two)."""

    tokens: tuple[ApiToken, ...] = ()
    export_options: ExportOptions = ExportOptions()


class MetricsConfig(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9110, ge=0, le=65535)


class ClusterConfig(_Model):
    """Several nodes on one PostgreSQL (gateway.cluster). The node's name stays
    ``forward.node_name`` (where it always was: one name per node, also for job runs).

    ``internal_url``: this node's HTTP application as the other nodes reach it
    (``http://host:port``), written to the ``nodes`` table with every heartbeat; by default
    ``http://<metrics.host or this host's name>:<metrics.port>``. ``secret_sha256``: the SHA-256
    of the shared cluster secret that ``/internal/instances/{uid}`` demands (``gateway token new``
    makes one and prints its hash); the secret itself, which this node sends to its peers, is read
    from ``secret_env`` or ``secret_file`` when the gateway starts, never from this file. Without
    ``secret_sha256`` the endpoint is off and nothing is fetched from peers (a single node)."""

    heartbeat_s: float = Field(5.0, gt=0, le=300, description="how often this node says it lives; "
                               "a node silent for three of these is stale")
    internal_url: str | None = Field(None, pattern=r"^https?://[^/\s]+$")
    secret_sha256: str | None = Field(None, repr=False)
    secret_env: str = "GATEWAY_CLUSTER_SECRET"
    secret_file: Path | None = None
    fetch_timeout_s: float = Field(30.0, gt=0)

    @field_validator("secret_sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256_HEX.fullmatch(value):
            raise ValueError("should be the SHA-256 of the cluster secret, 64 lowercase hex "
                             "digits (never the secret itself); `gateway token new` prints both")
        return value

    def secret(self, environ: Mapping[str, str]) -> str | None:
        """The shared secret, read when the gateway starts; it must hash to ``secret_sha256``."""
        if self.secret_sha256 is None:
            return None
        if self.secret_file is not None:
            try:
                value = self.secret_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError([(f"cluster: cannot read secret_file {self.secret_file} "
                                    f"({exc.strerror}); fix the path or its permissions")]) from None
        elif self.secret_env in environ:
            value = environ[self.secret_env].strip()
        else:
            raise ConfigError([(f"cluster: secret_sha256 is set but environment variable "
                                f"{self.secret_env} is not; export the cluster secret there or "
                                "set cluster.secret_file")])
        from gateway.web.auth import token_sha256

        if token_sha256(value) != self.secret_sha256:
            raise ConfigError([("cluster: the secret does not hash to cluster.secret_sha256; "
                                "every node needs the same secret and the same hash")])
        return value

    def url_of(self, host: str, port: int) -> str:
        """This node's internal URL, given where its HTTP application listens."""
        if self.internal_url is not None:
            return self.internal_url
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


class LoggingConfig(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class GatewayConfig(_Model):
    dicom: DicomConfig = DicomConfig()
    security: SecurityConfig = SecurityConfig()
    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()
    remap: RemapConfig = RemapConfig()
    forward: ForwardConfig = ForwardConfig()
    retention: RetentionConfig = RetentionConfig()
    query: QueryConfig = QueryConfig()
    worklist: WorklistConfig = WorklistConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    hl7: Hl7Config = Hl7Config()
    jobs: tuple[Job, ...] = ()
    sites: tuple[SiteConfig, ...] = ()
    api: ApiConfig = ApiConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _peer_limits_below_node_limit(self) -> GatewayConfig:
        """A per-peer limit above ``dicom.max_associations`` is an error, not a warning: it can
        never take effect (the node limit refuses first), and whoever wrote it most likely
        believes it lets that peer exceed the node limit, which it does not. Equal to the node
        limit is allowed: that is how one peer is exempted from ``max_associations_per_peer``."""
        node = self.dicom.max_associations
        fix = (f"lower it to at most {node}, or raise dicom.max_associations (it caps every "
               "caller together; a peer limit can only be lower)")
        default = self.security.max_associations_per_peer
        if default is not None and default > node:
            raise ValueError(f"security.max_associations_per_peer = {default} is above "
                             f"dicom.max_associations = {node}: {fix}")
        for i, peer in enumerate(self.security.peers):
            if peer.max_associations is not None and peer.max_associations > node:
                raise ValueError(f"security.peers.{i} ({peer.ae_title}).max_associations = "
                                 f"{peer.max_associations} is above dicom.max_associations = "
                                 f"{node}: {fix}")
        return self

    @model_validator(mode="after")
    def _unique_jobs(self) -> GatewayConfig:
        names = [j.name for j in self.jobs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"job names must be unique: {', '.join(twice)} given twice")
        return self

    @model_validator(mode="after")
    def _known_sites(self) -> GatewayConfig:
        """Site names unique; every site a token or an export job names is defined."""
        names = [s.name for s in self.sites]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"sites: names must be unique: {', '.join(twice)} given twice")
        for label, values in (("api.tokens", [t.name for t in self.api.tokens]),
                              ("api.tokens", [t.sha256 for t in self.api.tokens])):
            if len(set(values)) != len(values):
                raise ValueError(f"{label}: each token needs its own name and its own sha256 "
                                 "(run `gateway token new` once per client)")
        wanted = [(f"api.tokens.{i} ({t.name}).sites", site)
                  for i, t in enumerate(self.api.tokens) for site in t.sites if site != ALL_SITES]
        wanted += [(f"jobs.{i} ({j.name}).select.sites", site) for i, j in enumerate(self.jobs)
                   if isinstance(j, ExportJob) for site in j.select.sites]
        for where, site in wanted:
            if site not in names:
                close = difflib.get_close_matches(site, names, n=1, cutoff=0.6)
                fix = (f"did you mean {close[0]!r}?" if close else
                       "define it as [[sites]] with name, calling_aes (and institution_names), "
                       f"or use one of: {', '.join(names) or '(none defined yet)'}")
                raise ValueError(f"{where}: {site!r} is not a site; {fix}")
        return self

    def site(self, name: str) -> SiteConfig:
        return next(s for s in self.sites if s.name == name)


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _overlay_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Return which keys came from the environment, so errors can name the variable."""
    origins: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            continue
        table[key] = _env_value(raw)
        origins.setdefault(section, {})[key] = name
    return origins


# pydantic's wording for a few error types, in the words of a TOML file
_PLAIN_WORDS = {
    "tuple_type": "should be a list, e.g. [\"echo\", \"store\"]",
    "list_type": "should be a list, e.g. [\"a\", \"b\"]",
    "dict_type": "should be a table ([section] or { key = value })",
    "model_type": "should be a table ([section] or { key = value })",
    "bool_parsing": "should be true or false",
    "bool_type": "should be true or false",
    "int_parsing": "should be a whole number",
    "int_type": "should be a whole number",
    "float_parsing": "should be a number",
    "float_type": "should be a number",
    "string_type": "should be a string in quotes",
}


def _models(annotation: Any) -> list[Any]:
    """The models an annotation holds: itself, or those of a tuple, a union, an Annotated."""
    if hasattr(annotation, "model_fields"):
        return [annotation]
    return [m for inner in getattr(annotation, "__args__", ()) for m in _models(inner)]


def _tags(model: Any) -> tuple[Any, ...]:
    """The values of a tagged union member's tag (``kind`` of a job, ``type`` of a
    destination)."""
    field = model.model_fields.get("kind") or model.model_fields.get("type")
    return tuple(getattr(field.annotation, "__args__", ())) if field is not None else ()


def _known_keys(loc: list[str]) -> list[str]:
    """The keys the table at ``loc`` (an unknown key's location, without that key) accepts.
    ``loc`` may hold list indexes and, for a tagged union such as ``[[jobs]]``, the tag."""
    models: list[Any] = [GatewayConfig]
    for part in loc:
        if part.isdigit():
            continue
        tagged = [m for m in models if part in _tags(m)] if len(models) > 1 else []
        if tagged:
            models = tagged
            continue
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        if field is None:
            return []
        models = _models(field.annotation)
        if not models:
            return []
    return list(models[0].model_fields) if len(models) == 1 else []


def _describe(err: Mapping[str, Any], origins: dict[str, dict[str, Any]], source: str) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    where = source
    if len(loc) >= 2 and loc[1] in origins.get(loc[0], {}):
        where = f"environment variable {origins[loc[0]][loc[1]]}"
    bad = err.get("input")
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc[-1], _known_keys(loc[:-1]), n=1, cutoff=0.6)
        if close:
            return f"{key}: unknown key (in {where}); did you mean {close[0]}?"
        fix = "remove it or check its spelling against config/gateway.example.toml"
        return f"{key}: unknown key (in {where}); {fix}"
    if err["type"] == "missing":
        return f"{key}: required but missing (in {where}); add it"
    message = _PLAIN_WORDS.get(err["type"]) or str(err["msg"]).removeprefix("Value error, ")
    if not loc:  # a check across sections: its message names the keys; the input is the
        return f"{message} (in {where})"  # whole file (database URL and all): never shown
    # a URL holds a password; a wrong sha256 may be the token itself, pasted by mistake
    hidden = loc[:2] == ["database", "url"] or loc[:2] == ["api", "tokens"] and loc[-1] == "sha256"
    shown = "<hidden>" if hidden else repr(bad)
    return f"{key} = {shown} (in {where}): {message}"


def load(path: Path, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, overlay and validate; raise ConfigError listing every problem at once."""
    environ = os.environ if environ is None else environ
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file; pass --config with the path of a TOML file"])
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML ({exc}); fix the syntax"])
    origins = _overlay_env(data, environ)
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_describe(e, origins, str(path)) for e in exc.errors()])
    config = _absolute_paths(config, path.resolve().parent, origins)
    if config.remap.rules_file is not None:
        from gateway.remap.rules import load_rules

        load_rules(config.remap.rules_file)  # its errors are configuration errors too
    return config


def _absolute_paths(
    config: GatewayConfig, folder: Path, origins: dict[str, dict[str, Any]]
) -> GatewayConfig:
    """A relative path in the file is relative to the file's folder, so every command that reads
    the file (``serve``, ``status``, ``queue`` from any directory) finds the same spool and
    database; one from an environment variable is relative to the working directory, as on a
    command line. Made absolute once, so that nothing later can move them."""

    def absolute(value: Path, section: str, key: str) -> Path:
        if value.is_absolute():
            return value
        return Path(os.path.normpath((Path.cwd() if key in origins.get(section, {}) else folder)
                                     / value))

    storage = config.storage.model_copy(
        update={"spool_dir": absolute(config.storage.spool_dir, "storage", "spool_dir")})
    rules = config.remap.rules_file
    remap = config.remap.model_copy(
        update={"rules_file": None if rules is None else absolute(rules, "remap", "rules_file")})
    url = config.database.url
    if url.startswith("sqlite:///") and url not in ("sqlite:///", "sqlite:///:memory:"):
        database_path = absolute(Path(url.removeprefix("sqlite:///")), "database", "url")
        url = f"sqlite:///{database_path}"
    database = config.database.model_copy(update={"url": url})
    destinations = []
    for destination in config.forward.destinations:
        update = {
            key: Path(os.path.normpath(folder / value))
            for key in ("password_file", "ca_file")
            if isinstance(value := getattr(destination, key, None), Path) and not value.is_absolute()
        }
        destinations.append(destination.model_copy(update=update) if update else destination)
    forward = config.forward.model_copy(update={"destinations": tuple(destinations)})
    wl_folder = config.worklist.wl_folder
    worklist = config.worklist.model_copy(update={
        "wl_folder": None if wl_folder is None else absolute(wl_folder, "worklist", "wl_folder")})
    jobs = tuple(
        job.model_copy(update={"folder": Path(os.path.normpath(folder / job.folder))})
        if isinstance(job, OrderFolderJob) and not job.folder.is_absolute()
        else job.model_copy(
            update={"destination": Path(os.path.normpath(folder / job.destination))})
        if isinstance(job, ExportJob) and not job.destination.is_absolute() else job
        for job in config.jobs
    )
    return config.model_copy(update={"storage": storage, "remap": remap, "database": database,
                                     "forward": forward, "jobs": jobs, "worklist": worklist})
