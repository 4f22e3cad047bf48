"""Delivering attachment sets: each file of a routed set into its XNAT resource, verified by XNAT's own listing.

The deliverer runs these steps for batches of kind `files`, with the same loop, back-off, breaker and journal row
(`deliveries`) as for studies; the steps and their transitions are declared in `ingestd.states`:

    locate -> check -> upload -> uploading -> check -> done
                ^                               |
                +------- what is missing -------+

- `locate` finds the session: the archived experiment of the route's project, subject and session label; for a
  rule that does not archive, our READY prearchive session (from the delivery of the study's batch). Not there
  yet while the study's batch is on its way: wait (nothing is charged). Not there at all: held `no-session`, looked
  for again every `attachments.recheck_seconds`, and on by itself once it exists.
- `check` lists each resource (`?format=json`) and compares every file by name, size and MD5 digest (the listing's
  `digest`; where XNAT keeps none, the size, and the bytes for an archived file). It runs before the first upload
  too: a file XNAT already holds with the same content (an upload interrupted before its answer, the same files
  dropped again) is not sent; a file of that name with other content holds the set `attach-conflict` (ingestd never
  replaces what it did not write). All there: done. Some missing: `upload` those; once XNAT answered an upload and
  still lacks files, that counts against `delivery.max_resends`, then the set is held `incomplete`.
- `upload` sends only what the last `check` found missing, one resource at a time: an archived session gets one zip
  per resource, `PUT .../resources/L/files/ingestd-<set>.zip?extract=true&overwrite=true` (XNAT extracts it into the
  resource and keeps no zip; docs/xnat-resources.md §1.4). `overwrite=true` is safe there because the listing just
  showed none of these names, and needed: an interrupted upload leaves a partial file on XNAT's disk that no
  listing shows and that `overwrite=false` would call a duplicate for ever (§6). A prearchive session takes one raw
  PUT per file, and always overwrites (§5). `uploading` is committed before the first request: found after a crash
  or a failed request, `check` looks.

A set is delivered only when every outgoing file was seen in XNAT's listing (`finish_set` refuses less); then its
copies under `attachments/` are removed, unless `delivery.keep_after_delivery`.
"""

from __future__ import annotations

import hashlib
import shutil
import time
import zipfile
from collections.abc import Callable, Mapping
from itertools import groupby
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import structlog

from ingestd.config import Config
from ingestd.journal import Journal, StudyState
from ingestd.journal.attachments import (
    AttachmentOut,
    attachments_out,
    finish_set,
    session_batches,
    set_files,
    set_recheck,
    set_verified,
)
from ingestd.logs import path_digest
from ingestd.metrics import DELIVERIES
from ingestd.pipeline.holdings import READY, HoldError, Job
from ingestd.states import HoldCode, Step
from ingestd.xnat.resources import (
    ResourceFile,
    download,
    experiment_id,
    list_resource,
    resource_path,
    upload_file,
    upload_zip,
)

__all__ = ["SET_STEPS", "SetHost", "recheck_no_session"]

log = structlog.get_logger("ingestd.attach")

_ON_ITS_WAY = frozenset({StudyState.RECEIVING, StudyState.COMPLETE, StudyState.ROUTED})


class SetHost(Protocol):
    """What the steps need of the deliverer that runs them."""

    journal: Journal
    config: Config
    state_dir: Path

    def beat(self) -> None: ...

    def advance(self, batch_id: int, step: Step, *, progress: bool = False, **fields: Any) -> None: ...

    def wait(self, batch_id: int, seconds: float, **fields: Any) -> None: ...


Target = tuple[str, str, str]  # (level, scan, resource)


def _target(out: AttachmentOut) -> Target:
    return (out.level, out.scan, out.resource)


def _base(job: Job) -> str:
    """The located session: `/data/experiments/<ID>` or `/data/prearchive/projects/P/TS/S`."""
    if job.delivery.archive_uri:
        return job.delivery.archive_uri
    return "/data" + str(job.delivery.prearchive_url).removeprefix("/data")


