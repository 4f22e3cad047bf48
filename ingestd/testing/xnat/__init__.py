"""A faithful in-process stand-in for an XNAT 1.8 server (import -> prearchive -> archive), for tests and labs.

Behaviour follows XNAT's own source, surprises included: unknown projects land in `Unassigned` with status
200, archive conflicts answer HTTP 500 (not 409), octet-stream zips are refused with `Unsupported format UNKNOWN`, a
bad zip entry aborts the import *after* earlier entries were stored, and sessions sit in `RECEIVING` until an idle
builder builds them. DICOM-zip uploads are read as a stream the way java.util.zip.ZipInputStream reads them, files
are named as GradualDicomImporter.getSafeFile names them, and archiving merges catalogs by SOP Instance UID as
MergeCatCatalog does. Standard library HTTP server + pydicom only. The modules, bottom up: `common` (constants,
helpers, responses), `dicom`, `model` (state records), `auth` (accounts), `catalog` (representations), `merge`
(archiving a row), `store` (prearchive operations), `faults`, `routing`, the handler groups `login`, `site`,
`archive`, `import_service`, `prearchive`, `resources` (the resource file API of archived experiments, scans and
subjects, with its pure parts in `resource_files`) and `prearc_resources` (a prearchive session's own resources),
`api` (routing table and request plumbing), `handler` (HTTP server), `server` (`FakeXnat`), `cli`.

Sources. Comments cite XNAT's source as in github.com/NrgXnat/xnat (xnat-web under `web/`; checked at commit
93d33cbf6): `archive/`, `helpers/`, `restlet/`, `security/`, `initialization/` and `xapi/` paths are under
`web/src/main/java/org/nrg/xnat/` (`xapi/` under `web/src/main/java/org/nrg/`), "libs/xdat" under
`libs/xdat/src/main/java/org/nrg/`. Class.method names are the primary pointer; every `file:line` in the comments
was checked against that commit (a few were corrected to it), those marked "line unchecked" name only the file or
class. `[INF]` marks behaviour inferred, not confirmed in XNAT's source. `§n` marks the topic it belongs
to (the sections of a reference document that is not in this repository), each summarising this source:

* §0 the 1.8.8 / 1.8.9 / 1.8.10 switches (`_Config.modern`, `_Config.editable_projects_cached`): no single source.
* §1.1 URIs: restlet/XNATApplication.java:95 attachArchiveURI (the `/archive` aliases), :322-327 the services.
* §1.3 result tables: libs/xdat xft/XFTTable.java:267-280 (CSV cells by StringEscapeUtils.escapeCsv).
* §1.4 error pages: Restlet 1.1's StatusFilter and Tomcat's error page (libraries, not in XNAT's source).
* §1.5 prearchive timestamps and folder names: helpers/prearchive/PrearcUtils.java (line unchecked).
* §2 authentication: security/XnatBasicAuthenticationFilter.java, restlet/guard/XnatSecureGuard.java; §2.2
  `interactiveAgentIds`: libs/xdat xdat/preferences/SiteConfigPreferences.java:443-445.
* §3 the import service: restlet/services/Importer.java:61 (route XNATApplication.java:322); §3.1 upload names:
  restlet/resources/SecureResource.java:1270-1299 and libs/xdat xft/utils/fileExtraction/Format.java:27
  getFormat; §3.2 handlers and nested archives: archive/DicomZipImporter.java:160 importZipFile; §3.3 parameters
  (`PROJECT_ID`, `dest`, `overwrite`): restlet/services/Importer.java and
  restlet/actions/importer/ImporterHandlerA.java (lines unchecked); §3.4 one object's steps:
  archive/GradualDicomImporter.java:135 call (step 5 eitherGetOrCreateSession :324, file names getSafeFile :366,
  400 "unable to read DICOM object" :434); §3.5 SI and archiving after an import:
  restlet/actions/SessionImporter.java:152 call, DicomZipImporter.java:242-249 archiveSession; §3.6 answers
  (`text/uri-list`): restlet/services/Importer.java (line unchecked).
* §4 project, subject and session from DICOM: web/src/main/java/org/nrg/dcm/id/ClassicDicomObjectIdentifier.java:23
  and its base classes in that folder (lines unchecked).
* §5 the prearchive: helpers/prearchive/PrearcDatabase.java; §5.1 rows: helpers/prearchive/PrearcTableBuilder.java:36
  PREARC_HEADERS; §5.2 statuses: helpers/prearchive/PrearcUtils.java:91 PrearcStatus; §5.3 idle builds:
  helpers/prearchive/SessionXMLRebuilder.java:40; §5.5 session actions:
  restlet/resources/prearchive/PrearcSessionResource.java:254 (`switch (action)`); §5.6 prearchive files:
  restlet/resources/prearchive/PrearcSessionResourceFiles.java; §5.7 batch services:
  restlet/services/prearchive/PrearchiveBatchDelete.java, ...BatchMove.java, ...BatchRebuild.java
  (routes XNATApplication.java:325-327).
* §6 the archive service: restlet/services/Archiver.java:118 finishSingleSessionArchive; §6.2 auto-archive and
  redirects: helpers/prearchive/PrearcSession.java:79 isAutoArchive, Archiver.java:85; §6.3 the merge matrix:
  archive/PrearcSessionArchiver.java:359 checkForConflicts; §6.1 labels and subjects, §6.4 the checks of `src`,
  §6.5 batch archives: Archiver.java and PrearcSessionArchiver.java (lines unchecked).
* §7 prearchive codes: libs/framework/src/main/java/org/nrg/framework/constants/PrearchiveCode.java,
  helpers/prearchive/PrearcSession.java:108.
* §8 listings (projects, subjects, experiments; §8.1 bootstrap; §8.2 the `items` JSON xnatpy reads) and §12
  projects by permission: restlet/resources/ProjectListResource.java, ProjectResource.java (lines unchecked).
* §9 the config service: restlet/resources/ConfigResource.java (line unchecked).
* §10 proxies: nginx's behaviour, not XNAT's.

Usage::

    with FakeXnat(version="1.8.10", idle_build_seconds=0.2, rebuild_repeat_seconds=0.1) as xnat:
        xnat.add_user("alice", "secret")
        xnat.add_project("PROJ", owners=["alice"], prearchive_code=0)
        requests.post(f"{xnat.url}/data/services/import?PROJECT_ID=PROJ", data=zip_bytes,
                      headers={"Content-Type": "application/zip"}, auth=("alice", "secret"))
        xnat.build_now()
        assert xnat.prearchive_rows("PROJ")[0]["status"] == "READY"

Public API (`FakeXnat`):

* ``FakeXnat(*, version="1.8.10", host="127.0.0.1", port=0, idle_build_seconds=300.0,
  rebuild_repeat_seconds=60.0, session_timeout_seconds=900.0, archive_timeout_seconds=600.0,
  operation_seconds=0.0, site_id="XNAT", use_sop_instance_uid=True, token_lifetime_seconds=172800.0,
  max_failed_logins=20, lockout_seconds=3600.0, password_expiration_seconds=None, require_login=True,
  context_path="", lastmod_refresh_seconds=None, extra_scan_resources=(), checksums=True)`` -- `version` switches the
  1.8.8 / 1.8.9 / 1.8.10 behaviour (≥1.8.9: `projects?permissions=`
  without a known `dataType` is a bare 500; ≥1.8.10: default import handler, DICOM-zip
  `project`/`subject`/`session`/`dest`/`action=commit`, nested archives, `Ignore-Unparsable` scope) and is what
  `/xapi/siteConfig/buildInfo` (open, no login) and `.../buildInfo/version` report; `token_lifetime_seconds` is
  `aliasTokenTimeout`; `max_failed_logins`/`lockout_seconds` lock an account after that many failures (0 = never);
  `password_expiration_seconds` is `passwordExpirationInterval` (None = no expiry); `require_login=False` serves
  anonymous requests as `guest` (403, not 401); `context_path` (e.g. ``"/xnat"``) serves everything under it only
  (`url` includes it; body URIs stay `/data/...`, redirects to XNAT pages include it); the idle builder
  replaces XNAT's minutes by seconds (§5.3);
  `operation_seconds` makes every build and archive take that long (and holds every resource upload between its
  file writes and its catalog write), so tests can observe `BUILDING`/`_ARCHIVING`
  and lock contention; `use_sop_instance_uid` is the site preference `useSopInstanceUidToUniquelyIdentifyDicom`
  (archived catalog entries matched by SOP Instance UID, else by file name); `lastmod_refresh_seconds` is
  GradualDicomImporter.updateSessionLastMod's 15 s (a row's lastmod is refreshed by new files at most that often;
  default: 15 s scaled like the idle time, ``min(15, idle_build_seconds / 20)``); `extra_scan_resources` (e.g.
  ``("NIFTI", "SNAPSHOTS", "BIDS")``) gives every newly archived scan those resources too, with a few files each,
  in the experiment JSON/XML, the scan's resource listing, catalogs and file listings (``archived_files`` stays
  DICOM only); `checksums` is the site preference (MD5 `digest` in resource catalogs, "" when off).
* ``start()`` (returns self), ``stop()``, context manager; ``url`` (``http://127.0.0.1:PORT``).
* ``add_user(username, password, *, admin=False)``; ``add_project(project_id, *, owners=(), members=(),
  collaborators=(), prearchive_code=0, aliases=(), name=None)`` -- owners/members may edit, collaborators only
  read, site admins do everything; ``issue_token(username) -> (alias, secret)``; ``expire_sessions()``.
* Accounts and tokens: ``expire_tokens(username=None) -> int`` (the alias-token sweep, for one user or all; returns
  how many went); ``failed_logins(username) -> int``; ``is_locked(username) -> bool``; ``expire_password(username)``
  (authenticated requests then answer 302 to `{url}/app/template/XDATScreen_UpdateUser.vm`);
  ``set_password(username, password)``; ``disable_user(username, *, inactivity=False)`` (by an admin: every login
  401; for inactivity: the password logs in, then 302 to `{url}/app/template/InactiveAccount.vm`);
  ``unverify_user(username)`` (logins 401); ``enable_user(username)`` (undoes those and any lockout).
* Fault injection, each for the next `times` requests whose method matches and whose path starts with
  `path_prefix`: ``fail_next(method, path_prefix, *, status=503, times=1, body=None, html=True,
  after_processing=False, delay=0.0)`` -- `body` is the message (inside a Restlet status page when `html`,
  else plain text); `after_processing=True` does the real work first (files stored, session archived) and then
  answers the failure, like a proxy 504 after XNAT finished; `delay` sleeps before answering.
  ``html_error_with_200_next(method, path_prefix, message=...)`` answers 200 with an HTML error page (what
  `format=html` uploads do) without doing the work.
  ``reset_next(method, path_prefix, *, times=1, after_bytes=None)`` resets the connection (TCP RST) part-way
  through the body: for `POST /data/services/import` after `after_bytes` (default half the body), with every entry
  of a raw DICOM-zip upload that lies wholly inside them stored as a complete upload would store it (the rows stay
  RECEIVING; multipart and other uploads store nothing); for a resource file upload (PUT/POST `.../files...`,
  prearchive PUT too) after `after_bytes` (default half), the bytes that arrived left in the final file, or with
  `extract` the members read whole, on disk and not in the catalog; elsewhere after at most 64 KiB, processing
  nothing; logged with status 0.
  ``truncate_next(method, path_prefix, *, times=1, keep_bytes=None)`` does the real work and answers with the real
  status and headers but only the first `keep_bytes` of the body (default half; Content-Length to match).
  ``proxy_timeout_next(path_prefix="/data/services/import", *, after_seconds, import_seconds, method="POST",
  times=1)`` -- nginx's 504 page after `after_seconds` while XNAT goes on in the background: an import's entries
  are stored one by one over `import_seconds` (row RECEIVING, lastmod throttled, no idle build while it writes);
  `stop()` ends it. ``hold_row_lock(project, timestamp, folder, seconds, *, status="_BUILDING")`` -- the row
  locked as XNAT's LockAndSync locks it, so `?action=build|commit` answer 409 "session document locked".
* Anonymisation: ``set_anon_script(script, *, project=None, enabled=True, fails=False)`` -- the site-wide or a
  project's DicomEdit script (None removes it; scripts are never run). A failing enabled site script makes each
  import entry answer 400 "unable to read DICOM object NAME" (new row deleted; `prevent_anon` spares it); a failing
  project script fails the archive (row ERROR). Read back via ``GET /xapi/anonymize/site``, ``.../site/enabled``,
  ``/xapi/anonymize/projects/P``, ``.../projects/P/enabled``, ``/data/config/anon/script`` and
  ``/data/projects/P/config/anon/projects/P``.
* Silent drops: ``drop_entries(predicate, *, stage="filter")`` -- `predicate(sop_instance_uid,
  series_instance_uid, series_description) -> bool`; matching objects are accepted (200) and not stored, by a
  series import filter (`stage="filter"`, before any row exists) or a site-wide DicomEdit reject
  (`stage="anonymization"`: row created, file written and deleted, rows with `prevent_anon` spared);
  ``drop_entries(None)`` removes every rule.
* ``faults_pending()`` counts the injected faults not yet met; ``clear_faults()`` forgets every pending fault,
  reset, truncation, proxy timeout and drop rule. A client that hangs up part-way
  through an upload body is treated like a reset there (a streamed DICOM-zip keeps the entries read whole).
* Inspection: ``prearchive_rows(project=None)`` (the §5.1 row dicts, `project` may be ``"Unassigned"``),
  ``prearchive_files(project=None)`` (row url -> file name -> SOP Instance UID, built or not),
  ``experiments(project=None)`` (`ExperimentRecord` snapshots), ``archived_files(project, label)`` (the bytes of
  an archived session's files by `<scan>/<name>`), ``requests_log`` (a copy of every
  ``(method, path+query, status)``), ``build_now()`` (one idle-builder pass ignoring the idle time, including the
  auto-archive that follows a build).

Command line (a lab can point ingestd at it)::

    python -m ingestd.testing.xnat --port 8080 --user admin:admin --project PROJ

Archived scans answer what a verifying client reads: ``.../scans/{id}/resources`` (CatalogResourceList columns),
``.../scans/{id}/resources/{DICOM|resource id}`` (the catalog XML, one `cat:entry` with `UID` per file),
``.../files``, under `/data/projects/P/subjects/S/experiments/E`, `/data/experiments/{ID}` and the `/archive`
aliases. Prearchive scan/resource/file listings answer from what the last build catalogued.

Resources (docs/xnat-resources.md, "The stand-in" says what is modelled and what is not): ``PUT|POST
.../resources/{label}/files[/{path}]`` below `/data[/archive]/projects/P/subjects/S/experiments/E`,
`/projects/P/experiments/E`, `/experiments/E`, the scans of the first and last, `/projects/P/subjects/S` and
`/subjects/S`; ``GET`` of the same (the catalog's listing, or a file), ``DELETE .../files/{path}``, ``GET
.../resources``; ``PUT|GET /data/prearchive/projects/P/TS/S/resources/{label}/files[/{path}]`` and ``GET
.../resources`` once the session is built; archiving moves a session's resources into the experiment.

Deliberate simplifications (each [INF] where it applies): files live in memory; a minimal xnat.xsd (the
session types the stand-in files, their scans and resources; enough for xnatpy to walk projects, subjects,
experiments, scans and resources), no CSRF, anonymisation scripts only as `set_anon_script` failures and
`drop_entries`' rejects, no custom routing rules, no `Direct-Archive`, no concurrent-send detection, no
PET/MR separation, no file history in the archive.
"""

from ingestd.testing.xnat.cli import main
from ingestd.testing.xnat.model import ExperimentRecord, ResourceState, ScanRecord
from ingestd.testing.xnat.server import FakeXnat

__all__ = ["ExperimentRecord", "FakeXnat", "ResourceState", "ScanRecord", "main"]
