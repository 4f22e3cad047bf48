"""C-STORE answers Success only for what was stored whole, and only for the data set the request names.

Refused, with nothing spooled (no file, no journal row, no receipt) and the association going on:

- 0xC211: the data set is cut short or does not parse to its end (an image without Pixel Data is one cut
  between two elements);
- 0xC210: its header is unreadable (UIDs missing or malformed);
- 0xA900: its SOP Class UID is not the command's Affected SOP Class UID or the presentation context's abstract
  syntax, or its SOP Instance UID is not the command's Affected SOP Instance UID.

Peers: the raw PS3.8 peer of `tests/test_dataphase.py` (any bytes, any command), pynetdicom (which sends a
file's data set as it is with `STORE_SEND_CHUNKED_DATASET`, its command from the file meta), and DCMTK's
storescu where it can send the file (it will not send a file cut inside an element: it cannot read one).
Every network test runs against both data phases: ingestd's own, and pynetdicom's (the fallback for pynetdicom
releases `dataphase.py` was not checked against).
"""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import zlib
from collections.abc import Callable, Iterator, Mapping
from copy import deepcopy
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RTPlanStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from structlog.testing import capture_logs

from ingestd.dicomfile import check_data_set, data_set_offset
from ingestd.errors import IncompleteDataSetError, InvalidInstanceError
from ingestd.header import IMAGE_STORAGE_CLASSES, file_meta_prefix
from ingestd.receive import dataphase
from ingestd.receive.listener import read_received
from tests.conftest import Receiver, make_config, running_receiver
from tests.dicom import encode_raw, make_instance, pydicom_file, write_instances
from tests.hostile import RawPeer, p_data, pdu_item, pdv, store_command
from tests.procs import DCMTK_ENV, journal_rows

TEST_FILES = pydicom_file("CT_small.dcm").parent
INCOMPLETE, UNREADABLE, MISMATCH = 0xC211, 0xC210, 0xA900
PHASES = ["ingestd", "pynetdicom"]


def _testdata(name: str) -> tuple[bytes, str, Dataset]:
    """A pydicom test file's data set (the bytes after its file meta), transfer syntax and header."""
    path = TEST_FILES / name
    data = path.read_bytes()
    header = pydicom.dcmread(path, stop_before_pixels=True)
    return data[data_set_offset(data) :], str(header.file_meta.TransferSyntaxUID), header


# -- the check itself, without a network --------------------------------------------------------------


def _boundaries(body: bytes, syntax: str) -> dict[int, int]:
    """Where pydicom sees each top-level element end (and the next begin): offset -> tag (0 -> 0 for the start)."""
    stream = BytesIO(body)
    ends = {0: 0}
    for element in data_element_generator(
        stream,
        is_implicit_VR=syntax == ImplicitVRLittleEndian,
        is_little_endian=syntax != ExplicitVRBigEndian,
        defer_size=256,
    ):
        ends[stream.tell()] = int(element.tag)
    return ends


def _at_boundary(body: bytes, cut: int, ends: dict[int, int], little: bool) -> bool:
    """Whether a cut falls between two top-level elements (up to 7 zero bytes after one count as padding)."""
    return any(cut - end < 8 and not any(body[end:cut]) for end in ends if end <= cut) if little else cut in ends


def _pixel_data_end(ends: dict[int, int]) -> int | None:
    """Where the (Float, Double Float) Pixel Data element ends; elements after it (trailing padding) may go."""
    return next((end for end, tag in ends.items() if tag in (0x7FE00010, 0x7FE00008, 0x7FE00009)), None)


