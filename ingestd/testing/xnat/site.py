"""Site handlers: build info, schemas, projects and subjects (§6, §7, §8), anonymisation scripts."""

from __future__ import annotations

import re

from ingestd.testing.xnat.catalog import _xml_attr
from ingestd.testing.xnat.common import (
    _KNOWN_DATA_TYPES,
    _NOT_FOUND,
    _SERVER_ERROR,
    _HttpError,
    _json,
    _Response,
    _table,
    _text,
)
from ingestd.testing.xnat.login import _LoginApi
from ingestd.testing.xnat.model import _Project, _Subject
from ingestd.testing.xnat.routing import _Request

# A minimal xnat.xsd: the types the stand-in answers with (projects, subjects, imaging sessions of the modalities it
# files), with the fields it fills. Real XNAT serves its full schemas; xnatpy builds its classes from whatever it gets.
_XNAT_XSD = """<?xml version="1.0" encoding="UTF-8"?>
<xs:schema targetNamespace="http://nrg.wustl.edu/xnat" xmlns:xnat="http://nrg.wustl.edu/xnat"
    xmlns:xs="http://www.w3.org/2001/XMLSchema" elementFormDefault="qualified" attributeFormDefault="unqualified">
  <xs:element name="Project" type="xnat:projectData"/>
  <xs:element name="Subject" type="xnat:subjectData"/>
  <xs:element name="MRSession" type="xnat:mrSessionData"/>
  <xs:element name="CTSession" type="xnat:ctSessionData"/>
  <xs:element name="PETSession" type="xnat:petSessionData"/>
  <xs:element name="OtherDicomSession" type="xnat:otherDicomSessionData"/>
  <xs:complexType name="projectData">
    <xs:sequence>
      <xs:element name="name" type="xs:string" minOccurs="0"/>
    </xs:sequence>
    <xs:attribute name="ID" type="xs:string" use="required"/>
  </xs:complexType>
  <xs:complexType name="subjectData">
    <xs:sequence>
      <xs:element name="experiments" minOccurs="0">
        <xs:complexType>
          <xs:sequence>
            <xs:element name="experiment" type="xnat:subjectAssessorData" minOccurs="0" maxOccurs="unbounded"/>
          </xs:sequence>
        </xs:complexType>
      </xs:element>
    </xs:sequence>
    <xs:attribute name="ID" type="xs:string"/>
    <xs:attribute name="project" type="xs:string"/>
    <xs:attribute name="label" type="xs:string"/>
  </xs:complexType>
  <xs:complexType name="experimentData">
    <xs:sequence>
      <xs:element name="date" type="xs:date" minOccurs="0"/>
      <xs:element name="resources" minOccurs="0">
        <xs:complexType>
          <xs:sequence>
            <xs:element name="resource" type="xnat:abstractResource" minOccurs="0" maxOccurs="unbounded"/>
          </xs:sequence>
        </xs:complexType>
      </xs:element>
    </xs:sequence>
    <xs:attribute name="ID" type="xs:string" use="required"/>
    <xs:attribute name="project" type="xs:string" use="required"/>
    <xs:attribute name="label" type="xs:string"/>
  </xs:complexType>
  <xs:complexType name="subjectAssessorData">
    <xs:complexContent>
      <xs:extension base="xnat:experimentData">
        <xs:sequence>
          <xs:element name="subject_ID" type="xs:string"/>
        </xs:sequence>
      </xs:extension>
    </xs:complexContent>
  </xs:complexType>
  <xs:complexType name="imageSessionData">
    <xs:complexContent>
      <xs:extension base="xnat:subjectAssessorData">
        <xs:sequence>
          <xs:element name="UID" type="xs:string" minOccurs="0"/>
          <xs:element name="modality" type="xs:string" minOccurs="0"/>
          <xs:element name="scans" minOccurs="0">
            <xs:complexType>
              <xs:sequence>
                <xs:element name="scan" type="xnat:imageScanData" minOccurs="0" maxOccurs="unbounded"/>
              </xs:sequence>
            </xs:complexType>
          </xs:element>
        </xs:sequence>
      </xs:extension>
    </xs:complexContent>
  </xs:complexType>
  <xs:complexType name="abstractResource">
    <xs:attribute name="label" type="xs:string"/>
    <xs:attribute name="file_count" type="xs:integer"/>
    <xs:attribute name="file_size" type="xs:integer"/>
  </xs:complexType>
  <xs:complexType name="resource">
    <xs:complexContent>
      <xs:extension base="xnat:abstractResource">
        <xs:attribute name="URI" type="xs:string"/>
        <xs:attribute name="format" type="xs:string"/>
        <xs:attribute name="content" type="xs:string"/>
      </xs:extension>
    </xs:complexContent>
  </xs:complexType>
  <xs:complexType name="resourceCatalog">
    <xs:complexContent><xs:extension base="xnat:resource"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="imageScanData">
    <xs:sequence>
      <xs:element name="file" type="xnat:abstractResource" minOccurs="0" maxOccurs="unbounded"/>
    </xs:sequence>
    <xs:attribute name="ID" type="xs:string" use="required"/>
    <xs:attribute name="type" type="xs:string"/>
    <xs:attribute name="UID" type="xs:string"/>
    <xs:attribute name="project" type="xs:string"/>
  </xs:complexType>
  <xs:complexType name="mrScanData">
    <xs:complexContent><xs:extension base="xnat:imageScanData"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="ctScanData">
    <xs:complexContent><xs:extension base="xnat:imageScanData"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="petScanData">
    <xs:complexContent><xs:extension base="xnat:imageScanData"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="otherDicomScanData">
    <xs:complexContent><xs:extension base="xnat:imageScanData"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="mrSessionData">
    <xs:complexContent><xs:extension base="xnat:imageSessionData"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="ctSessionData">
    <xs:complexContent><xs:extension base="xnat:imageSessionData"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="petSessionData">
    <xs:complexContent><xs:extension base="xnat:imageSessionData"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="otherDicomSessionData">
    <xs:complexContent><xs:extension base="xnat:imageSessionData"/></xs:complexContent>
  </xs:complexType>
</xs:schema>
"""


