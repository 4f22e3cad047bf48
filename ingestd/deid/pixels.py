"""Burned-in text: which instances may carry it, whether a profile holds them, and cleaning them by region.

PS3.15 E.3.1 (Clean Pixel Data Option, code 113101) asks that identifying text burned into Pixel Data be removed
from the stored values. ingestd does not look for text (no OCR): a lab's administrator says where a device puts
it, as `regions` of a profile (the first whose `when` holds applies), and every frame is blacked out there.

`check` is the screening (`ingestd.deid.engine.screen` calls it): an instance of a SOP class or modality that
often carries burned-in text, or whose Burned In Annotation is YES, is held unless the profile says otherwise
(`burned_in: trust-header` believes a header that says NO; `burned_in: clean` needs a region), with a reason
that says what applies and what to add; it names the SOP class, modality, device and image size, which are
not patient attributes, and never a patient's value. `clean` (called by `anonymize` on its output) decodes
Pixel Data frame by frame with pydicom's decoders, blacks out the rectangles (the lowest stored value, the
highest for MONOCHROME1, so that they display black; every sample of a colour pixel) and stores the frames
uncompressed: a compressed source becomes Explicit VR Little Endian, YBR colour becomes RGB, and a lossy
source keeps Lossy Image Compression 01 with its method. Only then are Burned In Annotation NO and code 113101
written. Decoding needs the whole output in memory: `max_decoded_bytes` bounds it; a larger instance is held.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless

from ingestd.deid.hold import DeidError
from ingestd.deid.profile import Profile, Region
from ingestd.deid.seekable import SeekableReader
from ingestd.states import HoldCode

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from pydicom.pixels.decoders.base import Decoder

__all__ = ["REGION_KEYWORDS", "check", "clean", "may_carry_text"]

# What a region's `when` may look at: the device, the kind of image and its size (docs/rules.md, "pixels").
REGION_KEYWORDS = (
    "SOPClassUID",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "SoftwareVersions",
    "ImageType",
    "Rows",
    "Columns",
)
_DOCUMENTS = "1.2.840.10008.5.1.4.1.1.104."  # Encapsulated documents (PDF, CDA, STL, ...)
# SOP classes and modalities that carry text in pixels the header profile cannot clean.
_BURNED_IN_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (all kinds: screen saves, dose reports)
    "1.2.840.10008.5.1.4.1.1.6.",  # Ultrasound
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame
    "1.2.840.10008.5.1.4.1.1.77.",  # Visible Light (photographs, endoscopy, video)
    _DOCUMENTS,
)
# The retired ultrasound classes, which no prefix above covers: Ultrasound Image and Multi-frame Image Storage.
_BURNED_IN_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3"})
_BURNED_IN_MODALITIES = frozenset({"US", "IVUS", "XC", "ES", "GM", "SM", "OT", "DOC", "SC", "VL"})
_PIXEL_DATA = 0x7FE00010
_NOT_CLEANABLE = (0x7FE00008, 0x7FE00009)  # Float and Double Float Pixel Data: parametric maps, never text
# Attributes that describe the stored values or their encoding, which no longer hold once pixels change.
_STALE = (
    0x00280106,  # Smallest Image Pixel Value
    0x00280107,  # Largest Image Pixel Value
    0x00280108,  # Smallest Pixel Value in Series
    0x00280109,  # Largest Pixel Value in Series
    0x7FE00001,  # Extended Offset Table (of the compressed frames)
    0x7FE00002,  # Extended Offset Table Lengths
)
# Lossy Image Compression Method (0028,2114) by the compressed transfer syntax a lossy source came in.
_LOSSY_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # HTJ2K
}
_MIB = 1 << 20


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, str | bytes | int | float):
        return (str(value).strip(),)
    if isinstance(value, Iterable):
        return tuple(str(v).strip() for v in value)
    return (str(value).strip(),)


def may_carry_text(ds: Dataset) -> bool:
    """Whether the instance's SOP class or modality often has text burned into its pixels, or its header says so."""
    sop_class = _text(ds, "SOPClassUID")
    return (
        sop_class.startswith(_BURNED_IN_PREFIXES)
        or sop_class in _BURNED_IN_CLASSES
        or _text(ds, "Modality").upper() in _BURNED_IN_MODALITIES
        or _text(ds, "BurnedInAnnotation").upper() == "YES"
    )