def _cuts(size: int, dense: int = 6000, sparse: int = 1500) -> list[int]:
    """Every offset in the first `dense` bytes (the header), then `sparse` offsets spread over the rest."""
    head = list(range(min(size, dense)))
    step = max(1, (size - dense) // sparse)
    return head + list(range(dense, size, step))


_CUT_FILES = [
    "MR_small.dcm",  # Explicit VR Little Endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "CT_small.dcm",  # GE private elements, a defined-length sequence
    "MR_small_RLE.dcm",  # encapsulated pixel data
    "JPEG2000.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",  # a fragment holding a sequence delimiter's bytes
    "liver_1frame.dcm",  # Segmentation: nested functional group sequences
    "test-SR.dcm",  # deep undefined-length content sequences, no pixel data
    "rtplan.dcm",  # Implicit VR, nested sequences
    "reportsi.dcm",
    "rtdose.dcm",
    "examples_overlay.dcm",
    "waveform_ecg.dcm",
]


@pytest.mark.parametrize("name", _CUT_FILES)
def test_every_cut_inside_an_element_is_incomplete(name: str) -> None:
    """A cut anywhere but between two top-level elements is 0xC211's error; between two elements, an image's is
    refused too (no Pixel Data), and what is accepted is exactly the whole-element prefix pydicom sees."""
    body, syntax, header = _testdata(name)
    read_received(memoryview(body), syntax)  # the whole data set passes
    ends = _boundaries(body, syntax)
    image = header.SOPClassUID in IMAGE_STORAGE_CLASSES
    pixels_end = _pixel_data_end(ends)
    little = syntax != ExplicitVRBigEndian
    for cut in _cuts(len(body)):
        data = memoryview(body[:cut])
        if cut == 0 or not _at_boundary(body, cut, ends, little):  # nothing at all counts as cut short too
            with pytest.raises(IncompleteDataSetError):
                read_received(data, syntax)
        elif image and (pixels_end is None or cut < pixels_end):
            with pytest.raises(InvalidInstanceError):
                read_received(data, syntax)
        else:  # a cut between two elements, of a non-image or after the pixel data: a smaller whole data set
            try:
                read_received(data, syntax)
            except IncompleteDataSetError:
                pytest.fail(f"a cut at a top-level element boundary ({cut}) read as not parsing to its end")
            except InvalidInstanceError:
                pass


def test_every_cut_of_a_deflated_data_set_is_incomplete() -> None:
    body, syntax, _header = _testdata("image_dfl.dcm")
    assert syntax == DeflatedExplicitVRLittleEndian
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflater.decompress(body)
    stream_end = len(body) - len(inflater.unused_data)
    read_received(memoryview(body), syntax)
    for cut in range(stream_end):
        with pytest.raises(IncompleteDataSetError):
            read_received(memoryview(body[:cut]), syntax)


@pytest.mark.filterwarnings("ignore")
def test_cuts_left_to_pydicom_are_refused_as_pydicom_reads_them() -> None:
    """SC_rgb_jpeg.dcm's data set is Implicit VR under a JPEG (explicit) transfer syntax; pydicom reads it
    as Implicit VR and so does the check, through `check_data_set`. Its cuts inside elements are refused."""
    body, syntax, _header = _testdata("SC_rgb_jpeg.dcm")
    read_received(memoryview(body), syntax)
    ends = _boundaries(body, ImplicitVRLittleEndian)
    for cut in range(len(body)):
        if not _at_boundary(body, cut, ends, little=True):
            with pytest.raises(IncompleteDataSetError):
                read_received(memoryview(body[:cut]), syntax)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", sorted(path.name for path in TEST_FILES.glob("*.dcm")))
def test_whole_files_pass_as_pydicom_reads_them(name: str) -> None:
    """On every file bundled with pydicom, the check says "cut short" exactly when `check_data_set` does."""
    data = (TEST_FILES / name).read_bytes()
    if data[128:132] != b"DICM":
        pytest.skip("no file meta: no transfer syntax to read the data set in")
    try:
        header = pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True)
        syntax = str(header.file_meta.TransferSyntaxUID)
    except (AttributeError, pydicom.errors.InvalidDicomError):
        pytest.skip("no transfer syntax")
    body = memoryview(data)[data_set_offset(data) :]
    try:
        check_data_set(body, syntax)
        expected_incomplete = False
    except InvalidInstanceError:
        expected_incomplete = True
    try:
        read_received(body, syntax)
        incomplete = False
    except IncompleteDataSetError:
        incomplete = True
    except InvalidInstanceError:  # UIDs missing (several test files have none): not the question here
        incomplete = False
    assert incomplete == expected_incomplete


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_pydicoms_truncated_files_are_incomplete(name: str) -> None:
    body, syntax, _header = _testdata(name)
    pydicom.dcmread(TEST_FILES / name)  # which pydicom reads without complaint
    with pytest.raises(IncompleteDataSetError, match="cut short"):
        read_received(memoryview(body), syntax)


