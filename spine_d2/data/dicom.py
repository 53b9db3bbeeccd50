"""Writing scans as DICOM (reading lives in ``io.read_scan``).

Only derived images are written (DRRs, test scans): they have no patient, so no patient
attributes are written either.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_path

__all__ = ["write_dicom"]


def write_dicom(
    path, pixels: np.ndarray, *, bits_stored: int | None = None, pixel_spacing_mm=None, **attrs
) -> None:
    """Write a gray MONOCHROME2 Secondary Capture file atomically (temp name + rename).

    ``pixels``: 2D uint8/uint16; ``bits_stored`` defaults to the dtype's width;
    ``pixel_spacing_mm`` goes to ImagerPixelSpacing; ``attrs`` are set on the dataset as given.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"write_dicom takes 2D uint8/uint16 pixels, got {pixels.dtype} {pixels.shape}"
        )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if pixel_spacing_mm is not None:
        ds.ImagerPixelSpacing = [round(float(pixel_spacing_mm), 6)] * 2
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path = Path(path)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
