"""Whether dropped bytes are a whole DICOM file or archive, or could still grow into one (pure functions over bytes).

Every proper prefix of a file or archive must be refused as incomplete (the drop folder waits for the rest), the
whole accepted, and what more bytes cannot mend refused as corrupt (the drop folder quarantines it at once).
"""

from __future__ import annotations

import io
import zipfile

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    ParametricMapStorage,
    RTPlanStorage,
    SegmentationStorage,
    generate_uid,
)

from ingestd.config import Archives
from ingestd.dicomfile import IncompleteInstanceError, needs_pixel_data, prepare_instance
from ingestd.errors import InvalidInstanceError, UnsafeArchiveError
from ingestd.receive.archives import ArchiveKind, IncompleteArchiveError, check_archive, read_members
from tests.dicom import TarMode, encode, encode_raw, make_instance, pydicom_file, tar_bytes, zip_bytes


def _without_pixel_data(ds: Dataset) -> Dataset:
    del ds.PixelData
    return ds


IMAGES = {
    "part10": lambda: encode(make_instance(rows=4)),
    "no preamble": lambda: encode(make_instance(rows=4))[128:],
    "bare explicit": lambda: encode_raw(make_instance(rows=4)),
    "bare implicit": lambda: encode_raw(make_instance(rows=4), implicit=True),
    "CT_small (trailing padding cut off is harmless)": lambda: pydicom_file("CT_small.dcm").read_bytes()[:39068],
}


@pytest.mark.parametrize("build", IMAGES.values(), ids=IMAGES.keys())
def test_every_prefix_of_an_image_is_incomplete_and_the_whole_is_taken(build: object) -> None:
    assert callable(build)
    data: bytes = build()
    whole = prepare_instance(data)
    assert data.endswith(bytes(whole.body))
    assert whole.header.sop_uid == pydicom.dcmread(io.BytesIO(whole.prefix + bytes(whole.body))).SOPInstanceUID
    # Every cut through the header; through a large pixel data value, every 97th.
    for cut in [*range(min(len(data), 2000)), *range(2000, len(data), 97), len(data) - 1]:
        with pytest.raises(IncompleteInstanceError):
            prepare_instance(data[:cut])


def test_a_prefix_ending_cleanly_before_pixel_data_is_incomplete() -> None:
    """The observed case: the writer paused just before Pixel Data, at an element boundary."""
    data = encode(make_instance(rows=64))
    before_pixels = data.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010)
    with pytest.raises(IncompleteInstanceError, match="it ends before its Pixel Data"):
        prepare_instance(data[:before_pixels])


def test_a_prefix_ending_cleanly_before_the_uids_is_incomplete() -> None:
    ds = make_instance()
    data = encode(ds)
    before_study_uid = data.index(b"\x20\x00\x0d\x00")  # (0020,000D)
    with pytest.raises(IncompleteInstanceError, match="Study Instance UID, Series Instance UID"):
        prepare_instance(data[:before_study_uid])


def test_an_image_without_pixel_data_but_with_later_elements_is_corrupt_not_incomplete() -> None:
    ds = _without_pixel_data(make_instance())
    ds.DataSetTrailingPadding = b"\x00" * 4  # (FFFC,FFFC): nothing can come after it
    with pytest.raises(InvalidInstanceError, match="an image without Pixel Data") as caught:
        prepare_instance(encode(ds))
    assert not isinstance(caught.value, IncompleteInstanceError)


def test_pixel_data_is_required_by_sop_class() -> None:
    assert needs_pixel_data(CTImageStorage)
    assert needs_pixel_data(SegmentationStorage)
    assert needs_pixel_data(ParametricMapStorage)
    assert not needs_pixel_data(BasicTextSRStorage)
    assert not needs_pixel_data(RTPlanStorage)
    assert not needs_pixel_data("1.2.3.4.5")  # a private SOP class: nothing is known of it


def test_float_pixel_data_counts_as_pixel_data() -> None:
    ds = _without_pixel_data(make_instance(sop_class=ParametricMapStorage))
    ds.FloatPixelData = b"\x00\x00\x80\x3f" * 4
    assert prepare_instance(encode(ds)).header.sop_class_uid == ParametricMapStorage
    with pytest.raises(IncompleteInstanceError, match="Pixel Data"):
        prepare_instance(encode(_without_pixel_data(make_instance(sop_class=SegmentationStorage))))


def test_an_instance_without_pixel_data_is_taken_when_its_class_has_none() -> None:
    ds = _without_pixel_data(make_instance(sop_class=BasicTextSRStorage))
    ds.Modality = "SR"
    assert prepare_instance(encode(ds)).header.sop_class_uid == BasicTextSRStorage


def test_what_no_more_bytes_can_mend_is_corrupt_not_incomplete() -> None:
    text = b"scan protocol notes, not an image\n" * 10
    for data in (text, b"short text", bytes(140) + b"not DICM here"):
        with pytest.raises(InvalidInstanceError) as caught:
            prepare_instance(data)
        assert not isinstance(caught.value, IncompleteInstanceError), data[:20]


