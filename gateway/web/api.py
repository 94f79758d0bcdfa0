"""The export HTTP API: ``GET /api/export/study/{uid}``, ``/api/export/patient/{id}`` and
``/api/export/all`` (admin tokens only), each a ZIP streamed as it is built (or, with
``format=json``, the metadata JSON), behind bearer tokens (``gateway.web.auth``).

What a token sees is decided in one place, ``select.within``: a study every instance of which
comes from one of the token's sites. Anything else, and anything that does not exist, is the
same 404 with the same body, so that the API is no oracle for what other sites hold.

A Patient ID is read from the raw request path and percent-decoded once (``%2F`` is a ``/`` of
the ID, ``..`` is two dots of it): it reaches the selector exactly and is never part of a path
(archives are named by ``gateway.export.names``; the export writes into a private temporary
folder under the storage folder, removed afterwards). Neither a Patient ID nor a token is
logged; the token's name is (``api:<name>`` is the audit row's actor).
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import zipfile
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import unquote_to_bytes

import anyio
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import audit
from gateway.config import ExportOptions, ExportSelector, GatewayConfig
from gateway.export import select
from gateway.export.plan import ArchivePlan
from gateway.export.run import ArchiveHook, Exporter, ExportMetrics, ExportReport, ExportRequest
from gateway.export.service import make_sources
from gateway.web.auth import GRANT, BearerAuth, Grant, Tokens
from gateway.web.stream import Begin, Data, End, Event, ExportBroken, Failed, LiveExport

log = logging.getLogger(__name__)
TEMPORARY = ".api-exports"  # under the storage (spool) folder
PATIENT_PREFIX = b"/api/export/patient/"
PARAMETERS = {"includeImages": ("true", "false"), "format": ("zip", "json")}
ALL_NAME = "gateway_all_export.zip"
NOT_FOUND = {
    "study": {"error": "no study with this Study Instance UID is visible to this token",
              "fix": "check the UID; a token sees only the studies of its sites"},
    "patient": {"error": "no patient with this Patient ID is visible to this token",
                "fix": "check the Patient ID (percent-encode '/' as %2F); a token sees only "
                       "the studies of its sites"},
    "all": {"error": "this token sees no study", "fix": "a token sees only the studies of its "
            "sites; check [[sites]] and the token's sites"},
}


class Refused(Exception):
    def __init__(self, status: int, error: str, fix: str) -> None:
        super().__init__(error)
        self.status, self.error, self.fix = status, error, fix

    def response(self) -> Response:
        return problem(self.status, self.error, self.fix)


def problem(status: int, error: str, fix: str) -> Response:
    return Response(json.dumps({"error": error, "fix": fix}), status,
                    media_type="application/json")


class _Reporter:
    """The Exporter's progress, used only to stop it once the client has left."""

    def __init__(self, check: Callable[[], None]) -> None:
        self._check = check

    def begin(self, archives: int, instances: int, bytes: int) -> None:
        self._check()

    def archive(self, archive: ArchivePlan) -> None:
        self._check()

    def advance(self, instances: int, bytes: int, skipped: bool = False) -> None:
        self._check()

    def archive_done(self, archive: ArchivePlan, line: str) -> None:
        pass

    def end(self) -> None:
        pass


class ExportResponse(StreamingResponse):
    """Closes its ``LiveExport`` however the response ends: sent whole, failed, or the client
    gone (Starlette then cancels the body's iteration; only this ``finally`` is sure to run)."""

    def __init__(self, live: LiveExport, body: AsyncIterator[bytes], media_type: str,
                 filename: str) -> None:
        super().__init__(body, media_type=media_type, headers={
            "Content-Disposition": f'attachment; filename="{filename}"'})
        self._live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._live.close()


