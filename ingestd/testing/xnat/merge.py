"""Archiving a built prearchive row: the merge into an existing session (PrearcSessionArchiver, MergeCatCatalog, §6)."""

from __future__ import annotations

from dataclasses import replace

from ingestd.testing.xnat.auth import _Accounts
from ingestd.testing.xnat.catalog import _extra_resource
from ingestd.testing.xnat.common import (
    _SCAN_TYPES,
    _SESSION_TYPES,
    _ArchiveError,
    _now,
)
from ingestd.testing.xnat.model import (
    _AnonScript,
    _ArchiveOptions,
    _Experiment,
    _File,
    _Row,
    _Scan,
    _Subject,
)
from ingestd.testing.xnat.resource_files import md5


class _Merge(_Accounts):
    """The store's archive half: a built row merged into the archive, its subject created if missing (§6).

    It sits on `_Accounts` for `lock`, `config` and `next_serial` (experiment and subject IDs)."""

    experiments: dict[tuple[str, str], _Experiment]
    subjects: dict[tuple[str, str], _Subject]
    project_anon: dict[str, _AnonScript]

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
        self._archive_resources(row, existing)
        return existing.uri

    def _archive_resources(self, row: _Row, experiment: _Experiment) -> None:
        """The prearchive session's own resources become the experiment's (res §5: MergeSessionsA moves the folder,
        helpers/merge/MergeSessionsA.java 161, 369-380; PrearcUtils.cleanupScans 868-885 formalizes each catalog
        with checksums): every entry gets the MD5 of the file on disk when checksums are on; its SIZE metafield
        stays what the prearchive wrote [INF]. Merged into an existing session, a label it has already takes the
        new files over its own [INF: not confirmed in the source]."""
        for label, resource in row.resources.items():
            target = experiment.resources.setdefault(label, resource)
            for name, entry in resource.catalog.items():
                if name not in resource.disk:
                    continue
                target.disk[name] = resource.disk[name]
                digest = md5(resource.disk[name]) if self.config.checksums else ""
                target.catalog[name] = replace(entry, digest=digest)
            target.version += 1
        row.resources = {}

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