def _path(job: Job, target: Target) -> str:
    level, scan, resource = target
    return resource_path(_base(job), level, scan, resource, project=job.project, subject=job.subject)


def _in_prearchive(job: Job) -> bool:
    return not job.delivery.archive_uri


# -- locate ---------------------------------------------------------------------------------------------------


def _find(host: SetHost, job: Job) -> dict[str, Any] | None:
    """The located session as delivery fields (`archive_uri` or `prearchive_url`), or None."""
    found = experiment_id(job.client, job.project, job.subject, job.session)
    if found is not None:
        return {"archive_uri": f"/data/experiments/{quote(found, safe='')}", "prearchive_url": None}
    if not job.archives:
        batches = session_batches(host.journal, job.route.server, job.project, job.subject, job.session)
        for batch in batches:
            if batch.prearchive_url and batch.state == StudyState.DELIVERED:
                row = job.client.prearchive_session(batch.prearchive_url)
                if row is not None and row.status == READY:
                    return {"archive_uri": None, "prearchive_url": row.url}
    return None


def _on_its_way(host: SetHost, job: Job) -> bool:
    """Whether a study's batch routed to this session is still being delivered (the session will exist)."""
    batches = session_batches(host.journal, job.route.server, job.project, job.subject, job.session)
    return any(batch.state in _ON_ITS_WAY for batch in batches)


def _step_locate(host: SetHost, job: Job) -> None:
    found = _find(host, job)
    if found is not None:
        host.advance(job.batch_id, Step.CHECK, progress=True, **found)
        return
    if _on_its_way(host, job):
        host.wait(job.batch_id, job.server.poll_interval_seconds)
        return
    where = f"{job.project}/{job.subject}/{job.session}"
    state = "archived " if job.archives else ""
    raise HoldError(
        HoldCode.NO_SESSION,
        f"XNAT has no {state}session {where} to attach the files to: they go there once it exists (looked for again "
        f"every {host.config.attachments.recheck_seconds:g} s), or `ingestd release` this set",
    )


def recheck_no_session(host: SetHost, job: Job, retry: Callable[[], object]) -> bool:
    """A set held `no-session` whose time to look again has come: `retry` it (held -> routed, step `locate`) once
    the session exists, else look again later. Returns whether it moved on."""
    if _find(host, job) is not None:
        retry()
        log.info("attach.session_found", batch_id=job.batch_id)
        return True
    set_recheck(host.journal, job.batch_id, time.time() + host.config.attachments.recheck_seconds)
    return False


# -- upload ---------------------------------------------------------------------------------------------------


def _zip(host: SetHost, job: Job, number: int, files: list[AttachmentOut]) -> Path:
    """One resource's files in a zip (stored: results are often compressed already), read from their copies, in the
    set's outbox folder (which re-routing and retention remove with the set)."""
    path = host.state_dir / "outbox" / str(job.batch_id) / f"resource-{number}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for out in files:
            host.beat()
            archive.write(host.state_dir / out.spool_path, out.name)
    return path


def _step_upload(host: SetHost, job: Job) -> None:
    """Send every outgoing file XNAT was not seen holding, one resource at a time (`uploading` committed first)."""
    pending = [out for out in attachments_out(host.journal, job.batch_id) if out.verified_at is None]
    if not pending:
        host.advance(job.batch_id, Step.CHECK)
        return
    host.advance(job.batch_id, Step.UPLOADING)
    started = time.monotonic()
    requests = 0
    for number, (target, group) in enumerate(groupby(pending, key=_target)):
        files = list(group)
        path = _path(job, target)
        if _in_prearchive(job):
            for out in files:
                host.beat()
                upload_file(job.client, path, out.name, host.state_dir / out.spool_path)
                requests += 1
            continue
        package = _zip(host, job, number, files)
        try:
            duplicates = upload_zip(job.client, path, package, name=f"ingestd-{job.batch_id}.zip", overwrite=True)
        finally:
            package.unlink(missing_ok=True)
        requests += 1
        if duplicates:
            log.info("attach.duplicates", batch_id=job.batch_id, files=len(duplicates))  # looked at by `check`
    log.info(
        "attach.uploaded",
        batch_id=job.batch_id,
        files=len(pending),
        requests=requests,
        seconds=round(time.monotonic() - started, 3),
    )
    host.advance(job.batch_id, Step.CHECK, progress=True, answered=1)


