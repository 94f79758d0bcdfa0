"""The Orthanc test helper itself: it starts, stores, survives a restart, speaks DICOMweb."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.factory import make_dataset, write_file
from tests.orthanc import Orthanc

OrthancFactory = Callable[..., Orthanc]


def test_stores_and_keeps_instances_across_restart(
    orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    orthanc = orthanc_factory()
    ds = make_dataset()
    data = write_file(ds, tmp_path / "one.dcm").read_bytes()

    assert orthanc.post_bytes("/instances", data)["Status"] == "Success"

    def check() -> None:
        assert orthanc.instance_count() == 1
        assert orthanc.sop_instance_uids() == {ds.SOPInstanceUID}
        assert orthanc.study_instance_uids() == {ds.StudyInstanceUID}
        assert orthanc.instance_file(ds.SOPInstanceUID) == data

    check()
    assert (orthanc.root / "storage").is_dir() and (orthanc.root / "index").is_dir()
    with pytest.raises(KeyError):
        orthanc.instance_file("1.2.3.4")

    orthanc.stop()
    assert orthanc.process is None
    orthanc.start()
    check()

    # The REST API wants the registered user's password.
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(orthanc.url + "/system", timeout=5).close()
    assert error.value.code == 401
    error.value.close()


def test_modalities_and_dicom_port(orthanc_factory: OrthancFactory) -> None:
    orthanc = orthanc_factory(modalities={"gateway": ("GATEWAY", "127.0.0.1", 11112)})

    assert orthanc.get_json("/modalities") == ["gateway"]
    modality = orthanc.get_json("/modalities?expand")["gateway"]
    assert (modality["AET"], modality["Host"], modality["Port"]) == ("GATEWAY", "127.0.0.1", 11112)

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_dicomweb_stow_and_qido(orthanc_factory: OrthancFactory, tmp_path: Path) -> None:
    orthanc = orthanc_factory(dicomweb=True)
    ds = make_dataset()
    data = write_file(ds, tmp_path / "one.dcm").read_bytes()
    boundary = "test-boundary-0123456789"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'

    status, answer = orthanc.request(
        "POST", "/dicom-web/studies", body,
        {"Content-Type": content_type, "Accept": "application/dicom+json"},
    )

    assert status == 200, answer
    stored = json.loads(answer)["00081199"]["Value"]
    assert [item["00081155"]["Value"] for item in stored] == [[ds.SOPInstanceUID]]
    assert orthanc.sop_instance_uids() == {ds.SOPInstanceUID}
    instances = orthanc.get_json(f"/dicom-web/studies/{ds.StudyInstanceUID}/instances")
    assert [i["00080018"]["Value"] for i in instances] == [[ds.SOPInstanceUID]]
