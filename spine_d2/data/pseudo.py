"""Pseudo-labels for the vertebrae just outside a dataset's annotated range: C7 above T1, S1
below L5 on the AASCE films.

Why: full-spine AP films show C7 and S1 but AASCE annotates T1..L5 only, so a model fine-tuned
on them learns that C7 and S1 are background and has no name for them. When it finds one anyway
(it looks like any vertebral body), the level branch calls it T1 (or L5) and every level of the
film slides by one: the largest share of the real-data level errors (docs/results-aasce.md,
"Naming C7 and S1"). A model's own detections just above the top annotated body and just below the
bottom one, one spacing away along the spine and overlapping no annotation, are those
vertebrae. Added under the next level's name and flagged ``pseudo``, they teach the detector
that C7 and S1 are vertebral bodies and the level branch what to call them; at inference
``SPINE.LEVEL_HEAD.OUTPUT_RANGE`` leaves them out of the output when only T1..L5 are wanted.
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.structures import BoxMode

from ..config import VERTEBRA_LEVELS
from ..errors import DatasetError
from ..evaluation.vertebra import _annotation_rle
from .datasets import _level_of

__all__ = ["label_end_vertebrae"]


def _centre(bbox) -> np.ndarray:
    x, y, w, h = (float(v) for v in bbox)
    return np.array([x + w / 2, y + h / 2])


def _is_detection(det) -> bool:
    if not isinstance(det, dict) or not {"image_id", "category_id", "score"} <= set(det):
        return False
    bbox, segm = det.get("bbox"), det.get("segmentation")
    try:
        float(det["score"])
        ok_box = len(bbox) == 4 and all(np.isfinite(float(v)) for v in bbox)
    except (TypeError, ValueError):
        return False
    return ok_box and isinstance(segm, dict) and {"size", "counts"} <= set(segm)


def _annotation_rles(anns, height, width):
    """Raw COCO annotations (XYWH boxes) as RLEs, as the evaluator reads ground truth; the box
    stands in for an empty or unknown segmentation."""
    rles = []
    for a in anns:
        segm = a.get("segmentation")
        segm = segm if isinstance(segm, (list, dict)) and segm else None
        rles.append(
            _annotation_rle(dict(a, segmentation=segm, bbox_mode=BoxMode.XYWH_ABS), height, width)
        )
    return rles


def _polygon(rle) -> list:
    """The outline of a detection's mask (its largest part) as one COCO polygon, [] if none."""
    mask = np.ascontiguousarray(mask_util.decode(rle))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return []
    outline = cv2.approxPolyDP(max(contours, key=cv2.contourArea), 1.0, True).reshape(-1, 2)
    return outline.astype(float).flatten().tolist() if len(outline) >= 3 else []


def _pick(candidates, anchor, inward, step, max_steps, max_across):
    """The detection nearest ``anchor`` on the far side from ``inward`` (the next annotated
    body), between half a spacing and ``max_steps`` spacings away, near the spine's line."""
    axis = (anchor - inward) / np.linalg.norm(anchor - inward)  # out of the annotated range
    best = None
    for det, centre in candidates:
        offset = centre - anchor
        along = float(offset @ axis) / step
        across = abs(float(offset[0] * axis[1] - offset[1] * axis[0])) / step
        if 0.5 < along < max_steps and across < max_across and (best is None or along < best[0]):
            best = (along, det)
    return None if best is None else best[1]


