"""One scan reader for training, export and alignment, so a scan means the same thing everywhere.

``read_scan`` returns the unprocessed pixels in their original bit depth (what ZOIs are cut from)
plus a normalized float view for the model. Formats: PNG, JPEG, TIFF (8/16-bit, gray or colour)
and DICOM (pydicom, optional dependency). New formats register a reader by suffix.

DICOM metadata is whitelisted: patient names, IDs, dates and UIDs never leave the reader.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ..atomic import write_atomic
from ..errors import DatasetError, ScanReadError

__all__ = [
    "Scan",
    "read_scan",
    "register_reader",
    "is_scan_file",
    "file_sha256",
    "write_image",
    "SCAN_SUFFIXES",
]

# Sizes outside these bounds are corrupt headers, thumbnails or decompression bombs, not scans.
MIN_SIDE = 8
MAX_SIDE = 65536
MAX_PIXELS = 400_000_000


@dataclass
class Scan:
    path: str
    pixels: np.ndarray  # unprocessed, original dtype: HxW or HxWx3 (RGB)
    image: np.ndarray  # float32 HxW grayscale in [0, 1], bone bright (MONOCHROME2)
    bit_depth: int  # bits per sample of ``pixels`` (8 or 16; 32 for float TIFF)
    meta: dict = field(default_factory=dict)  # JSON-serializable; always "format" and "sha256"

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]


def _check_dimensions(path: str, height: int, width: int) -> None:
    """Called on headers where cheap (before decoding: no bombs) and on every decoded image."""
    if (
        min(height, width) < MIN_SIDE
        or max(height, width) > MAX_SIDE
        or height * width > MAX_PIXELS
    ):
        raise ScanReadError(
            path,
            f"absurd dimensions {width}x{height} px (expected sides of {MIN_SIDE}..{MAX_SIDE} px "
            f"and at most {MAX_PIXELS // 1_000_000} megapixels)",
        )


def _single_image(path: str, frame: int | None) -> None:
    if frame not in (None, 0):
        raise ScanReadError(path, f"frame {frame} requested but this format holds one image")


def _read_cv2(path: str, frame: int | None = None) -> tuple[np.ndarray, dict]:
    _single_image(path, frame)
    # imdecode from bytes (not imread) so that non-ASCII paths work and empty files are caught.
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ScanReadError(path, "file is empty")
    if data.size >= 24 and data[:8].tobytes() == b"\x89PNG\r\n\x1a\n":
        # Check the PNG header before decoding, so that a bomb is refused before it is allocated.
        width, height = struct.unpack(">II", data[16:24].tobytes())
        _check_dimensions(path, height, width)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ScanReadError(path, "not a readable image (corrupt, truncated or not an image)")
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[:, :, :3]  # alpha carries no X-ray signal
        arr = np.ascontiguousarray(arr[:, :, ::-1])  # BGR -> RGB
        if np.array_equal(arr[:, :, 0], arr[:, :, 1]) and np.array_equal(
            arr[:, :, 1], arr[:, :, 2]
        ):
            arr = np.ascontiguousarray(arr[:, :, 0])  # gray stored as RGB: keep one plane
    return arr, {"sha256": hashlib.sha256(data).hexdigest()}


def _read_tiff(path: str, frame: int | None = None) -> tuple[np.ndarray, dict]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = len(tif.pages)
            if frame is not None and frame >= pages:
                raise ScanReadError(path, f"frame {frame} requested but the TIFF has {pages} pages")
            page = tif.pages[frame or 0]
            _check_dimensions(path, int(page.imagelength), int(page.imagewidth))
            arr = tif.asarray() if frame is None else tif.asarray(key=frame)
    except ScanReadError:
        raise
    except Exception as e:  # tifffile raises many types (ValueError, TiffFileError, OSError...)
        raise ScanReadError(path, f"not a readable TIFF ({_describe(e)})") from e
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar configuration
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        hint = f"; it has {pages} pages: pass frame=" if pages > 1 else " (expected one 2D image)"
        raise ScanReadError(path, f"unsupported TIFF layout {arr.shape}{hint}")
    return np.ascontiguousarray(arr), {}


def _describe(e: Exception) -> str:
    """The original type and message on one line (third-party messages span several)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _has_dicom_preamble(path: str) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever their name."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _import_pydicom(path: str):
    try:
        import pydicom
        import pydicom.pixels
        import pydicom.pixels.utils
    except ImportError as e:
        raise ScanReadError(
            path, f"reading DICOM needs pydicom>=3 ({e}): pip install 'pydicom>=3'"
        ) from e
    return pydicom


