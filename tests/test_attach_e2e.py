"""Non-DICOM files to XNAT as resources, end to end: a real daemon, a drop folder, the XNAT stand-in, xnatpy.

Checked by identity: each file is in the resource its rule names, under its name, byte-identical (xnatpy downloads
it), and once (a listing never shows a name twice, and no file ingestd did not send is there); faults and a kill -9
during the upload change none of that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import xnat

from ingestd.testing.xnat import FakeXnat
from tests.dicom import make_study, write_instances
from tests.procs import DaemonProcess, free_port, journal_rows, wait_until, write_xnat_daemon_config

pytestmark = [pytest.mark.slow]

RULES = """\
rules:
  - name: mr
    when: {drop_folder: DROP}
    route: {server: main, project: PROJ, subject: '{path[0]}', session: '{path[1]}', archive: true}
    attach:
      - {match: "*/*/qBOLD/**", resource: qBOLD}
      - {match: "**/*.PAR", resource: PARREC}
      - {match: "**/*.REC", resource: PARREC}
"""

QBOLD = {"maps/r2prime.nii.gz": 300_000, "maps/oef.nii.gz": 200_000, "report.txt": 1_000}
PARREC = {"scan_7.PAR": 20_000, "scan_7.REC": 2_000_000}


def _bytes(name: str, size: int) -> bytes:
    """Content that differs per name (so a file in the wrong place shows), repeatable."""
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def _tree(root: Path, subject: str, session: str, *, dicom: bool, results: bool = True) -> dict[str, bytes]:
    """Write `<subject>/<session>/` under `root`: DICOM (2 series) and/or qBOLD results and a PAR/REC pair.
    Returns the non-DICOM files' bytes by their path below `<session>/`."""
    base = root / subject / session
    written: dict[str, bytes] = {}
    if dicom:
        study = make_study(series=2, per_series=3)
        for ds in study:
            ds.SeriesNumber = 1 if ds.SeriesInstanceUID == study[0].SeriesInstanceUID else 2
        write_instances(study, base / "dicom")
    if results:
        for name, size in QBOLD.items():
            written[f"qBOLD/{name}"] = _bytes(name, size)
        for name, size in PARREC.items():
            written[f"raw/{name}"] = _bytes(name, size)
        for relative, data in written.items():
            (base / relative).parent.mkdir(parents=True, exist_ok=True)
            (base / relative).write_bytes(data)
    return written


def _drop(staging: Path, drop: Path, subject: str) -> None:
    """Move a finished tree into the drop folder at once (a rename on the same file system)."""
    (staging / subject).rename(drop / subject)


def _config(tmp_path: Path, port: int, url: str, drop: Path, *, extra: str = "") -> Path:
    drop.mkdir(exist_ok=True)
    rules = RULES.replace("DROP", str(drop))
    return write_xnat_daemon_config(
        tmp_path,
        port,
        url,
        rules=rules,
        extra=f"drop_folders: [{{path: {drop}, settle_seconds: 0.3}}]\nattachments: {{recheck_seconds: 1}}\n{extra}",
    )


def _batches(config: Path) -> list[tuple[int, str, str, str | None]]:
    """(id, kind, state, hold code) of every batch and set, oldest first."""
    journal = config.parent / "state" / "journal.sqlite"
    if not journal.exists():
        return []
    return [
        (int(row[0]), str(row[1]), str(row[2]), row[3])
        for row in journal_rows(journal, "SELECT id, kind, state, hold_code FROM batches ORDER BY id")
    ]


def _all_delivered(config: Path, sets: int) -> bool:
    rows = _batches(config)
    files = [row for row in rows if row[1] == "files"]
    return len(files) == sets and all(row[2] == "delivered" for row in rows)


@contextmanager
def _xnatpy(server: FakeXnat) -> Iterator[Any]:
    with xnat.connect(server.url, user="ingestd", password="pw-for-tests", loglevel="ERROR") as session:
        yield session


