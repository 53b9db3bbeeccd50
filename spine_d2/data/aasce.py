"""AASCE 2019 (SpineWeb Dataset 16) landmarks -> COCO vertebral-body polygons, split by patient.

The source: ``data/training/*.jpg`` (AP spine radiographs) and ``labels/training/<image>.mat``
(key ``p2``: 68 x 2 absolute (x, y), 17 vertebrae T1..L5 top to bottom x 4 corners in the order
top-left, top-right, bottom-left, bottom-right), or ``landmarks.csv`` + ``filenames.csv`` (the
same points normalised to [0, 1]: 68 x values then 68 y values per row).

Label errors are checked per image and fixed only when the fix is unambiguous:

- ``bow_tie``: a corner pair swapped, so the quad drawn TL-TR-BR-BL crosses itself. Four points
  in convex position have exactly one simple (non-crossing) drawing order, their hull: that one is
  the fix. Points not in convex position have three simple orders: ambiguous, the image is skipped.
- ``order``: vertebrae not top to bottom. Levels are given by position, so sorting by centroid
  height is the fix when the sorted centres are clearly apart; else the image is skipped.
- ``degenerate``: a quad with (almost) no area or a side shorter than ``MIN_SIDE_PX``: skipped.
- ``size_outlier``: a quad far larger or smaller than the image's median body (corners taken
  from different vertebrae): skipped.
- ``overlap``: two vertebral bodies overlapping by more than ``MAX_OVERLAP`` of the smaller one
  (left after the fixes above): skipped.
- ``disc_shift``: three or more gaps in a row each taller than both quads beside it. A disc is
  thinner than the vertebral bodies around it (in the median film the median body is 2.7 times
  the median gap), so such a run of quads spans the discs: corners paired from one body's bottom
  endplate and the next one's top endplate. Over all 481 films the longest such run is 0 in 421,
  1 in 34, 2 in 4 and 4-12 in the 8 this skips. Re-pairing would leave the bodies' levels a
  guess: skipped.

A skipped image is dropped whole: keeping it with a vertebra missing would teach the model that a
vertebral body is background there, and would score a correct detection as a false positive.

Patient key (``patient_key``): names look like ``sunhl-1th-02-Jan-2017-162 A AP.jpg``; the number
before the letter is the patient (``162 A`` and ``162 B`` are two films of one patient, and the
same number recurs across dates: ``03-Jan-2017-165 A`` and ``04-Jan-2017-165 B``), so the key is
``patient-162``. The ``sunhl-1th-20-Jul-2016-coronalN`` films carry no patient number: they are
kept together as one group, which keeps the split patient-disjoint whoever they belong to.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_open
from ..errors import DatasetError, check_output_folder
from .datasets import polygon_area

logger = logging.getLogger(__name__)

__all__ = [
    "AASCE_LEVELS",
    "CONVERTER_VERSION",
    "check_vertebrae",
    "convert_aasce",
    "patient_key",
    "patient_split",
    "read_landmarks",
]

CONVERTER_VERSION = "1.1"  # 1.1: the disc_shift check
AASCE_LEVELS = [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
# Same id as the DRR "parts" taxonomy's vertebral_body (spine_d2.data.drr.categories("parts")).
CATEGORY = {"id": 1, "name": "vertebral_body", "supercategory": "vertebra"}
MIN_SIDE_PX = 3.0
MAX_OVERLAP = 0.25
# After sorting, neighbouring centres closer than this fraction of the median spacing are too
# close to tell which is above: the order fix would be a guess.
MIN_SORTED_GAP = 0.35
# A body's area relative to the median of its image: T1 to L5 vary about 3x, not more.
MIN_AREA_RATIO, MAX_AREA_RATIO = 0.2, 5.0
# This many gaps in a row, each taller than both quads beside it, mean the quads span the discs.
MIN_DISC_RUN = 3

_PATIENT_RE = re.compile(r"-(\d+) [A-Z]+ AP")
_CORONAL_RE = re.compile(r"^(.*-coronal)\d+$")


def patient_key(file_name: str) -> str:
    """The patient a film belongs to, from its name (see the module docstring)."""
    stem = Path(file_name).stem
    m = _PATIENT_RE.search(stem)
    if m:
        return f"patient-{int(m.group(1))}"
    m = _CORONAL_RE.match(stem)
    if m:
        return m.group(1)
    return stem  # unknown naming: its own group


def patient_split(file_names, val_fraction=0.2, seed=0) -> dict:
    """{file_name: "train" | "val"}: whole patients go to val (seeded shuffle of the sorted keys)
    until it holds at least ``val_fraction`` of the images."""
    groups: dict = {}
    for name in sorted(file_names):
        groups.setdefault(patient_key(name), []).append(name)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    target = val_fraction * len(file_names)
    split, n_val = {}, 0
    for key in keys:
        part = "val" if n_val < target else "train"
        n_val += len(groups[key]) if part == "val" else 0
        for name in groups[key]:
            split[name] = part
    return split


def read_landmarks(mat_path) -> np.ndarray:
    """(17, 4, 2) float corners TL, TR, BL, BR per vertebra, from an AASCE ``.mat`` file."""
    from scipy.io import loadmat

    try:
        p2 = loadmat(str(mat_path))["p2"]
    except KeyError:
        raise DatasetError(mat_path, "has no 'p2' landmark array") from None
    except Exception as e:  # scipy raises several types on a corrupt file
        raise DatasetError(mat_path, f"not a readable MATLAB file ({e})") from e
    p2 = np.asarray(p2, dtype=np.float64)
    if p2.shape != (68, 2):
        raise DatasetError(mat_path, f"'p2' has shape {p2.shape}, expected (68, 2)")
    return p2.reshape(17, 4, 2)


def read_landmarks_csv(labels_dir) -> dict:
    """{file_name: (17, 4, 2) normalised corners} from ``filenames.csv`` + ``landmarks.csv``."""
    labels_dir = Path(labels_dir)
    names_csv, marks_csv = labels_dir / "filenames.csv", labels_dir / "landmarks.csv"
    for p in (names_csv, marks_csv):
        if not p.is_file():
            raise DatasetError(p, "not found")
    with open(names_csv, newline="", encoding="utf-8") as f:
        names = [row[0] for row in csv.reader(f) if row]
    with open(marks_csv, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if row]
    if len(rows) != len(names):
        raise DatasetError(marks_csv, f"{len(rows)} rows for {len(names)} names in {names_csv}")
    out = {}
    for i, (name, row) in enumerate(zip(names, rows)):
        if len(row) != 136:
            raise DatasetError(marks_csv, f"row {i + 1} has {len(row)} values, expected 136")
        v = np.asarray(row, dtype=np.float64)
        out[name] = np.stack([v[:68], v[68:]], axis=1).reshape(17, 4, 2)
    return out


def _drawing_order(quad: np.ndarray) -> np.ndarray:
    """Corners TL, TR, BL, BR -> polygon TL, TR, BR, BL."""
    return quad[[0, 1, 3, 2]]


def _segments_cross(p1, p2, q1, q2) -> bool:
    def orient(a, b, c):
        return np.sign((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))

    return (
        orient(p1, p2, q1) * orient(p1, p2, q2) < 0 and orient(q1, q2, p1) * orient(q1, q2, p2) < 0
    )


def _is_simple(poly: np.ndarray) -> bool:
    """A quadrilateral is simple when neither pair of opposite edges crosses."""
    return not (
        _segments_cross(poly[0], poly[1], poly[2], poly[3])
        or _segments_cross(poly[1], poly[2], poly[3], poly[0])
    )


def _area(poly: np.ndarray) -> float:
    return float(polygon_area(poly[:, 0], poly[:, 1]))


def _convex_order(pts: np.ndarray):
    """The hull order of 4 points starting at TL-most, clockwise in image coordinates (y down),
    or None when one point lies inside the triangle of the others."""
    c = pts.mean(axis=0)
    ang = np.arctan2(pts[:, 1] - c[1], pts[:, 0] - c[0])
    poly = pts[np.argsort(ang)]
    cross = []
    for i in range(4):
        a, b, d = poly[i], poly[(i + 1) % 4], poly[(i + 2) % 4]
        cross.append((b[0] - a[0]) * (d[1] - b[1]) - (b[1] - a[1]) * (d[0] - b[0]))
    if not (all(v > 0 for v in cross) or all(v < 0 for v in cross)):
        return None
    start = int(np.argmin(poly[:, 0] + poly[:, 1]))
    return np.roll(poly, -start, axis=0)


def _mask_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Overlap of two simple quads as a fraction of the smaller one (rasterised at 1 px)."""
    import cv2

    lo = np.floor(np.minimum(a.min(0), b.min(0))).astype(int) - 1
    hi = np.ceil(np.maximum(a.max(0), b.max(0))).astype(int) + 1
    if np.any(hi - lo > 4096):
        return 0.0
    shape = (int(hi[1] - lo[1]), int(hi[0] - lo[0]))
    ma, mb = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    cv2.fillPoly(ma, [np.round(a - lo).astype(np.int32)], 1)
    cv2.fillPoly(mb, [np.round(b - lo).astype(np.int32)], 1)
    small = min(int(ma.sum()), int(mb.sum()))
    return float((ma & mb).sum()) / small if small else 0.0


