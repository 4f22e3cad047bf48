"""The header reader: the fast element walker agrees with pydicom, and the meta prefix is valid."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ingestd.errors import InvalidInstanceError
from ingestd.header import file_meta_prefix, read_file_header, read_stream_header
from tests.dicom import make_instance, pydicom_file

TEST_FILES = sorted(pydicom_file("CT_small.dcm").parent.glob("*.dcm"))


def _encode(ds: Dataset, syntax: str) -> bytes:
    buffer = BytesIO()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    dcmwrite(buffer, ds, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True, enforce_file_format=True)
    data = buffer.getvalue()
    return data[144 + int.from_bytes(data[140:144], "little") :]


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@given(depth=st.integers(0, 3), undefined=st.booleans(), items=st.integers(0, 3))
def test_walker_skips_nested_sequences(syntax: str, depth: int, undefined: bool, items: int) -> None:
    """Sequences before the wanted tags, nested and of undefined length, do not confuse the walker."""
    ds = make_instance()
    inner: Dataset = Dataset()
    inner.CodeValue = "X"
    for _ in range(depth):
        outer = Dataset()
        outer.ReferencedSOPInstanceUID = "1.2.3"
        outer.ProcedureCodeSequence = Sequence([inner] * items)
        inner = outer
    ds.ReferencedImageSequence = Sequence([inner] * items)
    ds.ProcedureCodeSequence = Sequence([inner])
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = undefined
    data = _encode(ds, syntax)
    header = read_stream_header(data, syntax)
    assert (header.study_uid, header.series_uid, header.sop_uid, header.sop_class_uid) == (
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
        ds.SOPClassUID,
    )
    assert header.modality == "MR"
    assert header.series_number == 1


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_file_header_agrees_with_pydicom(path: Path) -> None:
    """For every file bundled with pydicom, the header reader agrees with pydicom or refuses it clearly."""
    data = path.read_bytes()
    try:
        ds = pydicom.dcmread(path, force=True)
        expected = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    except Exception:  # noqa: BLE001 - files pydicom itself cannot read must be refused by us too
        expected = None
    try:
        header = read_file_header(data)
    except InvalidInstanceError:
        return
    assert expected is not None
    assert (header.study_uid, header.series_uid, header.sop_uid) == expected


def test_meta_prefix_reads_back() -> None:
    """The hand-encoded file meta is what pydicom would write."""
    ds = make_instance()
    prefix = file_meta_prefix(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "MR1")
    data = prefix + _encode(ds, ExplicitVRLittleEndian)
    read = pydicom.dcmread(BytesIO(data))
    assert read.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert read.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert read.file_meta.SourceApplicationEntityTitle == "MR1"
    assert read.file_meta.FileMetaInformationGroupLength == len(prefix) - 144
    assert read.SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize("data", [b"", b"\x08\x00", b"garbage" * 20, b"\x08\x00\x18\x00UI\xff\xff"])
def test_garbage_is_refused(data: bytes) -> None:
    """Short or garbage streams are refused with InvalidInstanceError, never another exception."""
    with pytest.raises(InvalidInstanceError):
        read_stream_header(data, ExplicitVRLittleEndian)
