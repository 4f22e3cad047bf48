"""What the XNAT stand-in's own tests send and read: numbered studies, zips of them, imports, error pages."""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Sequence

import requests
from pydicom.dataset import Dataset

from ingestd.testing.xnat import FakeXnat
from tests.dicom import encode, make_study
from tests.procs import wait_until

TIMEOUT = 10
ZIP = {"Content-Type": "application/zip"}


def numbered_study(series: int, per_series: int, **attributes: str) -> list[Dataset]:
    """A synthetic study whose series have distinct SeriesNumbers (XNAT files scans by them), plus `attributes`."""
    datasets = make_study(series, per_series)
    numbers: dict[str, int] = {}
    for ds in datasets:
        ds.SeriesNumber = numbers.setdefault(ds.SeriesInstanceUID, len(numbers) + 1)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
    return datasets


def zipped(
    datasets: Sequence[Dataset], extra: Sequence[tuple[str, bytes]] = (), *, at: int | None = None, first: int = 0
) -> bytes:
    """A stored (uncompressed) zip of the datasets as dicom/IM<n>.dcm from n = `first`; `extra` entries go at
    index `at` (default: the end)."""
    entries = [(f"dicom/IM{number}.dcm", encode(ds)) for number, ds in enumerate(datasets, start=first)]
    position = len(entries) if at is None else at
    entries[position:position] = list(extra)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def import_zip(xnat: FakeXnat, session: requests.Session, data: bytes, **params: str) -> requests.Response:
    """POST a zip to the import service, as subject SUBJ01 / session SESS01 of PROJ (overridable)."""
    values = {"PROJECT_ID": "PROJ", "SUBJECT_ID": "SUBJ01", "EXPT_LABEL": "SESS01", **params}
    return session.post(f"{xnat.url}/data/services/import", params=values, data=data, headers=ZIP, timeout=TIMEOUT)


def h3(response: requests.Response) -> str:
    """The message of an XNAT error page (its <h3>)."""
    match = re.search(r"<h3>(.*)</h3>", response.text)
    assert match, response.text
    return match.group(1)


def wait_for(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll every 0.02 s: some of the stand-in's states (RECEIVING, BUILDING) last only a moment."""
    wait_until(condition, timeout, interval=0.02)