@dataclass
class CheckResult:
    """Polygons in drawing order (None when the image is skipped) and what was found."""

    polygons: list | None
    fixed: list = field(default_factory=list)  # e.g. ["bow_tie:T4", "order"]
    skip_reason: str | None = None


def check_vertebrae(quads: np.ndarray, levels=AASCE_LEVELS) -> CheckResult:
    """Validate (N, 4, 2) corners (TL, TR, BL, BR) of the vertebrae of one image, top to bottom.

    Returns drawing-order polygons with the fixes applied, or the reason to skip the image."""
    quads = np.asarray(quads, dtype=np.float64)
    if quads.ndim != 3 or quads.shape[1:] != (4, 2) or len(quads) != len(levels):
        return CheckResult(None, skip_reason=f"expected {len(levels)} x 4 corners")
    if not np.all(np.isfinite(quads)):
        return CheckResult(None, skip_reason="non-finite landmark")
    fixed = []
    polys = []
    for level, quad in zip(levels, quads):
        poly = _drawing_order(quad)
        if not _is_simple(poly):  # (a bow-tie's shoelace area cancels: fix before measuring)
            hull = _convex_order(quad)
            if hull is None:
                return CheckResult(None, skip_reason=f"bow_tie_ambiguous:{level}")
            poly = hull
            fixed.append(f"bow_tie:{level}")
        sides = np.linalg.norm(poly - np.roll(poly, -1, axis=0), axis=1)
        if sides.min() < MIN_SIDE_PX or _area(poly) < MIN_SIDE_PX**2:
            return CheckResult(None, skip_reason=f"degenerate:{level}")
        polys.append(poly)

    areas = np.array([_area(p) for p in polys])
    med = float(np.median(areas))
    for level, a in zip(levels, areas):
        # Corners taken from different vertebrae make one huge (or tiny) quad: no safe fix.
        if not (MIN_AREA_RATIO * med <= a <= MAX_AREA_RATIO * med):
            return CheckResult(None, skip_reason=f"size_outlier:{level}")

    centres = np.array([p.mean(axis=0) for p in polys])
    if np.any(np.diff(centres[:, 1]) <= 0):
        order = np.argsort(centres[:, 1], kind="stable")
        gaps = np.diff(centres[order, 1])
        if gaps.min() < MIN_SORTED_GAP * np.median(gaps):
            return CheckResult(None, skip_reason="order_ambiguous")
        polys = [polys[i] for i in order]
        fixed.append("order")

    for i in range(len(polys) - 1):
        if _mask_overlap(polys[i], polys[i + 1]) > MAX_OVERLAP:
            return CheckResult(None, skip_reason=f"overlap:{levels[i]}-{levels[i + 1]}")
    run = _disc_run(polys)
    if run is not None:
        return CheckResult(None, skip_reason=f"disc_shift:{levels[run[0]]}-{levels[run[1]]}")
    return CheckResult(polys, fixed=fixed)


