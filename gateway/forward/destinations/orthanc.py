"""Orthanc over its REST API: ``POST /instances`` per instance; proof by ``/tools/find``.

Orthanc answers a stored instance with ``Status`` ``Success`` or ``AlreadyStored`` (it keeps the
first copy of a SOP Instance UID), which makes a repeated send harmless: delivery is at least once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import BinaryIO

from gateway.config import OrthancDestination
from gateway.errors import PermanentError
from gateway.forward.destinations.base import http_error, send_each
from gateway.forward.destinations.http import Sessions
from gateway.forward.outbox import Outgoing, Result, Sent

STORED = ("Success", "AlreadyStored")
IN_ONE_PIECE_BYTES = 32 * 1024 * 1024


class Orthanc:
    def __init__(self, config: OrthancDestination) -> None:
        self.name = config.name
        self._url = config.url.rstrip("/")
        self._http = Sessions(config)

    def send(self, batch: Sequence[Outgoing]) -> list[Result]:
        return send_each(batch, self._send_one)

    def _send_one(self, job: Outgoing) -> str | None:
        with open(job.path, "rb") as file:
            # Sent in one piece when small: streamed, a file goes out in 8 KiB writes (and as
            # many loopback segments), which cost more CPU than the copy. A 1 GB multi-frame is
            # still streamed, never held in memory.
            size = os.fstat(file.fileno()).st_size
            body: bytes | BinaryIO = file.read() if size <= IN_ONE_PIECE_BYTES else file
            response = self._http.request(
                "POST", f"{self._url}/instances", data=body,
                headers={"Content-Type": "application/dicom"},
            )
        if response.status_code != 200:
            raise http_error(response.status_code, "POST /instances")
        answer = response.json()
        if answer.get("Status") not in STORED:
            raise PermanentError(f"Orthanc answered Status {answer.get('Status')!r}")
        return str(answer.get("ID")) if answer.get("ID") else None

    def holds(self, study_uid: str, sent: Sequence[Sent]) -> set[str]:
        response = self._http.request(
            "POST", f"{self._url}/tools/find",
            json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
        )
        if response.status_code != 200:
            raise http_error(response.status_code, "POST /tools/find")
        return {str(i.get("MainDicomTags", {}).get("SOPInstanceUID")) for i in response.json()}

    def fetch(self, remote_id: str) -> bytes:
        """The instance as Orthanc holds it: for a retrieve after retention removed our copy."""
        response = self._http.request("GET", f"{self._url}/instances/{remote_id}/file")
        if response.status_code != 200:
            raise http_error(response.status_code, f"GET /instances/{remote_id}/file")
        return response.content

    def probe(self) -> None:
        response = self._http.request("GET", f"{self._url}/system")
        if response.status_code != 200:
            raise http_error(response.status_code, "GET /system")

    def close(self) -> None:
        self._http.close()
