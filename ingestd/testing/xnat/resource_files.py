"""The resource file API's pure parts: what a request body is, what a name may be, what an archive holds, and the
catalog writes (`FileList.handlePost` -> `ResourceModifierA.addFile` -> `CatalogUtils.storeCatalogEntry`).

Paths: `W:` = xnat-web `web/src/main/java/org/nrg/xnat/`, `X:` = `libs/xdat/src/main/java/org/nrg/` (commit
93d33cbf6, as docs/xnat-resources.md, whose sections are cited as "res §n").
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote_plus

from ingestd.testing.xnat.common import _HttpError
from ingestd.testing.xnat.dicom import _zip_stream
from ingestd.testing.xnat.model import _Entry, _Resource

# W:restlet/util/RequestUtil.java 36-67 `supported_upload_types` (Restlet 1.1 MediaType names; the lookup is
# `containsKey`, an exact match: `application/*` is the literal wildcard type, not every application type) with the
# extension `deriveFileName` (70-81) gives a raw body that has no name in the URL.
UPLOAD_TYPES = {
    "text/*": ".txt", "application/*": "", "text/plain": ".txt", "text/xml": ".xml", "text/csv": ".csv",
    "application/dicom": ".dcm", "application/zip": ".zip", "application/xar": ".xar",
    "application/x-gtar": ".tar.gz", "application/x-gzip": ".gzip", "application/octet-stream": "",
    "application/pdf": ".pdf", "application/vnd.ms-excel": ".xls", "application/vnd.ms-powerpoint": ".ppt",
    "application/x-tar": ".tar", "application/msword": ".doc", "image/*": ".img", "image/bmp": ".bmp",
    "image/gif": ".gif", "image/x-icon": ".icon", "image/jpeg": ".jpeg", "image/png": ".png", "image/svg+xml": ".svg",
    "image/tiff": ".tiff", "video/*": ".video", "video/x-msvideo": ".avi", "video/mp4": ".mp4", "video/mpeg": ".mpg",
    "video/quicktime": ".mov", "video/x-ms-wmv": ".wmv",
}  # fmt: skip

# X:xft/utils/fileExtraction/Format.java 9-13: case-sensitive, on the last path element of the uploaded name.
_TAR = re.compile(r"\.[tx]ar$")
_TGZ = re.compile(r"\.t(ar\.)?gz$")
_ZIP = re.compile(r"\.z(ip|ar)$")
_GZ = re.compile(r"\.gz$")


def flag(value: str | None) -> bool:
    """`SecureResource.isQueryVariableTrueHelper` (W:restlet/resources/SecureResource.java 1044-1053): absent is
    false; `false`/`0` (any case) false; anything else, an empty value included, true."""
    return value is not None and value.lower() not in ("false", "0")


def hack_check(value: str) -> bool:
    """`PoolDBUtils.HackCheck` (X:xft/db/PoolDBUtils.java 908-924): True when XNAT takes `value` for an attack."""
    if re.fullmatch(r"[a-zA-z0-9 _.]*[^\\]", value):
        return False
    upper = value.upper()
    words = ("SELECT", "INSERT", "UPDATE", "DELETE", "DROP", "ALTER", "CREATE")
    return upper.endswith("\\") or any(re.search(rf"\b{word}\s", upper) for word in words)


def file_path(raw: str) -> str:
    """`FileList.filePath` (W:restlet/resources/files/FileList.java 151-155): the URL after `/files/`, decoded
    (URLDecoder: `+` is a space) only when it holds `%2B` or `%20`."""
    return unquote_plus(raw) if "%2B" in raw or "%20" in raw else raw


def escape_param(raw: str) -> str:
    """`SecureResource.filepath` (W:restlet/resources/SecureResource.java 194-204): the URL after `/files/`, not
    URL-decoded, through `TurbineUtils.escapeParam` = `StringEscapeUtils.escapeXml11`: a writer's name."""
    for char, entity in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;"), ("'", "&apos;")):
        raw = raw.replace(char, entity)
    return raw


def refused_name(name: str) -> bool:
    """CatalogUtils.storeCatalogEntry 1753-1756 (filter at 86-87): a name XNAT will not catalog."""
    last = name.rsplit("/", 1)[-1]
    return last.endswith("_catalog.xml") or last.startswith(".~lock-")