def _disc_run(polys):
    """(first, last) vertebra index of the first run of ``MIN_DISC_RUN`` or more gaps each taller
    than both quads beside it, or None; heights from the edge midpoints of polygons drawn TL,
    TR, BR, BL and sorted top to bottom."""
    p = np.asarray(polys)
    top, bottom = (p[:, 0] + p[:, 1]) / 2, (p[:, 2] + p[:, 3]) / 2
    heights = np.linalg.norm(bottom - top, axis=1)
    gaps = np.linalg.norm(top[1:] - bottom[:-1], axis=1)
    tall = gaps > np.maximum(heights[:-1], heights[1:])
    start = None
    for i, t in enumerate(np.append(tall, False)):
        if t and start is None:
            start = i
        elif not t and start is not None:
            if i - start >= MIN_DISC_RUN:
                return start, i  # gaps start..i-1 lie between vertebrae start..i
            start = None
    return None


def _image_size(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise DatasetError(path, f"not a readable image ({e})") from e


def _annotation(ann_id, image_id, poly, level, width, height) -> dict:
    poly = poly.copy()
    poly[:, 0] = np.clip(poly[:, 0], 0, width)
    poly[:, 1] = np.clip(poly[:, 1], 0, height)
    x0, y0 = poly.min(axis=0)
    x1, y1 = poly.max(axis=0)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": CATEGORY["id"],
        "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]],
        "area": round(_area(poly), 2),
        "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
        "iscrowd": 0,
        "attributes": {"level": level},
    }