def _with_sequences(ds: Dataset, *, undefined: bool) -> Dataset:
    inner = Dataset()
    inner.CodeValue = "X"
    inner.ProcedureCodeSequence = Sequence([Dataset()])
    ds.ReferencedImageSequence = Sequence([inner, Dataset()])
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = undefined
    return ds


@pytest.mark.parametrize(
    ("what", "data", "syntax"),
    [
        ("empty", b"", ExplicitVRLittleEndian),
        ("an item delimiter at the top level", encode_raw(make_instance()) + b"\xfe\xff\x0d\xe0" + bytes(4), None),
        ("a sequence without its delimiter", None, None),
        ("a deflated data set cut short before deflating", None, DeflatedExplicitVRLittleEndian),
        ("an image without pixel data", None, ImplicitVRLittleEndian),
    ],
)
def test_data_sets_that_do_not_parse_to_their_end(what: str, data: bytes | None, syntax: str | None) -> None:
    ds = make_instance()
    if what == "a sequence without its delimiter":
        whole = encode_raw(_with_sequences(ds, undefined=True))
        data = whole[: whole.rindex(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")]  # ends after its last whole item
    elif what.startswith("a deflated"):
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        whole = encode_raw(ds)
        data = compressor.compress(whole[: len(whole) - 100]) + compressor.flush()
    elif what == "an image without pixel data":
        del ds.PixelData
        data = encode_raw(ds, implicit=True)
    assert data is not None
    with pytest.raises(IncompleteDataSetError):
        read_received(memoryview(data), syntax or ExplicitVRLittleEndian)


def test_nested_sequences_of_any_length_pass() -> None:
    for undefined in (False, True):
        for implicit in (False, True):
            ds = _with_sequences(make_instance(), undefined=undefined)
            syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
            header = read_received(memoryview(encode_raw(ds, implicit=implicit)), syntax)
            assert header.sop_uid == ds.SOPInstanceUID


def test_a_non_image_without_pixel_data_passes() -> None:
    body, syntax, header = _testdata("rtplan.dcm")
    assert header.SOPClassUID == RTPlanStorage and RTPlanStorage not in IMAGE_STORAGE_CLASSES
    assert read_received(memoryview(body), syntax).sop_uid == header.SOPInstanceUID


# -- real associations -----------------------------------------------------------------------------


@pytest.fixture(params=PHASES)
def phase_receiver(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Receiver]:
    """A listener serving the data phase itself ("ingestd") or leaving it to pynetdicom ("pynetdicom")."""
    if request.param == "pynetdicom":
        monkeypatch.setattr(dataphase, "available", lambda: False)
    with running_receiver(make_config(tmp_path)) as running:
        yield running


def _receipts(receiver: Receiver) -> list[tuple[str, str]]:
    return [
        (row[0], row[1])
        for row in journal_rows(receiver.config.journal_path, "SELECT sop_uid, outcome FROM receipts ORDER BY id")
    ]


def _spooled(receiver: Receiver) -> dict[str, bytes]:
    """The spool's instances: SOP Instance UID (journal) -> file bytes; every file in the spool has its row."""
    rows = journal_rows(receiver.config.journal_path, "SELECT sop_uid, spool_path FROM instances")
    files = sorted(receiver.config.spool_dir.rglob("*.dcm"))
    assert sorted(receiver.config.spool_dir / str(path) for _uid, path in rows) == files
    assert not list((receiver.config.spool_dir / ".tmp").iterdir())
    return {str(uid): (receiver.config.spool_dir / str(path)).read_bytes() for uid, path in rows}


def _associate_rq(contexts: Mapping[int, tuple[str, str]]) -> bytes:
    """An A-ASSOCIATE-RQ proposing one transfer syntax per context (`associate_rq_contexts`: Explicit VR only)."""
    body = b"\x00\x01\x00\x00" + b"INGESTD".ljust(16) + b"RAWSCU".ljust(16) + bytes(32)
    body += pdu_item(0x10, b"1.2.840.10008.3.1.1.1")
    for context_id, (abstract, syntax) in contexts.items():
        body += pdu_item(
            0x20, bytes((context_id, 0, 0, 0)) + pdu_item(0x30, abstract.encode()) + pdu_item(0x40, syntax.encode())
        )
    body += pdu_item(0x50, pdu_item(0x51, (16384).to_bytes(4, "big")) + pdu_item(0x52, b"1.2.826.0.1.3680043.9.9999"))
    return b"\x01\x00" + len(body).to_bytes(4, "big") + body


class Peer(RawPeer):
    """The raw peer, proposing (abstract syntax, transfer syntax) per presentation context."""

    def __init__(self, port: int, contexts: Mapping[int, tuple[str, str]]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(_associate_rq(contexts))
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x02, f"association not accepted (PDU type {pdu_type:#x})"
        self.accepted = self._accepted_contexts(body)
        assert self.accepted == set(contexts)

    def store(self, context_id: int, command: bytes, data: bytes) -> dict[int, bytes]:
        """Send one C-STORE (command and data set in one PDU) and return the response's command elements."""
        self.send(p_data(pdv(context_id, 0x03, command), pdv(context_id, 0x02, data)))
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x04 and body[5] == 0x03, f"expected one P-DATA response, got PDU type {pdu_type:#x}"
        elements, raw, offset = {}, body[6:], 0
        while offset < len(raw):
            number = int.from_bytes(raw[offset + 2 : offset + 4], "little")
            length = int.from_bytes(raw[offset + 4 : offset + 8], "little")
            elements[number] = raw[offset + 8 : offset + 8 + length]
            offset += 8 + length
        return elements


def _status(response: dict[int, bytes]) -> int:
    assert int.from_bytes(response[0x0100], "little") == 0x8001
    return int.from_bytes(response[0x0900], "little")


def _uid(response: dict[int, bytes], element: int) -> str:
    return response[element].rstrip(b"\x00").decode()


@pytest.mark.parametrize(
    ("truncated", "whole"), [("MR_truncated.dcm", "MR_small.dcm"), ("rtplan_truncated.dcm", "rtplan.dcm")]
)
def test_raw_peer_truncated_files_are_refused_and_the_association_goes_on(
    phase_receiver: Receiver, truncated: str, whole: str
) -> None:
    """pydicom's truncated test files get 0xC211 and nothing is stored; the whole file after them is stored."""
    cut, syntax, header = _testdata(truncated)
    body, whole_syntax, whole_header = _testdata(whole)
    assert (syntax, header.SOPInstanceUID) == (whole_syntax, whole_header.SOPInstanceUID)  # the same instance
    peer = Peer(phase_receiver.port, {1: (header.SOPClassUID, syntax)})
    response = peer.store(1, store_command(1, header.SOPClassUID, header.SOPInstanceUID), cut)
    assert _status(response) == INCOMPLETE
    assert _uid(response, 0x1000) == header.SOPInstanceUID
    assert _receipts(phase_receiver) == [] and _spooled(phase_receiver) == {}
    assert _status(peer.store(1, store_command(2, header.SOPClassUID, header.SOPInstanceUID), body)) == 0x0000
    peer.release()
    assert _receipts(phase_receiver) == [(header.SOPInstanceUID, "stored")]  # not "replaced": the cut was never stored
    assert _spooled(phase_receiver)[header.SOPInstanceUID].endswith(body)


def _mismatches() -> list[tuple[str, Callable[[Dataset], tuple[str, str, str]]]]:
    """(what, how): how(ds) returns (context abstract syntax, command SOP Class UID, command SOP Instance UID)."""
    return [
        ("a CT data set on an MR context", lambda ds: (MRImageStorage, MRImageStorage, ds.SOPInstanceUID)),
        ("a command naming another instance", lambda ds: (CTImageStorage, CTImageStorage, generate_uid())),
        ("a CT command on an MR context", lambda ds: (MRImageStorage, CTImageStorage, ds.SOPInstanceUID)),
    ]


@pytest.mark.parametrize(("what", "how"), _mismatches(), ids=[what for what, _how in _mismatches()])
def test_raw_peer_mismatches_are_refused_and_the_association_goes_on(
    phase_receiver: Receiver, what: str, how: Callable[[Dataset], tuple[str, str, str]]
) -> None:
    """0xA900; the response names the command's SOP class and instance, whatever the data set says."""
    ds = make_instance(sop_class=CTImageStorage)
    abstract, command_class, command_instance = how(ds)
    peer = Peer(
        phase_receiver.port, {1: (abstract, ExplicitVRLittleEndian), 3: (CTImageStorage, ExplicitVRLittleEndian)}
    )
    response = peer.store(1, store_command(1, command_class, command_instance), encode_raw(ds))
    assert _status(response) == MISMATCH, what
    assert (_uid(response, 0x0002), _uid(response, 0x1000)) == (command_class, command_instance)
    assert _receipts(phase_receiver) == [] and _spooled(phase_receiver) == {}
    assert _status(peer.store(3, store_command(2, CTImageStorage, ds.SOPInstanceUID), encode_raw(ds))) == 0x0000
    peer.release()
    assert _receipts(phase_receiver) == [(ds.SOPInstanceUID, "stored")]


def _send_files(port: int, files: list[Path], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """pynetdicom sends each file's data set bytes as they are, its command from the file meta."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="SCANNER")
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="INGESTD")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(path).Status for path in files]
    finally:
        assoc.release()


def test_pynetdicom_scu_truncated_files_are_refused(phase_receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends the files' bytes. rtplan.dcm itself is refused too, with 0xA900: its file meta (so the
    command) names SOP Instance 1.2.999..., its data set 1.2.777... (storescp answers it the same way)."""
    files = [TEST_FILES / name for name in ("MR_truncated.dcm", "rtplan_truncated.dcm", "MR_small.dcm", "rtplan.dcm")]
    assert _send_files(phase_receiver.port, files, monkeypatch) == [INCOMPLETE, INCOMPLETE, 0x0000, MISMATCH]
    assert _receipts(phase_receiver) == [(pydicom.dcmread(files[2]).SOPInstanceUID, "stored")]


def test_pynetdicom_scu_mismatches_are_refused(
    phase_receiver: Receiver, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Files whose file meta (the command) names another SOP class or instance than their data set."""
    ct, other, good = make_instance(sop_class=CTImageStorage), make_instance(), make_instance()
    metas = [
        (MRImageStorage, ct.SOPInstanceUID),  # a CT data set named MR Image Storage: sent on the MR context
        (MRImageStorage, generate_uid()),  # another instance named
        (MRImageStorage, good.SOPInstanceUID),
    ]
    files = []
    for index, (ds, (sop_class, sop_instance)) in enumerate(zip((ct, other, good), metas, strict=True)):
        files.append(tmp_path / f"{index}.dcm")
        files[-1].write_bytes(file_meta_prefix(sop_class, sop_instance, ExplicitVRLittleEndian) + encode_raw(ds))
    assert _send_files(phase_receiver.port, files, monkeypatch) == [MISMATCH, MISMATCH, 0x0000]
    assert _receipts(phase_receiver) == [(good.SOPInstanceUID, "stored")]


@pytest.mark.usefixtures("dcmtk")
def test_storescu_image_cut_before_its_pixel_data_is_refused(phase_receiver: Receiver, tmp_path: Path) -> None:
    """storescu sends an MR image cut between two elements (before its Pixel Data): 0xC211, then goes on (-nh).

    (storescu cannot send a file cut inside an element: it reads each file whole first and gives up on it.)
    """
    cut, good = make_instance(), make_instance()
    del cut.PixelData
    files = write_instances([cut, good], tmp_path / "scan")
    result = subprocess.run(
        ["storescu", "-d", "-nh", "-aec", "INGESTD", "127.0.0.1", str(phase_receiver.port), *map(str, files)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr  # "D: DIMSE Status                  : 0xc211: Error: Cannot understand"
    statuses = [int(line.split(":")[2].strip(), 16) for line in output.splitlines() if "DIMSE Status" in line]
    assert statuses == [INCOMPLETE, 0x0000], output
    assert _receipts(phase_receiver) == [(good.SOPInstanceUID, "stored")]


def test_refusals_are_logged_with_status_and_reason_and_no_uid(phase_receiver: Receiver) -> None:
    ds = make_instance()
    cut = encode_raw(ds)[:-10]
    other = generate_uid()
    with capture_logs() as logged:
        peer = Peer(phase_receiver.port, {1: (MRImageStorage, ExplicitVRLittleEndian)})
        assert _status(peer.store(1, store_command(1, MRImageStorage, ds.SOPInstanceUID), cut)) == INCOMPLETE
        assert _status(peer.store(1, store_command(2, MRImageStorage, other), encode_raw(ds))) == MISMATCH
        no_uid = deepcopy(ds)
        del no_uid.SeriesInstanceUID
        command = store_command(3, MRImageStorage, ds.SOPInstanceUID)
        assert _status(peer.store(1, command, encode_raw(no_uid))) == UNREADABLE
        peer.release()
    refused = [entry for entry in logged if entry["event"] == "receive.store_refused"]
    assert [(entry["status"], entry["log_level"]) for entry in refused] == [
        ("0xC211", "warning"),
        ("0xA900", "warning"),
        ("0xC210", "warning"),
    ]
    assert all(set(entry) == {"event", "log_level", "calling_aet", "status", "reason"} for entry in refused)
    assert "cut short" in refused[0]["reason"] and "SOP Instance UID" in refused[1]["reason"]
    text = json.dumps(logged, default=str)
    for value in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, other, "Synthetic", "SYN0001"):
        assert value not in text


# -- Hypothesis: any cut is refused, never answered Success ---------------------------------------------


def _expected_status(data: bytes, cut: int, syntax: str) -> int:
    """0xC211, unless the cut falls between two top-level elements before the UIDs are all there (0xC210).

    Nothing at all (a cut at 0) is cut short too.
    """
    if cut == 0 or not _at_boundary(data, cut, _boundaries(data, syntax), little=True):
        return INCOMPLETE
    ds = pydicom.filereader.read_dataset(BytesIO(data[:cut]), syntax == ImplicitVRLittleEndian, True)
    uids = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    return INCOMPLETE if all(keyword in ds for keyword in uids) else UNREADABLE


@pytest.mark.parametrize(("phase", "examples"), [("ingestd", 60), ("pynetdicom", 25)])
def test_any_cut_of_an_instance_is_refused_and_the_whole_one_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: str, examples: int
) -> None:
    """Cut an instance anywhere (often between two elements): never Success, nothing stored; then the whole
    instance on the same association is Success and stored byte-identical, as its first copy ("stored")."""
    if phase == "pynetdicom":
        monkeypatch.setattr(dataphase, "available", lambda: False)
    contexts = {1: (MRImageStorage, ExplicitVRLittleEndian), 3: (MRImageStorage, ImplicitVRLittleEndian)}
    numbers = itertools.count()

    @settings(max_examples=examples, deadline=None)
    @given(
        rows=st.integers(1, 24),
        implicit=st.booleans(),
        sequences=st.sampled_from([None, False, True]),
        choice=st.data(),
    )
    def check(rows: int, implicit: bool, sequences: bool | None, choice: st.DataObject) -> None:
        # UIDs of one length, so that the same draws give the same data set (and cut) when Hypothesis replays
        number = next(numbers)
        study, series, instance = (f"1.2.826.0.1.3680043.9.9999.{kind}.1{number:09d}" for kind in (1, 2, 3))
        ds = make_instance(study, series, rows=rows, fill=rows)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(instance)
        if sequences is not None:
            _with_sequences(ds, undefined=sequences)
        data = encode_raw(ds, implicit=implicit)
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        ends = sorted(end for end in _boundaries(data, syntax) if end < len(data))
        cut = choice.draw(st.one_of(st.integers(0, len(data) - 1), st.sampled_from(ends)), label="cut")
        context = 3 if implicit else 1
        peer = Peer(running.port, contexts)
        try:
            command = store_command(1, MRImageStorage, ds.SOPInstanceUID)
            response = peer.store(context, command, data[:cut])
            assert _status(response) == _expected_status(data, cut, syntax)
            assert _uid(response, 0x1000) == ds.SOPInstanceUID
            assert _status(peer.store(context, store_command(2, MRImageStorage, ds.SOPInstanceUID), data)) == 0
            peer.release()
        finally:
            peer.sock.close()
        receipts = [outcome for uid, outcome in _receipts(running) if uid == ds.SOPInstanceUID]
        assert receipts == ["stored"]
        (path,) = running.config.spool_dir.rglob(f"*/{ds.SOPInstanceUID}.dcm")
        assert path.read_bytes().endswith(data)

    with running_receiver(make_config(tmp_path)) as running:
        check()
