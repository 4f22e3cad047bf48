"""The C-STORE listener against real peers: pynetdicom SCUs and DCMTK's storescu and echoscu."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pydicom.uid import MRImageStorage
from pynetdicom import AE, _config
from pynetdicom.association import Association

from ingestd.header import read_file_header
from ingestd.receive import dataphase
from tests.conftest import Receiver, make_config, start_receiver
from tests.dicom import VERIFICATION, make_instance, make_study, pydicom_file, write_instances
from tests.procs import DCMTK_ENV, journal_rows, wait_until


def _dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool (with TCP_NODELAY=1, or it crawls) to completion."""
    return subprocess.run(list(args), env=DCMTK_ENV, capture_output=True, text=True, timeout=60, check=False)


def _rows(receiver: Receiver, sql: str) -> list[tuple[object, ...]]:
    return journal_rows(receiver.config.journal_path, sql)


def _associate(port: int, calling: str = "SCANNER", contexts: list[str] | None = None) -> Association:
    ae = AE(ae_title=calling)
    for abstract in contexts or [MRImageStorage]:
        ae.add_requested_context(abstract)
    return ae.associate("127.0.0.1", port, ae_title="INGESTD")


class TestPynetdicomPeer:
    def test_multi_series_study_is_spooled_and_journaled(self, receiver: Receiver) -> None:
        """A real SCU sends three series; every instance is acknowledged, on disk and in the journal."""
        study = make_study(series=3, per_series=4)
        assoc = _associate(receiver.port)
        assert assoc.is_established
        statuses = [assoc.send_c_store(ds).Status for ds in study]
        assoc.release()
        assert statuses == [0x0000] * len(study)

        rows = _rows(receiver, "SELECT sop_uid, series_uid, spool_path, source FROM instances")
        assert {row[0] for row in rows} == {ds.SOPInstanceUID for ds in study}
        assert len({row[1] for row in rows}) == 3
        assert {row[3] for row in rows} == {"SCANNER"}
        for sop_uid, _series, spool_path, _source in rows:
            stored = pydicom.dcmread(receiver.config.spool_dir / str(spool_path))
            assert stored.SOPInstanceUID == sop_uid
            assert stored.file_meta.MediaStorageSOPInstanceUID == sop_uid
            assert stored.file_meta.SourceApplicationEntityTitle == "SCANNER"
        batches = _rows(receiver, "SELECT study_uid, batch, state FROM batches")
        assert batches == [(study[0].StudyInstanceUID, 1, "receiving")]
        assert not list((receiver.config.spool_dir / ".tmp").iterdir())

    @pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm", "image_dfl.dcm"])
    def test_compressed_instance_is_stored_byte_identical(self, receiver: Receiver, name: str) -> None:
        """RLE, JPEG 2000 and deflated data sets are stored exactly as sent, never decoded."""
        path = pydicom_file(name)
        original = path.read_bytes()
        meta_end = _data_start(original)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        syntax = ds.file_meta.TransferSyntaxUID
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(ds.SOPClassUID, [syntax])
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="INGESTD")
        assert assoc.is_established
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's own bytes, not a re-encoding
        try:
            status = assoc.send_c_store(path).Status
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
            assoc.release()
        assert status == 0x0000
        (spool_path,) = _rows(receiver, "SELECT spool_path FROM instances")[0]
        stored = (receiver.config.spool_dir / str(spool_path)).read_bytes()
        assert stored[_data_start(stored) :] == original[meta_end:]
        assert pydicom.dcmread(receiver.config.spool_dir / str(spool_path)).file_meta.TransferSyntaxUID == syntax

    def test_disallowed_calling_aet_is_rejected(self, tmp_path: Path) -> None:
        """A calling AE title missing from a non-empty allow-list is rejected at association time."""
        config = make_config(tmp_path, "")
        config = config.model_copy(
            update={"listener": config.listener.model_copy(update={"allowed_calling_aets": ("MR1", "CT1")})}
        )
        running = start_receiver(config)
        try:
            refused = _associate(running.port, calling="INTRUDER")
            assert refused.is_rejected
            allowed = _associate(running.port, calling="MR1")
            assert allowed.is_established
            assert allowed.send_c_store(make_instance()).Status == 0x0000
            allowed.release()
        finally:
            running.listener.stop(grace_seconds=1)
            running.journal.close()

    def test_full_spool_refuses_with_out_of_resources(self, tmp_path: Path) -> None:
        """Below the free-space floor the scanner gets 0xA700, nothing is journaled, no temp file is left."""
        free_mb = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize // 2**20
        config = make_config(tmp_path, "")
        config = config.model_copy(update={"spool": config.spool.model_copy(update={"min_free_mb": free_mb + 1024})})
        running = start_receiver(config)
        try:
            assoc = _associate(running.port)
            status = assoc.send_c_store(make_instance()).Status
            assoc.release()
            assert status == 0xA700
            assert running.journal.instance_count() == 0
            assert not list((config.spool_dir / ".tmp").iterdir())
        finally:
            running.listener.stop(grace_seconds=1)
            running.journal.close()

    def test_missing_uids_cannot_be_understood(self, receiver: Receiver) -> None:
        """A data set without a StudyInstanceUID gets a 0xC2xx failure, never success."""
        ds = make_instance()
        del ds.StudyInstanceUID
        assoc = _associate(receiver.port)
        status = assoc.send_c_store(ds).Status
        assoc.release()
        assert 0xC000 <= status <= 0xCFFF
        assert receiver.journal.instance_count() == 0

    def test_path_hostile_uid_is_refused(self, receiver: Receiver) -> None:
        """A UID that is not digits and dots never becomes a spool path."""
        ds = make_instance()
        with pytest.warns(UserWarning, match="Invalid value for VR UI"):
            ds.SeriesInstanceUID = "1.2/../../etc"
        assoc = _associate(receiver.port)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            status = assoc.send_c_store(ds).Status
        assoc.release()
        assert 0xC000 <= status <= 0xCFFF
        assert not list(receiver.config.spool_dir.rglob("*.dcm"))

    def test_same_instance_twice(self, receiver: Receiver) -> None:
        """Identical bytes are a no-op; different bytes replace the earlier copy, which is kept aside; all recorded."""
        ds = make_instance(fill=1)
        first_pixels = ds.PixelData
        assoc = _associate(receiver.port)
        assert assoc.send_c_store(ds).Status == 0
        assert assoc.send_c_store(ds).Status == 0
        ds.PixelData = b"\x07" * len(ds.PixelData)
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        outcomes = [row[0] for row in _rows(receiver, "SELECT outcome FROM receipts ORDER BY id")]
        assert outcomes == ["stored", "duplicate", "superseded", "replaced"]
        (spool_path,) = _rows(receiver, "SELECT spool_path FROM instances")[0]
        assert pydicom.dcmread(receiver.config.spool_dir / str(spool_path)).PixelData == ds.PixelData
        (kept,) = _rows(receiver, "SELECT path FROM superseded")[0]
        assert pydicom.dcmread(receiver.config.state_dir / str(kept)).PixelData == first_pixels

    def test_concurrent_associations(self, receiver: Receiver) -> None:
        """Four associations storing at once all succeed and all land."""
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

        studies = [make_study(series=1, per_series=5) for _ in range(4)]

        def send(study: list[pydicom.Dataset]) -> list[int]:
            assoc = _associate(receiver.port)
            statuses = [assoc.send_c_store(ds).Status for ds in study]
            assoc.release()
            return statuses

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(send, studies))
        assert all(status == 0 for statuses in results for status in statuses)
        assert receiver.journal.instance_count() == 20

    def test_echo(self, receiver: Receiver) -> None:
        """C-ECHO is answered with success."""
        assoc = _associate(receiver.port, contexts=[VERIFICATION])
        assert assoc.send_c_echo().Status == 0
        assoc.release()


