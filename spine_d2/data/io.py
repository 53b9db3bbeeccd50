"""One scan reader for training, export and alignment, so a scan means the same thing everywhere.

``read_scan`` returns the unprocessed pixels in their original bit depth (what ZOIs are cut from)
plus a normalized float view for the model. Formats: PNG, JPEG, TIFF (8/16-bit, gray or colour).
New formats (DICOM) register a reader in ``_READERS`` by suffix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ..errors import ScanReadError

__all__ = ["Scan", "read_scan", "SCAN_SUFFIXES"]


@dataclass
class Scan:
    path: str
    pixels: np.ndarray  # unprocessed, original dtype: HxW or HxWx3 (RGB)
    image: np.ndarray  # float32 HxW grayscale in [0, 1], bone bright (MONOCHROME2)
    bit_depth: int  # bits per sample of ``pixels`` (8 or 16; 32 for float TIFF)
    meta: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]


def _read_cv2(path: str) -> tuple[np.ndarray, dict]:
    # imdecode from bytes (not imread) so that non-ASCII paths work and empty files are caught.
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ScanReadError(path, "file is empty")
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ScanReadError(path, "not a readable image (corrupt, truncated or not an image)")
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[:, :, :3]  # alpha carries no X-ray signal
        arr = np.ascontiguousarray(arr[:, :, ::-1])  # BGR -> RGB
        if np.array_equal(arr[:, :, 0], arr[:, :, 1]) and np.array_equal(arr[:, :, 1], arr[:, :, 2]):
            arr = np.ascontiguousarray(arr[:, :, 0])  # gray stored as RGB: keep one plane
    return arr, {}


def _read_tiff(path: str) -> tuple[np.ndarray, dict]:
    import tifffile

    try:
        arr = tifffile.imread(path)
    except Exception as e:  # tifffile raises many types (ValueError, TiffFileError, OSError...)
        raise ScanReadError(path, f"not a readable TIFF ({type(e).__name__}: {e})") from e
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar configuration
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ScanReadError(path, f"unsupported TIFF layout {arr.shape} (expected one 2D image)")
    return np.ascontiguousarray(arr), {}


_READERS: dict[str, Callable[[str], tuple[np.ndarray, dict]]] = {
    ".png": _read_cv2,
    ".jpg": _read_cv2,
    ".jpeg": _read_cv2,
    ".bmp": _read_cv2,
    ".tif": _read_tiff,
    ".tiff": _read_tiff,
}
SCAN_SUFFIXES = tuple(_READERS)


def register_reader(suffix: str, reader: Callable[[str], tuple[np.ndarray, dict]]) -> None:
    """Add a format (e.g. ``.dcm``): the reader returns (pixels, meta) or raises ScanReadError.

    ``meta`` may carry ``bits_stored`` (normalization range) and ``invert`` (MONOCHROME1)."""
    _READERS[suffix.lower()] = reader


def _to_unit_gray(pixels: np.ndarray, bits_stored: int | None) -> np.ndarray:
    gray = pixels
    if pixels.ndim == 3:  # luminance of an RGB export of a gray scan
        gray = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if np.issubdtype(pixels.dtype, np.integer):
        bits = bits_stored or pixels.dtype.itemsize * 8
        return np.clip(gray.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)
    # Float scans have no fixed range: min-max is the only choice that keeps them in [0, 1].
    gray = gray.astype(np.float32)
    lo, hi = float(np.nanmin(gray)), float(np.nanmax(gray))
    return np.zeros_like(gray) if hi <= lo else (gray - lo) / (hi - lo)


def read_scan(path: str | os.PathLike) -> Scan:
    """Read one scan. Raises ScanReadError(path, reason) for missing, empty or unreadable files."""
    path = os.fspath(path)
    p = Path(path)
    if not p.exists():
        raise ScanReadError(path, "no such file")
    if not p.is_file():
        raise ScanReadError(path, "not a file")
    reader = _READERS.get(p.suffix.lower())
    if reader is None:
        raise ScanReadError(
            path, f"unsupported file type '{p.suffix}' (expected one of {', '.join(SCAN_SUFFIXES)})"
        )
    if p.stat().st_size == 0:
        raise ScanReadError(path, "file is empty")
    pixels, meta = reader(path)
    if pixels.size == 0 or min(pixels.shape[:2]) < 1:
        raise ScanReadError(path, "image has no pixels")
    if pixels.dtype == np.bool_ or pixels.dtype.kind not in "uif":
        raise ScanReadError(path, f"unsupported pixel type {pixels.dtype}")
    if pixels.dtype.kind == "i":  # signed TIFF/DICOM: shift so that intensities start at 0
        pixels = (pixels.astype(np.int64) - int(pixels.min())).astype(np.uint16)
    image = _to_unit_gray(pixels, meta.get("bits_stored"))
    if meta.get("invert"):
        image = 1.0 - image
    bit_depth = pixels.dtype.itemsize * 8 if pixels.dtype.kind == "u" else 32
    return Scan(path=path, pixels=pixels, image=image.astype(np.float32), bit_depth=bit_depth, meta=meta)
