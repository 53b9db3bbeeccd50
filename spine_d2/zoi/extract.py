"""One scan's predictions -> ZOIs cut from its *unprocessed* pixels, at the original resolution.

The model sees a resized float view of the scan; a ZOI must carry the pixels as acquired (the
paper cross-references the mask on the unprocessed image). Predictions are scaled back exactly
as detectron2's ``detector_postprocess`` does (same scale, clip, empty-box filter, bilinear
``grid_sample`` paste, threshold 0.5), so masks equal detectron2's bit for bit, but each mask is
pasted only inside its own box: no N x H x W full-size masks, whose allocation and later
conversion dominate on large scans. The full-image RLE is built from the box-local mask.
"""

from __future__ import annotations

import io
import math
import struct
import time
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F

from .order import assign_levels, order_along_spine, spacing_ratios

__all__ = [
    "ScanPredictions",
    "chain_repeats",
    "level_conflicts",
    "level_margin",
    "levels_uncertain",
    "uncertain_levels",
    "scale_to_original",
    "paste_mask_local",
    "rle_from_local",
    "encode_png",
    "extract_zois",
]


@dataclass
class ScanPredictions:
    """Predictions of one scan in original pixels; masks still as the head's M x M probabilities."""

    boxes: torch.Tensor  # N x 4 float32, XYXY in original (continuous) pixel coordinates
    scores: torch.Tensor  # N
    classes: torch.Tensor  # N int64
    mask_probs: torch.Tensor  # N x M x M float32
    levels: list | None = None  # per instance, when the model predicts levels
    # the level decoder's margin for the scan (``modeling.levels.shift_margin``), when known
    level_margin: float | None = None

    def __len__(self):
        return len(self.scores)


def scale_to_original(
    instances, height: int, width: int, score_thresh: float = 0.0, levels=None, rescued=True
):
    """Raw network outputs (``inference(..., do_postprocess=False)``, at the resized size) ->
    ScanPredictions at ``height`` x ``width``, as ``detector_postprocess`` maps them.
    ``rescued``: also keep detections under ``score_thresh`` that the chain rescue accepted."""
    instances = instances.to("cpu")
    scale_x = width / instances.image_size[1]
    scale_y = height / instances.image_size[0]
    boxes = instances.pred_boxes.clone()
    boxes.scale(scale_x, scale_y)
    boxes.clip((height, width))
    confident = instances.scores >= score_thresh
    if rescued and instances.has("pred_rescued"):  # under the cut, accepted by the rescue
        confident = confident | instances.pred_rescued
    keep = boxes.nonempty() & confident
    idx = keep.nonzero().flatten().tolist()
    return ScanPredictions(
        boxes=boxes.tensor[keep].float(),
        scores=instances.scores[keep],
        classes=instances.pred_classes[keep],
        mask_probs=instances.pred_masks[keep][:, 0].float(),
        levels=None if levels is None else [levels[i] for i in idx],
        level_margin=level_margin(instances),
    )


def level_margin(instances) -> float | None:
    """The scan's ``level_margin`` (one value kept on every instance); None without a chain
    the decoder named (no level head, or fewer than two confident detections) and when no
    shift fits (infinite: never uncertain, and strict JSON has no infinity)."""
    if not len(instances) or not instances.has("level_margin"):
        return None
    margin = float(instances.level_margin[0])
    return margin if math.isfinite(margin) else None


def levels_uncertain(margin, threshold: float) -> bool:
    """Whether a scan's names are not sure: ``margin`` (``level_margin``) under ``threshold``
    (ZOI.LEVEL_MARGIN; 0: never)."""
    return threshold > 0 and margin is not None and margin < threshold


def uncertain_levels(entries, margin, threshold: float) -> list:
    """The manifest's ``level_conflicts`` entry of a scan whose names are not sure
    (:func:`levels_uncertain`): ``{"reason": "uncertain", "ids": the named ZOIs, "level": the
    first name}``."""
    named = [e for e in entries if e["level"] is not None]
    if not named or not levels_uncertain(margin, threshold):
        return []
    return [{"reason": "uncertain", "ids": [e["id"] for e in named], "level": named[0]["level"]}]