@pytest.mark.usefixtures("dcmtk")
class TestDcmtkPeer:
    def test_storescu_sends_a_folder(self, receiver: Receiver, tmp_path: Path) -> None:
        """DCMTK storescu sends a folder recursively; every file is spooled."""
        study = make_study(series=2, per_series=10)
        folder = tmp_path / "scan"
        write_instances(study[:10], folder / "a")
        write_instances(study[10:], folder / "b")
        result = _dcmtk(
            "storescu",
            "-aet",
            "MRSCANNER",
            "-aec",
            "INGESTD",
            "+sd",
            "+r",
            "127.0.0.1",
            str(receiver.port),
            str(folder),
        )
        assert result.returncode == 0, result.stderr
        rows = _rows(receiver, "SELECT sop_uid, source FROM instances")
        assert {row[0] for row in rows} == {ds.SOPInstanceUID for ds in study}
        assert {row[1] for row in rows} == {"MRSCANNER"}

    def test_echoscu(self, receiver: Receiver) -> None:
        """DCMTK echoscu gets an answer."""
        result = _dcmtk("echoscu", "-aec", "INGESTD", "127.0.0.1", str(receiver.port))
        assert result.returncode == 0, result.stderr

    def test_storescu_disallowed_aet(self, tmp_path: Path) -> None:
        """storescu from a calling AE off the allow-list fails to associate."""
        config = make_config(tmp_path, "")
        config = config.model_copy(
            update={"listener": config.listener.model_copy(update={"allowed_calling_aets": ("MR1",)})}
        )
        running = start_receiver(config)
        try:
            file = write_instances([make_instance()], tmp_path / "one")[0]
            result = _dcmtk("storescu", "-aet", "OTHER", "-aec", "INGESTD", "127.0.0.1", str(running.port), str(file))
            assert result.returncode != 0
            assert "Rejected" in result.stderr or "rejected" in result.stderr.lower()
            assert running.journal.instance_count() == 0
        finally:
            running.listener.stop(grace_seconds=1)
            running.journal.close()


