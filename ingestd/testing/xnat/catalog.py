"""Representations: catalog XML, experiment JSON/XML, session XML and zips, token JSON."""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from collections.abc import Callable
from typing import Any

from ingestd.testing.xnat.common import _XML_ROOTS, Key, _to_file_name_chars, _xml
from ingestd.testing.xnat.model import _Experiment, _ExtraResource, _Row, _Scan, _Token

# --------------------------------------------------------------------------------------------------------------
# Representations
# --------------------------------------------------------------------------------------------------------------


def _token_json(token: _Token) -> dict[str, Any]:
    """An AliasToken entity as XNAT's serializer writes it (libs/xdat entities/AliasToken.java getters plus
    AbstractHibernateEntity id/enabled/created/timestamp/disabled, Dates as epoch ms)."""
    return {
        "alias": token.alias,
        "secret": token.secret,
        "singleUse": False,
        "estimatedExpirationTime": int(token.expires * 1000),
        "xdatUserId": token.username,
        "validIPAddresses": None,
        "expired": time.time() > token.expires,
        "id": token.serial,
        "enabled": True,
        "created": int(token.created * 1000),
        "timestamp": int(token.created * 1000),
        "disabled": 0,
    }


def _data_url(key: Key) -> str:
    return f"/data/prearchive/projects/{key[0]}/{key[1]}/{key[2]}"


def _xml_attr(value: str) -> str:
    return '"' + _xml(value) + '"'


def _experiment_item(experiment: _Experiment, subject_id: str) -> dict[str, Any]:
    """An xnatpy-style `items` entry (§8.2) of an archived session."""
    scans = [
        {
            "meta": {"xsi:type": scan.xsi_type, "isHistory": False},
            "data_fields": {
                "ID": scan.id, "type": scan.type, "series_description": scan.type, "UID": scan.series_uid,
                "xsi:type": scan.xsi_type, "image_session_ID": experiment.id, "project": experiment.project,
            },
            "children": [
                {
                    "field": "file",
                    "items": [
                        {
                            "meta": {"xsi:type": "xnat:resourceCatalog", "isHistory": False},
                            "data_fields": {
                                "xnat_abstractresource_id": resource_id, "label": label, "file_count": len(files),
                                "file_size": sum(len(data) for data in files.values()), "format": fmt,
                                "content": content,
                            },
                            "children": [],
                        }
                        for label, resource_id, fmt, content, files in _scan_resources(scan)
                    ],
                }
            ],
        }
        for scan in experiment.scans.values()
    ]  # fmt: skip
    fields = {
        "ID": experiment.id, "label": experiment.label, "project": experiment.project, "subject_ID": subject_id,
        "UID": experiment.study_uid, "modality": experiment.modality, "date": experiment.date,
    }  # fmt: skip
    children = [{"field": "scans/scan", "items": scans}] if scans else []
    resources = [
        {
            "meta": {"xsi:type": "xnat:resourceCatalog", "isHistory": False},
            "data_fields": {
                "xnat_abstractresource_id": r.id, "label": r.label, "file_count": len(r.catalog),
                "file_size": sum(e.size for e in r.catalog.values()), "format": r.format or "",
                "content": r.content or "",
            },
            "children": [],
        }
        for r in experiment.resources.values()
    ]  # fmt: skip
    if resources:
        children.append({"field": "resources/resource", "items": resources})
    return {"meta": {"xsi:type": experiment.xsi_type, "isHistory": False}, "data_fields": fields, "children": children}


def _experiment_xml(experiment: _Experiment, subject_id: str) -> str:
    root = _XML_ROOTS.get(experiment.modality, "xnat:OtherDicomSession")
    scans = "".join(
        f"<xnat:scan ID={_xml_attr(s.id)} type={_xml_attr(s.type)} UID={_xml_attr(s.series_uid)} "
        f'xsi:type="{s.xsi_type}">'
        + "".join(
            f"<xnat:file label={_xml_attr(label)} format={_xml_attr(fmt)} content={_xml_attr(content)} "
            'xsi:type="xnat:resourceCatalog"/>'
            for label, _, fmt, content, _ in _scan_resources(s)
        )
        + "</xnat:scan>"
        for s in experiment.scans.values()
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} ID={_xml_attr(experiment.id)} '
        f"project={_xml_attr(experiment.project)} label={_xml_attr(experiment.label)} "
        f"UID={_xml_attr(experiment.study_uid)} "
        'xmlns:xnat="http://nrg.wustl.edu/xnat" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<xnat:subject_ID>{_xml(subject_id)}</xnat:subject_ID><xnat:scans>{scans}</xnat:scans></{root}>"
    )


_CATALOG_NAMESPACES = (
    'xmlns:arc="http://nrg.wustl.edu/arc" xmlns:cat="http://nrg.wustl.edu/catalog" '
    'xmlns:pipe="http://nrg.wustl.edu/pipe" xmlns:prov="http://www.nbirn.net/prov" '
    'xmlns:scr="http://nrg.wustl.edu/scr" '
    'xmlns:val="http://nrg.wustl.edu/val" xmlns:wrk="http://nrg.wustl.edu/workflow" '
    'xmlns:xdat="http://nrg.wustl.edu/security" xmlns:xnat="http://nrg.wustl.edu/xnat" '
    'xmlns:xnat_a="http://nrg.wustl.edu/xnat_assessments" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
)


