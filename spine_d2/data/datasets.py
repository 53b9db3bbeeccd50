"""COCO-format spine datasets as Detectron2 catalog entries, validated on load.

Two ways in: ``register_spine_coco(name, json, image_root)`` (from code, or without code through
the config key ``SPINE.COCO_DATASETS``), and the built-in splits, registered when ``spine_d2`` is
imported under ``$DETECTRON2_DATASETS`` (default ``./datasets``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..config import VERTEBRA_LEVELS
from ..errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "register_spine_coco",
    "load_spine_coco",
    "register_builtin",
    "register_from_config",
    "BUILTIN_SPLITS",
]

# Boxes and polygon points may overhang the image by this much (pixels): annotation tools put
# points on the last pixel's outer edge, and rounding adds a little more.
_EDGE_TOLERANCE = 1.0

_DRR_HOW = "make data"
_PARTS_HOW = "make data-parts"
_SMALL_HOW = "make data-small"
_AASCE_HOW = "make data-aasce"
# name -> (json relative to the dataset root, image root relative to it, how to make it[,
# categories kept: the others' annotations are dropped])
BUILTIN_SPLITS = {
    "spine_drr_train": ("spine_drr/train.json", "spine_drr/images", _DRR_HOW),
    "spine_drr_val": ("spine_drr/val.json", "spine_drr/images", _DRR_HOW),
    "spine_drr_test": ("spine_drr/test.json", "spine_drr/images", _DRR_HOW),
    "spine_drr_parts_train": ("spine_drr_parts/train.json", "spine_drr_parts/images", _PARTS_HOW),
    "spine_drr_parts_val": ("spine_drr_parts/val.json", "spine_drr_parts/images", _PARTS_HOW),
    "spine_drr_parts_test": ("spine_drr_parts/test.json", "spine_drr_parts/images", _PARTS_HOW),
    # 24 unseen views (test angle bins) of validation scans alone, to choose operating points on
    "spine_drr_val24": ("spine_drr_val24/val.json", "spine_drr_val24/images", "make data-val24"),
    # --preset small (make demo): its own folder, so the default dataset is never replaced
    "spine_drr_small_train": ("spine_drr_small/train.json", "spine_drr_small/images", _SMALL_HOW),
    "spine_drr_small_val": ("spine_drr_small/val.json", "spine_drr_small/images", _SMALL_HOW),
    "spine_drr_small_test": ("spine_drr_small/test.json", "spine_drr_small/images", _SMALL_HOW),
    # The parts scans with vertebral bodies only: the DRR side of the sim-to-real study (AASCE
    # labels bodies only)
    **{
        f"spine_drr_body_{split}": (
            f"spine_drr_parts/{split}.json",
            "spine_drr_parts/images",
            _PARTS_HOW,
            ("vertebral_body",),
        )
        for split in ("train", "val", "test")
    },
    # Real AP radiographs (datasets/prepare_aasce.py): images/ links to the source, split by patient
    "spine_aasce_train": ("spine_aasce/train.json", "spine_aasce/images", _AASCE_HOW),
    "spine_aasce_val": ("spine_aasce/val.json", "spine_aasce/images", _AASCE_HOW),
}


def _level_of(ann: dict):
    """Level label of an annotation: top-level "level" or COCO-style "attributes": {"level"}."""
    level = ann.get("level")
    if level is None and isinstance(ann.get("attributes"), dict):
        level = ann["attributes"].get("level")
    return level


def polygon_area(xs, ys) -> float:
    """Area of a simple polygon from its x and y coordinates (shoelace)."""
    return 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))


def _polygon_problem(poly, width, height):
    if not isinstance(poly, (list, tuple)):
        return "polygon is not a list of coordinates"
    if len(poly) < 6 or len(poly) % 2:
        return f"polygon has {len(poly)} coordinates (needs an even number >= 6)"
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly):
        return "polygon has non-numeric or non-finite coordinates"
    xs, ys = poly[0::2], poly[1::2]
    if polygon_area(xs, ys) < 1e-6:
        return "polygon is degenerate (zero area)"
    t = _EDGE_TOLERANCE
    if min(xs) < -t or min(ys) < -t or max(xs) > width + t or max(ys) > height + t:
        return f"polygon leaves the {width}x{height} image"
    return None


def _annotation_problem(ann: dict, width: int, height: int, cat_ids) -> str | None:
    if ann.get("category_id") not in cat_ids:
        return f"unknown category_id {ann.get('category_id')!r}"
    bbox = ann.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
        return "bbox must be [x, y, w, h]"
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        return "bbox has non-numeric or non-finite values"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bbox {bbox} has no area"
    t = _EDGE_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"bbox {bbox} leaves the {width}x{height} image"
    seg = ann.get("segmentation")
    if seg is None:
        return None  # boxes only: fine for detection, the mask loss will say so if enabled
    if isinstance(seg, dict):
        size = seg.get("size")
        if (
            "counts" not in seg
            or not isinstance(size, (list, tuple))
            or list(size) != [height, width]
        ):
            return f"RLE size {size} does not match the image ({height}x{width})"
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed: run lengths that tile the image
            runs_ok = all(isinstance(c, int) and c >= 0 for c in counts)
            if not runs_ok or sum(counts) != height * width:
                return f"RLE run lengths do not add up to the {height}x{width} image"
        elif not isinstance(counts, (str, bytes)):
            return "RLE counts must be a string (compressed) or a list of run lengths"
        return None
    if not isinstance(seg, list) or not seg:
        return "segmentation is empty"
    for poly in seg:
        problem = _polygon_problem(poly, width, height)
        if problem:
            return problem
    return None


def _resolve_image(image_root: Path, file_name) -> Path:
    """Join file_name to image_root, refusing names that would read outside it."""
    if not isinstance(file_name, str) or not file_name:
        raise ValueError("has no file_name")
    p = Path(file_name)
    if p.is_absolute() or file_name.startswith(("/", "\\")) or ":" in p.parts[0]:
        raise ValueError(f"file_name '{file_name}' is absolute (must be relative to image_root)")
    if ".." in Path(os.path.normpath(file_name)).parts:
        raise ValueError(f"file_name '{file_name}' escapes image_root")
    return image_root / p


def load_spine_coco(
    json_file, image_root, dataset_name=None, skip_invalid=False, categories=None
) -> list[dict]:
    """Load and validate a COCO instance file into Detectron2 dicts.

    Every bad record raises DatasetError naming the json, the record and the reason; with
    ``skip_invalid`` it is dropped instead and the counts per reason are logged. Annotations keep
    their ``level`` (e.g. "T12") and ``truncated`` attributes. ``categories`` (names) keeps only
    those classes, numbered in the json's id order; the other annotations are dropped.
    """
    json_file, image_root = Path(json_file), Path(image_root)
    if not json_file.is_file():
        raise DatasetError(json_file, "annotation file not found")
    try:
        with open(json_file, encoding="utf-8") as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(json_file, f"not valid JSON ({e})") from e
    if not isinstance(coco, dict) or not all(k in coco for k in ("images", "categories")):
        raise DatasetError(json_file, "not a COCO instances file (needs 'images' and 'categories')")
    if not coco["categories"]:
        raise DatasetError(json_file, "has no categories")
    for key in ("images", "categories", "annotations"):
        entries = coco.get(key, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise DatasetError(json_file, f"'{key}' must be a list of objects")
    for c in coco["categories"]:
        if not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DatasetError(json_file, f"category {c} needs an integer 'id' and a 'name'")
    if len({c["id"] for c in coco["categories"]}) != len(coco["categories"]):
        raise DatasetError(json_file, "two categories share an id")

    cats = sorted(coco["categories"], key=lambda c: c["id"])
    dropped_ids = set()
    if categories is not None:
        missing = set(categories) - {c["name"] for c in cats}
        if missing:
            raise DatasetError(
                json_file,
                f"has no categor{'y' if len(missing) == 1 else 'ies'} "
                f"{', '.join(sorted(missing))}",
            )
        dropped_ids = {c["id"] for c in cats if c["name"] not in categories}
        cats = [c for c in cats if c["name"] in categories]
    id_map = {c["id"]: i for i, c in enumerate(cats)}
    skipped: Counter = Counter()

    def bad(record: str, reason: str):
        if not skip_invalid:
            raise DatasetError(json_file, f"{record}: {reason}")
        skipped[reason.split(" (")[0] if "(" in reason else reason] += 1

    images = {}
    for img in coco["images"]:
        label = f"image id={img.get('id')} '{img.get('file_name')}'"
        try:
            path = _resolve_image(image_root, img.get("file_name"))
        except ValueError as e:
            bad(label, str(e))
            continue
        w, h = img.get("width"), img.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            bad(label, f"invalid width/height {w}x{h}")
            continue
        if img.get("id") in images:
            bad(label, "duplicate image id")
            continue
        if not path.is_file():
            bad(label, f"image file not found under {image_root}")
            continue
        images[img["id"]] = {
            "file_name": str(path),
            "height": h,
            "width": w,
            "image_id": img["id"],
            "annotations": [],
        }

    levels_seen = set()
    for ann in coco.get("annotations", []):
        label = f"annotation id={ann.get('id')} (image id={ann.get('image_id')})"
        rec = images.get(ann.get("image_id"))
        if rec is None:
            if not any(img.get("id") == ann.get("image_id") for img in coco["images"]):
                bad(label, "refers to an unknown image id")
            continue  # its image was skipped above: its annotations go with it
        if ann.get("category_id") in dropped_ids:
            continue
        problem = _annotation_problem(ann, rec["width"], rec["height"], id_map)
        if problem:
            bad(label, problem)
            continue
        obj = {
            "id": ann.get("id"),
            "bbox": list(ann["bbox"]),
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": id_map[ann["category_id"]],
            "iscrowd": int(ann.get("iscrowd", 0)),
        }
        if ann.get("segmentation") is not None:
            obj["segmentation"] = ann["segmentation"]
        level = _level_of(ann)
        if level is not None:
            obj["level"] = str(level)
            levels_seen.add(str(level))
        truncated = ann.get("truncated", (ann.get("attributes") or {}).get("truncated"))
        if truncated is not None:
            obj["truncated"] = bool(truncated)
        rec["annotations"].append(obj)

    if skipped:
        logger.warning(
            "%s: skipped invalid records: %s",
            json_file,
            ", ".join(f"{n} x {reason}" for reason, n in skipped.most_common()),
        )
    records = list(images.values())
    logger.info(
        "Loaded %d images, %d annotations from %s",
        len(records),
        sum(len(r["annotations"]) for r in records),
        json_file,
    )

    if dataset_name is not None:
        meta = MetadataCatalog.get(dataset_name)
        meta.set(
            thing_classes=[c["name"] for c in cats],
            thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(cats)},
        )
        if not hasattr(meta, "vertebra_levels"):  # given at registration when known up front
            order = {lvl: i for i, lvl in enumerate(VERTEBRA_LEVELS)}
            meta.vertebra_levels = sorted(levels_seen, key=lambda l: (order.get(l, len(order)), l))
        if skipped and hasattr(meta, "json_file"):
            # COCOEvaluator would score against the unfiltered json; let it convert these dicts.
            del meta.json_file
    return records


def _same_registration(name, json_file, image_root, categories=None) -> bool:
    if name not in DatasetCatalog.list():
        return False
    meta = MetadataCatalog.get(name)
    return getattr(meta, "_spine_source", None) == (str(json_file), str(image_root), categories)


def register_spine_coco(
    name, json_file, image_root, metadata=None, skip_invalid=False, categories=None
):
    """Register a COCO instance-segmentation dataset. Safe to call twice with the same arguments;
    a different source under the same name replaces the earlier one (with a warning).
    ``categories``: keep only these class names (see ``load_spine_coco``)."""
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    categories = tuple(categories) if categories is not None else None
    if _same_registration(name, json_file, image_root, categories):
        return
    if name in DatasetCatalog.list():
        logger.warning("Dataset '%s' was registered before; replacing it with %s", name, json_file)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(
        name,
        lambda: load_spine_coco(
            json_file, image_root, name, skip_invalid=skip_invalid, categories=categories
        ),
    )
    meta = {"evaluator_type": "spine_coco", **(metadata or {})}
    if categories is None:  # filtered: COCOEvaluator converts the loaded dicts instead
        meta["json_file"] = json_file
    else:
        meta["thing_classes"] = list(categories)
    MetadataCatalog.get(name).set(image_root=image_root, **meta)
    MetadataCatalog.get(name)._spine_source = (json_file, image_root, categories)


def _missing_builtin(name, json_file, how):
    def load():
        raise DatasetError(json_file, f"built-in dataset '{name}' is not there yet: run `{how}`")

    return load


def register_builtin(root=None):
    """Register the built-in splits under ``root`` (default ``$DETECTRON2_DATASETS`` or
    ``datasets``). Splits not generated yet are still registered, so that using one gives an
    error that says which command makes it instead of "dataset not registered"."""
    root = Path(root or os.environ.get("DETECTRON2_DATASETS", "datasets"))
    _warn_if_stale_aasce(root / "spine_aasce" / "meta.json")
    for name, (json_rel, images_rel, how, *cats) in BUILTIN_SPLITS.items():
        json_file, image_root = root / json_rel, root / images_rel
        if json_file.is_file():
            register_spine_coco(name, json_file, image_root, categories=cats[0] if cats else None)
        else:
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
            DatasetCatalog.register(name, _missing_builtin(name, json_file, how))
            MetadataCatalog.get(name).set(evaluator_type="spine_coco", thing_classes=["vertebra"])


def _warn_if_stale_aasce(meta_file: Path) -> None:
    """An older conversion still loads, but lacks the newer label checks: say so, once per
    registration, rather than silently train or score on films a newer converter skips."""
    if not meta_file.is_file():
        return
    from .aasce import CONVERTER_VERSION  # here: aasce imports this module

    try:
        version = json.loads(meta_file.read_text(encoding="utf-8")).get("converter_version")
    except (OSError, ValueError, AttributeError):
        version = "unreadable"
    if version == CONVERTER_VERSION:
        return
    # A newer converter's output: re-converting here would drop its checks, not add them.
    fix = (
        "update spine-d2"
        if _version_key(version) > _version_key(CONVERTER_VERSION)
        else "run `make data-aasce` again"
    )
    logger.warning(
        "%s: written by AASCE converter %s, this is %s: %s",
        meta_file,
        version,
        CONVERTER_VERSION,
        fix,
    )


def _version_key(version) -> tuple:
    """'1.10' > '1.9'; anything unparsable sorts first (treated as old)."""
    try:
        return tuple(int(part) for part in str(version).split("."))
    except ValueError:
        return ()


def register_from_config(cfg):
    """Register the datasets listed in ``SPINE.COCO_DATASETS`` ([[name, json, image_root], ...])."""
    for entry in cfg.SPINE.COCO_DATASETS:
        if len(entry) != 3:
            raise DatasetError(
                "SPINE.COCO_DATASETS", f"entry {list(entry)} must be [name, json_file, image_root]"
            )
        register_spine_coco(*entry, skip_invalid=cfg.SPINE.SKIP_INVALID_ANNOTATIONS)
