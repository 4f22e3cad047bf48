"""DICOM parsing and archive unpacking (zip read as java.util.zip.ZipInputStream reads it, tar, gzip)."""

from __future__ import annotations

import io
import struct
import tarfile
import threading
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread

from ingestd.testing.xnat.common import (
    _base36,
    _EntryError,
    _HttpError,
    _java_hash,
    _java_list_hash,
    _last_path_component,
)

# --------------------------------------------------------------------------------------------------------------
# DICOM parsing and archive unpacking
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dicom:
    """The header values the fake routes and describes sessions by."""

    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str
    series_number: str
    series_description: str
    modality: str
    patient_name: str
    patient_id: str
    comments: tuple[str, str, str]  # Patient Comments, Study Comments, Additional Patient History (§4)
    study_description: str
    accession: str
    study_date: str
    study_time: str
    instance_number: str

    @property
    def scan_id(self) -> str:
        """§3.4 step 6: scan = SeriesNumber, else a hash of the series UID."""
        return self.series_number or str(abs(_java_hash(self.series_uid)))

    def template_file_name(self) -> str:
        """The site's DICOM file namer with its default template (what XNAT falls back to for a file's name).

        xnat-web `TemplatizedDicomFileNamer.makeFileName` (org/nrg/dcm/id/TemplatizedDicomFileNamer.java) with
        libs/xdat SiteConfigPreferences `dicomFileNameTemplate` default
        `${StudyInstanceUID}-${SeriesNumber}-${InstanceNumber}-${HashSOPClassUIDWithSOPInstanceUID}` (no extension,
        so `.dcm` is appended); a blank value is `no-value-for-<keyword>`; the hash is the Java `List.hashCode()` of
        the two values, unsigned, in base 36. `GradualDicomImporter.getSafeFile` strips leading dots.
        """
        values = {
            "StudyInstanceUID": self.study_uid,
            "SeriesNumber": self.series_number,
            "InstanceNumber": self.instance_number,
            "SOPClassUID": self.sop_class,
            "SOPInstanceUID": self.sop_uid,
        }
        values = {key: value or f"no-value-for-{key}" for key, value in values.items()}
        digest = _base36(_java_list_hash([values["SOPClassUID"], values["SOPInstanceUID"]]))
        name = f"{values['StudyInstanceUID']}-{values['SeriesNumber']}-{values['InstanceNumber']}-{digest}.dcm"
        return name.lstrip(".")


_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "Modality", "PatientName", "PatientID", "PatientComments", "StudyComments", "AdditionalPatientHistory",
    "StudyDescription", "AccessionNumber", "StudyDate", "StudyTime", "InstanceNumber",
)  # fmt: skip
# pydicom may warn on odd input; `warnings.catch_warnings` is process-global, so parsing is serialised.
_PARSE_LOCK = threading.Lock()


