"""Which SOP classes the gateway accepts at association: every storage class, retired included,
and the private ones listed in ``dicom.extra_storage_sop_classes``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom._uid_dict import UID_dictionary
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext

from gateway.app import Gateway
from gateway.config import load
from gateway.dicom.contexts import MAX_REQUESTED, scp_contexts, storage_sop_classes
from gateway.dicom.status import Status
from gateway.errors import ConfigError
from tests.conftest import rows
from tests.factory import make_dataset, write_file
from tests.peers import dcmtk, spool_files

RETIRED_ULTRASOUND_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6"
PRIVATE_STORAGE = "1.2.826.0.1.3680043.9.7433.1.1"  # a vendor's own, as its conformance names it


def _retired_storage_classes() -> set[str]:
    return {
        uid for uid, (name, kind, _, retired, _) in UID_dictionary.items()
        if kind == "SOP Class" and retired and "Storage" in name and "Commitment" not in name
    }


def test_the_storage_list_holds_every_standard_and_retired_class() -> None:
    """Independent of how contexts.py builds it: pynetdicom's list, and every retired storage
    class pydicom names (the ultrasound, nuclear medicine and standalone ones among them)."""
    accepted = set(storage_sop_classes())
    assert {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts} <= accepted
    retired = _retired_storage_classes()
    assert RETIRED_ULTRASOUND_IMAGE_STORAGE in retired
    assert len(retired) >= 20
    assert retired <= accepted
    # Storage Commitment and the DICOMDIR are named "Storage" but no C-STORE carries them.
    assert not {"1.2.840.10008.1.20.1", "1.2.840.10008.1.3.10"} & accepted


def _accepted(port: int, sop_classes: list[str]) -> set[str]:
    """Propose every class, at most 127 an association (PS3.8 allows 128 context IDs)."""
    accepted: set[str] = set()
    for first in range(0, len(sop_classes), MAX_REQUESTED - 1):
        ae = AE(ae_title="EVERYCLASS")
        for sop_class in sop_classes[first:first + MAX_REQUESTED - 1]:
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
        assert assoc.is_established, "association was not accepted"
        accepted |= {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assoc.release()
    return accepted


def test_every_storage_sop_class_is_accepted_at_association(
    make_gateway: Callable[..., Gateway]
) -> None:
    app = make_gateway()
    assert app.receiver is not None
    everything = sorted(storage_sop_classes())
    assert _accepted(app.receiver.address[1], everything) == set(everything)


def test_retired_ultrasound_image_is_stored_with_dcmsend(
    make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    """What older ultrasound devices still send; DCMTK's storescp keeps it."""
    app = make_gateway()
    assert app.receiver is not None
    ds = make_dataset(SOPClassUID=RETIRED_ULTRASOUND_IMAGE_STORAGE, Modality="US")
    source = write_file(ds, tmp_path / "us.dcm")
    result = dcmtk("dcmsend", "-aet", "OLD_US", "-aec", "GATEWAY", "127.0.0.1",
                   str(app.receiver.address[1]), str(source))
    assert result.returncode == 0, result.stderr + result.stdout
    [kept] = spool_files(app.spool.root)
    assert kept.name == f"{ds.SOPInstanceUID}.dcm"
    [row] = rows(f"sqlite:///{tmp_path / 'gateway.db'}", "SELECT sop_class_uid FROM instances")
    assert row.sop_class_uid == RETIRED_ULTRASOUND_IMAGE_STORAGE


def test_configured_private_storage_classes_are_added_to_the_contexts() -> None:
    contexts = scp_contexts([PRIVATE_STORAGE, RETIRED_ULTRASOUND_IMAGE_STORAGE])
    syntaxes: dict[str | None, PresentationContext] = {cx.abstract_syntax: cx for cx in contexts}
    assert len(syntaxes) == len(contexts)  # a standard class listed again is not doubled
    private = syntaxes[PRIVATE_STORAGE]
    assert private.transfer_syntax == syntaxes[RETIRED_ULTRASOUND_IMAGE_STORAGE].transfer_syntax
    assert (private.scu_role, private.scp_role) == (True, True)
    assert PRIVATE_STORAGE not in {cx.abstract_syntax for cx in scp_contexts()}


def test_configured_private_storage_class_is_accepted_and_stored(
    make_gateway: Callable[..., Gateway]
) -> None:
    from tests.peers import store

    app = make_gateway(dicom={"extra_storage_sop_classes": [PRIVATE_STORAGE]})
    assert app.receiver is not None
    assert _accepted(app.receiver.address[1], [PRIVATE_STORAGE]) == {PRIVATE_STORAGE}
    assert store(app.receiver.address[1], make_dataset(SOPClassUID=PRIVATE_STORAGE)) == (
        Status.SUCCESS)


def test_a_private_storage_class_must_be_a_uid(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(f'[dicom]\nextra_storage_sop_classes = ["{PRIVATE_STORAGE}", "1.2.x"]\n')
    with pytest.raises(ConfigError) as error:
        load(path, environ={})
    [problem] = error.value.problems
    assert "dicom.extra_storage_sop_classes" in problem and "'1.2.x' is not a UID" in problem
    path.write_text(f'[dicom]\nextra_storage_sop_classes = ["{PRIVATE_STORAGE}"]\n')
    assert load(path, environ={}).dicom.extra_storage_sop_classes == (PRIVATE_STORAGE,)