def _matches(region: Region, ds: Dataset) -> bool:
    for test in region.when:
        values = _values(ds, test.keyword)
        if test.values and not any(value in test.values for value in values):
            return False
        if test.pattern is not None and not any(test.pattern.search(value) for value in values):
            return False
    return True


def _described(ds: Dataset) -> str:
    """What a region for this instance would match on: none of it is a patient attribute."""
    size = f"{_text(ds, 'Rows') or '?'} x {_text(ds, 'Columns') or '?'}"
    device = f"Manufacturer '{_text(ds, 'Manufacturer')}', ManufacturerModelName '{_text(ds, 'ManufacturerModelName')}'"
    return (
        f"SOP class {_text(ds, 'SOPClassUID') or '(none)'}, modality {_text(ds, 'Modality') or '(none)'}, "
        f"{device}, Rows x Columns {size}"
    )


def _kind(ds: Dataset) -> str:
    return (
        f"SOP class {_text(ds, 'SOPClassUID') or '(none)'} / modality {_text(ds, 'Modality') or '(none)'} "
        "often has text burned into the pixels"
    )


def check(ds: Dataset, profile: Profile) -> Region | None:
    """The region that cleans this instance, or None when it needs no cleaning; DeidError when it is held.

    `ds` may lack Pixel Data and file meta (the router screens the headers of a series before it reads any
    instance whole): then what needs them (size, transfer syntax) is checked when the instance is cleaned.
    """
    if not may_carry_text(ds):
        return None
    said = _text(ds, "BurnedInAnnotation").upper()
    if profile.burned_in == "trust-header" and said == "NO":
        return None
    if profile.burned_in != "clean":
        raise DeidError(HoldCode.BURNED_IN, _hold_reason(ds, profile, said))
    if _text(ds, "SOPClassUID").startswith(_DOCUMENTS) or _text(ds, "Modality").upper() == "DOC":
        raise DeidError(
            HoldCode.BURNED_IN,
            f"SOP class {_text(ds, 'SOPClassUID') or '(none)'} is an encapsulated document, which has no Pixel "
            "Data that regions could clean: drop the series with a drop_series filter",
        )
    region = next((region for region in profile.regions if _matches(region, ds)), None)
    if region is None:
        raise DeidError(
            HoldCode.BURNED_IN,
            f"no pixels region of profile {profile.name} matches this instance ({_described(ds)}): add a region "
            "for it with the rectangles to black out, or drop the series",
        )
    _check_geometry(ds, region)
    return region


def _hold_reason(ds: Dataset, profile: Profile, said: str) -> str:
    what = f"a pixels region (burned_in: clean) for {_described(ds)}"
    if said == "YES":
        return f"Burned In Annotation is YES: its pixels need cleaning; add {what}, or drop the series"
    if profile.burned_in == "trust-header":
        return (
            f"{_kind(ds)}, and its header does not say Burned In Annotation NO (trust-header believes only NO): "
            f"add {what}, or drop the series"
        )
    if said == "NO":
        return (
            f"{_kind(ds)}; its header says Burned In Annotation NO: set burned_in: trust-header to believe it, "
            f"or add {what}, or drop the series"
        )
    return f"{_kind(ds)}, and its header does not say Burned In Annotation NO: add {what}, or drop the series"


def _check_geometry(ds: Dataset, region: Region) -> None:
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not isinstance(rows, int) or not isinstance(columns, int):
        return  # the router's screening may not know them; clean() checks again with the instance's own
    for index, box in enumerate(region.rectangles):
        if box.x + box.width > columns or box.y + box.height > rows:
            raise DeidError(
                HoldCode.BURNED_IN,
                f"rectangle {index} of pixels region {region.name} reaches beyond this image ({rows} x {columns}, "
                "Rows x Columns): give the region a when on Rows and Columns, or fit the rectangle",
            )