class ExportApi:
    def __init__(self, config: GatewayConfig, sessions: Callable[[], Session],
                 metrics: ExportMetrics | None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._config = config
        self._sessions = sessions
        self._metrics = metrics
        self._clock = clock
        self._temporary = config.storage.spool_dir / TEMPORARY
        shutil.rmtree(self._temporary, ignore_errors=True)  # what a crash left behind
        self._tokens = Tokens(config.api.tokens, config.sites)

    def app(self) -> ASGIApp:
        async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
            await problem(404, "no such API route", "use /api/export/study/{uid}, "
                          "/api/export/patient/{id} or /api/export/all")(scope, receive, send)

        router = Router([
            Route("/export/study/{uid}", self.study, methods=["GET"]),
            Route("/export/patient/{patient_id:path}", self.patient, methods=["GET"]),
            Route("/export/all", self.everything, methods=["GET"]),
        ], default=not_found)
        return BearerAuth(router, self._tokens)

    # -- routes -------------------------------------------------------------------------------

    async def study(self, request: Request) -> Response:
        try:
            options = self._options(request)
            uid = request.path_params["uid"]
            try:
                selector = ExportSelector(studies=(uid,))
            except ValidationError:
                raise Refused(400, "that is not a Study Instance UID (digits and dots, at most "
                              "64 characters, PS3.5 9.1)", "check the UID") from None
        except Refused as refused:
            return refused.response()
        return await self._export(request.scope[GRANT], "study", uid, selector, "study",
                                  options)

    async def patient(self, request: Request) -> Response:
        try:
            options = self._options(request)
            patient_id = patient_id_of(request)
        except Refused as refused:
            return refused.response()
        return await self._export(request.scope[GRANT], "patient", patient_id,
                                  ExportSelector(patients=(patient_id,)), "patient", options)

    async def everything(self, request: Request) -> Response:
        grant: Grant = request.scope[GRANT]
        if grant.role != "admin":
            return problem(403, "exporting everything needs an admin token",
                           "ask for /api/export/patient/{id} or /study/{uid}, or use a token "
                           'with role = "admin"')
        try:
            options = self._options(request)
        except Refused as refused:
            return refused.response()
        return await self._export(grant, "all", None, ExportSelector(), "patient", options)

    # -- the export ---------------------------------------------------------------------------

    def _options(self, request: Request) -> ExportOptions:
        for key in request.query_params:
            if key not in PARAMETERS:
                raise Refused(400, f"unknown query parameter {key!r}",
                              f"use only {' and '.join(PARAMETERS)}")
        chosen: dict[str, str] = {}
        for key, allowed in PARAMETERS.items():
            values = request.query_params.getlist(key)
            if len(values) > 1:
                raise Refused(400, f"{key} is given {len(values)} times", "give it once")
            if values and values[0] not in allowed:
                raise Refused(400, f"{key}={values[0]!r} is not allowed",
                              f"use {key}={' or '.join(allowed)}")
            if values:
                chosen[key] = values[0]
        update: dict[str, object] = {}
        if "includeImages" in chosen:
            update["include_images"] = chosen["includeImages"] == "true"
        if "format" in chosen:
            update["format"] = chosen["format"]
        return self._config.api.export_options.model_copy(update=update)

    def _visible(self, selector: ExportSelector, sites: select.SiteScope | None) -> bool:
        today = self._clock().astimezone().date()
        with self._sessions() as session:
            return bool(select.study_uids(session, selector, today, None, sites))

    async def _export(self, grant: Grant, what: Literal["study", "patient", "all"],
                      subject: str | None, selector: ExportSelector,
                      per: Literal["study", "patient"], options: ExportOptions) -> Response:
        if not await anyio.to_thread.run_sync(self._visible, selector, grant.sites):
            body = NOT_FOUND[what]
            return problem(404, body["error"], body["fix"])
        folder = self._temporary / secrets.token_hex(8)
        folder.mkdir(parents=True)
        request = ExportRequest(
            key="api", actor=grant.actor, what=what, selector=selector, per=per,
            options=options, destination=folder, sites=grant.sites)
        log.info("api export by %s: %s%s", grant.actor, what,
                 f" {subject}" if what == "study" else "")  # a Patient ID is never logged

        def run(hook: ArchiveHook, check: Callable[[], None]) -> ExportReport:
            exporter = Exporter(self._sessions, make_sources(self._config), _Reporter(check),
                                self._clock, self._metrics, on_final=hook)
            return exporter.run(request)

        live = LiveExport(run, folder, lambda: self._cancelled(request, subject))
        live.start()
        events = live.events()
        if what == "all":
            return ExportResponse(live, outer_zip(events, self._clock()), "application/zip",
                                  ALL_NAME)
        try:
            first = await anext(events)
        except StopAsyncIteration:
            live.close()
            return problem(404, NOT_FOUND[what]["error"], NOT_FOUND[what]["fix"])
        except ExportBroken:
            live.close()
            return problem(500, "the export failed", "try again; if it fails again, the "
                           "service log says why (by UID)")
        if isinstance(first, Failed):
            live.close()
            return problem(409, f"the archive cannot be made: {first.error}",
                           "ask the gateway's operator (instances may be missing from the "
                           "spool and from every destination)")
        assert isinstance(first, Begin)
        media = "application/json" if options.format == "json" else "application/zip"
        return ExportResponse(live, data_only(events), media, first.name)

    def _cancelled(self, request: ExportRequest, subject: str | None) -> None:
        with self._sessions() as session:
            audit.record(session, request.actor, "export",
                         subject if request.what == "study" else None, self._clock(),
                         what=request.what, subject=subject,
                         options=request.options.model_dump(mode="json"), outcome="cancelled",
                         error="the client disconnected before the export was sent whole")
            session.commit()


def patient_id_of(request: Request) -> str:
    """The Patient ID exactly as sent: the raw path after the prefix, percent-decoded once as
    UTF-8 (so ``%2F`` and ``..`` are characters of the ID, never path syntax)."""
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes) and raw.startswith(PATIENT_PREFIX):
        try:
            patient_id = unquote_to_bytes(raw[len(PATIENT_PREFIX):]).decode("utf-8")
        except UnicodeDecodeError:
            raise Refused(400, "the Patient ID is not UTF-8 once percent-decoded",
                          "percent-encode the ID's UTF-8 bytes") from None
    else:  # a server that does not give the raw path: the decoded one
        patient_id = str(request.path_params["patient_id"])
    if not patient_id:
        raise Refused(400, "no Patient ID", "use /api/export/patient/{id}, the ID "
                      "percent-encoded")
    return patient_id