# `extra_scan_resources`: (format, content, file names by scan id and series description) of the usual labels.
_EXTRA_RESOURCES: dict[str, tuple[str, str, Callable[[str, str], list[str]]]] = {
    "NIFTI": ("NIFTI", "NIFTI_RAW", lambda scan, desc: [f"{desc}_{scan}.nii.gz", f"{desc}_{scan}.json"]),
    "SNAPSHOTS": ("GIF", "SNAPSHOTS", lambda scan, desc: [f"{scan}_qc.gif", f"{scan}_qc_t.gif"]),
    "BIDS": ("BIDS", "BIDS", lambda scan, desc: [f"sub-01_run-{scan}_{desc}.nii.gz", f"sub-01_run-{scan}_{desc}.json"]),
}


def _extra_resource(label: str, resource_id: int, scan_id: str, description: str) -> _ExtraResource:
    """A pipeline's resource for an archived scan, with a few small files."""
    desc = _to_file_name_chars(description or "scan")
    fmt, content, names = _EXTRA_RESOURCES.get(label, (label, label, lambda scan, _: [f"{label.lower()}_{scan}.dat"]))
    files = {name: f"{label} {scan_id} {name}\n".encode() for name in names(scan_id, desc)}
    return _ExtraResource(label, resource_id, fmt, content, files)


def _scan_resources(scan: _Scan) -> list[tuple[str, int, str, str, dict[str, bytes]]]:
    """(label, xnat_abstractresource_id, format, content, name -> bytes) of every resource of a scan, DICOM first."""
    found = [("DICOM", scan.resource_id, "DICOM", "RAW", {n: f.data for n, f in scan.files.items()})]
    found += [(x.label, x.resource_id, x.format, x.content, x.files) for x in scan.extras.values()]
    found += [
        (r.label, r.id, r.format or "", r.content or "", {n: r.disk[n] for n in r.catalog if n in r.disk})
        for r in scan.resources.values()
    ]  # uploaded through the resource file API (ingestd.testing.xnat.resources)
    return found


def _find_extra(scan: _Scan, name: str) -> _ExtraResource | None:
    return next((x for x in scan.extras.values() if name in (x.label, str(x.resource_id))), None)


def _extra_catalog_xml(extra: _ExtraResource) -> str:
    """A non-DICOM resource's catalog: `cat:Catalog`, one `cat:entry` per file, no UID."""
    entries = "".join(
        f"\t<cat:entry ID={_xml_attr(name)} URI={_xml_attr(name)} "
        f'digest="{hashlib.md5(data, usedforsecurity=False).hexdigest()}" format={_xml_attr(extra.format)}/>\n'
        for name, data in extra.files.items()
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<cat:Catalog {_CATALOG_NAMESPACES}>\n<cat:entries>\n{entries}'
        "</cat:entries>\n</cat:Catalog>\n"
    )


def _catalog_xml(scan: _Scan) -> str:
    """A scan's DICOM catalog as the catalog bean serialises it: root `cat:DCMCatalog` (UID = the series UID), one
    `cat:entry` (xsi:type `cat:dcmEntry`) per file with its name as `URI` and `ID`, its SOP Instance UID as `UID`,
    attributes in alphabetical order, as in the catalogs XNAT writes (web/src/test/resources/catalogs/
    scan_4_catalog.xml, dicom/duplicates/scan_5_catalog.xml). The audit attributes (createdBy, createdTime, ...)
    and metaFields are left out."""
    entries = []
    for name, item in scan.files.items():
        number = f" instanceNumber={_xml_attr(item.dicom.instance_number)}" if item.dicom.instance_number else ""
        digest = hashlib.md5(item.data, usedforsecurity=False).hexdigest()
        entries.append(
            f"\t<cat:entry ID={_xml_attr(name)} UID={_xml_attr(item.dicom.sop_uid)} URI={_xml_attr(name)} "
            f'digest="{digest}" format="DICOM"{number} xsi:type="cat:dcmEntry"/>\n'
        )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<cat:DCMCatalog UID={_xml_attr(scan.series_uid)} '
        f"{_CATALOG_NAMESPACES}>\n<cat:entries>\n{''.join(entries)}</cat:entries>\n</cat:DCMCatalog>\n"
    )


def _session_xml(row: _Row) -> str:
    """The prearchive session document (a minimal form of what the session builder writes)."""
    root = _XML_ROOTS.get(row.modality, "xnat:OtherDicomSession")
    scans = []
    for scan_id, files in row.catalogued().items():
        first = next(iter(files.values())).dicom
        scan_type = row.catalog[scan_id].xsi_type
        scans.append(
            f"<xnat:scan ID={_xml_attr(scan_id)} type={_xml_attr(row.catalog[scan_id].series_description)} "
            f'UID={_xml_attr(first.series_uid)} xsi:type="{scan_type}"><xnat:file label="DICOM" format="DICOM" '
            f'content="RAW" xsi:type="xnat:resourceCatalog" '
            f'URI="SCANS/{_xml(scan_id)}/DICOM/scan_{_xml(scan_id)}_catalog.xml"/>'
            "</xnat:scan>"
        )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} project={_xml_attr(row.project_label)} '
        f'label={_xml_attr(row.name)} UID={_xml_attr(row.tag)} xmlns:xnat="http://nrg.wustl.edu/xnat" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<xnat:subject_ID>{_xml(row.subject)}</xnat:subject_ID><xnat:scans>{''.join(scans)}</xnat:scans></{root}>"
    )


def _zip_row(row: _Row) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for scan_id, files in row.scans.items():
            for name, item in files.items():
                archive.writestr(f"{row.folder}/SCANS/{scan_id}/DICOM/{name}", item.data)
    return buffer.getvalue()
