"""A real PACS for tests: Debian's Orthanc, run as a throwaway subprocess.

Why Orthanc and not a stub: the gateway's promise is that what a modality sends ends up in the
PACS, so tests should check that against a real, independent PACS (its own DICOM parser, its own
storage, its own idea of duplicates), not against code we wrote ourselves. Each instance gets its
own folder (configuration, storage, index, log) and its own loopback ports, so tests run in
parallel with each other and never touch the machine's ``orthanc`` service or /etc/orthanc. The
storage outlives ``stop()``: start the same ``Orthanc`` again to see what survived a restart.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, wait_for
from tests.orthanc_config import DICOMWEB_PLUGIN, orthanc_config

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
IN_CI = os.environ.get("CI") == "true"


def require_orthanc() -> None:
    """In CI a missing Orthanc fails the run; elsewhere the test is skipped."""
    missing = [str(p) for p in (ORTHANC_BIN,) if not p.exists()]
    if missing:
        message = f"{', '.join(missing)} not found: apt-get install orthanc orthanc-dicomweb"
        pytest.fail(message) if IN_CI else pytest.skip(message)


@dataclass
class Orthanc:
    """One Orthanc server: ``start()`` writes ``<root>/orthanc.json`` and runs it."""

    root: Path
    http_port: int
    dicom_port: int
    aet: str = "ORTHANC"
    username: str = "gateway"
    password: str = "gateway-test-password"
    dicomweb: bool = False
    # Orthanc "DicomModalities": name -> (AET, host, port)
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    # Extra top-level configuration, merged last (e.g. {"OverwriteInstances": True}).
    extra_config: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def config_path(self) -> Path:
        return self.root / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    def config(self) -> dict[str, Any]:
        """The configuration ``start()`` writes (keys as in Debian's /etc/orthanc/*.json)."""
        data = orthanc_config(
            f"test-orthanc-{self.http_port}", self.root, self.http_port, self.dicom_port,
            self.aet, {self.username: self.password}, self.modalities, self.dicomweb,
        )
        data.update(self.extra_config)
        return data

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30) -> None:
        """Start Orthanc and wait until its REST API answers."""
        require_orthanc()
        if self.dicomweb and not DICOMWEB_PLUGIN.exists():
            message = f"{DICOMWEB_PLUGIN} not found: apt-get install orthanc-dicomweb"
            pytest.fail(message) if IN_CI else pytest.skip(message)
        assert not self.running(), "Orthanc is already running"
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(ORTHANC_BIN), str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
            )
        process = self.process
        try:
            wait_for(lambda: process.poll() is not None or self._answers(), timeout,
                     f"Orthanc on port {self.http_port} to answer")
        except AssertionError as error:
            self.kill()
            raise AssertionError(f"{error}; log:\n{self.log()[-3000:]}") from None
        if process.poll() is not None:
            self.process = None
            raise AssertionError(
                f"Orthanc exited at start with {process.returncode}; log:\n{self.log()[-3000:]}"
            )

    def _answers(self) -> bool:
        try:
            status, _ = self.request("GET", "/system", timeout=1)
        except OSError:
            return False
        return status == 200

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (Orthanc shuts down cleanly, in about 3.5 s), wait; SIGKILL if it takes longer
        than ``timeout``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: a crash, as far as Orthanc's storage and index are concerned."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process = None

    # --- REST API -------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> tuple[int, bytes]:
        """One HTTP request with basic auth: (status, body); HTTP errors are returned, not raised."""
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        req = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Authorization": f"Basic {token}", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as error:
            with error:
                return int(error.code), error.read()

    def _json(self, method: str, path: str, data: bytes | None, content_type: str) -> Any:
        headers = {"Content-Type": content_type} if data is not None else {}
        status, body = self.request(method, path, data, headers)
        if status >= 300:
            text = body.decode("utf-8", errors="replace")
            raise AssertionError(f"{method} {path}: HTTP {status}: {text}")
        return json.loads(body) if body else None

    def get_json(self, path: str) -> Any:
        return self._json("GET", path, None, "")

    def post_json(self, path: str, body: Any) -> Any:
        return self._json("POST", path, json.dumps(body).encode(), "application/json")

    def post_bytes(self, path: str, data: bytes, content_type: str = "application/dicom") -> Any:
        return self._json("POST", path, data, content_type)

    def delete(self, path: str) -> Any:
        return self._json("DELETE", path, None, "")

    def _find(self, level: str) -> list[dict[str, Any]]:
        found = self.post_json("/tools/find", {"Level": level, "Query": {}, "Expand": True})
        assert isinstance(found, list)
        return found

    def sop_instance_uids(self) -> set[str]:
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in self._find("Instance")}

    def study_instance_uids(self) -> set[str]:
        return {s["MainDicomTags"]["StudyInstanceUID"] for s in self._find("Study")}

    def instance_count(self) -> int:
        return int(self.get_json("/statistics")["CountInstances"])

    def instance_id(self, sop_uid: str) -> str:
        """Orthanc's identifier of the instance with this SOP Instance UID (KeyError if none)."""
        found = self.post_bytes("/tools/lookup", sop_uid.encode("ascii"), "text/plain")
        for item in found:
            if item["Type"] == "Instance":
                return str(item["ID"])
        raise KeyError(sop_uid)

    def instance_file(self, sop_uid: str) -> bytes:
        """The DICOM file Orthanc stored for this SOP Instance UID, byte for byte."""
        path = f"/instances/{self.instance_id(sop_uid)}/file"
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path}: HTTP {status}: {body[:500]!r}"
        return body


def make_orthanc(
    root: Path,
    *,
    dicomweb: bool = False,
    modalities: dict[str, tuple[str, str, int]] | None = None,
) -> Orthanc:
    """An Orthanc in ``root`` on free loopback ports, started."""
    orthanc = Orthanc(root, free_port(), free_port(), dicomweb=dicomweb,
                      modalities=dict(modalities or {}))
    orthanc.start()  # on failure, start() has already reaped the process
    return orthanc


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """``orthanc_factory(dicomweb=..., modalities=...)``: a started Orthanc in its own folder
    under tmp_path; every one is killed at teardown."""
    started: list[Orthanc] = []

    def factory(
        *,
        dicomweb: bool = False,
        modalities: dict[str, tuple[str, str, int]] | None = None,
    ) -> Orthanc:
        root = tmp_path / f"orthanc-{len(started)}"
        # Registered before it starts, so that teardown also reaps one that failed to answer.
        orthanc = Orthanc(root, free_port(), free_port(), dicomweb=dicomweb,
                          modalities=dict(modalities or {}))
        started.append(orthanc)
        orthanc.start()
        return orthanc

    yield factory
    # SIGKILL, not stop(): its folder is thrown away, and a clean stop takes Orthanc 1.10 about
    # 3.5 s (its HTTP and DICOM servers notice the request to stop by polling).
    for orthanc in started:
        orthanc.kill()
