"""`ingestd check-xnat --write-test PROJECT`: a dry import of one generated instance, judged, then deleted.

As a delivery does, the test imports a zip into the project's prearchive, waits for XNAT to build the session,
then looks at what XNAT made of it (where it landed, whether it kept the file, its status) and deletes it again;
a session it cannot delete is an error finding that says how to remove it by hand.
"""

from __future__ import annotations

import contextlib
import io
import secrets
import tempfile
import time
import zipfile
from pathlib import Path

from ingestd.check_xnat.findings import Finding
from ingestd.config import XnatServer
from ingestd.xnat import PrearchiveRow, XnatClient, XnatError

_WRITE_TEST_TIMEOUT = 120.0  # at most this long for the test session to be built (ready_timeout_seconds if lower)


_SETTLED = ("READY", "ERROR", "CONFLICT")


def _test_instance(label: str) -> tuple[bytes, str, str, str]:
    """One small MR instance with new UIDs: (bytes, study UID, series UID, SOP Instance UID)."""
    from pydicom.uid import generate_uid  # noqa: PLC0415 - only the write test needs pydicom

    from ingestd.synthetic import mr_instance  # noqa: PLC0415

    study_uid, series_uid = generate_uid(), generate_uid()
    ds = mr_instance(
        study_uid,
        series_uid,
        size=8,
        pixel_data=bytes(8 * 8 * 2),
        PatientName=label,
        PatientID=label,
        StudyID="1",
        AccessionNumber="",
        StudyDate=time.strftime("%Y%m%d"),
        SeriesDate=time.strftime("%Y%m%d"),
        StudyTime=time.strftime("%H%M%S"),
        SeriesTime=time.strftime("%H%M%S"),
        StudyDescription="ingestd check-xnat write test",
        SeriesDescription="ingestd check",
        SeriesNumber=1,
        InstanceNumber=1,
    )
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), study_uid, series_uid, sop_uid


def _write_test(client: XnatClient, name: str, server: XnatServer, project: str) -> list[Finding]:
    """Import one generated instance into `project`'s prearchive, see it built and held, delete it whatever
    happened; an error names anything that could not be deleted."""
    subject = f"{name}/{project}"
    try:  # as a delivery does: an import into a project the account cannot write lands elsewhere (Unassigned)
        client.check_project(project)
    except XnatError as exc:
        return [Finding("error", subject, f"write test not run: {exc}", "fix the project or the account's role in it")]
    label = f"ingestd_check_{secrets.token_hex(4)}"
    data, study_uid, series_uid, sop_uid = _test_instance(label)
    findings: list[Finding] = []
    placed: list[str] = []  # prearchive URLs (/prearchive/...) XNAT named or listed for our study
    try:
        with tempfile.TemporaryDirectory(prefix="ingestd-check-") as folder:
            zip_path = Path(folder) / f"{label}.zip"
            with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as archive:
                archive.writestr(f"{series_uid}/{sop_uid}.dcm", data)
            uris = client.import_zip(zip_path, project, label, label)
        placed += [uri.removeprefix("/data") for uri in uris if uri.startswith("/data/prearchive/")]
        findings += _judge_import(client, subject, server, project, uris, sop_uid, label)
    except XnatError as exc:
        findings.append(
            Finding(
                "error",
                subject,
                f"write test: {exc}",
                "act on XNAT's message (project membership, anonymisation script, disk), then run again",
            )
        )
    finally:
        findings += _clean_up(client, subject, project, study_uid, placed, label)
    return findings