def _looks_like_dicom(data: bytes) -> bool:
    """A Part 10 file, or a bare data set starting with a group 0002/0008 element (dcm4che guesses the same)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    if len(data) < 8 or int.from_bytes(data[0:2], "little") not in (0x0002, 0x0008):
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    return int.from_bytes(data[4:8], "little") <= len(data) - 8


def _value(dataset: Any, keyword: str) -> str:
    value = dataset.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def _parse_dicom(base: str, data: bytes, *, require_uids: bool = True) -> _Dicom:
    """Read one object; `base` is the name XNAT's file writer gives it (used in the error messages).

    `require_uids=False` leaves the SOP Class/Instance UID checks to `_require_uids`: GradualDicomImporter.call
    makes them only after the series import filters (archive/GradualDicomImporter.java:193-211).
    """
    if not _looks_like_dicom(data):
        raise _EntryError(f"unable to read DICOM object {base}", unreadable=True)
    try:
        with _PARSE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
            values = {keyword: _value(dataset, keyword) for keyword in _KEYWORDS}
    except Exception as exc:  # pydicom raises many types on garbage; all mean "unreadable"
        raise _EntryError(f"unable to read DICOM object {base}", unreadable=True) from exc
    dicom = _Dicom(
        sop_class=values["SOPClassUID"],
        sop_uid=values["SOPInstanceUID"],
        study_uid=values["StudyInstanceUID"],
        series_uid=values["SeriesInstanceUID"],
        series_number=values["SeriesNumber"],
        series_description=values["SeriesDescription"],
        modality=values["Modality"],
        patient_name=values["PatientName"],
        patient_id=values["PatientID"],
        comments=(values["PatientComments"], values["StudyComments"], values["AdditionalPatientHistory"]),
        study_description=values["StudyDescription"],
        accession=values["AccessionNumber"],
        study_date=values["StudyDate"],
        study_time=values["StudyTime"],
        instance_number=values["InstanceNumber"],
    )
    if require_uids:
        _require_uids(base, dicom)
    return dicom


def _require_uids(base: str, dicom: _Dicom) -> None:
    if not dicom.sop_class:
        raise _EntryError(f"object {base} contains no SOP Class UID", unreadable=False)
    if not dicom.sop_uid:
        raise _EntryError(f"object {base} contains no SOP Instance UID", unreadable=False)


def _archive_kind(name: str) -> str | None:
    """`Format.getFormat`: purely from the (case-sensitive) file name (§3.1)."""
    if name.endswith((".zip", ".zar")):
        return "zip"
    if name.endswith((".tar", ".xar")):
        return "tar"
    if name.endswith((".tgz", ".tar.gz")):
        return "tgz"
    return None


def _iter_entries(name: str, data: bytes, *, nested: bool, cut: bool = False) -> Iterator[tuple[str, bytes]]:
    """The file entries of a zip/tar/tgz, lazily (so a later failure comes after earlier entries were stored).

    `cut`: `data` is what arrived before the connection was reset, so needing more than that fails.
    """
    kind = _archive_kind(name)
    if kind == "zip":
        yield from _zip_entries(data, nested=nested, cut=cut)
    elif kind is not None:
        yield from _tar_entries(data, gzip=kind == "tgz", nested=nested)
        if cut:  # TarArchiveInputStream reads on to the end-of-archive blocks [INF: a cut in the padding is rare]
            raise _unreadable_archive()


def _expand(entry_name: str, data: bytes, *, nested: bool) -> Iterator[tuple[str, bytes]]:
    """One archive entry: a nested archive's entries, or (the entry's file writer name, its bytes); that name is the
    entry name's last path component (helpers/ArchiveEntryFileWriterWrapper.java:25-34)."""
    if nested and _archive_kind(entry_name) is not None:  # ≥1.8.10 unpacks nested archives (§3.2)
        yield from _iter_entries(entry_name, data, nested=nested)
    else:
        yield _last_path_component(entry_name), data


_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # PK\x03\x04 local file header, 30 bytes
_ZIP64_MAGIC = 0xFFFFFFFF


def _unreadable_archive() -> _HttpError:
    """DicomZipImporter.importCompressedFile: any IOException of the archive stream (java.util.zip.ZipException,
    EOFException, a reset connection) -> ClientException "unable to read data from file" (archive/DicomZipImporter.java
    importCompressedFile)."""
    return _HttpError(400, "unable to read data from file")


def _zip_entries(data: bytes, *, nested: bool, cut: bool = False) -> Iterator[tuple[str, bytes]]:
    """The entries of a zip as `java.util.zip.ZipInputStream` reads it (DicomZipImporter.importZipFile): local file
    headers in stream order, the central directory never consulted; directories (names ending in `/`) skipped.

    Reading stops cleanly where ZipInputStream.getNextEntry returns null: fewer than 30 bytes left (its EOFException
    on the header is caught) or a signature other than PK\x03\x04 (the central directory, or a body that is no zip at
    all, §3.6). Anything else that cannot be read raises "unable to read data from file" *after* the earlier entries
    were yielded (and stored). A body cut by a reset (`cut`) fails wherever more bytes are needed: a reset stream
    throws an IOException, not the EOF that ends the entries quietly (see `_Api.process_cut`).
    """
    for name, content in _zip_stream(data, cut=cut):
        if not name.endswith("/"):
            yield from _expand(name, content, nested=nested)


@dataclass(frozen=True)
class _LocalEntry:
    """One local file header as ZipInputStream.readLOC takes it; `start` is where the entry's data begin."""

    name: str
    method: int
    descriptor: bool  # general purpose flag bit 3: CRC and sizes follow the data
    crc: int
    compressed: int
    size: int
    start: int


def _zip_stream(data: bytes, *, cut: bool) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each local entry, following Java 8's ZipInputStream.readLOC / read / readEnd."""
    pos = 0
    while True:
        if len(data) - pos < _LOCAL_HEADER.size:
            if cut:
                raise _unreadable_archive()
            return  # readLOC's EOFException is caught: getNextEntry returns null
        entry = _local_entry(data, pos)
        if entry is None:
            return
        if entry.method == zipfile.ZIP_STORED:  # ZipInputStream reads `size` bytes (remaining = entry.size)
            content = data[entry.start : entry.start + entry.size]
            if len(content) < entry.size:
                raise _unreadable_archive()
            pos = entry.start + entry.size
            if zlib.crc32(content) != entry.crc:
                raise _unreadable_archive()  # "invalid entry CRC"
            yield entry.name, content
            continue
        content, end = _inflate_entry(data, entry)
        # The importer has the whole content (and the file written) before the read that hits the entry's end
        # checks the data descriptor, so an entry whose descriptor is cut off is stored before reading fails.
        yield entry.name, content
        if end is None:
            raise _unreadable_archive()
        pos = end