class _Buffer(SeekableReader):
    """A read-only stream over the cleaned frames, which pydicom's writer copies in chunks (no second copy)."""

    def __init__(self, data: memoryview) -> None:
        super().__init__(len(data))
        self._data = data

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        data = bytes(self._data[self._pos : end])
        self._pos = max(self._pos, end)
        return data


def _short(exc: BaseException) -> str:
    """An exception as a short cause: its first line, without pydicom's 'With tag' wrapping; when every decoder
    plugin failed (one line each, `  name: message`), the first message that speaks of decoding, else the first."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    plugins = [line.split(": ", 1)[1] for line in lines[1:] if ": " in line]
    text = next((m for m in plugins if "decod" in m.lower()), plugins[0]) if plugins else lines[0]
    text = text.split("got exception: ", 1)[-1]
    return text if len(text) <= 100 else text[:97] + "..."


def _decoder(syntax: UID) -> Decoder:
    from pydicom.pixels.decoders.base import get_decoder  # noqa: PLC0415 - numpy and decoders, when cleaning

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DeidError(
            HoldCode.PIXEL_DATA,
            f"Pixel Data in {syntax.name or syntax} cannot be decoded: pydicom has no decoder for that transfer "
            "syntax; drop the series",
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise DeidError(
            HoldCode.PIXEL_DATA,
            f"Pixel Data in {syntax.name} cannot be decoded: no decoder installed ({missing or 'none known'})",
        )
    return decoder


def _number(ds: Dataset, keyword: str, default: int) -> int:
    """An Image Pixel attribute as a number; DeidError naming it (never its value) when it is not one."""
    try:
        return int(ds.get(keyword) or default)
    except (TypeError, ValueError):
        raise DeidError(
            HoldCode.PIXEL_DATA, f"{keyword} is not a number, so its Pixel Data cannot be decoded: drop the series"
        ) from None


def _decoded_size(ds: Dataset) -> int:
    samples, bits = _number(ds, "SamplesPerPixel", 1), _number(ds, "BitsAllocated", 8)
    frames, rows, columns = _number(ds, "NumberOfFrames", 1), _number(ds, "Rows", 0), _number(ds, "Columns", 0)
    return rows * columns * samples * max(1, bits // 8) * frames


def _black(photometric: str, bits_stored: int, signed: bool) -> int:
    """The stored value displayed black: the lowest, except under MONOCHROME1 (the highest)."""
    low, high = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    return high if photometric == "MONOCHROME1" else low


def clean(original: Dataset, out: Dataset, profile: Profile) -> Region | None:
    """Black out the region of `profile` that matches `original` in the Pixel Data of `out`, its de-identified
    copy (whose file meta is already written); return the region, or None when nothing needed cleaning.

    Only under `burned_in: clean`. Raises DeidError when the instance must be held: no region (as `check`), Pixel
    Data that cannot be decoded (`pixel-data`), or larger decoded than the profile allows.
    """
    if profile.burned_in != "clean":
        return None  # held or trusted by `screen`, which the callers run first; nothing here changes pixels
    region = check(original, profile)
    if region is None:
        return None
    if any(tag in original for tag in _NOT_CLEANABLE) or _PIXEL_DATA not in original:
        raise DeidError(HoldCode.PIXEL_DATA, "the instance has no (integer) Pixel Data to clean: drop the series")
    if _number(original, "BitsAllocated", 0) not in (8, 16, 32):
        raise DeidError(
            HoldCode.PIXEL_DATA,
            f"Pixel Data with Bits Allocated {original.get('BitsAllocated')} is not cleaned (8, 16 or 32 are): "
            "drop the series",
        )
    size = _decoded_size(original)
    if size > profile.max_decoded_bytes:
        raise DeidError(
            HoldCode.PIXEL_DATA,
            f"Pixel Data is {size // _MIB} MiB decoded, above the {profile.max_decoded_bytes // _MIB} MiB the "
            f"profile {profile.name} cleans in memory: raise pixels.max_decoded_mb, or drop the series",
        )
    syntax = UID(str(original.file_meta.TransferSyntaxUID))
    try:
        if profile.compress == "rle":
            encoded, meta = _decode(original, syntax, region, _encode_rle)
            _describe(original, out, meta, syntax, size)
            out[_PIXEL_DATA] = DataElement(_PIXEL_DATA, "OB", encapsulate(encoded))
            out[_PIXEL_DATA].is_undefined_length = True
            out.file_meta.TransferSyntaxUID = RLELossless
        else:
            frames, meta = _decode(original, syntax, region, _collect)
            _describe(original, out, meta, syntax, frames.nbytes)
            data = frames.reshape(-1).view("u1").data
            padded = data if len(data) % 2 == 0 else memoryview(bytes(data) + b"\x00")
            vr = "OB" if int(str(meta.get("bits_allocated", 8))) == 8 else "OW"
            out[_PIXEL_DATA] = DataElement(_PIXEL_DATA, vr, _Buffer(padded))
    except DeidError:
        raise
    except Exception as exc:  # noqa: BLE001 - fail closed: never hand on Pixel Data half described
        raise DeidError(HoldCode.PIXEL_DATA, f"the cleaned Pixel Data cannot be stored ({_short(exc)})") from None
    _record(out, region)
    return region


_Frames = Iterator[tuple["np.ndarray", dict[str, str | int]]]
_T = TypeVar("_T")


def _decode(
    original: Dataset, syntax: UID, region: Region, collect: Callable[[_Frames, int], _T]
) -> tuple[_T, dict[str, str | int]]:
    """Every frame decoded (colour as RGB), the region's rectangles blacked out, handed to `collect` one by one."""
    decoder = _decoder(syntax)
    count = _number(original, "NumberOfFrames", 1)
    try:
        _rewind(original)
        return _collected(decoder.iter_array(original, as_rgb=True), count, region, syntax, collect)
    except DeidError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises, the instance is held with its cause
        first = exc
    # pydicom 3.0's frame-by-frame path fails where its whole-array one does not (a JPEG 2000 whose pixel
    # representation differs from the header's: it corrects a read-only frame); that costs a second copy in memory.
    try:
        _rewind(original)
        whole, meta = decoder.as_array(original)  # raw=False: colour as RGB, as above
        each = ((whole[index] if count > 1 else whole, meta) for index in range(count))
        return _collected(each, count, region, syntax, collect)
    except DeidError:
        raise
    except Exception:  # noqa: BLE001 - as above; the first cause is the one reported
        raise DeidError(HoldCode.PIXEL_DATA, f"Pixel Data cannot be decoded ({syntax.name}: {_short(first)})") from None


