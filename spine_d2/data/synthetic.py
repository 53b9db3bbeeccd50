"""Small synthetic spine scans with exact COCO labels, for tests and smoke runs.

Not a substitute for the built-in DRR dataset (real CT anatomy): these are rounded vertebral
bodies along a curved column on a smooth soft-tissue background, enough for a model to learn
something in a few iterations and for every code path to see real images, masks and levels.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np

from ..atomic import write_atomic
from ..config import VERTEBRA_LEVELS
from .io import write_image

__all__ = ["make_synthetic_spine_dataset", "registered_synthetic_dataset", "vertebra_polygon"]


def vertebra_polygon(cx, cy, w, h, angle_deg, corner=0.25, n_arc=4) -> np.ndarray:
    """Rounded-rectangle outline (K x 2, float) of a vertebral body, rotated about its centre."""
    r = corner * min(w, h)
    pts = []
    for sx, sy, a0 in ((1, 1, 0), (-1, 1, 90), (-1, -1, 180), (1, -1, 270)):
        ccx, ccy = sx * (w / 2 - r), sy * (h / 2 - r)
        for t in np.linspace(a0, a0 + 90, n_arc):
            pts.append((ccx + r * np.cos(np.radians(t)), ccy + r * np.sin(np.radians(t))))
    pts = np.asarray(pts)
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    rot = pts @ np.array([[c, s], [-s, c]])
    return rot + np.array([cx, cy])


def _render(rng, size, n_vert):
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    body_cx = w * rng.uniform(0.4, 0.6)
    img = 0.25 + 0.15 * np.exp(-(((xx - body_cx) / (0.35 * w)) ** 2))  # soft tissue
    img += 0.05 * np.sin(yy / h * rng.uniform(2, 5) + rng.uniform(0, 6))
    top = h * rng.uniform(0.08, 0.15)
    pitch = (h * 0.8) / n_vert
    curve_amp, curve_phase = w * rng.uniform(0.0, 0.08), rng.uniform(0, np.pi)
    polys = []
    for i in range(n_vert):
        cy = top + pitch * (i + 0.5)
        cx = body_cx + curve_amp * np.sin(np.pi * cy / h + curve_phase)
        slope = curve_amp * np.pi / h * np.cos(np.pi * cy / h + curve_phase)
        angle = -np.degrees(np.arctan(slope)) + rng.uniform(-4, 4)
        vw, vh = pitch * rng.uniform(1.1, 1.4), pitch * rng.uniform(0.6, 0.72)
        poly = vertebra_polygon(cx, cy, vw, vh, angle)
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
        rim = mask - cv2.erode(mask, np.ones((3, 3), np.uint8))
        img += mask * rng.uniform(0.3, 0.4) + rim * 0.15  # cancellous body + cortical rim
        polys.append(poly)
    img = cv2.GaussianBlur(img, (0, 0), 0.7)
    img += rng.normal(0, 0.01, img.shape).astype(np.float32)
    return np.clip(img, 0, 1), polys


def make_synthetic_spine_dataset(
    root, num_images=4, size=128, vertebrae=(4, 6), seed=0, bit_depth=16, split="train"
):
    """Write ``root/images/<split>_XXX.png`` and ``root/<split>.json``; return (json, image_root).

    Each instance carries category "vertebra" and a ``level`` attribute (consecutive levels from
    a random start), so level-aware code paths are exercised too.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num_images):
        n = int(rng.integers(vertebrae[0], vertebrae[1] + 1))
        img, polys = _render(rng, size, n)
        name = f"{split}_{i:03d}.png"
        scale = 65535 if bit_depth == 16 else 255
        dtype = np.uint16 if bit_depth == 16 else np.uint8
        write_image(root / "images" / name, np.round(img * scale).astype(dtype))
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        first = int(rng.integers(VERTEBRA_LEVELS.index("T1"), len(VERTEBRA_LEVELS) - n))
        for j, poly in enumerate(polys):
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            area = 0.5 * abs(
                np.dot(poly[:, 0], np.roll(poly[:, 1], 1))
                - np.dot(poly[:, 1], np.roll(poly[:, 0], 1))
            )
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "segmentation": [np.round(poly, 2).ravel().tolist()],
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": float(area),
                    "iscrowd": 0,
                    "level": VERTEBRA_LEVELS[first + j],
                }
            )
    coco = {
        "info": {"description": f"spine-d2 synthetic spine scans (seed {seed})"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "vertebra", "supercategory": "spine"}],
    }
    json_file = root / f"{split}.json"
    write_atomic(json_file, json.dumps(coco))
    return str(json_file), str(root / "images")


@contextlib.contextmanager
def registered_synthetic_dataset(name, root=None, **kwargs):
    """Write a synthetic dataset, register it as ``name`` and unregister it on exit."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from .datasets import register_spine_coco

    with contextlib.ExitStack() as stack:
        if root is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="spine_synth_"))
        json_file, image_root = make_synthetic_spine_dataset(root, **kwargs)
        register_spine_coco(name, json_file, image_root)
        try:
            yield name
        finally:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
