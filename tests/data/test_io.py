"""read_scan: formats round trip, bad files name the file, DICOM meta holds no identifiers."""

import hashlib
import json
import sys

import cv2
import numpy as np
import pytest
import tifffile

from spine_d2.data.io import MAX_PIXELS, is_scan_file, read_scan
from spine_d2.errors import ScanReadError

try:  # optional: without pydicom>=3 only the DICOM tests are skipped
    import pydicom
    import pydicom.pixels
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLSLossless,
        RLELossless,
        SecondaryCaptureImageStorage,
        generate_uid,
    )
except ImportError:
    pydicom = None
needs_pydicom = pytest.mark.skipif(pydicom is None, reason="DICOM tests need pydicom>=3")

IDENTIFIERS = {"PatientName": "Doe^Jane", "PatientID": "PID-4711", "StudyDate": "20200131"}


def _ramp(h=24, w=40, dtype=np.uint16, top=None):
    top = np.iinfo(dtype).max if top is None else top
    return np.linspace(0, top, h * w).reshape(h, w).astype(dtype)


def _dicom(path, arr, bits_stored=None, syntax=None, **attrs):
    """Write a minimal DX file with patient identifiers (which the reader must drop)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for k, v in IDENTIFIERS.items():
        setattr(ds, k, v)
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape[:2] if attrs.get("SamplesPerPixel") == 3 else arr.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(arr.dtype.kind == "i")
    ds.ImagerPixelSpacing = [0.143, 0.143]
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = arr.tobytes()
    if syntax is not None:
        ds.compress(syntax)  # pydicom's own encoders (RLE Lossless) need no extra package
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------- PNG, JPEG, TIFF


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_gray_round_trip(tmp_path, dtype):
    arr = _ramp(dtype=dtype)
    path = tmp_path / "scan.png"
    cv2.imwrite(str(path), arr)
    scan = read_scan(path)
    assert scan.pixels.dtype == dtype and np.array_equal(scan.pixels, arr)
    assert scan.bit_depth == np.dtype(dtype).itemsize * 8
    assert scan.image.dtype == np.float32
    np.testing.assert_allclose(scan.image, arr / np.iinfo(dtype).max, atol=1e-6)
    assert (scan.height, scan.width) == arr.shape
    assert scan.meta["format"] == "png"
    assert scan.meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_png_colour_is_rgb_and_gray_as_rgb_keeps_one_plane(tmp_path):
    rgb = np.zeros((16, 20, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, 50
    cv2.imwrite(str(tmp_path / "c.png"), rgb[..., ::-1])  # cv2 writes BGR
    scan = read_scan(tmp_path / "c.png")
    assert np.array_equal(scan.pixels, rgb) and scan.image.shape == (16, 20)
    gray = _ramp(16, 20, np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), np.dstack([gray] * 3))
    assert np.array_equal(read_scan(tmp_path / "g.png").pixels, gray)


def test_jpeg_reads_as_8_bit_gray(tmp_path):
    arr = _ramp(32, 32, np.uint8)
    cv2.imwrite(str(tmp_path / "scan.jpg"), arr, [cv2.IMWRITE_JPEG_QUALITY, 100])
    scan = read_scan(tmp_path / "scan.jpg")
    assert scan.pixels.dtype == np.uint8 and scan.pixels.shape == arr.shape
    assert np.abs(scan.pixels.astype(int) - arr).max() <= 3


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_gray_round_trip(tmp_path, dtype):
    arr = _ramp(dtype=dtype)
    tifffile.imwrite(tmp_path / "scan.tif", arr)
    scan = read_scan(tmp_path / "scan.tif")
    assert np.array_equal(scan.pixels, arr) and scan.bit_depth == arr.itemsize * 8
    assert scan.meta["format"] == "tif" and len(scan.meta["sha256"]) == 64


def test_float_tiff_is_min_max_normalized(tmp_path):
    arr = np.linspace(-3.0, 5.0, 24 * 40, dtype=np.float32).reshape(24, 40)
    tifffile.imwrite(tmp_path / "scan.tiff", arr)
    scan = read_scan(tmp_path / "scan.tiff")
    assert scan.bit_depth == 32 and np.array_equal(scan.pixels, arr)
    np.testing.assert_allclose(scan.image, (arr + 3.0) / 8.0, atol=1e-6)


def test_float_tiff_with_nan_or_inf_keeps_its_finite_range(tmp_path):
    arr = np.linspace(-3.0, 5.0, 24 * 40, dtype=np.float32).reshape(24, 40)
    arr[0, :4] = np.nan  # e.g. outside a processed field
    arr[1, :4] = np.inf
    arr[2, :4] = -np.inf
    tifffile.imwrite(tmp_path / "scan.tif", arr)
    scan = read_scan(tmp_path / "scan.tif")
    assert np.array_equal(scan.pixels, arr, equal_nan=True)  # the pixels stay as stored
    finite = np.isfinite(arr)
    lo, hi = arr[finite].min(), arr[finite].max()
    np.testing.assert_allclose(scan.image[finite], (arr[finite] - lo) / (hi - lo), atol=1e-6)
    assert (scan.image[0, :4] == 0).all() and (scan.image[1, :4] == 1).all()
    assert (scan.image[2, :4] == 0).all()
    tifffile.imwrite(tmp_path / "blank.tif", np.full((24, 40), np.nan, np.float32))
    with pytest.raises(ScanReadError, match=r"blank.tif: no finite pixel value"):
        read_scan(tmp_path / "blank.tif")


@pytest.mark.parametrize(
    "dtype, offset", [(np.int16, -20000), (np.int32, -30000), (np.uint32, 0), (np.int64, 7)]
)
def test_wide_or_signed_integer_tiffs_are_read_as_16_bit(tmp_path, dtype, offset):
    """Counts of a 16-bit detector in another container: shifted to start at 0 (signed) and
    narrowed to uint16 without loss."""
    arr = _ramp(dtype=np.uint16).astype(np.int64) // 2 + offset
    tifffile.imwrite(tmp_path / "scan.tif", arr.astype(dtype))
    scan = read_scan(tmp_path / "scan.tif")
    assert scan.pixels.dtype == np.uint16 and scan.bit_depth == 16
    low = arr.min() if np.issubdtype(dtype, np.signedinteger) else 0
    assert np.array_equal(scan.pixels, arr - low)


def test_a_range_wider_than_16_bits_is_refused_not_wrapped(tmp_path):
    arr = (_ramp(dtype=np.uint16).astype(np.uint32) * 3).astype(np.uint32)
    tifffile.imwrite(tmp_path / "wide.tif", arr)
    with pytest.raises(ScanReadError, match=r"wide.tif: uint32 pixel values span \d+ levels"):
        read_scan(tmp_path / "wide.tif")
    tifffile.imwrite(tmp_path / "signed.tif", arr.astype(np.int32) - 100000)
    with pytest.raises(ScanReadError, match=r"signed.tif: int32 pixel values span"):
        read_scan(tmp_path / "signed.tif")


def test_multipage_tiff_needs_a_frame(tmp_path):
    pages = np.stack([_ramp(), _ramp()[::-1]])
    tifffile.imwrite(tmp_path / "stack.tif", pages)
    with pytest.raises(ScanReadError, match="2 pages"):
        read_scan(tmp_path / "stack.tif")
    assert np.array_equal(read_scan(tmp_path / "stack.tif", frame=1).pixels, pages[1])
    with pytest.raises(ScanReadError, match="frame 2"):
        read_scan(tmp_path / "stack.tif", frame=2)


def _truncated_png(tmp_path):
    noise = np.random.default_rng(0).integers(0, 65535, (64, 64), dtype=np.uint16)
    ok, buf = cv2.imencode(".png", noise)
    path = tmp_path / "truncated.png"
    path.write_bytes(buf.tobytes()[: len(buf) // 2])
    return path


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("missing", "no such file"),
        ("directory", "not a file"),
        ("empty", "file is empty"),
        ("truncated", "not a readable image"),
        ("not_an_image", "not a readable image"),
        ("bad_tiff", "not a readable TIFF"),
        ("suffix", "unsupported file type '.txt'"),
        ("tiny", "absurd dimensions 5x40"),
    ],
)
def test_bad_files_raise_scan_read_error_naming_the_file(tmp_path, kind, reason):
    path = tmp_path / f"{kind}.png"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.touch()
    elif kind == "truncated":
        path = _truncated_png(tmp_path)
    elif kind == "not_an_image":
        path.write_text("these are not the pixels you are looking for")
    elif kind == "bad_tiff":
        path = tmp_path / "bad.tif"
        path.write_bytes(b"II*\x00" + b"\xff" * 64)
    elif kind == "suffix":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
    elif kind == "tiny":
        cv2.imwrite(str(path), np.zeros((40, 5), np.uint8))
    with pytest.raises(ScanReadError, match=reason) as err:
        read_scan(path)
    assert err.value.path == str(path) and str(path) in str(err.value)


def test_absurd_png_header_is_refused_before_decoding(tmp_path):
    ok, buf = cv2.imencode(".png", np.zeros((16, 16), np.uint8))
    data = bytearray(buf.tobytes())
    data[16:24] = (60000).to_bytes(4, "big") * 2  # IHDR width, height: 3.6 gigapixels
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    with pytest.raises(
        ScanReadError, match=f"60000x60000 px.*{MAX_PIXELS // 1_000_000} megapixels"
    ):
        read_scan(tmp_path / "bomb.png")


def test_frame_argument_is_checked(tmp_path):
    cv2.imwrite(str(tmp_path / "one.png"), _ramp(dtype=np.uint8))
    assert read_scan(tmp_path / "one.png", frame=0).pixels.shape == (24, 40)
    with pytest.raises(ScanReadError, match="one image"):
        read_scan(tmp_path / "one.png", frame=1)
    with pytest.raises(ValueError):
        read_scan(tmp_path / "one.png", frame=-1)


# ---------------------------------------------------------------- DICOM


@needs_pydicom
def test_dicom_12_bit_round_trip_keeps_no_identifiers(tmp_path):
    arr = _ramp(top=4095)
    path = _dicom(tmp_path / "scan.dcm", arr | 0xF000, bits_stored=12)  # high bits: not pixel data
    scan = read_scan(path)
    assert scan.pixels.dtype == np.uint16 and np.array_equal(scan.pixels, arr)
    np.testing.assert_allclose(scan.image, arr / 4095.0, atol=1e-6)
    meta = scan.meta
    assert meta["format"] == "dicom" and meta["bits_stored"] == 12 and meta["modality"] == "DX"
    assert meta["photometric_interpretation"] == "MONOCHROME2" and meta["invert"] is False
    assert (meta["rows"], meta["columns"]) == arr.shape
    assert meta["pixel_spacing"] == [0.143, 0.143]
    assert meta["pixel_spacing_tag"] == "ImagerPixelSpacing"
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    text = json.dumps(meta)  # JSON-serializable, so it can go into manifests as is
    ds = pydicom.dcmread(path)
    for secret in [*IDENTIFIERS.values(), "Doe", ds.SOPInstanceUID, ds.StudyInstanceUID]:
        assert secret not in text
    assert not {"PatientName", "PatientID", "StudyDate", "patient", "uid"} & {k for k in meta}


@needs_pydicom
def test_dicom_monochrome1_inverts_the_image_not_the_pixels(tmp_path):
    arr = _ramp(top=4095)
    path = _dicom(tmp_path / "m1.dcm", arr, bits_stored=12, PhotometricInterpretation="MONOCHROME1")
    scan = read_scan(path)
    assert np.array_equal(scan.pixels, arr) and scan.meta["invert"] is True
    np.testing.assert_allclose(scan.image, 1.0 - arr / 4095.0, atol=1e-6)


@needs_pydicom
def test_dicom_rescale_and_window_shape_the_image(tmp_path):
    arr = _ramp(top=4095)
    attrs = dict(RescaleSlope=2, RescaleIntercept=-1000, RescaleType="US")
    scan = read_scan(_dicom(tmp_path / "r.dcm", arr, bits_stored=12, **attrs))
    assert (scan.meta["rescale_slope"], scan.meta["rescale_intercept"]) == (2.0, -1000.0)
    assert np.array_equal(scan.pixels, arr)  # stored values, not rescaled
    np.testing.assert_allclose(scan.image, arr / 4095.0, atol=1e-6)  # linear rescale: same range
    windowed = _dicom(tmp_path / "w.dcm", arr, 12, WindowCenter=3000, WindowWidth=2001, **attrs)
    scan = read_scan(windowed)
    value = arr * 2.0 - 1000
    expected = np.clip((value - 2999.5) / 2000.0 + 0.5, 0, 1)  # PS3.3 C.11.2.1.2 LINEAR
    np.testing.assert_allclose(scan.image, expected, atol=1e-6)
    assert (scan.meta["window_center"], scan.meta["window_width"]) == (3000.0, 2001.0)


@needs_pydicom
@pytest.mark.parametrize(
    "function, expected",
    [
        ("LINEAR_EXACT", lambda v: np.clip((v - 2000) / 1000 + 0.5, 0, 1)),
        ("SIGMOID", lambda v: 1 / (1 + np.exp(-4 * (v - 2000) / 1000))),
        ("BOGUS", lambda v: v / 4095),  # unknown function: the window is ignored, full range used
    ],
)
def test_dicom_voi_lut_functions(tmp_path, function, expected):
    arr = _ramp(top=4095)
    attrs = dict(WindowCenter=2000, WindowWidth=1000, VOILUTFunction=function)
    scan = read_scan(_dicom(tmp_path / "f.dcm", arr, bits_stored=12, **attrs))
    np.testing.assert_allclose(scan.image, expected(arr.astype(np.float64)), atol=1e-5)
    assert scan.meta.get("voi_lut_function") == (None if function == "BOGUS" else function)


@needs_pydicom
def test_dicom_voi_lut_sequence_is_applied(tmp_path):
    arr = _ramp(top=255, dtype=np.uint8)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.add_new(0x00283006, "US", list(range(255, -1, -1)))  # LUT Data: a reversing LUT
    scan = read_scan(_dicom(tmp_path / "voi.dcm", arr, VOILUTSequence=[item]))
    assert scan.meta["voi_lut"] is True
    np.testing.assert_allclose(scan.image, 1.0 - arr / 255.0, atol=1e-6)


@needs_pydicom
def test_dicom_signed_pixels_keep_a_fixed_offset(tmp_path):
    arr = np.linspace(-2048, 2047, 24 * 40).reshape(24, 40).astype(np.int16)
    scan = read_scan(_dicom(tmp_path / "s.dcm", arr, bits_stored=12))
    assert scan.pixels.dtype == np.uint16 and scan.meta["pixel_offset"] == 2048
    assert np.array_equal(scan.pixels.astype(int) - 2048, arr)
    np.testing.assert_allclose(scan.image, (arr + 2048) / 4095.0, atol=1e-6)


@needs_pydicom
def test_dicom_rgb_is_read_as_colour(tmp_path):
    rgb = np.zeros((16, 20, 3), np.uint8)
    rgb[..., 1] = 120
    path = tmp_path / "rgb.dcm"
    _dicom(path, rgb, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    scan = read_scan(path)
    assert np.array_equal(scan.pixels, rgb) and scan.image.shape == (16, 20)


@needs_pydicom
def test_dicom_multiframe_needs_a_frame(tmp_path):
    frames = np.stack([_ramp(top=4000) + i for i in range(3)])
    path = _dicom(tmp_path / "cine.dcm", frames, bits_stored=12, NumberOfFrames=3)
    with pytest.raises(ScanReadError, match="3 frames: pass frame=0..2"):
        read_scan(path)
    scan = read_scan(path, frame=2)
    assert np.array_equal(scan.pixels, frames[2]) and scan.meta["frame"] == 2
    with pytest.raises(ScanReadError, match="frame 3"):
        read_scan(path, frame=3)


@needs_pydicom
def test_dicom_rle_lossless_is_decoded(tmp_path):
    arr = _ramp(top=4095)
    scan = read_scan(_dicom(tmp_path / "rle.dcm", arr, bits_stored=12, syntax=RLELossless))
    assert np.array_equal(scan.pixels, arr) and scan.meta["transfer_syntax"] == "RLE Lossless"


def _compressed_junk(path, syntax):
    path = _dicom(path, _ramp())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@needs_pydicom
def test_dicom_undecodable_jpeg2000_names_the_syntax(tmp_path):
    path = _compressed_junk(tmp_path / "j2k.dcm", JPEG2000Lossless)
    with pytest.raises(ScanReadError, match="JPEG 2000"):  # not installed, or cannot decode
        read_scan(path)


@needs_pydicom
def test_dicom_syntax_without_decoder_says_what_to_install(tmp_path):
    if pydicom.pixels.get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = _compressed_junk(tmp_path / "jls.dcm", JPEGLSLossless)
    with pytest.raises(ScanReadError, match="JPEG-LS Lossless.*not installed.*pylibjpeg"):
        read_scan(path)


@needs_pydicom
@pytest.mark.parametrize(
    "kind, reason",
    [
        ("truncated", "truncated"),
        ("header_only", "without pixel data|not a readable DICOM"),
        ("text", "not a DICOM file"),
        ("huge", "absurd dimensions 30000x30000"),
    ],
)
def test_bad_dicom_files(tmp_path, kind, reason):
    path = _dicom(tmp_path / f"{kind}.dcm", _ramp(top=4095), bits_stored=12)
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:-200])
    elif kind == "header_only":
        path.write_bytes(data[:300])
    elif kind == "text":
        path.write_text("not a DICOM file at all\n" * 20)
    elif kind == "huge":
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Columns = 30000  # header claims 1.8 GB of pixels
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ScanReadError, match=reason) as err:
        read_scan(path)
    assert err.value.path == str(path)


@needs_pydicom
def test_dicom_without_suffix_is_recognized_by_its_preamble(tmp_path):
    named = _dicom(tmp_path / "scan.dcm", _ramp(top=4095), bits_stored=12)
    for name in ("IM0001", "1.2.840.10008.99.7"):  # export names: none, or a UID
        path = tmp_path / name
        path.write_bytes(named.read_bytes())
        assert is_scan_file(path) and read_scan(path).meta["format"] == "dicom"
    (tmp_path / "README").write_text("no preamble here")
    assert not is_scan_file(tmp_path / "README")
    with pytest.raises(ScanReadError, match="unsupported file type"):
        read_scan(tmp_path / "README")


def test_missing_pydicom_gives_an_install_hint(tmp_path, monkeypatch):
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` fail
    with pytest.raises(ScanReadError, match="pip install"):
        read_scan(path)