def _rewind(ds: Dataset) -> None:
    element = ds[_PIXEL_DATA]
    if element.is_buffered:
        element.value.seek(0)


def _collected(
    decoded: Iterable[tuple[np.ndarray, dict[str, str | int]]],
    count: int,
    region: Region,
    syntax: UID,
    collect: Callable[[_Frames, int], _T],
) -> tuple[_T, dict[str, str | int]]:
    meta: dict[str, str | int] = {}
    done = 0

    def blacked() -> _Frames:
        nonlocal meta, done
        for frame, frame_meta in decoded:
            meta = frame_meta
            copy = frame.astype(frame.dtype.newbyteorder("<"), copy=True)  # writable, little endian
            photometric = str(meta.get("photometric_interpretation", ""))
            bits_stored = int(str(meta.get("bits_stored", frame.dtype.itemsize * 8)))
            black = _black(photometric, bits_stored, frame.dtype.kind == "i")
            for box in region.rectangles:
                copy[box.y : box.y + box.height, box.x : box.x + box.width, ...] = black
            done += 1
            yield copy, meta

    result = collect(blacked(), count)
    if done != count:
        raise DeidError(HoldCode.PIXEL_DATA, f"Pixel Data cannot be decoded ({syntax.name}: {done} of {count} frames)")
    return result, meta


def _collect(frames: _Frames, count: int) -> np.ndarray:
    """The cleaned frames in one array (the uncompressed Pixel Data)."""
    import numpy as np  # noqa: PLC0415 - only when pixels are cleaned

    whole: np.ndarray | None = None
    for index, (frame, _meta) in enumerate(frames):
        if whole is None:
            whole = np.empty((count, *frame.shape), dtype=frame.dtype)
        if index < count:
            whole[index] = frame
    if whole is None:
        raise DeidError(HoldCode.PIXEL_DATA, "Pixel Data cannot be decoded: it has no frame")
    return whole