def _write_json(path: Path, obj) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f)


def convert_aasce(src, out, val_fraction=0.2, seed=0, limit=None, progress=False) -> dict:
    """Convert an AASCE folder (``data/training``, ``labels/training``) into ``out/``:
    ``train.json``, ``val.json``, ``meta.json`` and ``images`` (a symlink to the source images:
    they are never copied or modified). Returns the meta dict."""
    src, out = Path(src), Path(out)
    check_output_folder(out)
    img_dir, lab_dir = src / "data" / "training", src / "labels" / "training"
    if not img_dir.is_dir():
        raise DatasetError(img_dir, "not found (expected the AASCE folder with data/training)")
    if not lab_dir.is_dir():
        raise DatasetError(lab_dir, "not found (expected the AASCE folder with labels/training)")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise DatasetError(out, "output folder is inside the source folder (never written into)")
    names = sorted(p.name for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if limit:
        names = names[:limit]
    if not names:
        raise DatasetError(img_dir, "holds no .jpg images")
    csv_marks = None

    split = patient_split(names, val_fraction, seed)
    coco = {
        s: {"images": [], "annotations": [], "categories": [CATEGORY]} for s in ("train", "val")
    }
    counts: Counter = Counter()
    fixed_log, skipped_log = {}, {}
    ann_id = 1
    it = names
    if progress:
        from tqdm import tqdm

        it = tqdm(names, desc="AASCE", unit="img")
    for image_id, name in enumerate(it, start=1):
        width, height = _image_size(img_dir / name)
        mat = lab_dir / f"{name}.mat"
        if mat.is_file():
            quads = read_landmarks(mat)
        else:
            if csv_marks is None:
                csv_marks = read_landmarks_csv(lab_dir)
            if name not in csv_marks:
                skipped_log[name] = "no_landmarks"
                counts["skipped:no_landmarks"] += 1
                logger.warning("%s: skipped: no landmarks (.mat or CSV row)", img_dir / name)
                continue
            quads = csv_marks[name] * np.array([width, height])
        result = check_vertebrae(quads)
        if result.polygons is None:
            skipped_log[name] = result.skip_reason
            counts["skipped:" + result.skip_reason.split(":")[0]] += 1
            logger.warning("%s: skipped: %s", img_dir / name, result.skip_reason)
            continue
        for fix in result.fixed:
            counts["fixed:" + fix.split(":")[0]] += 1
        if result.fixed:
            fixed_log[name] = result.fixed
            logger.info("%s: fixed %s", img_dir / name, ", ".join(result.fixed))
        part = split[name]
        coco[part]["images"].append(
            {
                "id": image_id,
                "file_name": name,
                "width": width,
                "height": height,
                "patient": patient_key(name),
            }
        )
        for poly, level in zip(result.polygons, AASCE_LEVELS):
            coco[part]["annotations"].append(
                _annotation(ann_id, image_id, poly, level, width, height)
            )
            ann_id += 1

    out.mkdir(parents=True, exist_ok=True)
    link = out / "images"
    if link.is_symlink() or link.exists():
        if not (link.is_symlink() and link.resolve() == img_dir.resolve()):
            raise DatasetError(link, f"exists and is not a link to {img_dir}; remove it first")
    else:
        os.symlink(img_dir.resolve(), link, target_is_directory=True)
    for part in ("train", "val"):
        _write_json(out / f"{part}.json", coco[part])
    patients = {p: sorted({im["patient"] for im in coco[p]["images"]}) for p in ("train", "val")}
    digest = hashlib.sha256(
        json.dumps([coco["train"], coco["val"]], sort_keys=True).encode()
    ).hexdigest()[:12]
    meta = {
        "converter_version": CONVERTER_VERSION,
        "source": str(src.resolve()),
        "seed": seed,
        "val_fraction": val_fraction,
        "patient_key": "number before the film letter ('-162 A AP' -> patient-162); "
        "the '-coronalN' films form one group",
        "digest": digest,
        "counts": {
            "source_images": len(names),
            **{
                p: {
                    "images": len(coco[p]["images"]),
                    "annotations": len(coco[p]["annotations"]),
                    "patients": len(patients[p]),
                }
                for p in ("train", "val")
            },
            "checks": dict(sorted(counts.items())),
        },
        "fixed": fixed_log,
        "skipped": skipped_log,
        "patients": patients,
    }
    _write_json(out / "meta.json", meta)
    return meta