def _data_start(data: bytes) -> int:
    """Offset of the data set after preamble and file meta."""
    assert data[128:132] == b"DICM"
    group_length = int.from_bytes(data[140:144], "little")
    return 144 + group_length


def test_read_file_header_matches_pydicom() -> None:
    """The cheap header reader agrees with a full pydicom read on a bundled file."""
    path = pydicom_file("CT_small.dcm")
    header = read_file_header(path.read_bytes())
    ds = pydicom.dcmread(path)
    assert (header.study_uid, header.series_uid, header.sop_uid) == (
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
    )


class TestDataPhase:
    """ingestd serves the data phase of an association itself (see ingestd/receive/dataphase.py); it must end
    associations as a DICOM peer expects."""

    def test_this_pynetdicom_gets_the_data_phase(self) -> None:
        assert dataphase.available(), f"check dataphase.py against pynetdicom {pynetdicom.__version__}'s internals"

    def test_release_and_stores_on_one_association(self, receiver: Receiver) -> None:
        study = make_study(series=1, per_series=20)
        assoc = _associate(receiver.port)
        assert [assoc.send_c_store(ds).Status for ds in study] == [0x0000] * 20
        assoc.release()
        assert assoc.is_released
        wait_until(lambda: receiver.listener.association_count() == 0, timeout=10)

    def test_peer_abort_ends_the_association(self, receiver: Receiver) -> None:
        assoc = _associate(receiver.port)
        assert assoc.send_c_store(make_instance()).Status == 0x0000
        assoc.abort()
        wait_until(lambda: receiver.listener.association_count() == 0, timeout=10)

    def test_network_timeout_ends_an_idle_association(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        listener = config.listener.model_copy(update={"network_timeout_seconds": 0.5})
        running = start_receiver(config.model_copy(update={"listener": listener}))
        try:
            assoc = _associate(running.port)
            assert assoc.is_established
            wait_until(lambda: not assoc.is_established, timeout=10)
            wait_until(lambda: running.listener.association_count() == 0, timeout=10)
        finally:
            running.listener.stop(grace_seconds=2)
            running.journal.close()