def _resources(server: FakeXnat, subject: str, session: str) -> dict[str, dict[str, bytes]]:
    """What xnatpy finds in the session's resources: label -> name -> the bytes it downloads."""
    found: dict[str, dict[str, bytes]] = {}
    with _xnatpy(server) as connection:
        experiment = connection.projects["PROJ"].subjects[subject].experiments[session]
        for resource in experiment.resources.values():
            files: dict[str, bytes] = {}
            for name, file in resource.files.items():
                assert name not in files, f"{name} listed twice in {resource.label}"
                with file.open() as stream:
                    files[name] = stream.read()
            found[resource.label] = files
    return found


def _on_disk(server: FakeXnat, session: str, labels: tuple[str, ...] = ("qBOLD", "PARREC")) -> None:
    """XNAT's disk holds exactly what its catalogs list: no partial file left from an interrupted upload."""
    for label in labels:
        state = server.resource_state("PROJ", label, session=session)
        assert state is not None
        assert set(state.disk) == set(state.catalog), label
        assert all(len(state.disk[name]) == size for name, (size, _digest) in state.catalog.items())


def _run_until_delivered(tmp_path: Path, config: Path, port: int, staging: Path, drop: Path, subject: str) -> None:
    """Start the daemon, drop `<subject>/` and wait until its study and one attachment set are delivered."""
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        _drop(staging, drop, subject)
        wait_until(lambda: _all_delivered(config, 1), 60, interval=0.3, message="study and files delivered")
        assert daemon.terminate() == 0