def paste_mask_local(prob: torch.Tensor, box, height: int, width: int, threshold: float = 0.5):
    """Paste one M x M mask into its box: (y0, x0, bool mask of the region), the region being the
    box rounded out by one pixel as detectron2's paste does, so the result equals its paste."""
    x0, y0, x1, y1 = (float(v) for v in box)
    xa = max(int(math.floor(x0)) - 1, 0)
    ya = max(int(math.floor(y0)) - 1, 0)
    xb = min(int(math.ceil(x1)) + 1, width)
    yb = min(int(math.ceil(y1)) + 1, height)
    # float32 arithmetic in detectron2's order, for identical sampling positions
    box_t = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
    gx = (torch.arange(xa, xb, dtype=torch.float32) + 0.5 - box_t[0]) / (
        box_t[2] - box_t[0]
    ) * 2 - 1
    gy = (torch.arange(ya, yb, dtype=torch.float32) + 0.5 - box_t[1]) / (
        box_t[3] - box_t[1]
    ) * 2 - 1
    grid = torch.stack(
        [gx[None, :].expand(len(gy), len(gx)), gy[:, None].expand(len(gy), len(gx))], dim=2
    )
    sampled = F.grid_sample(prob[None, None].float(), grid[None], align_corners=False)
    return ya, xa, (sampled[0, 0] >= threshold).numpy()


def rle_from_local(local: np.ndarray, y0: int, x0: int, height: int, width: int) -> dict:
    """COCO RLE (compressed, counts as str) of the full-image mask that is ``local`` at (y0, x0),
    without materializing the full image: runs are counted in column-major order."""
    h, w = local.shape
    col = np.zeros((w, height), dtype=bool)  # column-major: one row per image column
    col[:, y0 : y0 + h] = local.T
    flat = np.concatenate([[False], col.ravel(), [False]])
    change = np.flatnonzero(flat[1:] != flat[:-1])  # run boundaries inside the region
    lead = x0 * height
    if change.size == 0:
        counts = [height * width]
    else:
        edges = np.concatenate([[0], change + lead, [height * width]])
        counts = np.diff(edges).tolist()  # starts with a zero-run, as COCO RLE requires
        if len(counts) > 1 and counts[-1] == 0:  # the mask reaches the last pixel
            counts.pop()
    rle = mask_util.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def mask_geometry(local: np.ndarray, y0: int, x0: int):
    """(area, centroid [x, y], principal-axis angle in degrees) of a mask in original pixels.

    Centroid in continuous coordinates (pixel (r, c) covers [c, c + 1) x [r, r + 1)), like the
    boxes. Angle of the long axis from +x, y down, in (-90, 90] (image convention)."""
    m = cv2.moments(local.astype(np.uint8), binaryImage=True)
    area = int(round(m["m00"]))
    if area == 0:
        return 0, [None, None], None
    cx, cy = m["m10"] / m["m00"] + x0 + 0.5, m["m01"] / m["m00"] + y0 + 0.5
    angle = 0.5 * math.degrees(math.atan2(2 * m["mu11"], m["mu20"] - m["mu02"]))
    if angle <= -90:
        angle += 180
    return area, [round(cx, 3), round(cy, 3)], round(angle, 3)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(arr: np.ndarray, level: int = 1) -> bytes:
    """PNG bytes of an HxW[xC] uint8/uint16 array (C: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA).

    OpenCV cannot write gray+alpha and Pillow cannot write it at 16 bits, so this writes the
    format directly: "Up" filter on every row (smooth X-rays compress well), zlib."""
    if arr.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"PNG holds uint8 or uint16 samples, got {arr.dtype}")
    arr = arr if arr.ndim == 3 else arr[:, :, None]
    h, w, c = arr.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = arr.astype(arr.dtype.newbyteorder(">"), copy=False).view(np.uint8).reshape(h, -1)
    up = rows.copy()
    up[1:] -= rows[:-1]  # wraps modulo 256, as the filter defines
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", w, h, arr.dtype.itemsize * 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw, level))
        + _png_chunk(b"IEND", b"")
    )