def md5(data: bytes) -> str:
    """CatalogUtils.getHash (W:utils/CatalogUtils.java 431-474): MD5, lower-case hex."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class Body:
    """What `getFileWritersAndLoadParams` makes of a request body: (name, bytes) writers."""

    writers: tuple[tuple[str, bytes], ...]


def writers(
    method: str,
    content_type: str,
    headers_chunked: bool,
    inbody: bool,
    name: str,
    body: bytes,
    parts: list[tuple[str | None, bytes]] | None,
) -> Body:
    """W:restlet/resources/SecureResource.java `getFileWritersAndLoadParams` 1251-1308 and FileList 330-339.

    `parts`: the multipart parts (file name, payload), or None when the body is not multipart/form-data.
    """
    if inbody or content_type in UPLOAD_TYPES:
        if content_type == "multipart/form-data":
            raise _HttpError(
                406,
                "In-body File posts must include the file directly as the body of the message (not as part of "
                "multi-part form data).",
            )
        size = -1 if headers_chunked else len(body)
        if size < 1 and content_type != "application/zip":
            raise _HttpError(
                500,
                "In-body File posts must include the file directly as the body of the message. In this case, the "
                f"request entity size is {size} but the media type is not application/zip (i.e. streaming "
                "compressed upload).",
            )
        return Body(((name or "upload" + UPLOAD_TYPES.get(content_type, ".unsupported"), body),))
    if parts is not None:
        found = []
        for filename, payload in parts:
            if filename is None:
                continue  # a form field: a parameter, not a file
            found.append((name or filename[filename.rfind("\\") + 1 :], payload))
        if found:
            return Body(tuple(found))
    size = len(body)
    if size == 0:
        message = (
            f"You tried to {method} to this service, but didn't provide any data (found request entity size of 0). "
            "Please check the format of your service request."
        )
    else:  # CatalogUtils.formatSize [INF: its exact format]
        message = (
            f"You tried to {method} a payload of {size} B to this service, but didn't provide any data. If you think "
            f"you sent data to upload, you can try to {method} with the query-string parameter inbody=true or use "
            "multipart/form-data encoding."
        )
    raise _HttpError(400, message)


def archive_kind(name: str) -> str | None:
    """Which extractor `ZipUtils.isCompressedFile` / FileExtractor (X:xft/utils/fileExtraction/FileExtractor.java
    69-108) picks for an uploaded name: "zip", "tar", "tgz", "gz" or None (stored as is)."""
    last = name.rsplit("/", 1)[-1]
    if _ZIP.search(last):
        return "zip"
    if _TGZ.search(last):
        return "tgz"
    if _TAR.search(last):
        return "tar"
    if _GZ.search(last):
        return "gz"
    return None


class UnreadableError(Exception):
    """The archive stream broke off (a reset body, a corrupt member): members read before it are already written."""


def members(kind: str, name: str, data: bytes, *, cut: bool) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of each file an archive holds, in stream order, as XNAT reads it: ZipUtils.extractMap
    (X:xft/utils/zip/ZipUtils.java 332-373) over a ZipInputStream, TarUtils.extract (TarUtils.java 67-99) over a
    TarInputStream; directory entries are skipped (they only make folders). Raises `Unreadable` where it breaks."""
    try:
        if kind == "zip":
            for member, content in _zip_stream(data, cut=cut):
                if not member.endswith("/"):
                    yield member, content
        elif kind == "gz":
            yield name.rsplit("/", 1)[-1][:-3], gzip.decompress(data)
        else:
            raw = _gunzip(data) if kind == "tgz" else data
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as archive:
                for info in archive:
                    extracted = archive.extractfile(info) if info.isfile() else None
                    if extracted is not None:
                        yield info.name, extracted.read()
    except (_HttpError, tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise UnreadableError(str(exc)) from exc


def _gunzip(data: bytes) -> bytes:
    """As much of a gzip stream as can be read (a cut body yields its first part; tar then stops where it ends)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    return inflater.decompress(data)


def catalogue(
    resource: _Resource,
    name: str,
    *,
    checksums: bool,
    fmt: str | None,
    content: str | None,
    tags: tuple[str, ...] = (),
) -> None:
    """`CatalogUtils.addOrUpdateEntry` (2474-2487) for a file now on disk: a new entry, or the entry updated with its
    new size and digest (2563-2571); the MD5 is filled in when checksums are on (`writeCatalogToFile` 1977-1987);
    format, content and tags from the query (`configureEntry` 1625-1670)."""
    data = resource.disk[name]
    resource.catalog[name] = _Entry(name, len(data), md5(data) if checksums else "", fmt, content, tags)