def _expected(written: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    return {
        "qBOLD": {name.removeprefix("qBOLD/"): data for name, data in written.items() if name.startswith("qBOLD/")},
        "PARREC": {name.removeprefix("raw/"): data for name, data in written.items() if name.startswith("raw/")},
    }


def test_a_session_folder_lands_as_one_session_with_scans_and_two_resources(tmp_path: Path, xnat: FakeXnat) -> None:
    """`sub01/ses01/` with DICOM, qBOLD results and a PAR/REC pair: one session, its two scans, two resources,
    every file byte-identical in xnatpy's download, and the drop folder emptied."""
    port, drop, staging = free_port(), tmp_path / "drop", tmp_path / "staging"
    config = _config(tmp_path, port, xnat.url, drop)
    written = _tree(staging, "sub01", "ses01", dicom=True)
    _run_until_delivered(tmp_path, config, port, staging, drop, "sub01")
    (experiment,) = xnat.experiments("PROJ")
    assert len(experiment.scans) == 2
    assert _resources(xnat, "sub01", "ses01") == _expected(written)
    assert not any(drop.iterdir())
    assert not list((config.parent / "state" / "attachments").glob("[!.]*"))  # copies removed once verified
    log = (tmp_path / "daemon.log").read_text()
    assert "qBOLD/maps" not in log and "scan_7" not in log  # no path below the drop folder in the log


def test_files_without_dicom_attach_to_an_existing_session_and_wait_for_a_missing_one(
    tmp_path: Path, xnat: FakeXnat
) -> None:
    """The how-to pattern `<subject>/<session>/qBOLD/...` without DICOM: attached to the session XNAT has; for a
    session XNAT lacks, held `no-session` until it exists (here: its DICOM is dropped), then attached by itself."""
    port, drop, staging = free_port(), tmp_path / "drop", tmp_path / "staging"
    config = _config(tmp_path, port, xnat.url, drop)
    _tree(staging, "sub02", "ses02", dicom=True, results=False)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        _drop(staging, drop, "sub02")
        wait_until(lambda: _all_delivered(config, 0) and _batches(config), 60, interval=0.3)
        later = _tree(staging, "sub02", "ses02", dicom=False)
        missing = _tree(staging, "sub03", "ses03", dicom=False)
        _drop(staging, drop, "sub02")
        _drop(staging, drop, "sub03")

        def one_held_one_delivered() -> bool:
            sets = [row for row in _batches(config) if row[1] == "files"]
            return {(row[2], row[3]) for row in sets} == {("held", "no-session"), ("delivered", None)}

        wait_until(one_held_one_delivered, 60, interval=0.3, message="one set delivered, the other held no-session")
        assert _resources(xnat, "sub02", "ses02") == _expected(later)
        # the session appears: its DICOM is dropped (as a lab would, once the scan is exported)
        _tree(staging, "sub03", "ses03", dicom=True, results=False)
        _drop(staging, drop, "sub03")
        wait_until(lambda: _all_delivered(config, 2), 60, interval=0.3, message="the held set delivered")
        assert daemon.terminate() == 0
    assert _resources(xnat, "sub03", "ses03") == _expected(missing)


_UPLOAD = ("PUT", "/data/experiments/")


@pytest.mark.parametrize("fault", ["reset", "503", "processed-then-504", "listings-503", "lookups-503"])
def test_a_fault_during_the_resource_upload_leaves_each_file_once(tmp_path: Path, xnat: FakeXnat, fault: str) -> None:
    """XNAT resets the upload mid-body (a partial file on its disk that no listing shows), answers 503, or stores
    everything and then a proxy answers 504; or the listings and look-ups around it fail: each file ends in XNAT
    once, byte-identical."""
    if fault == "reset":
        xnat.reset_next(*_UPLOAD, after_bytes=200_000)
    elif fault == "503":
        xnat.fail_next(*_UPLOAD, status=503)
    elif fault == "processed-then-504":
        xnat.fail_next(*_UPLOAD, status=504, after_processing=True)
    elif fault == "listings-503":  # the resource listings `check` reads (and the study's catalogs, whoever is first)
        xnat.fail_next("GET", "/data/experiments/", status=503, times=3)
    else:  # the experiment look-ups of `locate` (and of the study's verify)
        xnat.fail_next("GET", "/data/projects/PROJ/subjects/", status=503, times=3)
    port, drop, staging = free_port(), tmp_path / "drop", tmp_path / "staging"
    config = _config(tmp_path, port, xnat.url, drop)
    written = _tree(staging, "sub01", "ses01", dicom=True)
    _run_until_delivered(tmp_path, config, port, staging, drop, "sub01")
    assert xnat.faults_pending() == 0
    assert _resources(xnat, "sub01", "ses01") == _expected(written)
    _on_disk(xnat, "ses01")


def test_kill9_during_the_resource_upload_leaves_each_file_once(tmp_path: Path, xnat: FakeXnat) -> None:
    """The daemon dies while XNAT stores the first upload (its answer delayed): after the restart it lists the
    resources, finds every file, and uploads nothing again."""
    xnat.fail_next(*_UPLOAD, status=504, after_processing=True, delay=30)
    port, drop, staging = free_port(), tmp_path / "drop", tmp_path / "staging"
    config = _config(tmp_path, port, xnat.url, drop)
    written = _tree(staging, "sub01", "ses01", dicom=True)

    def uploading() -> bool:
        journal = config.parent / "state" / "journal.sqlite"
        return bool(journal_rows(journal, "SELECT 1 FROM deliveries WHERE step = 'uploading'"))

    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        _drop(staging, drop, "sub01")
        wait_until(uploading, 60, interval=0.2, message="the resource upload under way")
        wait_until(lambda: _resources_answered(xnat), 30, interval=0.2, message="XNAT storing the first upload")
        assert daemon.kill9() == -9
        daemon.start()
        daemon.wait_ready(port)
        wait_until(lambda: _all_delivered(config, 1), 60, interval=0.3, message="delivered after the restart")
        assert daemon.terminate() == 0
    puts = [path for method, path, _status in xnat.requests_log if method == "PUT" and "/resources/" in path]
    # PARREC's upload (the first, by label) was stored before the kill and never answered; after the restart only
    # qBOLD's was sent
    # (the stand-in logs a request once answered: the one the first daemon died waiting for shows only if its
    # delayed answer came before the end of the test)
    qbold = [path for path in puts if "/resources/qBOLD/" in path]
    assert len(qbold) == 1 and len(puts) - len(qbold) <= 1
    assert _resources(xnat, "sub01", "ses01") == _expected(written)
    _on_disk(xnat, "ses01")


def _resources_answered(server: FakeXnat) -> bool:
    """Whether the stand-in holds the PARREC files the delayed upload carried (it stores before it answers)."""
    state = server.resource_state("PROJ", "PARREC", session="ses01")
    return state is not None and len(state.catalog) == len(PARREC)


def test_a_rule_that_does_not_archive_attaches_to_its_ready_prearchive_session(tmp_path: Path, xnat: FakeXnat) -> None:
    """XNAT's prearchive takes session-level resources once the session is built (one raw PUT per file, always
    overwriting, no digest: docs/xnat-resources.md §5): the files land beside the DICOM of our READY session."""
    port, drop, staging = free_port(), tmp_path / "drop", tmp_path / "staging"
    config = _config(tmp_path, port, xnat.url, drop)
    rules = config.parent / "lab.rules.yaml"
    rules.write_text(rules.read_text().replace("archive: true", "archive: false"))
    written = _tree(staging, "sub01", "ses01", dicom=True)
    _run_until_delivered(tmp_path, config, port, staging, drop, "sub01")
    assert not xnat.experiments("PROJ")
    (row,) = xnat.prearchive_rows("PROJ")
    assert row["status"] == "READY"
    expected = _expected(written)
    for label, files in expected.items():
        state = xnat.resource_state("PROJ", label, prearchive=(row["timestamp"], row["folderName"]))
        assert state is not None and state.disk == files and set(state.catalog) == set(files)
    puts = [path for method, path, _status in xnat.requests_log if method == "PUT" and "/resources/" in path]
    assert len(puts) == sum(len(files) for files in expected.values())  # one per file, each once


def test_a_file_xnat_holds_with_other_content_holds_the_set_and_one_with_the_same_is_not_sent(
    tmp_path: Path, xnat: FakeXnat
) -> None:
    """Someone put `qBOLD/report.txt` into the session by hand, with other content: the set is held
    `attach-conflict` and XNAT's file is left as it is. The PAR/REC pair someone put there already, byte for byte,
    is not sent again."""
    port, drop, staging = free_port(), tmp_path / "drop", tmp_path / "staging"
    config = _config(tmp_path, port, xnat.url, drop)
    _tree(staging, "sub01", "ses01", dicom=True, results=False)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        _drop(staging, drop, "sub01")
        wait_until(lambda: _all_delivered(config, 0) and _batches(config), 60, interval=0.3)
        base = f"{xnat.url}/data/projects/PROJ/subjects/sub01/experiments/ses01/resources"
        auth = ("ingestd", "pw-for-tests")
        theirs = b"a report someone else wrote"
        for path, data in [
            ("qBOLD/files/report.txt", theirs),
            *((f"PARREC/files/{n}", _bytes(n, s)) for n, s in PARREC.items()),
        ]:
            answer = requests.put(
                f"{base}/{path}", data=data, auth=auth, headers={"Content-Type": "text/plain"}, timeout=10
            )
            assert answer.status_code == 200, answer.text
        _tree(staging, "sub01", "ses01", dicom=False)
        _drop(staging, drop, "sub01")

        def held() -> bool:
            return any(row[1] == "files" and row[3] == "attach-conflict" for row in _batches(config))

        wait_until(held, 60, interval=0.3, message="the set held attach-conflict")
        assert daemon.terminate() == 0
    assert _resources(xnat, "sub01", "ses01")["qBOLD"]["report.txt"] == theirs
    puts = [path for method, path, _status in xnat.requests_log if method == "PUT" and "ingestd-" in path]
    assert puts == []  # nothing sent: the listing found the conflict first, and PARREC already there


ANONYMIZING = """\
profiles:
  research: {key: {env: INGESTD_TEST_KEY}}
rules:
  - name: research
    when: {drop_folder: DROP}
    route: {server: main, project: PROJ, subject: '{PatientID:hash8}', session: '{subject}_MR', archive: true}
    anonymize: research
    attach:
      - {match: "*/*/qBOLD/**", resource: qBOLD}
    attach_unreviewed_files: true
    justification: the lab's qBOLD pipeline writes maps and a fit report, reviewed to hold no patient data
"""


def test_a_de_identifying_rule_attaches_reviewed_files_under_names_made_of_the_label(
    tmp_path: Path, xnat: FakeXnat
) -> None:
    """With `anonymize`, the files leave under `<resource>_<NNNN><extension>`: no folder or file name of the drop
    (which may hold a patient's name) reaches XNAT, and the session is the de-identified one."""
    port, drop, staging = free_port(), tmp_path / "drop", tmp_path / "staging"
    config = _config(tmp_path, port, xnat.url, drop)
    (config.parent / "lab.rules.yaml").write_text(ANONYMIZING.replace("DROP", str(drop)))
    written = _tree(staging, "DOE^JOHN", "ses01", dicom=True)
    _run_until_delivered(tmp_path, config, port, staging, drop, "DOE^JOHN")
    (experiment,) = xnat.experiments("PROJ")
    assert "DOE" not in experiment.subject and experiment.label.endswith("_MR")
    state = xnat.resource_state("PROJ", "qBOLD", session=experiment.label)
    assert state is not None
    qbold = {name: data for name, data in written.items() if name.startswith("qBOLD/")}
    assert sorted(state.disk) == ["qBOLD_0001.nii.gz", "qBOLD_0002.nii.gz", "qBOLD_0003.txt"]
    assert sorted(state.disk.values()) == sorted(qbold.values())  # the bytes as dropped (reviewed, not altered)
    assert xnat.resource_state("PROJ", "PARREC", session=experiment.label) is None  # no entry takes them
    log = (tmp_path / "daemon.log").read_text()
    assert "DOE" not in log and "r2prime" not in log


def test_a_late_file_of_a_delivered_upload_joins_the_same_resource(tmp_path: Path, xnat: FakeXnat) -> None:
    """A file of the same upload dropped after its set was delivered (a late export): a set of its own, delivered
    into the same session's resource beside the others, nothing sent twice."""
    port, drop, staging = free_port(), tmp_path / "drop", tmp_path / "staging"
    config = _config(tmp_path, port, xnat.url, drop)
    written = _tree(staging, "sub01", "ses01", dicom=True)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        _drop(staging, drop, "sub01")
        wait_until(lambda: _all_delivered(config, 1), 60, interval=0.3, message="the first set delivered")
        late = staging / "sub01" / "ses01" / "qBOLD" / "late.txt"
        late.parent.mkdir(parents=True)
        late.write_bytes(b"a late fit report\n")
        _drop(staging, drop, "sub01")
        wait_until(lambda: _all_delivered(config, 2), 60, interval=0.3, message="the late set delivered")
        assert daemon.terminate() == 0
    expected = _expected(written)
    expected["qBOLD"]["late.txt"] = b"a late fit report\n"
    assert _resources(xnat, "sub01", "ses01") == expected
    puts = [path for method, path, _status in xnat.requests_log if method == "PUT" and "/resources/" in path]
    assert len(puts) == 3  # PARREC and qBOLD once each, then the late file's zip


def test_a_site_without_checksums_is_checked_by_the_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """XNAT's `checksums` preference off: listings carry no digest, so each archived file's bytes are downloaded
    and hashed before the set counts as delivered."""
    monkeypatch.setenv("XNAT_TEST_USER", "ingestd")
    monkeypatch.setenv("XNAT_TEST_PASSWORD", "pw-for-tests")
    with FakeXnat(version="1.8.10", checksums=False) as server:
        server.add_user("ingestd", "pw-for-tests")
        server.add_project("PROJ", members=["ingestd"])
        port, drop, staging = free_port(), tmp_path / "drop", tmp_path / "staging"
        config = _config(tmp_path, port, server.url, drop)
        written = _tree(staging, "sub01", "ses01", dicom=True)
        _run_until_delivered(tmp_path, config, port, staging, drop, "sub01")
        state = server.resource_state("PROJ", "qBOLD", session="ses01")
        assert state is not None and {digest for _size, digest in state.catalog.values()} == {""}
        downloads = [path for method, path, _ in server.requests_log if method == "GET" and "/files/" in path]
        assert len(downloads) >= len(written)  # every file looked at by its bytes (a listing's path ends in /files)
        assert _resources(server, "sub01", "ses01") == _expected(written)