def _parse_dicom(path: str, data: bytes, pydicom):
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except pydicom.errors.InvalidDicomError:
        pass  # no 'DICM' preamble: may be a legacy raw dataset, retried below
    except Exception as e:  # pydicom raises EOFError, ValueError, struct.error, ...
        raise ScanReadError(path, f"not a readable DICOM file ({_describe(e)})") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # forced parsing of a non-DICOM file warns per element
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if "PixelData" not in ds or "Rows" not in ds:
            raise ValueError("no 'DICM' preamble and no image elements")
        if "TransferSyntaxUID" not in ds.file_meta:
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(
                pydicom.uid.ImplicitVRLittleEndian
                if implicit
                else (
                    pydicom.uid.ExplicitVRLittleEndian
                    if little
                    else pydicom.uid.ExplicitVRBigEndian
                )
            )
        return ds
    except Exception as e:
        raise ScanReadError(path, f"not a DICOM file ({_describe(e)})") from e


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """VOI window to [0, 1] (DICOM PS3.3 C.11.2.1.2); None when the window is invalid."""
    if function == "SIGMOID":
        return None if width <= 0 else 1 / (1 + np.exp(np.float32(-4 / width) * (values - center)))
    if function == "LINEAR":
        center, width = center - 0.5, width - 1.0
    elif function != "LINEAR_EXACT":
        return None
    if width <= 0:
        return None
    out = (values - np.float32(center)) * np.float32(1.0 / width) + np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def _dicom_gray(ds, stored: np.ndarray, meta: dict, pydicom) -> np.ndarray:
    """Normalized view of monochrome stored values: modality LUT, then VOI LUT or window."""
    values = pydicom.pixels.apply_modality_lut(stored, ds)
    if ds.get("VOILUTSequence"):
        depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        meta["voi_lut"] = True
        return pydicom.pixels.apply_voi(values, ds, index=0).astype(np.float32) / (2**depth - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds["WindowCenter"]), _first(ds["WindowWidth"])
        function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
        image = _window(values.astype(np.float32), center, width, function)
        if image is not None:
            meta.update(window_center=center, window_width=width, voi_lut_function=function)
            return image
    # No VOI: the full range the modality LUT can output for BitsStored-bit stored values.
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    else:
        bits = meta["bits_stored"]
        signed = stored.dtype.kind == "i"
        ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1])
        ends = pydicom.pixels.apply_modality_lut(ends, ds)
        lo, hi = float(np.min(ends)), float(np.max(ends))
    out = (values.astype(np.float32) - np.float32(lo)) * np.float32(1 / max(hi - lo, 1e-12))
    return np.clip(out, 0.0, 1.0, out=out)


def _first(elem) -> float:
    return float(elem.value[0] if elem.VM > 1 else elem.value)  # several windows: the first


def _read_dicom(path: str, frame: int | None = None) -> tuple[np.ndarray, dict, np.ndarray | None]:
    pydicom = _import_pydicom(path)
    data = Path(path).read_bytes()
    ds = _parse_dicom(path, data, pydicom)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ScanReadError(path, "DICOM without pixel data (not an image, or truncated)")
    missing = [
        k for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation") if k not in ds
    ]
    if missing:
        raise ScanReadError(path, f"DICOM image without {', '.join(missing)}")
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None:
        raise ScanReadError(path, "DICOM without a Transfer Syntax UID (truncated file meta?)")
    if not ts.is_transfer_syntax:
        raise ScanReadError(path, f"unknown DICOM transfer syntax {ts}")
    ts_name = f"{ts.name} ({ts})"
    rows, cols = int(ds.Rows), int(ds.Columns)
    _check_dimensions(path, rows, cols)
    photometric = str(ds.PhotometricInterpretation).upper()
    if not photometric.startswith(("MONOCHROME1", "MONOCHROME2", "RGB", "YBR")):
        raise ScanReadError(path, f"unsupported DICOM photometric interpretation {photometric}")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frame is None and frames > 1:
        raise ScanReadError(
            path, f"multi-frame DICOM with {frames} frames: pass frame=0..{frames - 1} to read_scan"
        )
    if frame is not None and frame >= frames:
        raise ScanReadError(path, f"frame {frame} requested but the DICOM has {frames} frame(s)")
    if ts.is_compressed:
        try:
            decoder = pydicom.pixels.get_decoder(ts)
        except NotImplementedError as e:
            raise ScanReadError(
                path, f"no DICOM decoder exists for transfer syntax {ts_name}"
            ) from e
        if not decoder.is_available:
            raise ScanReadError(
                path,
                f"compressed transfer syntax {ts_name} needs a decoder that is not installed; "
                f"install one of: {'; '.join(decoder.missing_dependencies)}",
            )
    elif "PixelData" in ds:
        expected = pydicom.pixels.utils.get_expected_length(ds, "bytes")
        if len(ds.PixelData) < expected:
            raise ScanReadError(
                path, f"DICOM pixel data truncated: {len(ds.PixelData)} of {expected} bytes"
            )
    try:
        stored = pydicom.pixels.pixel_array(ds, index=frame if frames > 1 else None)
    except Exception as e:  # each decoder plugin raises its own types
        raise ScanReadError(path, f"cannot decode {ts_name} pixel data ({_describe(e)})") from e

    bits_stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    meta = _dicom_meta(ds, ts, photometric, bits_stored, frames, frame)
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    # MONOCHROME1 (and an INVERSE presentation LUT) show low values bright: invert the view only.
    inverse_lut = str(ds.get("PresentationLUTShape", "")) == "INVERSE"
    meta["invert"] = stored.ndim == 2 and (photometric == "MONOCHROME1") != inverse_lut
    if stored.ndim == 3:  # colour (YBR already converted to RGB by pydicom)
        meta["photometric_interpretation"] = "RGB"
    if stored.ndim == 3 or stored.dtype.kind == "f":
        return stored, meta, None  # read_scan normalizes (float: min-max) and inverts
    image = _dicom_gray(ds, stored, meta, pydicom)
    if meta["invert"]:
        image = 1.0 - image
    pixels = stored
    if stored.dtype.kind == "i":
        # A fixed offset, not the image minimum, keeps stored values: stored = pixels - offset.
        offset = 2 ** (bits_stored - 1)
        pixels = (stored.astype(np.int64) + offset).astype(f"u{stored.dtype.itemsize}")
        meta["pixel_offset"] = offset
    return pixels, meta, image.astype(np.float32)