def _zoi_bytes(crop: np.ndarray, alpha: np.ndarray, fmt: str, crop_xyxy, level: int) -> bytes:
    if fmt == "npz":
        buf = io.BytesIO()
        np.savez_compressed(buf, pixels=crop, mask=alpha, crop_xyxy=np.asarray(crop_xyxy))
        return buf.getvalue()
    full = np.iinfo(crop.dtype).max
    a = (alpha * full).astype(crop.dtype)[:, :, None]
    return encode_png(
        np.concatenate([crop if crop.ndim == 3 else crop[:, :, None], a], axis=2), level
    )


def _levels(pred: ScanPredictions, class_names, n_ordered, gaps, cfg_levels, anchor, anchor_at):
    """Level per ordered instance and its source: the model, level-named classes, or an anchor."""
    if pred.levels is not None:
        return list(pred.levels), "model"
    names = [class_names[c] if c < len(class_names) else None for c in pred.classes.tolist()]
    if names and all(n in cfg_levels for n in names):
        return names, "class"
    if anchor:
        return assign_levels(n_ordered, gaps, list(cfg_levels), anchor, anchor_at), "anchor"
    return [None] * n_ordered, None


def extract_zois(
    pixels: np.ndarray,
    pred: ScanPredictions,
    *,
    zoi_dir: str,
    class_names=("vertebra",),
    margin: int = 0,
    fmt: str = "png",
    levels=(),
    anchor_level: str = "",
    anchor_at: str = "top",
    gap_factor: float = 1.6,
    png_compression: int = 1,
    timings: dict | None = None,
    expected_levels=(),
):
    """ZOIs of one scan: (manifest entries, {relative file: bytes}, suspected_missing).

    Entries are ordered top to bottom along the spine, per class (each class is one sequence
    along the spine, e.g. bodies and pedicles); ``id`` is the position in that order.
    ``expected_levels``: [first, last] levels the scan shows; the ones beyond either end of a
    class's chain are reported missing (``after`` null: above its first vertebra; ``before``
    null: below its last), when the chain's end levels are known.
    """
    timings = timings if timings is not None else {}
    height, width = pixels.shape[:2]
    t0 = time.perf_counter()
    pasted = [
        paste_mask_local(p, b, height, width) for p, b in zip(pred.mask_probs, pred.boxes.tolist())
    ]
    geometry = [mask_geometry(m, y, x) for y, x, m in pasted]
    t1 = time.perf_counter()
    timings["paste"] = timings.get("paste", 0.0) + t1 - t0

    entries, files, missing = [], {}, []
    classes = pred.classes.tolist()
    for cls in sorted(set(classes)):
        members = [i for i in range(len(classes)) if classes[i] == cls]
        # An empty pasted mask is kept (area 0), placed by its box centre: never dropped silently.
        points = [geometry[i][1] if geometry[i][0] else _box_centre(pred.boxes[i]) for i in members]
        seq = order_along_spine(points, gap_factor)
        ordered = [members[k] for k in seq.order]
        sub = ScanPredictions(
            pred.boxes[ordered],
            pred.scores[ordered],
            pred.classes[ordered],
            pred.mask_probs[ordered],
            None if pred.levels is None else [pred.levels[i] for i in ordered],
        )
        names, source = _levels(
            sub, class_names, len(ordered), seq.gaps, levels, anchor_level, anchor_at
        )
        first_id = len(entries)
        missing += chain_suspected_missing(names, seq.gaps, levels, expected_levels, first_id)
        for k, i in enumerate(ordered):
            y0, x0, local = pasted[i]
            area, centroid, angle = geometry[i]
            zid = first_id + k
            label = names[k] or (class_names[cls] if cls < len(class_names) else str(cls))
            cx0, cy0 = max(x0 - margin, 0), max(y0 - margin, 0)
            cx1 = min(x0 + local.shape[1] + margin, width)
            cy1 = min(y0 + local.shape[0] + margin, height)
            alpha = np.zeros((cy1 - cy0, cx1 - cx0), dtype=bool)
            alpha[y0 - cy0 : y0 - cy0 + local.shape[0], x0 - cx0 : x0 - cx0 + local.shape[1]] = (
                local
            )
            rel = f"{zoi_dir}/{zid:02d}_{_safe(label)}.{fmt}"
            crop = pixels[cy0:cy1, cx0:cx1]
            files[rel] = _zoi_bytes(crop, alpha, fmt, [cx0, cy0, cx1, cy1], png_compression)
            entries.append(
                {
                    "id": zid,
                    "class": class_names[cls] if cls < len(class_names) else str(cls),
                    "class_id": int(cls),
                    "level": names[k],
                    "level_source": source if names[k] is not None else None,
                    "score": round(float(pred.scores[i]), 5),
                    "bbox_xyxy": [round(v, 3) for v in pred.boxes[i].tolist()],
                    "crop_xyxy": [cx0, cy0, cx1, cy1],
                    "mask_rle": rle_from_local(local, y0, x0, height, width),
                    "centroid": centroid,
                    "angle_deg": angle,
                    "area": area,
                    "file": rel,
                }
            )
    if not entries:
        missing.append(no_detections_entry(levels, expected_levels))
    timings["crop"] = timings.get("crop", 0.0) + time.perf_counter() - t1
    return entries, files, missing