class _SiteApi(_LoginApi):
    """Build info, schemas, projects, subjects and anonymisation-script handlers."""

    def _build_properties(self) -> dict[str, str]:
        """xapi/rest/settings/SiteConfigApi.getBuildInfo -> XnatAppInfo.getSystemProperties: the MANIFEST.MF
        attributes, `version` = Implementation-Version (the release number, e.g. "1.8.10"), every value a string."""
        return {
            "version": self.config.version,
            "buildNumber": "fake",
            "buildDate": "Thu Jan 01 00:00:00 UTC 1970",
            "commit": "fake",
            "sha": "fake",
            "branch": "fake",
            "isDirty": "false",
            "timestamp": "0",
        }

    def build_info(self, request: _Request) -> _Response:
        """`GET /xapi/siteConfig/buildInfo` (open URL). `/data/version` does not exist in 1.8 (no such route in
        restlet/XNATApplication.java): it answers 404 and clients fall back to this."""
        return _json(self._build_properties())

    def build_property(self, request: _Request) -> _Response:
        """`GET /xapi/siteConfig/buildInfo/{property}` (SiteConfigApi.getBuildProperty): the bare string (a String
        return value goes through Spring's StringHttpMessageConverter: `1.8.10`, not `"1.8.10"`); not an open URL,
        so it needs a login [INF: the guest is refused like an anonymous request]; an unknown property is null: an
        empty 200 [INF]."""
        if request.user is None or request.user is self.store.guest:
            raise _HttpError(401, headers=[("WWW-Authenticate", 'Basic realm="XNAT Protected Area"')], tomcat=True)
        value = self._build_properties().get(request.group("property"), "")
        return _text(value, content_type="application/json")

    def schemas(self, request: _Request) -> _Response:
        return _json(["xnat"])  # one minimal schema: enough for xnatpy to build its session classes

    def schema(self, request: _Request) -> _Response:
        if request.group("schema") != "xnat":
            raise _HttpError(404, f"No schema named {request.group('schema')}")
        return _text(_XNAT_XSD, content_type="application/xml")

    def search_elements(self, request: _Request) -> _Response:
        if "element" in request.groups:
            return _table(["FIELD_ID", "HEADER", "SUMMARY", "TYPE", "REQUIRES_VALUE", "DESC"], [], request.fmt())
        return _table(["ELEMENT_NAME", "PLURAL", "SINGULAR", "COUNT"], [], request.fmt())

    # -- projects, subjects, experiments (§6, §7, §8) ------------------------------------------------------------

    def projects(self, request: _Request) -> _Response:
        permissions = request.params.get("permissions")
        if permissions is not None:
            return self._projects_by_permission(request, permissions)
        with self.store.lock:
            visible = [p for p in self.store.projects.values() if self.store.can_read(request.agent, p)]
        rows = [
            {
                "ID": p.id, "secondary_ID": p.id, "name": p.name, "description": "", "pi_firstname": "",
                "pi_lastname": "", "URI": f"/data/projects/{p.id}",
            }
            for p in visible
        ]  # fmt: skip
        return _table(
            ["ID", "secondary_ID", "name", "description", "pi_firstname", "pi_lastname", "URI"], rows, request.fmt()
        )

    def _projects_by_permission(self, request: _Request, permissions: str) -> _Response:
        """`GET /data/projects?permissions=read|edit|create|delete|active[&dataType=T]`: restlet/resources/
        ProjectListResource.PermissionsProjectHandler (chosen whenever `permissions` is present). Columns `id`,
        `secondary_id` (lower case), rows sorted by secondary_id. Every exception in the handler ends in
        ProjectListResource.represent's catch: a bare `setStatus(SERVER_ERROR_INTERNAL)`, i.e. Restlet's default 500
        page, no message (a blank or unknown `permissions` value included, on every version).

        ≤1.8.8 (ProjectListResource before XNAT-7845 b30a31bc9): without dataType a project is listed when
        UserHelperServiceI.hasEditAccessToSessionDataByTag (XDATUser.hasAccessTo: site admin or an editable project),
        whatever `permissions` says; with dataType, Permissions.can(user, dataType + "/project", id, permissions).
        ≥1.8.9 (d3a896206 has b30a31bc9): services/cache/DefaultGroupsAndPermissionsCache.getProjectsForDatatypeAction
        calls SchemaElement.GetElement(dataType) first, which throws ElementNotFoundException("NULL") for a missing
        dataType (GenericWrapperElement.GetElement) and ElementNotFoundException for an unknown one, neither caught:
        a bare 500. With a known type: data admins get every project (`SELECT ID,secondary_ID FROM xnat_projectData`,
        PostgreSQL folds the names to lower case), others the projects where their groups (or guest's) hold
        `{permissions}_element` on `{dataType}/project`. (§12 in the package docstring.)
        """
        if permissions not in ("read", "edit", "create", "delete", "active"):
            raise _HttpError(500, _SERVER_ERROR)
        data_type = request.params.get("dataType")
        if self.config.editable_projects_cached and data_type not in _KNOWN_DATA_TYPES:
            raise _HttpError(500, _SERVER_ERROR)
        agent = request.agent
        with self.store.lock:
            if not data_type:  # ≤1.8.8 only: edit access to session data, whatever `permissions` says
                allowed = [p for p in self.store.projects.values() if self.store.can_edit(agent, p)]
            elif data_type not in _KNOWN_DATA_TYPES:  # ≤1.8.8: no permission on an unknown type [INF]
                allowed = []
            else:
                check = self.store.can_read if permissions in ("read", "active") else self.store.can_edit
                if permissions == "delete":  # owners only (XDATUser.getOwnedProjects: delete = owner)
                    check = lambda user, project: user.admin or user.username in project.owners  # noqa: E731
                allowed = [p for p in self.store.projects.values() if check(agent, p)]
        rows = [{"id": p.id, "secondary_id": p.id} for p in sorted(allowed, key=lambda p: p.id)]
        return _table(["id", "secondary_id"], rows, request.fmt())

    def project(self, request: _Request) -> _Response:
        project = self._project(request)
        fields = {"ID": project.id, "secondary_ID": project.id, "name": project.name, "description": ""}
        if request.fmt() == "xml":
            attributes = " ".join(f"{k}={_xml_attr(v)}" for k, v in fields.items() if k != "description")
            return _text(
                f'<xnat:Project xmlns:xnat="http://nrg.wustl.edu/xnat" {attributes}/>', content_type="text/xml"
            )
        meta = {"xsi:type": "xnat:projectData", "isHistory": False}
        return _json({"items": [{"meta": meta, "data_fields": fields, "children": []}]})

    def prearchive_code(self, request: _Request) -> _Response:
        return _text(str(self._project(request).prearchive_code))

    def set_prearchive_code(self, request: _Request) -> _Response:
        project = self._project(request, edit=True)
        raw = request.group("code")
        mapping = {"true": "1", "false": "0"}
        value = mapping.get(raw.lower(), raw)
        if not re.fullmatch(r"-?\d+", value):
            raise _HttpError(400, f"The submitted code {raw} is invalid: must be an integer.")
        with self.store.lock:
            project.prearchive_code = int(value)
        return _Response(200)

    def subjects(self, request: _Request) -> _Response:
        project = self._project(request)
        with self.store.lock:
            found = [s for (p, _), s in self.store.subjects.items() if p == project.id]
        rows = [{"ID": s.id, "project": s.project, "label": s.label, "URI": f"/data/subjects/{s.id}"} for s in found]
        return _table(["ID", "project", "label", "URI"], rows, request.fmt())

    def subject(self, request: _Request) -> _Response:
        found = self._subject(request, self._project(request))
        fields = {"ID": found.id, "label": found.label, "project": found.project}
        return _json(
            {
                "items": [
                    {
                        "meta": {"xsi:type": "xnat:subjectData", "isHistory": False},
                        "data_fields": fields,
                        "children": [],
                    }
                ]
            }
        )

    def _subject(self, request: _Request, project: _Project) -> _Subject:
        name = request.group("subject")
        with self.store.lock:
            for subject in self.store.subjects.values():
                if subject.project == project.id and name in (subject.label, subject.id):
                    return subject
        raise _HttpError(404, f"Unable to find subject {name}")

    # -- anonymisation scripts (config tool `anon`) --------------------------------------------------------------

    def anon_site(self, request: _Request) -> _Response:
        """`GET /xapi/anonymize/site` (xapi/rest/dicom/AnonymizeApi.java:72-84, d3a896206 and 4fb6bc14): the script."""
        with self.store.lock:
            script = self.store.site_anon.script if self.store.site_anon else ""
        return _text(script)

    def anon_site_enabled(self, request: _Request) -> _Response:
        """`GET /xapi/anonymize/site/enabled` (AnonymizeApi.java:95-98): the preference
        enableSitewideAnonymizationScript as JSON `true`/`false`."""
        with self.store.lock:
            enabled = self.store.site_anon is not None and self.store.site_anon.enabled
        return _json(enabled)

    def anon_project(self, request: _Request) -> _Response:
        """`GET /xapi/anonymize/projects/{P}` (AnonymizeApi.java:115-125): the script, or 204 (NoContentException)
        when the project has none."""
        project = self._project(request)
        with self.store.lock:
            anon = self.store.project_anon.get(project.id)
        return _text(anon.script) if anon is not None else _Response(204)

    def anon_project_enabled(self, request: _Request) -> _Response:
        """`GET /xapi/anonymize/projects/{P}/enabled` (AnonymizeApi.java:149-152): isProjectScriptEnabled."""
        project = self._project(request)
        with self.store.lock:
            anon = self.store.project_anon.get(project.id)
        return _json(anon is not None and anon.enabled)

    def anon_config(self, request: _Request) -> _Response:
        """The config service's view (§9: `/data/config/anon/script`, `/data/projects/P/config/anon/projects/P`):
        the configuration row with its `status` (enabled/disabled) and `contents`; `contents=true` answers the script
        alone; 404 without one. Column set as the config service lists them [INF]."""
        project = self._project(request) if "project" in request.groups else None
        with self.store.lock:
            anon = self.store.project_anon.get(project.id) if project else self.store.site_anon
        if anon is None or (project is not None and request.group("target") != project.id):
            raise _HttpError(404, _NOT_FOUND)
        if request.params.flag("contents"):
            return _text(anon.script)
        row = {
            "tool": "anon", "path": f"projects/{project.id}" if project else "script",
            "project": project.id if project else "", "status": "enabled" if anon.enabled else "disabled",
            "contents": anon.script, "version": str(anon.version), "unversioned": "false", "reason": "",
            "xnatUser": "admin", "create_date": "",
        }  # fmt: skip
        return _table(list(row), [row], request.fmt())