def _dicom_meta(ds, ts, photometric: str, bits_stored: int, frames: int, frame: int | None) -> dict:
    """Whitelist of what the pipeline needs; nothing that identifies a patient or a study."""
    meta = {
        "format": "dicom",
        "transfer_syntax": ts.name,
        "modality": str(ds.get("Modality", "")),
        "photometric_interpretation": photometric,
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "bits_allocated": int(ds.BitsAllocated),
        "bits_stored": bits_stored,
        "pixel_representation": int(ds.get("PixelRepresentation") or 0),
        "number_of_frames": frames,
    }
    if frame is not None:
        meta["frame"] = frame
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        if ds.get(tag):
            meta["pixel_spacing"] = [float(v) for v in ds[tag].value]  # mm, [row, column]
            meta["pixel_spacing_tag"] = tag
            break
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        meta["rescale_slope"] = float(ds.RescaleSlope)
        meta["rescale_intercept"] = float(ds.RescaleIntercept)
        if ds.get("RescaleType"):
            meta["rescale_type"] = str(ds.RescaleType)
    return meta


_READERS: dict[str, Callable] = {  # reader(path[, frame=]) -> (pixels, meta[, image])
    ".png": _read_cv2,
    ".jpg": _read_cv2,
    ".jpeg": _read_cv2,
    ".bmp": _read_cv2,
    ".tif": _read_tiff,
    ".tiff": _read_tiff,
    ".dcm": _read_dicom,
    ".dicom": _read_dicom,
}
SCAN_SUFFIXES = tuple(_READERS)


def register_reader(suffix: str, reader: Callable) -> None:
    """Add a format: ``reader(path)`` returns ``(pixels, meta)`` or raises ScanReadError.

    ``meta`` may carry ``bits_stored`` (normalization range) and ``invert`` (MONOCHROME1). A reader
    may return ``(pixels, meta, image)`` with its own normalized MONOCHROME2 view in [0, 1]; then
    ``invert`` is informative only. Readers that take ``frame=`` serve ``read_scan(path, frame=i)``.
    """
    _READERS[suffix.lower()] = reader


def _reader_for(path: str, suffix: str) -> Callable:
    reader = _READERS.get(suffix.lower())
    if reader is None and _has_dicom_preamble(path):
        reader = _READERS.get(".dcm", _read_dicom)  # DICOM exports often have no suffix or a UID
    if reader is None:
        raise ScanReadError(
            path,
            f"unsupported file type '{suffix}' (expected one of {', '.join(_READERS)} or DICOM)",
        )
    return reader


def is_scan_file(path: str | os.PathLike) -> bool:
    """Whether read_scan would try this file: a known suffix, or DICOM with any name."""
    p = Path(path)
    return p.is_file() and (p.suffix.lower() in _READERS or _has_dicom_preamble(os.fspath(p)))


