"""The stand-in reads DICOM-zip uploads as XNAT does, as a stream: connections reset mid-upload, zips of every make,
and answers cut short by a proxy."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import requests
from pydicom.dataset import Dataset

from ingestd.testing.xnat import FakeXnat
from tests.dicom import encode
from tests.fake_xnat.helpers import TIMEOUT, ZIP, import_zip, numbered_study


class _Unseekable(io.RawIOBase):
    """A write-only stream without seek/tell: zipfile then writes data descriptors (flag bit 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += bytes(b)
        return len(b)


def study(series: int = 2, per_series: int = 3) -> list[Dataset]:
    return numbered_study(series, per_series)


def zipped(
    datasets: Sequence[Dataset],
    *,
    method: int = zipfile.ZIP_STORED,
    seekable: bool = True,
    force_zip64: bool = False,
) -> bytes:
    """The datasets as dicom/IM<n>.dcm; ingestd's zips are `seekable=True, force_zip64=True`
    (ingestd/pipeline/package.py)."""
    sink: Any = io.BytesIO() if seekable else _Unseekable()
    with zipfile.ZipFile(sink, "w") as archive:
        for index, ds in enumerate(datasets):
            info = zipfile.ZipInfo(f"dicom/IM{index}.dcm", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            with archive.open(info, "w", force_zip64=force_zip64) as sink_entry:
                sink_entry.write(encode(ds))
    return bytes(sink.getvalue() if seekable else sink.data)


def data_ends(data: bytes) -> list[tuple[str, int]]:
    """(entry name, offset just past its data) from the zip's own directory and local headers."""
    ends = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
            ends.append((info.filename, info.header_offset + 30 + name_length + extra_length + info.compress_size))
    return ends


def stored_names(xnat: FakeXnat, session: requests.Session) -> list[str]:
    """Build the only prearchive row and list the files its scans hold (public API only)."""
    (row,) = xnat.prearchive_rows("PROJ")
    xnat.build_now()
    uri = f"{xnat.url}/data{row['url']}"
    names: list[str] = []
    for scan in session.get(f"{uri}/scans", params={"format": "json"}, timeout=TIMEOUT).json()["ResultSet"]["Result"]:
        files = session.get(
            f"{uri}/scans/{scan['ID']}/resources/DICOM/files", params={"format": "json"}, timeout=TIMEOUT
        ).json()["ResultSet"]["Result"]
        names += [f["Name"] for f in files]
    return sorted(names)


def imports_logged(xnat: FakeXnat) -> list[int]:
    return [status for method, path, status in xnat.requests_log if path.startswith("/data/services/import")]


# ---------------------------------------------------------------------------------------------------------------
# A reset mid-import keeps what XNAT read before the cut
# ---------------------------------------------------------------------------------------------------------------


def test_reset_half_way_keeps_the_entries_read_whole_and_builds_nothing(
    xnat: FakeXnat, alice: requests.Session
) -> None:
    """ingestd's own zip (seekable, force_zip64) with 1.8.10's dest/commit: the entries wholly inside the first half
    are stored in a RECEIVING row; the synchronous build never happens because the request failed."""
    data = zipped(study(), force_zip64=True)
    half = len(data) // 2
    expected = sorted(name.rsplit("/", 1)[1] for name, end in data_ends(data) if end <= half)
    assert 0 < len(expected) < 6
    xnat.reset_next("POST", "/data/services/import")
    with pytest.raises(requests.ConnectionError):
        import_zip(xnat, alice, data, dest="/prearchive/projects/PROJ")
    (row,) = xnat.prearchive_rows("PROJ")
    assert (row["status"], row["name"], row["uploaded"]) == ("RECEIVING", "SESS01", "")
    assert imports_logged(xnat) == [0]
    assert stored_names(xnat, alice) == expected


@pytest.mark.parametrize(
    ("method", "seekable", "force_zip64"),
    [
        (zipfile.ZIP_STORED, True, True),  # ingestd's default package
        (zipfile.ZIP_DEFLATED, True, True),  # ingestd with compression: deflated
        (zipfile.ZIP_STORED, True, False),
        (zipfile.ZIP_DEFLATED, False, False),  # data descriptors: each entry's end is found by inflating
    ],
)
def test_the_cut_stores_exactly_the_entries_whose_data_it_holds(
    xnat: FakeXnat, alice: requests.Session, method: int, seekable: bool, force_zip64: bool
) -> None:
    data = zipped(study(series=1, per_series=4), method=method, seekable=seekable, force_zip64=force_zip64)
    ends = data_ends(data)
    cut = ends[1][1]  # exactly the end of the second entry's data
    xnat.reset_next("POST", "/data/services/import", after_bytes=cut)
    with pytest.raises(requests.ConnectionError):
        import_zip(xnat, alice, data)
    assert stored_names(xnat, alice) == ["IM0.dcm", "IM1.dcm"]

    xnat.reset_next("POST", "/data/services/import", after_bytes=ends[2][1] - 1)  # one byte short of the third
    with pytest.raises(requests.ConnectionError):
        import_zip(xnat, alice, data)
    assert stored_names(xnat, alice) == ["IM0.dcm", "IM1.dcm"]  # merged into the same row, overwritten in place

    assert import_zip(xnat, alice, data).status_code == 200  # the retry completes the row
    assert stored_names(xnat, alice) == ["IM0.dcm", "IM1.dcm", "IM2.dcm", "IM3.dcm"]


def test_a_cut_before_the_first_entry_is_complete_stores_nothing(xnat: FakeXnat, alice: requests.Session) -> None:
    data = zipped(study(series=1, per_series=2), force_zip64=True)
    xnat.reset_next("POST", "/data/services/import", after_bytes=data_ends(data)[0][1] - 1)
    with pytest.raises(requests.ConnectionError):
        import_zip(xnat, alice, data)
    assert xnat.prearchive_rows() == []


def test_a_chunked_upload_is_cut_after_the_given_bytes(xnat: FakeXnat, alice: requests.Session) -> None:
    data = zipped(study(series=1, per_series=3), force_zip64=True)
    cut = data_ends(data)[0][1] + 10

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    xnat.reset_next("POST", "/data/services/import", after_bytes=cut)
    with pytest.raises(requests.ConnectionError):
        alice.post(
            f"{xnat.url}/data/services/import",
            params={"PROJECT_ID": "PROJ", "EXPT_LABEL": "SESS01"},
            data=chunks(),
            headers=ZIP,
            timeout=TIMEOUT,
        )
    assert stored_names(xnat, alice) == ["IM0.dcm"]


def test_a_reset_after_the_whole_body_was_read_loses_only_the_answer(xnat: FakeXnat, alice: requests.Session) -> None:
    """Everything arrived: XNAT imports and builds (1.8.10 dest), only the answer never reaches the client."""
    data = zipped(study(series=1, per_series=2), force_zip64=True)
    xnat.reset_next("POST", "/data/services/import", after_bytes=len(data))
    with pytest.raises(requests.ConnectionError):
        import_zip(xnat, alice, data, dest="/prearchive/projects/PROJ")
    (row,) = xnat.prearchive_rows("PROJ")
    assert row["status"] == "READY"


def test_multipart_and_non_zip_uploads_store_nothing_when_cut(xnat: FakeXnat, alice: requests.Session) -> None:
    """commons-fileupload parses a multipart body whole before the importer runs (SecureResource.java:1273-1277);
    gradual-DICOM fails on the cut before storing anything [INF]."""
    datasets = study(series=1, per_series=4)
    data = zipped(datasets, force_zip64=True)
    xnat.reset_next("POST", "/data/services/import", after_bytes=len(data) - 10)
    with pytest.raises(requests.ConnectionError):
        alice.post(
            f"{xnat.url}/data/services/import",
            files={"file": ("study.zip", data, "application/zip")},
            data={"PROJECT_ID": "PROJ", "EXPT_LABEL": "SESS01"},
            timeout=TIMEOUT,
        )
    dicom = encode(datasets[0])
    xnat.reset_next("POST", "/data/services/import")
    with pytest.raises(requests.ConnectionError):
        alice.post(
            f"{xnat.url}/data/services/import",
            params={"PROJECT_ID": "PROJ"},
            data=dicom,
            headers={"Content-Type": "application/dicom"},
            timeout=TIMEOUT,
        )
    assert xnat.prearchive_rows() == []
    assert imports_logged(xnat) == [0, 0]


def test_other_paths_are_reset_without_any_processing(xnat: FakeXnat, alice: requests.Session) -> None:
    uri = import_zip(xnat, alice, zipped(study(series=1, per_series=1)), dest="/prearchive/projects/PROJ").text
    xnat.reset_next("POST", "/data/services/archive", times=2)
    for _ in range(2):
        with pytest.raises(requests.ConnectionError):
            alice.post(f"{xnat.url}/data/services/archive", params={"src": uri.strip()}, timeout=TIMEOUT)
    assert [row["status"] for row in xnat.prearchive_rows()] == ["READY"]
    assert xnat.experiments() == []
    assert [s for m, p, s in xnat.requests_log if p.startswith("/data/services/archive")] == [0, 0]


# ---------------------------------------------------------------------------------------------------------------
# Zips as java.util.zip.ZipInputStream reads them (complete uploads)
# ---------------------------------------------------------------------------------------------------------------


def test_zips_of_every_make_import_whole(xnat: FakeXnat, alice: requests.Session) -> None:
    for label, (method, seekable) in enumerate(
        [(zipfile.ZIP_STORED, True), (zipfile.ZIP_DEFLATED, True), (zipfile.ZIP_DEFLATED, False)]
    ):
        data = zipped(study(series=1, per_series=3), method=method, seekable=seekable, force_zip64=seekable)
        response = import_zip(xnat, alice, data, EXPT_LABEL=f"S{label}", dest="/prearchive/projects/PROJ")
        assert response.status_code == 200, response.text
    assert sorted(row["name"] for row in xnat.prearchive_rows("PROJ")) == ["S0", "S1", "S2"]
    assert {row["status"] for row in xnat.prearchive_rows("PROJ")} == {"READY"}


def test_zips_java_8_cannot_read_fail_like_a_broken_stream(xnat: FakeXnat, alice: requests.Session) -> None:
    """ZipInputStream refuses a stored entry with a data descriptor ("only DEFLATED entries can have EXT
    descriptor") before the entry is read, and Java 8's readEnd expects 4-byte descriptor sizes below 4 GiB, so it
    refuses the 8-byte ones Python writes to an unseekable stream with force_zip64 ("invalid entry size"; the message
    XNAT then answers depends on where the importer was reading [INF])."""
    stored = zipped(study(series=1, per_series=2), method=zipfile.ZIP_STORED, seekable=False)
    response = import_zip(xnat, alice, stored)
    assert response.status_code == 400
    assert "<h3>unable to read data from file</h3>" in response.text
    wide = zipped(study(series=1, per_series=2), method=zipfile.ZIP_DEFLATED, seekable=False, force_zip64=True)
    assert import_zip(xnat, alice, wide).status_code == 400
    assert xnat.prearchive_rows() == []


def test_entries_are_read_in_stream_order_without_the_central_directory(
    xnat: FakeXnat, alice: requests.Session
) -> None:
    """A zip whose central directory is missing (cut off) still yields every whole entry; what follows the last one
    must then be a clean end, so the import fails only when reading needs bytes that are not there."""
    data = zipped(study(series=1, per_series=2), force_zip64=True)
    last_end = data_ends(data)[-1][1]
    assert import_zip(xnat, alice, data[:last_end]).status_code == 200  # ends exactly after the last entry: EOF
    assert stored_names(xnat, alice) == ["IM0.dcm", "IM1.dcm"]
    truncated = import_zip(xnat, alice, data[: last_end - 1], EXPT_LABEL="SESS02")
    assert truncated.status_code == 400
    rows = {row["name"]: row for row in xnat.prearchive_rows("PROJ")}
    assert set(rows) == {"SESS01", "SESS02"}  # the first entry of SESS02 was stored before the failure


# ---------------------------------------------------------------------------------------------------------------
# A reply cut short by a proxy
# ---------------------------------------------------------------------------------------------------------------


def test_truncate_next_keeps_status_and_headers_but_cuts_the_body(xnat: FakeXnat, alice: requests.Session) -> None:
    import_zip(xnat, alice, zipped(study(series=1, per_series=1)))
    whole = alice.get(f"{xnat.url}/data/prearchive/projects/PROJ", params={"format": "json"}, timeout=TIMEOUT)
    xnat.truncate_next("GET", "/data/prearchive/projects/PROJ", keep_bytes=40)
    cut = alice.get(f"{xnat.url}/data/prearchive/projects/PROJ", params={"format": "json"}, timeout=TIMEOUT)
    assert cut.status_code == 200
    assert cut.headers["Content-Type"] == whole.headers["Content-Type"]
    assert cut.headers["Content-Length"] == "40"
    assert cut.content == whole.content[:40]
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.content)
    again = alice.get(f"{xnat.url}/data/prearchive/projects/PROJ", params={"format": "json"}, timeout=TIMEOUT)
    assert again.json() == whole.json()

    # the work is done before the answer is cut: a truncated import has stored its files
    xnat.truncate_next("POST", "/data/services/import")  # keep_bytes defaults to half the body
    answered = import_zip(xnat, alice, zipped(study(series=1, per_series=1)), EXPT_LABEL="SESS02")
    rows = {row["name"]: row for row in xnat.prearchive_rows("PROJ")}
    assert set(rows) == {"SESS01", "SESS02"}
    full = f"/data{rows['SESS02']['url']}\r\n".encode()
    assert (answered.status_code, answered.content) == (200, full[: len(full) // 2])
    assert [s for m, p, s in xnat.requests_log if p.startswith("/data/services/import")] == [200, 200]
