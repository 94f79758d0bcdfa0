"""Orthanc's configuration for a throwaway server on loopback, shared by the tests' fixture
(tests/orthanc.py) and the forward benchmark (scripts/bench_forward.py), so that the benchmark
measures the same server the tests check. No pytest here: the benchmark imports it too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_config(
    name: str,
    root: Path,
    http_port: int,
    dicom_port: int,
    aet: str,
    users: dict[str, str],
    modalities: dict[str, tuple[str, str, int]] | None = None,
    dicomweb: bool = False,
) -> dict[str, Any]:
    """Keys as in Debian's /etc/orthanc/*.json; storage and index under ``root``.
    ``modalities``: Orthanc "DicomModalities", name -> (AET, host, port)."""
    data: dict[str, Any] = {
        "Name": name,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": users,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomModalities": {
            name: {"AET": aet, "Host": host, "Port": port}
            for name, (aet, host, port) in (modalities or {}).items()
        },
        "DicomScuTimeout": 10,
        # Orthanc's SCU keeps an idle association open this long (default 5 s); close at once
        # so that a stopped peer does not find a half-dead association later.
        "DicomAssociationCloseDelay": 0,
        "HttpTimeout": 10,
        "StableAge": 2,
        "SaveJobs": False,
        "LogExportedResources": False,
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
    }
    if dicomweb:
        data["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
    return data