def test_files_too_short_to_tell_are_incomplete_when_they_could_start_a_dicom_file() -> None:
    for data in (b"", bytes(64), b"II*\x00" + bytes(20), b"\x08\x00\x05\x00CS"):
        with pytest.raises(IncompleteInstanceError):
            prepare_instance(data)


def test_archive_members_keep_the_reason_a_truncated_file_had() -> None:
    with pytest.raises(InvalidInstanceError, match=r"^corrupt DICOM file: truncated$"):
        prepare_instance(encode(make_instance())[:-100])


# -- archives ------------------------------------------------------------------------------------------


def _members() -> dict[str, bytes]:
    study_uid = generate_uid()
    return {f"d/IM{i}.dcm": encode(make_instance(study_uid, rows=4, number=i)) for i in range(3)}


def _read(data: bytes, kind: ArchiveKind) -> dict[str, bytes]:
    stream = io.BytesIO(data)
    check_archive(stream, kind, Archives())
    return dict(read_members(stream, kind, Archives()))


ARCHIVES: dict[str, tuple[ArchiveKind, TarMode | None]] = {
    "zip": ("zip", None),
    "tar": ("tar", "w"),
    "tar.gz": ("tar", "w:gz"),
    "tar.bz2": ("tar", "w:bz2"),
}


@pytest.mark.parametrize(("kind", "mode"), ARCHIVES.values(), ids=ARCHIVES.keys())
def test_every_prefix_of_an_archive_is_incomplete_up_to_its_end(kind: ArchiveKind, mode: TarMode | None) -> None:
    members = _members()
    data = zip_bytes(members) if mode is None else tar_bytes(members, mode)
    assert _read(data, kind) == members
    # A plain tar is whole once its end-of-archive marker (a zero block) is there: the rest is padding.
    end = sum(512 + (len(value) + 511) // 512 * 512 for value in members.values()) + 512 if mode == "w" else len(data)
    assert _read(data[:end], kind) == members
    step = max(1, end // 400)
    for cut in [*range(0, end, step), end - 1]:
        with pytest.raises(IncompleteArchiveError):
            _read(data[:cut], kind)


def test_a_tar_cut_at_a_member_boundary_is_incomplete_not_a_smaller_archive() -> None:
    """tarfile's stream mode reads such a prefix without complaint, as an archive of fewer members."""
    members = _members()
    data = tar_bytes(members, "w")
    first_member_end = 512 + (len(members["d/IM0.dcm"]) + 511) // 512 * 512
    with pytest.raises(IncompleteArchiveError, match="no end-of-archive marker"):
        _read(data[:first_member_end], "tar")


def test_a_zip_stored_in_a_zip_being_written_is_not_taken_for_it() -> None:
    inner = zip_bytes(_members())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("first.dcm", encode(make_instance()))
        archive.writestr("inner.zip", inner)
    outer = buffer.getvalue()
    cut = outer.index(inner) + len(inner)  # the writer paused right after the stored inner zip's bytes
    with pytest.raises(IncompleteArchiveError):
        _read(outer[:cut], "zip")


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"not a zip at all" * 10, "zip"),
        (b"not a tar at all" * 40, "tar"),
        (b"\x1f\x8b" + b"\xff" * 100, "tar"),  # a gzip header that is no gzip stream
    ],
    ids=["garbage zip", "garbage tar", "garbage gzip"],
)
def test_garbage_is_unreadable_not_incomplete(data: bytes, kind: ArchiveKind) -> None:
    with pytest.raises(UnsafeArchiveError) as caught:
        _read(data, kind)
    assert not isinstance(caught.value, IncompleteArchiveError)


def test_a_compressed_tar_whose_stream_ends_before_the_tar_does_is_corrupt() -> None:
    """The compressed stream is whole: no more bytes will come, so the tar inside is cut short for good."""
    import gzip  # noqa: PLC0415 - only here

    plain = tar_bytes(_members(), "w")
    data = gzip.compress(plain[:1536])  # a header and part of the first member, in a whole gzip stream
    with pytest.raises(UnsafeArchiveError) as caught:
        _read(data, "tar")
    assert not isinstance(caught.value, IncompleteArchiveError)


def test_datasets_read_back_from_a_whole_archive_are_the_members() -> None:
    members = _members()
    archives: tuple[tuple[ArchiveKind, bytes], ...] = (("zip", zip_bytes(members)), ("tar", tar_bytes(members, "w:xz")))
    for kind, data in archives:
        read = _read(data, kind)
        assert {name: pydicom.dcmread(io.BytesIO(value)).SOPInstanceUID for name, value in read.items()} == {
            name: pydicom.dcmread(io.BytesIO(value)).SOPInstanceUID for name, value in members.items()
        }