def label_end_vertebrae(
    coco: dict,
    detections: list,
    levels=VERTEBRA_LEVELS,
    min_score: float = 0.2,
    max_steps: float = 1.6,
    max_across: float = 0.75,
    max_iou: float = 0.2,
    source: str = "detections",
    coco_source: str = "dataset",
) -> tuple:
    """A copy of ``coco`` with one pseudo-labelled vertebra added per film and end where the
    detections hold one, and the counts by level.

    Args:
        coco: a COCO instance dataset whose annotations carry levels (``attributes.level``).
        detections: COCO results (``coco_instances_results.json`` of an evaluation on that
            dataset): ``image_id``, ``category_id``, ``bbox``, ``score``, ``segmentation`` (RLE
            at the film's size).
        levels: all level names, top to bottom; the level above the film's top annotated one
            and the one below its bottom one are what the pseudo-labels are called.
        min_score: detections under this score are not considered.
        max_steps, max_across: how far beyond the end body (along the spine) and off the
            spine's line (across), in spacings of the two end bodies, a candidate may lie.
        max_iou: a candidate overlapping any annotation by more mask IoU is not a new vertebra.
        source, coco_source: what ``detections`` and ``coco`` came from, for error messages.
    """
    levels = list(levels)
    rank = {name: i for i, name in enumerate(levels)}
    images = {}
    for k, img in enumerate(coco.get("images", [])):
        try:
            images[img["id"]] = img
            if int(img["height"]) <= 0 or int(img["width"]) <= 0:
                raise ValueError("size")
        except (TypeError, KeyError, ValueError):
            raise DatasetError(
                coco_source, f"image {k} needs an id and a positive height and width"
            )
    anns_by_image = defaultdict(list)
    for k, ann in enumerate(coco.get("annotations", [])):
        if not isinstance(ann, dict) or not {"id", "image_id", "category_id", "bbox"} <= set(ann):
            raise DatasetError(
                coco_source, f"annotation {k} needs id, image_id, category_id and bbox"
            )
        anns_by_image[ann["image_id"]].append(ann)
    dets_by_image = defaultdict(list)
    for k, det in enumerate(detections):
        if not _is_detection(det):
            raise DatasetError(
                source,
                f"detection {k} is not a COCO result with image_id, category_id, score, a "
                "4-number bbox and an RLE segmentation (size, counts)",
            )
        if det["image_id"] in images and float(det["score"]) >= min_score:
            dets_by_image[det["image_id"]].append(det)

    out = copy.deepcopy(coco)
    next_id = max((a["id"] for a in coco.get("annotations", [])), default=0) + 1
    counts = Counter()
    for image_id, img in images.items():
        ranked = sorted(
            (
                (rank[str(_level_of(a))], a)
                for a in anns_by_image[image_id]
                if not a.get("iscrowd", 0) and str(_level_of(a)) in rank
            ),
            key=lambda pair: pair[0],
        )
        dets = dets_by_image.get(image_id)
        if len(ranked) < 2 or not dets:
            continue
        h, w = int(img["height"]), int(img["width"])
        for det in dets:
            if tuple(det["segmentation"].get("size", ())) != (h, w):
                raise DatasetError(
                    source,
                    f"image {image_id}: detection mask is {det['segmentation'].get('size')}, "
                    f"the film is {[h, w]}",
                )
        gt_rles = _annotation_rles([a for _, a in ranked], h, w)
        ious = np.asarray(mask_util.iou([d["segmentation"] for d in dets], gt_rles,
                                        [0] * len(gt_rles)))  # fmt: skip
        free = [(d, _centre(d["bbox"])) for d, row in zip(dets, ious) if row.max() <= max_iou]
        ends = (
            (ranked[0], ranked[1], ranked[0][0] - 1),  # above the top one
            (ranked[-1], ranked[-2], ranked[-1][0] + 1),  # below the bottom one
        )
        for (end_rank, end), (inner_rank, inner), new_rank in ends:
            if not 0 <= new_rank < len(levels) or end_rank == inner_rank:
                continue
            anchor, inward = _centre(end["bbox"]), _centre(inner["bbox"])
            # one spacing: the next annotated body may lie levels away (one missing between)
            step = float(np.linalg.norm(anchor - inward)) / abs(end_rank - inner_rank)
            if step <= 0:
                continue
            same_class = [(d, c) for d, c in free if d["category_id"] == end["category_id"]]
            det = _pick(same_class, anchor, inward, step, max_steps, max_across)
            poly = _polygon(det["segmentation"]) if det is not None else []
            if not poly:
                continue
            xs, ys = poly[0::2], poly[1::2]
            pts = np.array([xs, ys], dtype=np.float32).T
            out["annotations"].append(
                {
                    "id": next_id,
                    "image_id": image_id,
                    "category_id": end["category_id"],
                    "segmentation": [poly],
                    "area": float(cv2.contourArea(pts)),
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                    "iscrowd": 0,
                    "attributes": {"level": levels[new_rank], "pseudo": True},
                }
            )
            next_id += 1
            counts[levels[new_rank]] += 1
            free = [(d, c) for d, c in free if d is not det]
    return out, dict(sorted(counts.items(), key=lambda kv: rank[kv[0]]))
