"""Storage classes are the lab's choice: retired standard classes and listed private ones are received and stored.

A real daemon process; pynetdicom and DCMTK's storescu as the scanners. Before, the listener offered exactly
pynetdicom's 170 storage classes: a Siemens CSA Non-Image series or an old ultrasound's retired Ultrasound Image
Storage was rejected at negotiation, and the log said only that the association was accepted.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from ingestd.config import Listener
from ingestd.deid.engine import DeidError, screen
from ingestd.deid.profile import Profile
from ingestd.journal import StudyState
from ingestd.receive.listener import DicomListener
from ingestd.receive.sopclasses import storage_sop_classes
from tests.dicom import make_instance, write_instances
from tests.procs import HOST, DaemonProcess, Storescu, free_port, journal_rows, wait_until, write_daemon_config
from tests.test_route import KEY, SCANNER, Setup

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.slow]

CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image Storage (private)
US_IMAGE_RETIRED = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)
NM_IMAGE_RETIRED = "1.2.840.10008.5.1.4.1.1.5"  # Nuclear Medicine Image Storage (Retired)
UNLISTED_PRIVATE = "1.2.840.113619.4.27"  # a GE private class this lab did not list


def csa_non_image(study_uid: str) -> Dataset:
    """A Siemens CSA Non-Image instance: private SOP class, no Pixel Data (spectroscopy, raw data headers)."""
    ds = make_instance(study_uid, generate_uid())
    del ds.PixelData
    for keyword in ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns"):
        delattr(ds, keyword)
    for keyword in ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(CSA_NON_IMAGE)
    ds.Modality = "MR"
    ds.add_new(0x00290010, "LO", "SIEMENS CSA NON-IMAGE")
    ds.add_new(0x00291010, "OB", b"SV10" + bytes(60))
    return ds


def retired(study_uid: str, sop_class: str, modality: str) -> Dataset:
    ds = make_instance(study_uid, generate_uid(), sop_class=sop_class)
    ds.Modality = modality
    return ds


def _config(tmp_path: Path, port: int) -> Path:
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port)
    text = config.read_text().replace(
        "processes: 1}\n",
        f"processes: 1, extra_sop_classes: [{{uid: '{CSA_NON_IMAGE}', name: Siemens CSA Non-Image}}]}}\n",
    )
    config.write_text(text)
    return config


def _storescu_profile(tmp_path: Path) -> Path:
    """A storescu association profile proposing the two classes (it proposes no private class by itself)."""
    path = tmp_path / "storescu.cfg"
    path.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\n"
        "TransferSyntax1 = LittleEndianExplicit\nTransferSyntax2 = LittleEndianImplicit\n"
        "[[PresentationContexts]]\n[Lab]\n"
        f"PresentationContext1 = {CSA_NON_IMAGE}\\Uncompressed\n"
        f"PresentationContext2 = {US_IMAGE_RETIRED}\\Uncompressed\n"
        "[[Profiles]]\n[Lab]\nPresentationContexts = Lab\n",
        encoding="utf-8",
    )
    return path


def _stored(tmp_path: Path) -> dict[str, str]:
    rows = journal_rows(tmp_path / "state" / "journal.sqlite", "SELECT sop_uid, sop_class_uid FROM instances")
    return dict(rows)


def test_the_listener_offers_retired_and_extra_classes() -> None:
    classes = storage_sop_classes()
    assert len(classes) > 170
    assert {US_IMAGE_RETIRED, NM_IMAGE_RETIRED, "1.2.840.10008.5.1.4.1.1.3"} <= classes.keys()
    assert "1.2.840.10008.1.20.1" not in classes  # Storage Commitment is no storage class
    assert "1.2.840.10008.5.1.4.38.1" not in classes  # hanging protocols: no patient, no study
    extra = Listener(port=0, extra_sop_classes=[{"uid": CSA_NON_IMAGE, "name": "CSA"}])
    listener = DicomListener(extra, None)  # type: ignore[arg-type]  # no spool: only the offered contexts are read
    offered = {str(context.abstract_syntax) for context in listener.ae.supported_contexts}
    assert {CSA_NON_IMAGE, US_IMAGE_RETIRED, MRImageStorage} <= offered


def test_private_and_retired_classes_are_received_and_stored(tmp_path: Path) -> None:
    port = free_port()
    config = _config(tmp_path, port)
    study = generate_uid()
    by_pynetdicom = [
        csa_non_image(study),
        retired(study, US_IMAGE_RETIRED, "US"),
        retired(study, NM_IMAGE_RETIRED, "NM"),
    ]
    by_storescu = [csa_non_image(study), retired(study, US_IMAGE_RETIRED, "US")]
    files = write_instances(by_storescu, tmp_path / "files")
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        ae = AE(ae_title="SCANNER")
        for ds in by_pynetdicom:
            ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(HOST, port, ae_title="INGESTD")
        assert assoc.is_established
        try:
            statuses = [assoc.send_c_store(ds).Status for ds in by_pynetdicom]
        finally:
            assoc.release()
        assert statuses == [0, 0, 0]
        storescu = Storescu(port, files)
        storescu.args[1:1] = ["--config-file", str(_storescu_profile(tmp_path)), "Lab"]
        with storescu:
            assert storescu.wait() == 0, storescu.output()
            assert len(storescu.acknowledged) == 2, storescu.output()
        expected = {ds.SOPInstanceUID: ds.SOPClassUID for ds in by_pynetdicom + by_storescu}
        wait_until(lambda: _stored(tmp_path) == expected, 10, message="all five instances in the journal")
        assert daemon.terminate() == 0
        assert not daemon.logged("receive.context_rejected")
        assert not daemon.logged("receive.store_refused")


def test_a_rejected_context_is_logged_once_with_its_name_and_uid(tmp_path: Path) -> None:
    port = free_port()
    config = _config(tmp_path, port)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(UNLISTED_PRIVATE, ExplicitVRLittleEndian)
        ae.add_requested_context(UNLISTED_PRIVATE, ImplicitVRLittleEndian)  # the same class twice: one entry
        ae.add_requested_context(MRImageStorage, "1.2.3.4.5.6")  # a transfer syntax nobody knows
        assoc = ae.associate(HOST, port, ae_title="INGESTD")
        assert assoc.is_established
        ds = make_instance()
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        record = daemon.wait_logged("receive.context_rejected")
        assert record["count"] == 1
        assert record["calling_aet"] == "SCANNER"
        (context,) = record["contexts"]
        assert context["sop_class_uid"] == UNLISTED_PRIVATE  # a SOP class is not PHI: not digested
        assert context["sop_class"] == "unknown"
        assert "extra_sop_classes" in context["reason"]
        assert daemon.terminate() == 0
        assert len(daemon.logged("receive.context_rejected")) == 1


def test_a_csa_non_image_instance_is_routed_and_deidentified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the listener: no Pixel Data is no fault for a private class; rules, de-identification and outbox take it."""
    monkeypatch.setenv("INGESTD_TEST_KEY", KEY)
    setup = Setup(tmp_path)
    study = generate_uid()
    images = [make_instance(study, generate_uid(), number=n) for n in (1, 2)]
    csa = csa_non_image(study)
    setup.store([*images, csa], SCANNER)
    setup.complete_all()
    assert setup.router.check() == 1
    (batch,) = setup.journal.batches()
    assert batch.state == StudyState.ROUTED, batch.reason
    outgoing = setup.journal.outgoing(batch.id)
    assert len(outgoing) == 3
    classes = {pydicom.dcmread(setup.state / item.path).SOPClassUID for item in outgoing}
    assert classes == {MRImageStorage, CSA_NON_IMAGE}  # the SOP class is kept, the instance UIDs are new


def test_retired_ultrasound_is_screened_like_its_successor() -> None:
    """The retired US classes carry burned-in text as often as the current ones: held, whatever the Modality."""
    profile = Profile(name="research", key=b"k" * 32)
    for sop_class in (US_IMAGE_RETIRED, "1.2.840.10008.5.1.4.1.1.3"):
        ds = retired(generate_uid(), sop_class, "")
        with pytest.raises(DeidError) as caught:
            screen(ds, profile)
        assert caught.value.code == "burned-in"
