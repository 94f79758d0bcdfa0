"""C-STORE SCU to a DICOM peer; proof by C-FIND at IMAGE level (PS3.4 C.6.2), probe by C-ECHO.

The stored transfer syntax is offered in a context of its own, and explicit and implicit VR little
endian in another (``sending_contexts``). A file the peer accepts as stored is streamed from disk
without decoding (pynetdicom's ``STORE_SEND_CHUNKED_DATASET``); one it accepts only uncompressed is
decoded and decompressed (pydicom with the pylibjpeg / Pillow plugins) first, keeping its UIDs. Statuses (PS3.4 B.2.3): 0x0000 and 0xBxxx
warnings are stored; 0xA7xx out of resources is retried; 0xA9xx, 0xCxxx and the rest are refusals
of the instance, which trying again would not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from gateway.config import DimseDestination
from gateway.dicom.contexts import sending_contexts
from gateway.dicom.transcode import as_uncompressed
from gateway.errors import PermanentError, RetriableError
from gateway.forward.destinations.base import send_each
from gateway.forward.outbox import Outgoing, Result, Sent
from gateway.receive.fastpath import RequestingAssociation

# PS3.4 Annex A and C.6.2.1 SOP classes, by UID (pynetdicom's names are generated at import)
Verification = UID("1.2.840.10008.1.1")
StudyRootQueryRetrieveInformationModelFind = UID("1.2.840.10008.5.1.4.1.2.2.1")
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_config.STORE_SEND_CHUNKED_DATASET = True


class Dimse:
    def __init__(self, config: DimseDestination, calling_ae: str) -> None:
        self.name = config.name
        self._config = config
        self._calling_ae = calling_ae

    def send(self, batch: Sequence[Outgoing]) -> list[Result]:
        contexts = sending_contexts((j.sop_class_uid, j.transfer_syntax_uid) for j in batch)
        included = {(c.abstract_syntax, s) for c in contexts for s in c.transfer_syntax}
        batch = [j for j in batch if (j.sop_class_uid, j.transfer_syntax_uid) in included]
        try:
            assoc = self._associate(contexts)
        except _NotAccepted as exc:
            self.probe()  # down (retriable) or up and refusing these SOP classes (permanent)?
            classes = ", ".join(sorted({str(c.abstract_syntax) for c in contexts}))
            raise PermanentError(
                f"{self.name} answers C-ECHO but {exc.why} an association for SOP class {classes}"
            ) from exc
        try:
            return send_each(batch, lambda job: self._store(assoc, job))
        finally:
            _release(assoc)

    def _store(self, assoc: Association, job: Outgoing) -> str | None:
        if not assoc.is_established:
            raise RetriableError(f"{self.name}: association ended")
        accepted = [c for c in assoc.accepted_contexts if c.abstract_syntax == job.sop_class_uid]
        if not accepted:
            raise PermanentError(
                f"{self.name} accepted no presentation context for SOP class {job.sop_class_uid}"
            )
        syntaxes = {UID(c.transfer_syntax[0]) for c in accepted}
        data: Path | Dataset = job.path
        if job.transfer_syntax_uid not in syntaxes:
            data = _as_uncompressed(job.path)
        status = assoc.send_c_store(data)
        code = status.get("Status") if status else None
        if code is None:
            raise RetriableError(f"{self.name}: no C-STORE response (timeout or abort)")
        if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
            return None
        if 0xA700 <= code <= 0xA7FF:
            raise RetriableError(f"{self.name}: C-STORE status 0x{code:04X} (out of resources)")
        raise PermanentError(f"{self.name}: C-STORE status 0x{code:04X}")

    def holds(self, study_uid: str, sent: Sequence[Sent]) -> set[str]:
        if self._config.verify == "none":
            return {s.sop_uid for s in sent}  # the C-STORE status is the only proof there is
        found: set[str] = set()
        assoc = self._associate([build_context(StudyRootQueryRetrieveInformationModelFind)])
        try:
            for series in sorted({s.series_uid for s in sent}):
                query = Dataset()
                query.QueryRetrieveLevel = "IMAGE"
                query.StudyInstanceUID = study_uid
                query.SeriesInstanceUID = series
                query.SOPInstanceUID = ""
                for status, identifier in assoc.send_c_find(
                    query, StudyRootQueryRetrieveInformationModelFind
                ):
                    code = status.get("Status") if status else None
                    if code is None:
                        raise RetriableError(f"{self.name}: no C-FIND response")
                    if code in (0xFF00, 0xFF01) and identifier is not None:
                        found.add(str(identifier.get("SOPInstanceUID", "")))
                    elif code != 0x0000:
                        raise RetriableError(f"{self.name}: C-FIND status 0x{code:04X}")
        finally:
            _release(assoc)
        return found

    def probe(self) -> None:
        assoc = self._associate([build_context(Verification)])
        try:
            status = assoc.send_c_echo()
            if not status or status.get("Status") != 0x0000:
                raise RetriableError(f"{self.name}: C-ECHO failed")
        finally:
            _release(assoc)

    def close(self) -> None:
        pass

    def _associate(self, contexts: list[PresentationContext]) -> Association:
        ae = AE(self._calling_ae)
        ae.requested_contexts = contexts
        timeout = self._config.timeout_s
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        assoc = ae.associate(self._config.host, self._config.port, ae_title=self._config.ae_title)
        if assoc.is_rejected or assoc.is_aborted:
            raise _NotAccepted(self.name, "rejected" if assoc.is_rejected else "aborted")
        if not assoc.is_established:
            raise RetriableError(f"{self.name}: no association (connection refused or timed out)")
        # Nagle against the peer's delayed ACKs costs 40-90 ms per message on a LAN, ours
        # (TCP_NODELAY) and the peer's (our quick ACKs: DCMTK leaves Nagle on)
        RequestingAssociation.adopt(assoc)  # and pynetdicom's lost-answer race (fastpath)
        return assoc


class _NotAccepted(RetriableError):
    """The peer answered, then rejected or aborted the association (DCMTK rejects one in which
    it accepts no presentation context)."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: association {why}")
        self.why = why


def _as_uncompressed(path: Path) -> Dataset:
    """The peer takes only uncompressed data: decode (and decompress) the stored file."""
    return as_uncompressed(dcmread(path))


def _release(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
