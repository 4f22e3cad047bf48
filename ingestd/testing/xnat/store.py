"""The store: all server state behind one lock, and the prearchive/archive operations (§3.4, §5, §6)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta

from ingestd.testing.xnat.auth import _Accounts
from ingestd.testing.xnat.catalog import _extra_resource
from ingestd.testing.xnat.common import (
    _ARCHIVABLE,
    _AUTO_ARCHIVE_CODES,
    _INTERRUPTIBLE,
    _REUSE_AS_IS,
    _SCAN_TYPES,
    _SESSION_TYPES,
    _VALID_FILE_NAME,
    ARCHIVING,
    BUILDING,
    CONFLICT,
    ERROR,
    LOCKED_ARCHIVING,
    QUEUED_ARCHIVING,
    QUEUED_BUILDING,
    QUEUED_MOVING,
    READY,
    RECEIVING,
    RECEIVING_INTERRUPT,
    UNASSIGNED,
    Key,
    _ArchiveError,
    _assignment,
    _code_name,
    _dicom_datetime,
    _EntryError,
    _HttpError,
    _label_chars,
    _now,
    _timestamp_datetime,
    _to_file_name_chars,
)
from ingestd.testing.xnat.dicom import _Dicom
from ingestd.testing.xnat.model import (
    _AnonScript,
    _ArchiveOptions,
    _BuiltScan,
    _Config,
    _Drop,
    _Experiment,
    _File,
    _HttpSession,
    _ImportContext,
    _Project,
    _Row,
    _Scan,
    _Subject,
    _Token,
    _User,
)

LOG = logging.getLogger("ingestd.testing.xnat")


class _Store(_Accounts):
    """All server state behind one re-entrant lock, and the prearchive/archive operations (§3.4, §5, §6)."""

    def __init__(self, config: _Config) -> None:
        self.config = config
        self.lock = threading.RLock()
        self.users: dict[str, _User] = {}
        self.projects: dict[str, _Project] = {}
        self.tokens: dict[str, _Token] = {}
        self.sessions: dict[str, _HttpSession] = {}
        # requireLogin=false: anonymous requests run as XNAT's `guest` user, who has no project rights here (Spring's
        # anonymous principal, SecurityConfig.configure: `.anonymous().principal(DEFAULT_GUEST_USERNAME)`).
        self.guest = _User("guest", "")
        self.rows: dict[Key, _Row] = {}
        self.subjects: dict[tuple[str, str], _Subject] = {}
        self.experiments: dict[tuple[str, str], _Experiment] = {}
        self.drops: list[_Drop] = []
        self.site_anon: _AnonScript | None = None
        self.project_anon: dict[str, _AnonScript] = {}
        self._serial = 0
        self._last_timestamp: datetime | None = None

    # -- users, projects, permissions --------------------------------------------------------------------------

    def project(self, name: str | None) -> _Project | None:
        """A project by ID or alias."""
        if not name:
            return None
        with self.lock:
            found = self.projects.get(name)
            if found is not None:
                return found
            return next((p for p in self.projects.values() if name in p.aliases), None)

    def code(self, project_id: str | None) -> int | None:
        project = self.project(project_id)
        return project.prearchive_code if project else None

    @staticmethod
    def can_read(user: _User, project: _Project) -> bool:
        name = user.username
        return user.admin or name in project.owners or name in project.members or name in project.collaborators

    @staticmethod
    def can_edit(user: _User, project: _Project) -> bool:
        return user.admin or user.username in project.owners or user.username in project.members

    def can_edit_label(self, user: _User, label: str) -> bool:
        """Edit rights on a prearchive project (`Unassigned` needs all-data access = admin, §4)."""
        if label == UNASSIGNED:
            return user.admin
        project = self.project(label)
        return project is not None and self.can_edit(user, project)

    # -- prearchive: receiving -----------------------------------------------------------------------------------

    def _new_timestamp(self) -> str:
        """`yyyyMMdd_HHmmssSSS`, strictly increasing so every new row gets its own folder (§1.5)."""
        now = _now()
        if self._last_timestamp is not None and now <= self._last_timestamp:
            now = self._last_timestamp + timedelta(milliseconds=1)
        self._last_timestamp = now
        return now.strftime("%Y%m%d_%H%M%S") + f"{now.microsecond // 1000:03d}"

    def _readable_project(self, user: _User, name: str) -> _Project | None:
        project = self.project(name.strip())
        return project if project is not None and self.can_read(user, project) else None

    def route(self, ctx: _ImportContext, dicom: _Dicom) -> tuple[_Project | None, str, str]:
        """§4: (project, subject label, session label) for one object; explicit parameters win."""
        project = self._readable_project(ctx.user, ctx.project) if ctx.project else None
        if project is None:  # an unknown/unreadable PROJECT_ID is silently ignored (§3.3)
            candidates = [_assignment(text, "Project") for text in dicom.comments]
            candidates += [dicom.study_description, dicom.accession]
            for candidate in candidates:
                project = self._readable_project(ctx.user, candidate) if candidate.strip() else None
                if project is not None:
                    break
        subject = ctx.subject or next((v for v in (_assignment(t, "Subject") for t in dicom.comments) if v), "")
        subject = subject or _label_chars(dicom.patient_name)
        label = ctx.label or next((v for v in (_assignment(t, "Session") for t in dicom.comments) if v), "")
        label = label or _label_chars(dicom.patient_id) or "dicom_upload"
        return project, subject, label

    def receive(self, ctx: _ImportContext, name: str, data: bytes, dicom: _Dicom) -> Key | None:
        """§3.4 steps 2-8 for one parsed object (`GradualDicomImporter.call`): route, find-or-create the row, name
        and store the file. `name` is the file writer's name (an archive entry's last path component).

        None when a site-wide DicomEdit "reject" drops the object after the file was written, deleting it again
        (archive/GradualDicomImporter.java:388-400; skipped when the row says `prevent_anon`): the import still
        answers 200 (`returnEmptyList`). Series import filters drop objects earlier, before any row exists; the
        caller asks `filtered` first, before the SOP UID checks, as XNAT does (:193-211). The legacy SI importer
        (`new_rows_only`) takes another path and is not filtered [INF].
        """
        with self.lock:
            project, subject, label = self.route(ctx, dicom)
            known = set(self.rows)
            row = self._find_or_create(ctx, project, subject, label, dicom)
            is_new = row.key not in known
            incoming, files = name, row.scans.setdefault(dicom.scan_id, {})
            name = self._file_name(ctx, name, dicom, files)
            files[name] = _File(name, data, dicom)
            # GradualDicomImporter.updateSessionLastMod (archive/GradualDicomImporter.java:472-487 at 4fb6bc14, :384-399
            # at d3a896206), called from eitherGetOrCreateSession for an existing row only: lastmod is refreshed when it
            # is more than 15 s old (`lastmod_refresh_seconds`); a new row's lastmod is its creation time.
            now = _now()
            if not is_new and (now - row.lastmod).total_seconds() >= self.config.lastmod_refresh_seconds:
                row.lastmod = now
            if ctx.pace > 0 and row not in ctx.locked:  # PrearcUtils.lockFile while the entry streams in
                row.receiving += 1
                ctx.locked.append(row)
            anon = self.site_anon
            if not ctx.new_rows_only and row.prevent_anon != "true" and anon and anon.enabled and anon.fails:
                # A failing site-wide script (GradualDicomImporter.java:389-417 at 4fb6bc14, :320-349 at d3a896206):
                # handleAnonymizationError deletes the row if this file created it, else the file, and throws a
                # ServerException(500) -- which call()'s own `catch (Throwable t)` (:431-435; :368-372) turns into
                # ClientException(400, "unable to read DICOM object " + name). So 400, not the 500 of §3.6.
                if is_new:
                    self.rows.pop(row.key, None)
                else:
                    del files[name]
                    if not files:
                        del row.scans[dicom.scan_id]
                raise _EntryError(f"unable to read DICOM object {incoming}", unreadable=False)
            if not ctx.new_rows_only and row.prevent_anon != "true" and self._dropped(dicom, "anonymization"):
                del files[name]  # FileUtils.deleteQuietly(outputFile): an earlier copy it overwrote is gone too
                if not files:
                    del row.scans[dicom.scan_id]
                return None
            return row.key

    def filtered(self, ctx: _ImportContext, dicom: _Dicom) -> bool:
        """Whether a series import filter drops the object (GradualDicomImporter.java:193-200)."""
        with self.lock:
            return not ctx.new_rows_only and self._dropped(dicom, "filter")

    def _dropped(self, dicom: _Dicom, stage: str) -> bool:
        return any(
            drop.stage == stage and drop.predicate(dicom.sop_uid, dicom.series_uid, dicom.series_description)
            for drop in self.drops
        )

    def _find_or_create(
        self, ctx: _ImportContext, project: _Project | None, subject: str, label: str, dicom: _Dicom
    ) -> _Row:
        project_id = project.id if project else None
        identity = (project_id, dicom.study_uid, label)
        if ctx.new_rows_only:
            existing = self.rows.get(ctx.created[identity]) if identity in ctx.created else None
            if existing is not None:
                return existing
        else:
            for row in self.rows.values():  # PrearcDatabase.eitherGetOrCreateSession (§3.4 step 5)
                if (row.project, row.tag, row.name) != identity:
                    continue
                if row.status in _REUSE_AS_IS:
                    return row
                if row.status == BUILDING:
                    row.status = RECEIVING_INTERRUPT
                    return row
                if row.status in _INTERRUPTIBLE:
                    row.status = RECEIVING
                    row.note("new files arrived: status set back to RECEIVING")
                    return row
        row = self._new_row(ctx, project, subject, label, dicom)
        ctx.created[identity] = row.key
        return row

    def _new_row(self, ctx: _ImportContext, project: _Project | None, subject: str, label: str, dicom: _Dicom) -> _Row:
        timestamp = ctx.timestamp or self._new_timestamp()
        project_label = project.id if project else UNASSIGNED
        wanted = ctx.folder or label
        folder = next(
            (
                f
                for f in [wanted] + [f"{wanted}_{n}" for n in (1, 2, 3)]
                if (project_label, timestamp, f) not in self.rows
            ),
            None,
        )  # §1.5: suffix _1.._3 on a clash
        if folder is None:
            raise _HttpError(500, f"Unable to create a prearchive session folder for {wanted}: name clash")
        autoarchive = _code_name(project.prearchive_code if project else None)
        requested = next((v for v in (_assignment(t, "AA") for t in dicom.comments) if v), "").lower()
        if requested in ("true", "t"):  # §4 AA: override
            autoarchive = "AutoArchive"
        elif requested in ("false", "f"):
            autoarchive = "Manual"
        row = _Row(
            project=project.id if project else None,
            timestamp=timestamp,
            folder=folder,
            name=label,
            tag=dicom.study_uid,
            subject=subject,
            status=RECEIVING,
            lastmod=_now(),
            scan_datetime=_dicom_datetime(dicom.study_date, dicom.study_time),
            has_study_time=bool(dicom.study_time),
            autoarchive=autoarchive,
            prevent_anon="true" if ctx.prevent_anon else "false",
            prevent_auto_commit="true" if ctx.prevent_auto_commit else "false",
            source=ctx.source,
            visit=ctx.visit,
            protocol=ctx.protocol,
            timezone=ctx.timezone,
            overwrite_files=ctx.overwrite_files,
        )
        row.note(f"session created by {ctx.user.username}")
        self.rows[row.key] = row
        return row

    @staticmethod
    def _file_name(ctx: _ImportContext, name: str, dicom: _Dicom, files: dict[str, _File]) -> str:
        """`GradualDicomImporter.getSafeFile` (archive/GradualDicomImporter.java:630-659).

        The template namer's name with `rename=true` or when `Files.toFileNameChars(name)` is not a valid file name;
        otherwise that name, unless a file of that name in the scan holds another SOP Instance UID or SOP Class UID
        (then the namer's name; the same pair is overwritten in place). The namer's name itself is never checked,
        so a file already there under it is overwritten.
        """
        safe = dicom.template_file_name()
        if ctx.rename:
            return safe
        requested = _to_file_name_chars(name)
        if not _VALID_FILE_NAME.fullmatch(requested):
            return safe
        existing = files.get(requested)
        if existing is None:
            return requested
        same = existing.dicom.sop_uid == dicom.sop_uid and existing.dicom.sop_class == dicom.sop_class
        return requested if same else safe

    # -- prearchive: operations ----------------------------------------------------------------------------------

    def row(self, key: Key) -> _Row | None:
        with self.lock:
            return self.rows.get(key)

    def pause(self) -> None:
        if self.config.operation_seconds > 0:
            time.sleep(self.config.operation_seconds)

    def build(self, key: Key, *, only_from: frozenset[str] | None = None) -> _Row | None:
        """QUEUED_BUILDING/...-> BUILDING -> READY (or ERROR; back to RECEIVING if files arrived meanwhile)."""
        with self.lock:
            row = self.rows.get(key)
            if row is None or (only_from is not None and row.status not in only_from):
                return None
            if row.status.startswith("_") or row.status == BUILDING:
                # PrearcSessionResource.postActionBuild/postActionCommit (restlet/resources/prearchive/
                # PrearcSessionResource.java:333-339, 403-437, same at d3a896206 and 4fb6bc14): 409 "session document
                # locked" when PrearcDatabase.setStatus(..., BUILDING) refuses, i.e. isLocked: the status is one of
                # PrearcUtils.inProcessStatusMap's `_` values, set by LockAndSync.run/lockSession while a build
                # (_BUILDING, here BUILDING), archive (_ARCHIVING), move or delete runs. An import only takes per-file
                # locks (the row stays RECEIVING), so it never makes a build answer 409; nor do ARCHIVING/QUEUED_*.
                raise _HttpError(409, "session document locked")
            row.status = BUILDING
        self.pause()
        with self.lock:
            if self.rows.get(row.key) is not row:
                return None
            interrupted = row.status == RECEIVING_INTERRUPT
            row.lastmod = _now()
            if not any(row.scans.values()):
                row.status = ERROR
                row.note("build failed: no files")
                return row
            row.built = True
            row.catalog = {
                scan_id: _BuiltScan(
                    next(iter(files.values())).dicom.series_description,
                    _SCAN_TYPES.get(next(iter(files.values())).dicom.modality, "xnat:otherDicomScanData"),
                    tuple(files),
                )
                for scan_id, files in row.scans.items()
                if files
            }
            row.uploaded = _timestamp_datetime(row.timestamp)
            row.scan_time = row.scan_datetime.strftime("%H:%M:%S") if row.scan_datetime and row.has_study_time else ""
            row.status = RECEIVING if interrupted else READY
            row.note("session built" + (" (interrupted by new files)" if interrupted else ""))
            return row

    def archive(self, key: Key, options: _ArchiveOptions, *, from_statuses: frozenset[str] = _ARCHIVABLE) -> str:
        """Archive one row (§6): lock it, merge into the archive, delete the row; CONFLICT/ERROR on failure."""
        with self.lock:
            row = self.rows.get(key)
            if row is None:
                raise _HttpError(404, f"/prearchive/projects/{key[0]}/{key[1]}/{key[2]} not found.")
            if row.status not in from_statuses:
                raise _HttpError(403, "Operation already in progress on this prearchive entry.")
            row.status = LOCKED_ARCHIVING
        self.pause()
        with self.lock:
            try:
                uri = self._merge(row, options)
            except _ArchiveError as failure:
                row.status = CONFLICT if failure.conflict else ERROR
                row.lastmod = _now()
                row.note(f"archive failed: {failure.message}")
                raise
            self.rows.pop(row.key, None)
            return uri

    def _merge(self, row: _Row, options: _ArchiveOptions) -> str:
        if not row.built:  # §5.2: no session XML yet -> ERROR [INF]
            raise _ArchiveError("Unable to load the session XML: the session has not been built.", conflict=False)
        project_id = options.project or row.project
        if project_id is None:
            raise _ArchiveError("Cannot archive sessions from the Unassigned folder.", conflict=False)
        label = options.label or row.name or row.folder
        subject = options.subject or row.subject
        if not subject:
            raise _ArchiveError("Unable to identify the subject of the session.", conflict=False)
        xsi_type = _SESSION_TYPES.get(row.modality, "xnat:otherDicomSessionData")
        anon = self.project_anon.get(project_id)
        if anon is not None and anon.enabled and anon.fails and row.prevent_anon != "true":
            # The project script runs at archive (MergePrearcToArchiveSession.java:55 -> PrearcSessionAnonymizer ->
            # ProjectAnonymizer); its failure fails the archive (row ERROR). The message is [INF].
            raise _ArchiveError(f"Anonymization failed for project {project_id}: the DicomEdit script failed.",
                                conflict=False)  # fmt: skip
        existing = self.experiments.get((project_id, label))
        if existing is None:
            existing = _Experiment(
                f"{self.config.site_id}_E{self.next_serial():05d}", project_id, subject, label, row.tag, xsi_type,
                row.modality, row.scan_datetime.strftime("%Y-%m-%d") if row.scan_datetime else "", _now(),
            )  # fmt: skip
            plan = [(scan_id, files) for scan_id, files in row.catalogued().items()]
        else:
            self._check_session(existing, row, subject, xsi_type, options)
            plan = self._plan_scans(existing, row, options)
        # Every catalog is merged before anything moves (MergeSessionsA.call: mergeSessions, then the directories),
        # so a conflict leaves the archive as it was.
        merged = [
            (scan_id, files, self._merge_catalog(existing.scans[scan_id].files, files) if scan_id in existing.scans
             else dict(files))
            for scan_id, files in plan
        ]  # fmt: skip
        self._ensure_subject(project_id, subject)
        self.experiments[(project_id, label)] = existing
        for scan_id, files, entries in merged:
            first = next(iter(files.values())).dicom
            scan = existing.scans.get(scan_id)
            if scan is None:
                scan = _Scan(
                    scan_id,
                    first.series_uid,
                    first.series_description,
                    _SCAN_TYPES.get(first.modality, "xnat:otherDicomScanData"),
                    self.next_serial(),
                )
                scan.extras = {
                    extra: _extra_resource(extra, self.next_serial(), scan_id, first.series_description)
                    for extra in self.config.extra_scan_resources
                }
                existing.scans[scan_id] = scan
            scan.files = entries
        return existing.uri

    def _merge_catalog(self, existing: dict[str, _File], incoming: dict[str, _File]) -> dict[str, _File]:
        """`MergeCatCatalog.merge` of an incoming DICOM catalog into an existing one; the new entries (name -> file).

        helpers/merge/MergeCatCatalog.java: each incoming entry is matched by SOP Instance UID when the site
        preference `useSopInstanceUidToUniquelyIdentifyDicom` is on (libs/xdat SiteConfigPreferences: default true),
        else (or when no UID matches) by URI, i.e. file name (`locateExistingEntry`). No match: added. A match is
        overwritten (the archiver passes overwrite = allowSessionMerge, true once it got here); when it was found
        under another name, that older file is removed (`handleFilenameChange`). With the UID preference on, an
        incoming file whose name is taken by an entry with another UID is a conflict (`throwForDicomUidConflict`),
        which MergePrearcToArchiveSession turns into a 409 ClientException (row CONFLICT).
        """
        by_uid = self.config.use_sop_instance_uid
        entries = dict(existing)
        first_with_uid: dict[str, str] = {}  # CatalogUtils.getDCMEntryByUID finds the first entry with the UID
        for entry_name, entry in entries.items():
            first_with_uid.setdefault(entry.dicom.sop_uid, entry_name)
        for name, item in incoming.items():
            uid = item.dicom.sop_uid
            found = first_with_uid.get(uid) if by_uid and uid else None
            if found is None and name in entries:
                found = name
            if found is None:
                entries[name] = item
                first_with_uid.setdefault(uid, name)
                continue
            if by_uid and name in entries and entries[name].dicom.sop_uid != uid:
                raise _ArchiveError(
                    "A DICOM file with the same name but different UID already exists. "
                    "There is no way to override this conflict, you will need to fix your data.",
                    conflict=True,
                )
            if found != name:
                del entries[found]
            entries[name] = item
            if by_uid:
                first_with_uid[uid] = name
        return entries

    @staticmethod
    def _check_session(existing: _Experiment, row: _Row, subject: str, xsi_type: str, options: _ArchiveOptions) -> None:
        """The session-level rows of the §6.3 merge matrix, in PrearcSessionArchiver.checkForConflicts' order
        (archive/PrearcSessionArchiver.java:358-392 at 4fb6bc14, :353-387 at d3a896206): PRE_EXISTS, modality,
        subject, UID. The existing session is found by label across the whole project (GetExptByProjectIdentifier,
        :178), so a label another subject's session uses fails here, at archive, with 409 (CONFLICT row); MODALITY_MOD
        has two spaces after "process." in the source."""
        if not options.allow_merge:
            raise _ArchiveError("Session already exists, retry with overwrite enabled", conflict=True)
        if existing.xsi_type != xsi_type:
            raise _ArchiveError(
                "Invalid modification of session modality via archive process.  Data may require a manual merge.",
                conflict=True,
            )
        if existing.subject != subject:
            raise _ArchiveError(
                "Invalid modification of session subject via archive process.: "
                f"{existing.label} Already Exists for another Subject",
                conflict=True,
            )
        if existing.study_uid != row.tag and not options.override_exceptions:
            raise _ArchiveError("Invalid modification of session UID via archive process.", conflict=True)

    @staticmethod
    def _plan_scans(existing: _Experiment, row: _Row, options: _ArchiveOptions) -> list[tuple[str, dict[str, _File]]]:
        """The scan-level rows of the §6.3 matrix: where each incoming scan goes, or the conflict.

        Without overwriteFiles, MergeSessionsA.checkForConflict (helpers/merge/MergeSessionsA.java:80-110) refuses
        any overlap with the existing session: a file path that exists already -> "Session already exists with
        matching files."; else an incoming entry whose UID or URI a matching scan's catalog has already
        (SessionOverwriteCheck.detectOverwrite) -> "Session already exists with the same resources.".
        """
        by_uid = {scan.series_uid: scan.id for scan in existing.scans.values()}
        taken = set(existing.scans)
        plan: list[tuple[str, dict[str, _File]]] = []
        same_files = same_entries = False
        for scan_id, files in row.catalogued().items():
            series_uid = next(iter(files.values())).dicom.series_uid
            target = scan_id
            other = by_uid.get(series_uid)
            if other is not None and other != scan_id:
                if not options.override_exceptions:
                    raise _ArchiveError(
                        f"Session already contains a scan with the same UID, but a different number ({other}).",
                        conflict=True,
                    )
                target = other
            elif scan_id in existing.scans and existing.scans[scan_id].series_uid != series_uid:
                # "scan IDs corrected, merged" (§6.3); the corrected ID's form is [INF].
                target = next(f"{scan_id}-{n}" for n in range(1, 10_000) if f"{scan_id}-{n}" not in taken)
            taken.add(target)
            if target in existing.scans:
                there = existing.scans[target].files
                same_files = same_files or bool(set(files) & set(there))
                uids = {item.dicom.sop_uid for item in there.values()}
                same_entries = same_entries or any(item.dicom.sop_uid in uids for item in files.values())
            plan.append((target, files))
        if not options.overwrite_files and same_files:
            raise _ArchiveError("Session already exists with matching files.", conflict=True)
        if not options.overwrite_files and same_entries:
            raise _ArchiveError("Session already exists with the same resources.", conflict=True)
        return plan

    def subject_id(self, project_id: str, label: str) -> str:
        with self.lock:
            return self._ensure_subject(project_id, label).id

    def _ensure_subject(self, project_id: str, label: str) -> _Subject:
        subject = self.subjects.get((project_id, label))
        if subject is None:  # §6.1: the subject is created if missing
            subject = _Subject(f"{self.config.site_id}_S{self.next_serial():05d}", project_id, label)
            self.subjects[(project_id, label)] = subject
        return subject

    def delete(self, key: Key) -> None:
        with self.lock:
            row = self.rows.get(key)
            if row is None:
                raise _HttpError(404, f"/prearchive/projects/{key[0]}/{key[1]}/{key[2]} not found.")
            if row.status.startswith("_"):
                raise _HttpError(400, f"Unable to delete the session: it is {row.status}.")
            del self.rows[key]

    def move(self, key: Key, destination: _Project) -> Key:
        with self.lock:
            row = self.rows.get(key)
            if row is None:
                raise _HttpError(404, f"/prearchive/projects/{key[0]}/{key[1]}/{key[2]} not found.")
            if row.status.startswith("_") or row.status in (BUILDING, ARCHIVING, QUEUED_ARCHIVING):
                raise _HttpError(409, "session document locked")
            new_key = (destination.id, row.timestamp, row.folder)
            if new_key in self.rows:
                raise _HttpError(
                    409,
                    f"A prearchive resource with session {row.folder} already exists in the project {destination.id}",
                )
            del self.rows[key]
            row.project = destination.id
            if row.status == QUEUED_MOVING:
                row.status = READY if row.built else RECEIVING
            row.note(f"moved from {key[0]} to {destination.id}")
            self.rows[new_key] = row
            return new_key

    def wants_auto_archive(self, row: _Row) -> bool:
        """§5.3: row autoarchive AutoArchive* or project code ≥4."""
        code = self.code(row.project)
        return row.autoarchive in _AUTO_ARCHIVE_CODES or (code is not None and code >= 4)

    def queued_archive_options(self, row: _Row) -> _ArchiveOptions:
        """§5.3: queued auto-archive uses override=false, append=true, overwriteFiles = code 5 or overwrite_files."""
        code = self.code(row.project)
        overwrite = row.overwrite_files or code == 5 or row.autoarchive == "AutoArchiveOverwrite"
        return _ArchiveOptions(override_exceptions=False, allow_merge=True, overwrite_files=overwrite)

    def idle_pass(self, *, ignore_idle: bool) -> None:
        """One run of the SessionXMLRebuilder (§5.3): build idle RECEIVING rows, then auto-archive as configured."""
        with self.lock:
            now = _now()
            due = [
                row
                for row in self.rows.values()
                if row.status == RECEIVING
                and row.prevent_auto_commit != "true"
                and row.source != "uploader"
                and row.receiving == 0  # SessionXMLRebuilder.java:99 `!PrearcUtils.isSessionReceiving(triple)`
                and (ignore_idle or (now - row.lastmod).total_seconds() >= self.config.idle_build_seconds)
            ]
            for row in due:
                row.status = QUEUED_BUILDING
            keys = [row.key for row in due]
        for key in keys:
            built = self.build(key, only_from=frozenset({QUEUED_BUILDING}))
            if built is None:
                continue
            with self.lock:
                if built.status != READY or not self.wants_auto_archive(built) or self.rows.get(built.key) is not built:
                    continue
                built.status = QUEUED_ARCHIVING
                options = self.queued_archive_options(built)
            try:
                self.archive(built.key, options, from_statuses=frozenset({QUEUED_ARCHIVING}))
            except (_ArchiveError, _HttpError) as exc:
                LOG.info("auto-archive of %s failed: %s", built.url, exc)
