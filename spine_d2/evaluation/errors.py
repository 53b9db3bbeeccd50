"""Where a model goes wrong, film by film: read back VertebraEvaluator's ``vertebra_results.json``.

The aggregate metrics say how often a vertebra is missed; choosing what to fix needs which ones
(levels, films), whether a miss had a poor mask near it or nothing at all, and whether wrong level
names come from a chain shifted by one (the lowest body found taking the name of a missed one
below it). ``tools/error_report.py`` is the command line; this module holds the logic.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util

from ..atomic import atomic_open
from ..config import VERTEBRA_LEVELS
from ..errors import SpineError
from .vertebra import _annotation_rle

__all__ = [
    "load_vertebra_results",
    "film_shift",
    "summarize_errors",
    "write_errors_csv",
    "worst_films",
    "badness",
    "error_overlay",
    "classify_misses",
    "MISS_KINDS",
]

RESULTS_NAME = "vertebra_results.json"

# What each missed vertebra had over it (classify_misses), from the fixable to the absent.
MISS_KINDS = ("poor_mask", "low_score", "under_neighbour", "not_detected", "unmatched")


def load_vertebra_results(path) -> dict:
    """The payload VertebraEvaluator saved (``path``: the file or its folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_NAME
    if not p.is_file():
        raise SpineError(f"{p}: no such file (evaluate with an output dir: tools/train_net.py)")
    try:
        payload = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpineError(f"{p}: not readable as JSON ({e})") from None
    per_image = payload.get("per_image") if isinstance(payload, dict) else None
    if not isinstance(per_image, list):
        raise SpineError(f"{p}: no per_image list: not a VertebraEvaluator result")
    if per_image and "missed" not in per_image[0]:
        raise SpineError(
            f"{p}: written by an older spine-d2 without per-image errors; evaluate again"
        )
    payload["path"] = str(p)
    return payload


def _rank(levels):
    return {lvl: i for i, lvl in enumerate(levels)}


def film_shift(film: dict, levels=VERTEBRA_LEVELS) -> int:
    """The film's most common level offset among its wrong names (predicted index minus true
    index: +1 = named one level too low, i.e. towards the sacrum); 0 without level errors."""
    rank = _rank(levels)
    offsets = [
        rank[e["pred"]] - rank[e["gt"]]
        for e in film["level_errors"]
        if e["pred"] in rank and e["gt"] in rank
    ]
    if not offsets:
        return 0
    counts = Counter(offsets).most_common()
    best = counts[0][1]
    return min((o for o, n in counts if n == best), key=abs)  # ties: the smaller shift


def _end_levels(film, rank):
    known = [lvl for lvl in film.get("gt_levels") or [] if lvl in rank]
    if not known:
        return None, None
    return min(known, key=rank.get), max(known, key=rank.get)


def summarize_errors(payload: dict, levels=VERTEBRA_LEVELS) -> dict:
    """Counts over the films: misses by level and kind, false positives, level errors by shift."""
    rank = _rank(levels)
    films = payload["per_image"]
    missed = [m for f in films for m in f["missed"]]
    by_level = Counter(m["level"] for m in missed if m["level"] is not None)
    shifts, down_bottom_missed, up_top_missed = Counter(), 0, 0
    for f in films:
        k = film_shift(f, levels)
        if not k:
            continue
        shifts[f"{k:+d}"] += 1
        top, bottom = _end_levels(f, rank)
        missed_levels = {m["level"] for m in f["missed"]}
        down_bottom_missed += k > 0 and bottom in missed_levels
        up_top_missed += k < 0 and top in missed_levels
    matched = sum(f["num_matched"] for f in films)
    level_errors = sum(len(f["level_errors"]) for f in films)
    return {
        "results": payload.get("path"),
        "dataset": payload.get("dataset"),
        "iou_thresh": payload.get("iou_thresh"),
        "score_thresh": payload.get("score_thresh"),
        "films": len(films),
        "films_with_miss": sum(bool(f["missed"]) for f in films),
        "gt": sum(f["num_gt"] for f in films),
        "missed": len(missed),
        # The evaluator's pairing: a miss with a prediction paired below the IoU threshold, or
        # with none (nothing over it, what was went to a neighbour, or it scored under the cut).
        # classify_misses (error_report --kinds) tells these apart: missed_by_kind.
        "missed_with_partial_mask": sum(m["best_iou"] > 0 for m in missed),
        "missed_unpaired": sum(m["best_iou"] == 0 for m in missed),
        # Of those (no ZOI of their own), the ones the export's suspected_missing would not name
        # (VertebraEvaluator's "unreported"; None for results written before it existed).
        "missed_unpaired_silent": _if_recorded(
            films, "unreported", lambda: sum(len(f.get("unreported", ())) for f in films)
        ),
        # Cut by the border (or, in the DRRs, by the CT's field of view): a fragment, not a body.
        "missed_truncated": sum(m.get("truncated") is True for m in missed),
        **_kind_counts(missed, rank),
        "missed_by_level": {
            lvl: by_level[lvl] for lvl in sorted(by_level, key=lambda v: (rank.get(v, 1e9), v))
        },
        "false_positives": sum(f["false_positives"] for f in films),
        "films_with_false_positive": sum(f["false_positives"] > 0 for f in films),
        "matched": matched,
        "level_errors": level_errors,
        "films_with_level_errors": sum(bool(f["level_errors"]) for f in films),
        "films_by_shift": dict(sorted(shifts.items(), key=lambda kv: int(kv[0]))),
        "films_too_low_with_bottom_missed": int(down_bottom_missed),
        "films_too_high_with_top_missed": int(up_top_missed),
        # Films the export's level_conflicts would flag, and of them the ones named wrong (None
        # for results written before the evaluator counted them).
        "films_with_level_conflicts": _if_recorded(
            films, "level_conflicts", lambda: _count_flagged(films)
        ),
        "films_with_level_errors_flagged": _if_recorded(
            films, "level_conflicts", lambda: _count_flagged(f for f in films if f["level_errors"])
        ),
    }


def _if_recorded(films, key, count):
    """``count()``, or None when no film carries ``key``: results written by an evaluator from
    before that key existed, where 0 would claim a count nobody made."""
    return count() if any(key in f for f in films) else None


def _count_flagged(films) -> int:
    return sum(f.get("level_conflicts", 0) > 0 for f in films)


def classify_misses(
    payload: dict, predictions: list, records: dict, pred_classes=None, cover: float = 0.05
) -> dict:
    """Tag each missed vertebra of ``payload`` (in place: ``m["kind"]``) with what the model put
    over it; returns the counts per kind.

    The evaluator's ``best_iou`` is 0 both when nothing was there and when the detection over a
    vertebra went to a neighbour, and it never sees detections under its score cut; telling these
    apart chooses the fix (masks, scores, NMS/overlap, detection). A prediction is a vertebra's
    *own* when that vertebra is the one it overlaps most. Checked in order:

    - ``poor_mask``: an own prediction at or above the score cut, its mask below the IoU threshold
      (or one the evaluator paired with it: a detection the chain rescue kept under the cut);
    - ``low_score``: an own prediction under the score cut that would match (IoU >= threshold);
    - ``under_neighbour``: only predictions of neighbours (at or above the cut) cover >= ``cover``
      of it: merged into a neighbour's mask, or its own box was suppressed next to one;
    - ``not_detected``: nothing of the above;
    - ``unmatched`` (checked first; never with the evaluator's own matching and classes): an own
      prediction at or above the cut that fits it, which the evaluator did not pair with it
      (another class when ``pred_classes`` is None, or predictions of another run).

    ``predictions``: COCO-json detections at every score dumped (``coco_instances_results.json``);
    ``records``: image_id -> dataset dict (annotations in original pixels, the evaluator's order
    of non-crowd annotations); ``pred_classes``: dataset category id -> contiguous id, so that a
    prediction only counts for vertebrae of its class (None: class-agnostic).
    """
    thresh = float(payload.get("score_thresh") or 0.0)
    iou_thresh = float(payload.get("iou_thresh") or 0.5)
    by_image = {}
    for p in predictions:
        if "segmentation" in p:
            by_image.setdefault(p["image_id"], []).append(p)
    counts = Counter()
    for film in payload["per_image"]:
        if not film["missed"]:
            continue
        record = records.get(film["image_id"])
        if record is None:
            raise SpineError(f"{payload.get('path')}: image_id {film['image_id']} has no record")
        h, w = int(record["height"]), int(record["width"])
        anns = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
        gts = [_annotation_rle(a, h, w) for a in anns]
        preds = by_image.get(film["image_id"], [])
        prles = [_annotation_rle(p, h, w) for p in preds]
        iou = (
            np.asarray(mask_util.iou(prles, gts, [0] * len(gts))).reshape(len(prles), len(gts))
            if prles and gts
            else np.zeros((len(prles), len(gts)))
        )
        same = np.ones(iou.shape, bool)  # a prediction only stands for vertebrae of its class
        if pred_classes is not None and prles:
            pc = [pred_classes.get(p.get("category_id"), -1) for p in preds]
            same = np.array([[c == a.get("category_id") for a in anns] for c in pc], bool)
            iou = np.where(same, iou, 0.0)
        owner = iou.argmax(1) if len(gts) else np.zeros(len(prles), int)
        scores = np.array([float(p.get("score", 1.0)) for p in preds])
        kept = scores >= thresh
        for m in film["missed"]:
            g = int(m["index"])
            if g >= len(gts):
                raise SpineError(
                    f"{payload.get('path')}: image_id {film['image_id']}: missed index {g} but "
                    f"{len(gts)} annotations (results from another version of the dataset?)"
                )
            own = (owner == g) & (iou[:, g] > 0) if len(prles) else np.zeros(0, bool)
            if m.get("best_iou", 0) > 0:  # the evaluator paired a detection it kept with it
                kind = "poor_mask"
            elif np.any(own & kept & (iou[:, g] >= iou_thresh)):
                kind = "unmatched"
            elif np.any(own & kept):
                kind = "poor_mask"
            elif np.any(own & ~kept & (iou[:, g] >= iou_thresh)):
                kind = "low_score"
            elif _covered(gts[g], [r for r, k in zip(prles, kept & same[:, g]) if k], cover):
                kind = "under_neighbour"
            else:
                kind = "not_detected"
            m["kind"] = kind
            counts[kind] += 1
    return {k: counts[k] for k in MISS_KINDS}


def _covered(gt, rles, cover) -> bool:
    area = float(mask_util.area(gt))
    if not rles or area <= 0:
        return False
    return any(
        mask_util.area(mask_util.merge([gt, r], intersect=True)) >= cover * area for r in rles
    )


def _kind_counts(missed, rank) -> dict:
    """missed_by_kind and, per kind, the levels (only when classify_misses has tagged them)."""
    if not missed or any("kind" not in m for m in missed):
        return {}
    by_kind = {k: [m for m in missed if m["kind"] == k] for k in MISS_KINDS}
    levels = {
        k: Counter(m["level"] for m in ms if m["level"] is not None) for k, ms in by_kind.items()
    }
    return {
        "missed_by_kind": {k: len(ms) for k, ms in by_kind.items()},
        "missed_by_kind_and_level": {
            k: {lvl: c[lvl] for lvl in sorted(c, key=lambda v: (rank.get(v, 1e9), v))}
            for k, c in levels.items()
            if c
        },
    }


def _missed_text(film):
    """'T12~0.22 L1 C6[t] L5(low_score)': level, the paired IoU when one was below the threshold,
    [t] for a truncated vertebra, the kind when classify_misses has tagged it."""
    parts = []
    for m in film["missed"]:
        text = m["level"] or "?"
        if m["best_iou"] > 0:
            text += f"~{m['best_iou']:.2f}"
        if m.get("truncated") is True:
            text += "[t]"
        if m.get("kind"):
            text += f"({m['kind']})"
        parts.append(text)
    return " ".join(parts)


def _level_errors_text(film):
    """'T2->T3 T3->T4': each wrong name as true->predicted."""
    return " ".join(f"{e['gt']}->{e['pred']}" for e in film["level_errors"])


def write_errors_csv(payload: dict, path, levels=VERTEBRA_LEVELS) -> str:
    """One row per film, worst first; written to a temp name and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "file_name",
                "image_id",
                "num_gt",
                "num_pred",
                "num_matched",
                "missed",
                "false_positives",
                "level_errors",
                "shift",
            ]
        )
        for film in worst_films(payload["per_image"]):
            w.writerow(
                [
                    film.get("file_name") or "",
                    film["image_id"],
                    film["num_gt"],
                    film["num_pred"],
                    film["num_matched"],
                    _missed_text(film),
                    film["false_positives"],
                    _level_errors_text(film),
                    f"{film_shift(film, levels):+d}" if film["level_errors"] else "",
                ]
            )
    return str(path)


def badness(film) -> int:
    """Misses + false positives + wrong levels of one film (0: nothing went wrong)."""
    return len(film["missed"]) + film["false_positives"] + len(film["level_errors"])


def worst_films(per_image: list) -> list:
    """Films sorted by misses + false positives + wrong levels, most first (stable)."""
    return sorted(per_image, key=badness, reverse=True)


# BGR
_FOUND, _MISSED, _PRED = (80, 200, 80), (0, 215, 255), (255, 0, 255)


def _contours(mask: np.ndarray, f: float) -> list:
    """Outer contours of a 0/1 mask, scaled by f (int32 N x 2 each)."""
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    return [np.round(c.reshape(-1, 2) * f).astype(np.int32) for c in contours]


def _outline(ann: dict, shape, f) -> list:
    """Outlines of a GT annotation scaled by f: its polygons as drawn, or an RLE's contours
    (decoded as VertebraEvaluator decodes it)."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        return [
            np.round(np.asarray(s, np.float64).reshape(-1, 2) * f).astype(np.int32) for s in seg
        ]
    if isinstance(seg, dict):
        return _contours(mask_util.decode(_annotation_rle(ann, *shape)), f)
    return []