def _encode_rle(frames: _Frames, _count: int) -> list[bytes]:
    """Each cleaned frame RLE Lossless as it comes (GDCM's encoder when installed): only the encoded are kept."""
    from pydicom.pixels.encoders.base import RLELosslessEncoder  # noqa: PLC0415 - only when pixels are cleaned

    plugin = "gdcm" if "gdcm" in RLELosslessEncoder.available_plugins else ""
    encoded: list[bytes] = []
    for frame, meta in frames:
        options = {
            "rows": frame.shape[0],
            "columns": frame.shape[1],
            "samples_per_pixel": int(str(meta.get("samples_per_pixel", 1))),
            "bits_allocated": int(str(meta.get("bits_allocated", 8))),
            "bits_stored": int(str(meta.get("bits_stored", 8))),
            "pixel_representation": int(str(meta.get("pixel_representation", 0))),
            "photometric_interpretation": str(meta.get("photometric_interpretation", "")),
            "number_of_frames": 1,
            "planar_configuration": 0,
        }
        try:
            encoded.append(RLELosslessEncoder.encode(frame, encoding_plugin=plugin, **options))
        except Exception as exc:  # noqa: BLE001 - an encoder's failure is not a decoding one
            raise DeidError(
                HoldCode.PIXEL_DATA, f"the cleaned Pixel Data cannot be stored as RLE Lossless ({_short(exc)})"
            ) from None
    return encoded


def _describe(original: Dataset, out: Dataset, meta: dict[str, str | int], syntax: UID, decoded: int) -> None:
    """The attributes that describe the cleaned frames (stored uncompressed unless the caller says otherwise)."""
    samples = int(str(meta.get("samples_per_pixel", 1)))
    bits = int(str(meta.get("bits_allocated", 8)))
    out.PhotometricInterpretation = str(meta.get("photometric_interpretation", out.get("PhotometricInterpretation")))
    out.SamplesPerPixel = samples
    out.BitsAllocated = bits
    out.BitsStored = int(str(meta.get("bits_stored", bits)))
    out.HighBit = out.BitsStored - 1
    out.PixelRepresentation = int(str(meta.get("pixel_representation", 0)))
    if samples > 1:
        out.PlanarConfiguration = 0
    elif "PlanarConfiguration" in out:
        del out.PlanarConfiguration
    for tag in _STALE:
        if tag in out:
            del out[tag]
    if syntax.is_compressed or not syntax.is_little_endian:
        out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    lossy = _text(original, "LossyImageCompression")
    method = _LOSSY_METHODS.get(str(syntax))
    if lossy == "01" or (lossy != "00" and method is not None):
        out.LossyImageCompression = "01"
        if method is not None and "LossyImageCompressionMethod" not in out:
            out.LossyImageCompressionMethod = method
            compressed = _stored_length(original)
            if "LossyImageCompressionRatio" not in out and compressed:
                out.LossyImageCompressionRatio = f"{decoded / compressed:.4g}"


def _stored_length(ds: Dataset) -> int:
    value = ds[_PIXEL_DATA].value
    if isinstance(value, bytes):
        return len(value)
    here = value.tell()
    size = int(value.seek(0, os.SEEK_END))
    value.seek(here)
    return size


def _record(out: Dataset, region: Region) -> None:
    """Burned In Annotation NO and code 113101, now that the stored values changed."""
    out.BurnedInAnnotation = "NO"
    item = Dataset()
    item.CodeValue = "113101"
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = "Clean Pixel Data Option"
    codes = list(out.get("DeidentificationMethodCodeSequence") or [])
    codes.append(item)
    codes.sort(key=lambda code: str(code.get("CodeValue", "")))
    out.DeidentificationMethodCodeSequence = Sequence(codes)
    method = [str(value) for value in _values(out, "DeidentificationMethod")]
    out.DeidentificationMethod = [*method, f"pixels region {region.name}"[:64]]