def _local_entry(data: bytes, pos: int) -> _LocalEntry | None:
    """The local header at `pos`, or None where there is none (the central directory, or no zip at all)."""
    signature, _, flags, method, _, _, crc, compressed, size, name_length, extra_length = _LOCAL_HEADER.unpack_from(
        data, pos
    )
    if signature != b"PK\x03\x04":
        return None
    start = pos + _LOCAL_HEADER.size + name_length + extra_length
    if len(data) < start:
        raise _unreadable_archive()  # readFully of the name/extra: EOFException, not caught there
    try:  # ZipInputStream(InputStream) decodes names as UTF-8
        name = data[pos + _LOCAL_HEADER.size : pos + _LOCAL_HEADER.size + name_length].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _unreadable_archive() from exc
    if flags & 0x1:
        raise _unreadable_archive()  # "encrypted ZIP entry not supported"
    descriptor = bool(flags & 0x8)
    if descriptor and method != zipfile.ZIP_DEFLATED:
        raise _unreadable_archive()  # "only DEFLATED entries can have EXT descriptor": its end cannot be found
    if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _unreadable_archive()  # "invalid compression method"
    if not descriptor and _ZIP64_MAGIC in (compressed, size):
        extra = data[start - extra_length : start]
        compressed, size = _zip64_sizes(extra, compressed, size)
    return _LocalEntry(name, method, descriptor, crc, compressed, size, start)


def _inflate_entry(data: bytes, entry: _LocalEntry) -> tuple[bytes, int | None]:
    """A deflated entry's content and where the next header starts (None: its data descriptor is cut off); with a
    data descriptor the deflate stream's own end delimits the data (ZipInputStream inflates until it finishes)."""
    limit = len(data) if entry.descriptor else min(len(data), entry.start + entry.compressed)
    view = memoryview(data)
    inflater = zlib.decompressobj(-15)
    parts: list[bytes] = []
    pos = entry.start
    try:
        while not inflater.eof and pos < limit:  # fed in slices: the end is unknown until the inflater finishes
            chunk = view[pos : min(pos + 65536, limit)]
            parts.append(inflater.decompress(chunk))
            pos += len(chunk) - len(inflater.unused_data)
    except zlib.error as exc:
        raise _unreadable_archive() from exc
    if not inflater.eof:
        raise _unreadable_archive()  # "Unexpected end of ZLIB input stream": cut short or corrupt
    content = b"".join(parts)
    read = pos - entry.start
    crc, compressed, size = entry.crc, entry.compressed, entry.size
    if entry.descriptor:
        # readEnd (Java 8): the descriptor has 8-byte sizes only when an inflated or deflated size exceeds
        # 0xFFFFFFFF, and its PK\x07\x08 signature is optional. (So Java 8 misreads the small zip64 descriptors
        # that Python's zipfile writes to an unseekable stream with force_zip64, and refuses the entry.)
        width = 8 if len(content) > _ZIP64_MAGIC or read > _ZIP64_MAGIC else 4
        if data[pos : pos + 4] == b"PK\x07\x08":
            pos += 4
        if len(data) - pos < 4 + 2 * width:
            return content, None
        crc = int.from_bytes(data[pos : pos + 4], "little")
        compressed = int.from_bytes(data[pos + 4 : pos + 4 + width], "little")
        size = int.from_bytes(data[pos + 4 + width : pos + 4 + 2 * width], "little")
        pos += 4 + 2 * width
    if size != len(content) or compressed != read or zlib.crc32(content) != crc:
        # "invalid entry size / compressed size / CRC". XNAT's message then depends on where the importer was
        # reading (a small object's header read -> "unable to read DICOM object ..."; later -> 507) [INF].
        raise _unreadable_archive()
    return content, pos


def _zip64_sizes(extra: bytes, compressed: int, size: int) -> tuple[int, int]:
    """ZipEntry.setExtra0 for a local header: the zip64 block (0x0001) holds the original size, then the compressed
    size (both must be there)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001 and length >= 16:
            return struct.unpack_from("<Q", extra, pos + 12)[0], struct.unpack_from("<Q", extra, pos + 4)[0]
        pos += 4 + length
    return compressed, size


def _tar_entries(data: bytes, *, gzip: bool, nested: bool) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz" if gzip else "r:") as archive:
            for member in archive:
                extracted = archive.extractfile(member) if member.isfile() else None
                if extracted is not None:
                    yield from _expand(member.name, extracted.read(), nested=nested)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise _HttpError(400, "unable to read data from file") from exc