def error_overlay(image01: np.ndarray, record: dict, preds: list, film: dict, height=1024):
    """BGR uint8 picture of one film: true outlines green when found and yellow when missed (with
    their level), the predictions kept by the evaluator in magenta, and a one-line caption.

    ``image01``: the film as float [0, 1] HxW; ``record``: its dataset dict (annotations in
    original pixels); ``preds``: its COCO-json predictions at or above the score threshold."""
    f = height / image01.shape[0]
    w = max(1, round(image01.shape[1] * f))
    img = np.round(image01 * 255).astype(np.uint8)
    img = cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA)
    img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    for p in preds:
        m = mask_util.decode(p["segmentation"]).astype(np.uint8)
        m = cv2.resize(m, (w, height), interpolation=cv2.INTER_NEAREST)
        cv2.drawContours(img, _contours(m, 1.0), -1, _PRED, 1, cv2.LINE_AA)
    missed = {m["index"] for m in film["missed"]}
    anns = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    for g, ann in enumerate(anns):  # the evaluator's GT order: non-crowd annotations
        pts = _outline(ann, image01.shape, f)
        if not pts:
            continue
        level = ann.get("level")
        is_missed = g in missed
        colour = _MISSED if is_missed else _FOUND
        cv2.polylines(img, pts, True, colour, 2 if is_missed else 1, cv2.LINE_AA)
        if level:
            x, y = np.concatenate(pts).min(0)
            cv2.putText(img, str(level), (max(0, int(x) - 26), int(y) + 12),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)  # fmt: skip
    caption = (
        f"missed {_missed_text(film) or '-'} | FP {film['false_positives']} | "
        f"levels {_level_errors_text(film) or 'ok'}"
    )
    # Wrapped to the film's width: tall AP films are narrow.
    per_line = max(20, (img.shape[1] - 8) // 7)
    words, lines = caption.split(" "), [""]
    for word in words:
        if lines[-1] and len(lines[-1]) + 1 + len(word) > per_line:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()
    bar = np.zeros((16 * len(lines) + 6, img.shape[1], 3), np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(bar, line, (4, 15 + 16 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    return np.vstack([bar, img])
