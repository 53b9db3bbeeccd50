"""labelme JSON polygons <-> COCO instances, with the label-to-class mapping in a small YAML.

labelme (https://github.com/wkentaro/labelme) writes one JSON per image: ``imagePath`` (relative
to the JSON), ``imageHeight``/``imageWidth`` and ``shapes`` (``label``, ``points``,
``shape_type``, ``group_id``). Shapes sharing a ``group_id`` and label are one instance (a
vertebra drawn in two pieces). The mapping file::

    categories: [vertebral_body, pedicle, transverse_process, spinous_process]  # COCO ids 1..N
    labels:                   # labelme label -> category
      body: vertebral_body
      pedicle: pedicle
    # optional: labels such as "body T4" or "T4" carry the level
    level_pattern: '^(?:(?P<label>.+?)[ _:-])?(?P<level>[CTLS][0-9]{1,2})$'
    default_category: vertebral_body   # for a bare level ("T4")
    ignore: [ruler, marker]   # labels dropped without complaint

The COCO file is validated like ``register_spine_coco`` before it replaces anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from ..atomic import atomic_path, write_atomic
from ..errors import DatasetError, check_output_folder
from .datasets import _polygon_problem, load_spine_coco, polygon_area

logger = logging.getLogger(__name__)

__all__ = ["LabelMapping", "coco_to_labelme", "labelme_to_coco", "load_mapping"]

_REGION_SHAPES = ("polygon", "rectangle")


class LabelMapping:
    """labelme label -> (category name, level or None); None for an ignored label."""

    def __init__(self, categories, labels, level_pattern=None, default_category=None, ignore=()):
        self.categories = list(categories)
        if not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError("categories must be a non-empty list of distinct names")
        self.labels = dict(labels or {})
        for label, cat in self.labels.items():
            if cat not in self.categories:
                raise ValueError(f"label '{label}' maps to '{cat}', which is not in categories")
        if default_category is not None and default_category not in self.categories:
            raise ValueError(f"default_category '{default_category}' is not in categories")
        self.default_category = default_category
        self.level_pattern = re.compile(level_pattern) if level_pattern else None
        self.ignore = set(ignore or ())

    def __call__(self, label: str):
        if label in self.ignore:
            return None
        if label in self.labels:
            return self.labels[label], None
        if self.level_pattern is not None:
            m = self.level_pattern.match(label)
            if m:
                base = m.groupdict().get("label")
                if base is None and self.default_category is not None:
                    return self.default_category, m.group("level")
                if base in self.labels:
                    return self.labels[base], m.group("level")
        raise KeyError(label)


def load_mapping(path) -> LabelMapping:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "mapping file not found")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(doc, dict) or "categories" not in doc:
        raise DatasetError(path, "needs a 'categories' list (and 'labels')")
    unknown = set(doc) - {"categories", "labels", "level_pattern", "default_category", "ignore"}
    if unknown:
        raise DatasetError(path, f"unknown keys {sorted(unknown)}")
    try:
        return LabelMapping(
            doc["categories"],
            doc.get("labels"),
            doc.get("level_pattern"),
            doc.get("default_category"),
            doc.get("ignore"),
        )
    except (ValueError, re.error) as e:
        raise DatasetError(path, str(e)) from e


def _shape_polygon(shape: dict, where: str) -> np.ndarray:
    try:
        pts = np.asarray(shape.get("points") or [], dtype=np.float64)
    except (TypeError, ValueError):  # a coordinate that is not a number, or ragged pairs
        pts = np.zeros((0,))
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise DatasetError(where, f"shape '{shape.get('label')}' has malformed points")
    if shape.get("shape_type", "polygon") == "rectangle":
        if len(pts) != 2:
            raise DatasetError(where, f"rectangle '{shape.get('label')}' needs 2 points")
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    if len(pts) < 3:
        raise DatasetError(where, f"polygon '{shape.get('label')}' has {len(pts)} points (needs 3)")
    if not np.all(np.isfinite(pts)):
        raise DatasetError(where, f"polygon '{shape.get('label')}' has non-finite points")
    return pts


def _area(pts: np.ndarray) -> float:
    return float(polygon_area(pts[:, 0], pts[:, 1]))


def labelme_to_coco(src, mapping: LabelMapping, out_json, image_root=None) -> dict:
    """Convert every labelme ``*.json`` under ``src`` (recursive, sorted) into one COCO file.

    ``file_name`` is relative to ``image_root`` (default ``src``). Raises DatasetError naming the
    labelme file on a bad shape, unknown label, wrong image size or missing image; nothing is
    written then. Returns counts."""
    from PIL import Image

    src = Path(src)
    image_root = Path(image_root) if image_root else src
    out_json = Path(out_json)
    if not src.is_dir():
        raise DatasetError(src, "not a folder")
    files = sorted(
        p
        for p in src.rglob("*.json")
        # hidden files are not annotations: macOS's "._scan.json" resource forks on shared
        # drives, editors' and our own temporary files, .git; the export's folder walk skips
        # them alike
        if not any(part.startswith(".") for part in p.relative_to(src).parts)
        and p.resolve() != out_json.resolve()
    )
    cat_ids = {name: i + 1 for i, name in enumerate(mapping.categories)}
    images, annotations = [], []
    counts: Counter = Counter()
    for path in files:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(path, f"not valid JSON ({e})") from e
        if not isinstance(doc, dict) or "shapes" not in doc or "imagePath" not in doc:
            counts["not_labelme"] += 1  # some other JSON in the tree (e.g. a COCO file)
            continue
        img_path = (path.parent / doc["imagePath"]).resolve()
        if not img_path.is_file():
            raise DatasetError(path, f"its image {doc['imagePath']} is not there")
        try:
            rel = img_path.relative_to(image_root.resolve())
        except ValueError:
            raise DatasetError(path, f"its image {img_path} is outside {image_root}") from None
        with Image.open(img_path) as im:
            width, height = im.size
        dw, dh = doc.get("imageWidth"), doc.get("imageHeight")
        if (dw, dh) != (None, None) and (dw, dh) != (width, height):
            raise DatasetError(path, f"says {dw}x{dh} but {rel} is {width}x{height}")
        image_id = len(images) + 1
        images.append(
            {"id": image_id, "file_name": rel.as_posix(), "width": width, "height": height}
        )
        instances: dict = {}
        for k, shape in enumerate(doc["shapes"]):
            label = str(shape.get("label", ""))
            kind = shape.get("shape_type") or "polygon"
            if kind not in _REGION_SHAPES:
                counts[f"skipped_{kind}"] += 1  # points, lines, circles are not regions
                continue
            try:
                target = mapping(label)
            except KeyError:
                raise DatasetError(
                    path, f"label '{label}' is not in the mapping (add it to labels: or ignore:)"
                ) from None
            if target is None:
                counts["ignored"] += 1
                continue
            pts = _shape_polygon(shape, str(path))
            problem = _polygon_problem(pts.reshape(-1).tolist(), width, height)
            if problem:  # the loader's own check, here to name the labelme file and shape
                raise DatasetError(path, f"shape '{label}': {problem}")
            group = shape.get("group_id")
            key = (label, group) if group is not None else (label, f"shape{k}")
            instances.setdefault(key, (target, []))[1].append(pts)
        for (label, _), ((category, level), polys) in instances.items():
            allpts = np.concatenate(polys)
            x0, y0 = np.clip(allpts.min(0), 0, [width, height])
            x1, y1 = np.clip(allpts.max(0), 0, [width, height])
            ann = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cat_ids[category],
                "segmentation": [[round(float(v), 2) for v in p.reshape(-1)] for p in polys],
                "area": round(sum(_area(p) for p in polys), 2),
                "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                "iscrowd": 0,
                "attributes": {"labelme_label": label},
            }
            if level is not None:
                ann["attributes"]["level"] = level
            annotations.append(ann)
            counts["annotations"] += 1
    if not images:
        raise DatasetError(src, "holds no labelme JSON files")
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "spine"} for n, i in cat_ids.items()],
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps(coco), encoding="utf-8")
        load_spine_coco(tmp, image_root)  # the checks every registered dataset gets
    counts["images"] = len(images)
    logger.info("labelme -> %s: %s", out_json, dict(counts))
    return dict(counts)


def coco_to_labelme(coco_json, image_root, out_dir) -> int:
    """Write one labelme JSON per image of a COCO file (polygon segmentations), e.g. to correct
    labels or predictions in labelme. ``imagePath`` points at the image under ``image_root``;
    the level, when known, is appended to the label ("vertebral_body T4"). Returns files written."""
    coco_json, image_root, out_dir = Path(coco_json), Path(image_root), Path(out_dir)
    check_output_folder(out_dir)
    if not coco_json.is_file():
        raise DatasetError(coco_json, "annotation file not found")
    try:
        coco = json.loads(coco_json.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(coco_json, f"not valid JSON ({e})") from e
    if not isinstance(coco, dict) or not all(k in coco for k in ("images", "categories")):
        raise DatasetError(coco_json, "not a COCO instances file (needs 'images' and 'categories')")
    names = {c["id"]: c["name"] for c in coco["categories"]}
    by_image: dict = {}
    for ann in coco.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    written = 0
    for img in coco["images"]:
        target = out_dir / Path(img["file_name"]).with_suffix(".json")
        target.parent.mkdir(parents=True, exist_ok=True)
        shapes = []
        for ann in by_image.get(img["id"], []):
            seg = ann.get("segmentation")
            if not isinstance(seg, list):
                continue  # RLE masks have no polygon to draw
            label = names[ann["category_id"]]
            level = (ann.get("attributes") or {}).get("level", ann.get("level"))
            if level:
                label = f"{label} {level}"
            group = ann["id"] if len(seg) > 1 else None
            for poly in seg:
                pts = np.asarray(poly, dtype=float).reshape(-1, 2).tolist()
                shapes.append(
                    {
                        "label": label,
                        "points": pts,
                        "group_id": group,
                        "shape_type": "polygon",
                        "flags": {},
                    }
                )
        image_path = os.path.relpath((image_root / img["file_name"]).resolve(), target.parent)
        doc = {
            "version": "5.2.1",
            "flags": {},
            "shapes": shapes,
            "imagePath": image_path,
            "imageData": None,
            "imageHeight": img["height"],
            "imageWidth": img["width"],
        }
        write_atomic(target, json.dumps(doc, indent=1))
        written += 1
    return written