def chain_suspected_missing(names, spacing_gaps, levels, expected_levels=(), first_id=0) -> list:
    """The ``suspected_missing`` entries of one class's chain, top to bottom: the expected
    levels above its first vertebra, the gaps inside it, the expected levels below its last.

    ``names``: the chain's level names in spine order (None where unknown); ``spacing_gaps``:
    ``order_along_spine``'s (k, count) gaps; ids are ``first_id`` + position. Shared by the
    export and ``VertebraEvaluator`` (which measures how many missed vertebrae it names)."""
    top, bottom = _missing_ends(names, expected_levels, levels)
    out = [_gap(None, first_id, top)] if top else []
    for k, gap_count, guess in _suspected_gaps(names, spacing_gaps, levels):
        out.append(
            {
                "reason": "gap",
                "after": first_id + k,
                "before": first_id + k + 1,
                "count": gap_count,
                "levels": guess,
            }
        )
    if bottom:
        out.append(_gap(first_id + len(names) - 1, None, bottom))
    return out


def chain_repeats(names, ratios, duplicate_ratio: float = 0.5) -> list:
    """Positions k of one chain (names in spine order, ``order_along_spine``'s ``ratios``)
    where vertebrae k and k + 1 carry the same level although they lie apart.

    The level decoder names two neighbours alike for a duplicate detection of one body (a
    spacing near 0). Between two distinct bodies (spacing >= ``duplicate_ratio`` of the local
    one, or too few neighbours to tell) one of the two names is wrong, and mostly the names on
    one side with it: a body above T1 read as T1, or an L4 read as L5, pushes the rest of the
    chain to fit (docs/results-aasce.md, "Where the names slide"). Or one of the two is a
    second, offset detection of one body. Either way a reader should not trust those two names
    (and should check the chain's). Shared by the export, ``VertebraEvaluator`` and the
    aligner's matcher."""
    return [
        k
        for k in range(len(names) - 1)
        if names[k] is not None
        and names[k] == names[k + 1]
        and not (np.isfinite(ratios[k]) and ratios[k] < duplicate_ratio)
    ]