async def data_only(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    """One archive's bytes (the first Begin was consumed by the caller)."""
    async for event in events:
        if isinstance(event, Data) and event.data:
            yield event.data
        elif isinstance(event, Begin | Failed):
            raise ExportBroken("a second archive in a one-archive export")


class _Chunks:
    """A write-only, non-seekable stream: ``zipfile`` then writes data descriptors after each
    entry (APPNOTE 4.3.9) and never seeks back, so the outer ZIP streams too."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def write(self, data: bytes, /) -> int:
        self._pending += data
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data, self._pending = bytes(self._pending), bytearray()
        return data


async def outer_zip(events: AsyncIterator[Event], when: datetime) -> AsyncIterator[bytes]:
    """``/all``: one ZIP holding each patient's archive as an entry (stored: the inner ZIPs'
    DICOM files are as received, compressing them again would cost more than it saves), written
    with the standard library's ``zipfile`` to a non-seekable stream. Why a ZIP of ZIPs: every
    patient archive stays exactly what ``/patient/{id}`` gives (its manifest and SHA-256 hold),
    any unzip tool opens it, and one response needs no client-side logic. An archive that
    could not be made is an entry ``<name>.error.txt`` saying why."""
    sink = _Chunks()
    stamp = when.astimezone().timetuple()[:6]
    archive = zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED)
    entry = None
    async for event in events:
        if isinstance(event, Begin):
            info = zipfile.ZipInfo(event.name, date_time=stamp)
            entry = archive.open(info, "w", force_zip64=True)
        elif isinstance(event, Data) and entry is not None:
            entry.write(event.data)
        elif isinstance(event, End) and entry is not None:
            entry.close()
            entry = None
        elif isinstance(event, Failed):
            info = zipfile.ZipInfo(event.name + ".error.txt", date_time=stamp)
            archive.writestr(info, f"not exported: {event.error}\n")
        data = sink.take()
        if data:
            yield data
    archive.close()
    yield sink.take()


def temporary_root(spool_dir: Path) -> Path:
    return spool_dir / TEMPORARY