def _step_uploading(host: SetHost, job: Job) -> None:
    """An upload that may or may not have reached XNAT, wholly or in part: look before sending anything."""
    host.advance(job.batch_id, Step.CHECK)


# -- check ----------------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _holds(job: Job, path: str, out: AttachmentOut, listed: ResourceFile) -> bool | None:
    """Whether XNAT's file is ours: True, False (other content), or None (not known: treated as missing)."""
    if listed.size is not None and listed.size != out.size:
        return False if listed.digest else None
    if listed.digest:
        return listed.digest.lower() == out.md5
    if _in_prearchive(job):
        return listed.size == out.size  # XNAT keeps no digest there (§5): the size it catalogued
    data = download(job.client, path, out.name)  # checksums are off on this site: the bytes decide
    return hashlib.md5(data, usedforsecurity=False).hexdigest() == out.md5


def _step_check(host: SetHost, job: Job) -> None:
    """List each resource; decide from that alone: done, send what is missing again, or hold."""
    outs = attachments_out(host.journal, job.batch_id)
    found: dict[int, bool] = {}
    conflicts: list[AttachmentOut] = []
    for target, group in groupby(outs, key=_target):
        path = _path(job, target)
        host.beat()
        listing: Mapping[str, ResourceFile] = {f.name: f for f in list_resource(job.client, path) or ()}
        for out in group:
            listed = listing.get(out.name)
            ours = None if listed is None else _holds(job, path, out, listed)
            found[out.id] = bool(ours)
            if ours is False:
                conflicts.append(out)
    set_verified(host.journal, job.batch_id, found, time.time())
    missing = sum(1 for seen in found.values() if not seen)
    log.info("attach.checked", batch_id=job.batch_id, files=len(found), missing=missing, conflicts=len(conflicts))
    if conflicts:
        first = conflicts[0]
        raise HoldError(
            HoldCode.ATTACH_CONFLICT,
            f"resource {first.resource} of {job.project}/{job.subject}/{job.session} already holds {len(conflicts)} "
            "file(s) of the same name with other content (ingestd never replaces what it did not write): remove "
            "them in XNAT, or rename the files, then `ingestd retry`",
        )
    if not missing:
        _done(host, job)
        return
    shortfalls = job.delivery.shortfalls + int(job.delivery.answered)  # XNAT answered, yet lacks files
    if shortfalls > host.config.delivery.max_resends:
        raise HoldError(
            HoldCode.INCOMPLETE,
            f"XNAT answered {shortfalls} uploads but does not list {missing} of the {len(found)} files: the account "
            "may lack edit access to the session (XNAT then answers 200 and stores nothing); the copies are kept",
        )
    host.advance(job.batch_id, Step.UPLOAD, shortfalls=shortfalls, answered=0)


def _done(host: SetHost, job: Job) -> None:
    if not finish_set(host.journal, job.batch_id, time.time()):
        return
    DELIVERIES.labels(outcome=StudyState.DELIVERED).inc()
    log.info(
        "attach.delivered",
        batch_id=job.batch_id,
        where="prearchive" if _in_prearchive(job) else "archive",
        session=path_digest(job.session),
    )
    shutil.rmtree(host.state_dir / "outbox" / str(job.batch_id), ignore_errors=True)
    if not host.config.delivery.keep_after_delivery:
        for file in set_files(host.journal, job.batch_id):
            (host.state_dir / file.spool_path).unlink(missing_ok=True)


SET_STEPS: Mapping[Step, Callable[[SetHost, Job], None]] = {
    Step.LOCATE: _step_locate,
    Step.UPLOAD: _step_upload,
    Step.UPLOADING: _step_uploading,
    Step.CHECK: _step_check,
}