def level_conflicts(entries, duplicate_ratio: float = 0.5) -> list:
    """The manifest's ``level_conflicts`` of ``extract_zois``'s entries (in its order):
    ``chain_repeats`` of each class's chain, as ``{"reason": "repeat", "ids", "level"}``."""
    chains = {}
    for e in entries:
        chains.setdefault(e["class_id"], []).append(e)
    out = []
    for chain in chains.values():
        if len(chain) < 2:
            continue
        points = [
            e["centroid"] if e["centroid"][0] is not None else _box_centre(e["bbox_xyxy"])
            for e in chain
        ]
        ratios = spacing_ratios(np.array(points, dtype=np.float64))
        for k in chain_repeats([e["level"] for e in chain], ratios, duplicate_ratio):
            a, b = chain[k], chain[k + 1]
            out.append({"reason": "repeat", "ids": [a["id"], b["id"]], "level": a["level"]})
    return out


def no_detections_entry(levels, expected_levels=()) -> dict:
    """A scan where nothing was found: every expected level is missing (count None when the
    range is not known)."""
    expected = _expected_range(expected_levels, levels)
    return {
        "reason": "no_detections",
        "after": None,
        "before": None,
        "count": len(expected) or None,
        "levels": expected,
    }


def _gap(after, before, names) -> dict:
    return {"reason": "gap", "after": after, "before": before, "count": len(names), "levels": names}


def _expected_range(expected_levels, levels) -> list:
    """The level names from ``expected_levels[0]`` to ``[1]``; [] when not set."""
    if not expected_levels:
        return []
    levels = list(levels)
    return levels[levels.index(expected_levels[0]) : levels.index(expected_levels[1]) + 1]


def _missing_ends(names, expected_levels, levels) -> tuple:
    """(levels missing above the chain, levels missing below it) of the expected range.

    A film that shows T1..L5 and whose chain was named T2..L4 lacks T1 and L5: nothing else
    reports them, since a missing end leaves no gap in the chain. Unknown end levels (no level
    head, no anchor) say nothing, and neither does a chain whose ends lie outside the range."""
    expected = _expected_range(expected_levels, levels)
    if not expected or not names:
        return [], []
    first, last = names[0], names[-1]
    top = expected[: expected.index(first)] if first in expected else []
    bottom = expected[expected.index(last) + 1 :] if last in expected else []
    return top, bottom


def _suspected_gaps(names, spacing_gaps, levels) -> list:
    """[(k, count, level names)] for the gaps between ordered vertebrae k and k + 1.

    Two kinds of evidence: a spacing much larger than its neighbours' (``order.find_gaps``),
    and a skip in the level sequence when both neighbours' levels are known (the model's level
    decoder skips a level it does not see, even where the spacing looks ordinary). Known
    levels on both sides decide the count and the names; a spacing gap between consecutive
    levels contradicts them and is still reported, with no names: never dropped."""
    levels = list(levels)
    spacing = dict(spacing_gaps)
    gaps = []
    for k in range(len(names) - 1):
        after, before = names[k], names[k + 1]
        skipped = None
        if after in levels and before in levels:
            skipped = levels.index(before) - levels.index(after) - 1
        if skipped is not None and skipped >= 1:
            start = levels.index(after) + 1
            gaps.append((k, skipped, levels[start : start + skipped]))
        elif k in spacing:
            guess = (
                [] if skipped is not None else _missing_levels(after, before, spacing[k], levels)
            )
            gaps.append((k, spacing[k], guess))
    return gaps


def _missing_levels(after, before, count, levels) -> list:
    """Level names a gap stands for, when the levels on its top side are known."""
    levels = list(levels)
    if after in levels:
        start = levels.index(after) + 1
        return levels[start : start + count]
    if before in levels:
        end = levels.index(before)
        return levels[max(end - count, 0) : end]
    return []


def _box_centre(box) -> list:
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float64).tolist()  # a tensor row or a list
    return [(x0 + x1) / 2, (y0 + y1) / 2]


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(label))
