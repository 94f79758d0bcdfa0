"""STOW-RS (PS3.18 10.5) to any DICOMweb server; proof by QIDO-RS (PS3.18 10.6).

Several instances go in one ``multipart/related; type="application/dicom"`` request, as received
(no re-encoding); the response's Referenced SOP Sequence (0008,1199) lists what was stored and the
Failed SOP Sequence (0008,1198) what was not, with a Failure Reason (0008,1197) each.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from gateway.config import DicomwebDestination
from gateway.errors import PermanentError, RetriableError
from gateway.forward.destinations.base import http_error
from gateway.forward.destinations.http import Sessions
from gateway.forward.outbox import Delivered, Failed, Outgoing, Result, Sent

REFERENCED_SOP = "00081199"
FAILED_SOP = "00081198"
REFERENCED_SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"
SOP_INSTANCE_UID = "00080018"
# PS3.18 Table I.2-1 failure reasons that trying again may cure (0xA7xx: out of resources)
_TRANSIENT_REASONS = range(0xA700, 0xA800)


class Dicomweb:
    def __init__(self, config: DicomwebDestination) -> None:
        self.name = config.name
        self._url = config.url.rstrip("/")
        self._per_request = config.instances_per_request
        self._http = Sessions(config)

    def send(self, batch: Sequence[Outgoing]) -> list[Result]:
        results: list[Result] = []
        for start in range(0, len(batch), self._per_request):
            part = batch[start : start + self._per_request]
            try:
                results.extend(self._stow(part))
            except RetriableError:
                if not results:
                    raise
                break
            except PermanentError as exc:
                results.extend(Failed(job, str(exc), permanent=True) for job in part)
        return results

    def _stow(self, part: Sequence[Outgoing]) -> list[Result]:
        boundary = uuid.uuid4().hex
        chunks: list[bytes] = []
        for job in part:
            chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            chunks.append(job.path.read_bytes())
            chunks.append(b"\r\n")
        chunks.append(f"--{boundary}--\r\n".encode())
        response = self._http.request(
            "POST", f"{self._url}/studies", data=b"".join(chunks),
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
            },
        )
        if response.status_code in (200, 202, 409):
            return _per_instance(part, _json(response.content), unnamed_permanent=False)
        if response.status_code == 400 and REFERENCED_SOP in response.text:
            # Orthanc's plugin answers 400 when some parts were not stored, yet stores the rest
            return _per_instance(part, _json(response.content), unnamed_permanent=True)
        raise http_error(response.status_code, "STOW-RS")

    def holds(self, study_uid: str, sent: Sequence[Sent]) -> set[str]:
        response = self._http.request(
            "GET", f"{self._url}/studies/{study_uid}/instances",
            params={"includefield": SOP_INSTANCE_UID}, headers={"Accept": "application/dicom+json"},
        )
        if response.status_code in (204, 404):
            return set()
        if response.status_code != 200:
            raise http_error(response.status_code, "QIDO-RS")
        found = _json(response.content)
        items = found if isinstance(found, list) else []
        return {str(v) for item in items for v in item.get(SOP_INSTANCE_UID, {}).get("Value", [])}

    def probe(self) -> None:
        response = self._http.request(
            "GET", f"{self._url}/studies", params={"limit": "1"},
            headers={"Accept": "application/dicom+json"},
        )
        if response.status_code not in (200, 204):
            raise http_error(response.status_code, "QIDO-RS probe")

    def close(self) -> None:
        self._http.close()


def _json(content: bytes) -> Any:
    if not content.strip():
        return {}
    try:
        return json.loads(content)
    except ValueError:
        raise RetriableError("the DICOMweb server answered with something that is not JSON") from None


def _per_instance(part: Sequence[Outgoing], answer: Any, unnamed_permanent: bool) -> list[Result]:
    """Match the response to the request by SOP Instance UID. An instance the answer does not
    name was not stored: tried again, unless the server refused the request (400)."""
    answer = answer[0] if isinstance(answer, list) and answer else answer
    if not isinstance(answer, dict):
        answer = {}
    stored = {
        str(item.get(REFERENCED_SOP_INSTANCE, {}).get("Value", [""])[0])
        for item in answer.get(REFERENCED_SOP, {}).get("Value", [])
    }
    failed: dict[str, int] = {}
    for item in answer.get(FAILED_SOP, {}).get("Value", []):
        uid = str(item.get(REFERENCED_SOP_INSTANCE, {}).get("Value", [""])[0])
        reasons = item.get(FAILURE_REASON, {}).get("Value", [0])
        failed[uid] = int(reasons[0]) if reasons else 0
    results: list[Result] = []
    for job in part:
        if job.sop_uid in stored:
            results.append(Delivered(job))
        elif job.sop_uid in failed:
            reason = failed[job.sop_uid]
            results.append(Failed(job, f"STOW-RS failure reason 0x{reason:04X}",
                                  permanent=reason not in _TRANSIENT_REASONS))
        else:
            results.append(Failed(job, "STOW-RS answer did not name this instance",
                                  permanent=unnamed_permanent))
    return results