def _judge_import(  # noqa: PLR0911 - one return per outcome
    client: XnatClient, subject: str, server: XnatServer, project: str, uris: list[str], sop_uid: str, label: str
) -> list[Finding]:
    if not uris:
        return [
            Finding(
                "error",
                subject,
                "write test: XNAT answered the import but kept no file (an anonymisation script's reject or a series"
                " import filter)",
                "look at the site and project anonymisation scripts and series import filters",
            )
        ]
    if len(uris) > 1:
        return [
            Finding(
                "error",
                subject,
                f"write test: XNAT filed one study as {len(uris)} sessions: {' '.join(uris)}",
                "check the site's DICOM routing rules and anonymisation scripts",
            )
        ]
    uri = uris[0]
    if not uri.startswith(f"/data/prearchive/projects/{project}/"):
        return [
            Finding(
                "error",
                subject,
                f"write test: XNAT filed the test study under {uri}, not in the prearchive of {project}",
                "make the account a member or owner of the project and check its ID or alias; XNAT's routing"
                " rules may send studies elsewhere",
            )
        ]
    url = uri.removeprefix("/data")
    row = _wait_for_build(client, server, url)
    if row is None:
        experiment = client.experiment(project, label, label)
        where = (
            f"it was archived as /data/archive/projects/{project}/subjects/{label}/experiments/{label}: delete that"
            " subject and session in XNAT"
            if experiment is not None
            else "it is not in the archive either"
        )
        return [
            Finding(
                "error",
                subject,
                f"write test: the test session left the prearchive before ingestd could check it; {where}",
                "an auto-archive project archives sessions by itself: see the prearchive finding",
            )
        ]
    if row.status != "READY":
        log = client.prearchive_log(url)
        return [
            Finding(
                "error",
                subject,
                f"write test: the test session is {row.status} after import" + (f": {log}" if log else ""),
                "look at the session's log in XNAT (Upload > Prearchive) and at XNAT's logs",
            )
        ]
    holdings = client.prearchive_holdings(url)
    if holdings is None or not holdings.holds(sop_uid):
        return [
            Finding(
                "error",
                subject,
                f"write test: XNAT built the test session but does not list the file {sop_uid}.dcm in it",
                "look at the anonymisation scripts (they may rename or drop files) and the site's file namer",
            )
        ]
    return [
        Finding(
            "ok",
            subject,
            f"write test: one generated instance imported into the prearchive as {label}, built, found by file"
            " name, and deleted",
        )
    ]


def _wait_for_build(client: XnatClient, server: XnatServer, url: str) -> PrearchiveRow | None:
    """The prearchive row once READY, ERROR or CONFLICT (asking for a build while it is RECEIVING: the import
    answered, so XNAT read every entry), or as it is when time runs out; None when it left the prearchive."""
    deadline = time.monotonic() + min(server.ready_timeout_seconds, _WRITE_TEST_TIMEOUT)
    interval = min(server.poll_interval_seconds, 1.0)
    built = False
    while True:
        row = client.prearchive_session(url)
        if row is None or row.status in _SETTLED or time.monotonic() > deadline:
            return row
        if row.status == "RECEIVING" and not built:
            built = client.build(url)
        time.sleep(interval)


def _clean_up(
    client: XnatClient, subject: str, project: str, study_uid: str, placed: list[str], label: str
) -> list[Finding]:
    """Delete every prearchive session of the test study: those XNAT named, and any listed for its Study Instance
    UID in the project's prearchive (which shows Unassigned rows too to an admin). An error names what is left."""
    urls = list(dict.fromkeys(placed))
    with contextlib.suppress(XnatError):
        urls += [row.url for row in client.prearchive(project) if row.study_uid == study_uid and row.url not in urls]
    left = []
    for url in urls:
        try:
            client.request("DELETE", f"/data{url}", "delete the test session", allow=(404,))
        except XnatError as exc:
            left.append(f"{url} ({exc})")
    with contextlib.suppress(XnatError):
        left += [row.url for row in client.prearchive(project) if row.study_uid == study_uid]
    if not left:
        return []
    return [
        Finding(
            "error",
            subject,
            f"write test: could not delete the test session {label}: {'; '.join(dict.fromkeys(left))}",
            "delete it in XNAT: Upload > Prearchive, select the session, Delete",
        )
    ]