def write_image(path: str | os.PathLike, pixels: np.ndarray) -> None:
    """``pixels`` to ``path`` in the format its suffix names, through a temporary name.
    Encoded in memory and written by Python rather than by ``cv2.imwrite``, which returns a
    bare False on a full disk: a failed write names its reason (a one-line OutputError)."""
    suffix = Path(path).suffix
    try:
        ok, buf = cv2.imencode(suffix, pixels)
    except cv2.error:
        ok = False
    if not ok:
        raise DatasetError(
            path, f"OpenCV cannot encode a {pixels.dtype} array of shape {pixels.shape} as {suffix}"
        )
    write_atomic(path, buf.tobytes())


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, streamed (scans can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _to_unit_gray(pixels: np.ndarray, bits_stored: int | None) -> np.ndarray:
    gray = pixels
    if pixels.ndim == 3:  # luminance of an RGB export of a gray scan
        gray = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if np.issubdtype(pixels.dtype, np.integer):
        bits = bits_stored or pixels.dtype.itemsize * 8
        return np.clip(gray.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)
    # Float scans have no fixed range: min-max is the only choice that keeps them in [0, 1]. The
    # range is the finite values'; NaN (e.g. outside a processed field) reads as black, +inf
    # as white, so that one such pixel does not blank the whole scan.
    gray = gray.astype(np.float32)
    finite = gray[np.isfinite(gray)]
    lo, hi = float(finite.min()), float(finite.max())
    unit = np.zeros_like(gray) if hi <= lo else (gray - lo) / (hi - lo)
    return np.nan_to_num(unit, nan=0.0, posinf=1.0, neginf=0.0)


def _as_16_bit_at_most(path: str, pixels: np.ndarray) -> np.ndarray:
    """Integer pixels as uint8/uint16, losslessly: signed ones shifted to start at 0, wider
    containers (a 12- or 16-bit detector's counts saved as 32-bit TIFF) narrowed to uint16 when
    their values fit. A range that does not fit 16 bits is refused rather than wrapped around."""
    if pixels.dtype.kind not in "ui" or (pixels.dtype.kind == "u" and pixels.itemsize <= 2):
        return pixels
    low = int(pixels.min()) if pixels.dtype.kind == "i" else 0  # signed: start at 0
    span = int(pixels.max()) - low
    if span > 0xFFFF:
        raise ScanReadError(
            path,
            f"{pixels.dtype} pixel values span {span + 1} levels, more than the 16 bits "
            "spine-d2 reads (save the scan as 16-bit, or as float for a wider range)",
        )
    return (pixels.astype(np.int64) - low).astype(np.uint16)


def read_scan(path: str | os.PathLike, *, frame: int | None = None) -> Scan:
    """Read one scan. Raises ScanReadError(path, reason) for missing, empty or unreadable files.

    ``frame`` selects one image of a multi-frame DICOM or multi-page TIFF; without it such files
    are refused (naming the frame count) rather than silently reduced to their first image.
    """
    path = os.fspath(path)
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or frame < 0):
        raise ValueError(f"frame must be a non-negative int or None, got {frame!r}")
    p = Path(path)
    if not p.exists():
        raise ScanReadError(path, "no such file")
    if not p.is_file():
        raise ScanReadError(path, "not a file")
    if p.stat().st_size == 0:
        raise ScanReadError(path, "file is empty")
    reader = _reader_for(path, p.suffix)
    result = reader(path) if frame is None else reader(path, frame=frame)
    pixels, meta, image = (*result, None)[:3]
    if pixels.size == 0 or min(pixels.shape[:2]) < 1:
        raise ScanReadError(path, "image has no pixels")
    _check_dimensions(path, pixels.shape[0], pixels.shape[1])
    if pixels.dtype == np.bool_ or pixels.dtype.kind not in "uif":
        raise ScanReadError(path, f"unsupported pixel type {pixels.dtype}")
    pixels = _as_16_bit_at_most(path, pixels)
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).any():
        raise ScanReadError(path, "no finite pixel value (all NaN or infinite)")
    if image is None:
        image = _to_unit_gray(pixels, meta.get("bits_stored"))
        if meta.get("invert"):
            image = 1.0 - image
    meta.setdefault("format", p.suffix.lower().lstrip(".") or "unknown")
    meta.setdefault("sha256", file_sha256(path))
    bit_depth = pixels.dtype.itemsize * 8 if pixels.dtype.kind == "u" else 32
    return Scan(
        path=path, pixels=pixels, image=image.astype(np.float32), bit_depth=bit_depth, meta=meta
    )
