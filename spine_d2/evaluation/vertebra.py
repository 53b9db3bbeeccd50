"""VertebraEvaluator: did the model find every vertebra, and how well does each mask fit?

COCO AP ranks detections over all score thresholds; the question a ZOI export asks is simpler:
at the working score threshold, is each ground-truth vertebra found (mask IoU >= a threshold) and
how good is its mask. This evaluator answers that beside detectron2's COCOEvaluator.

Conventions:
- Vertebra metrics are fractions in [0, 1]; detectron2's COCO AP stays in percent.
- A metric whose denominator is empty (e.g. precision with no predictions) is NaN, not 0 or 1.
- Matching is greedy one-to-one by descending mask IoU, class-aware (a prediction can only
  match a ground truth of its own class). With a single threshold and one class per image this
  equals optimal matching except in rare ties between overlapping masks; greedy needs no scipy
  and makes the matching at every threshold a prefix of one ordering, so the matches at IoU 0.5
  (for ``accuracy``) come from the same pass as those at ``iou_thresh``.
"""

import itertools
import json
import logging
import os
from collections import OrderedDict, defaultdict

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table

from ..atomic import atomic_open
from ..config import VERTEBRA_LEVELS
from ..zoi.extract import chain_repeats, chain_suspected_missing, level_margin, levels_uncertain
from ..zoi.order import order_along_spine
from .bootstrap import RATIOS, image_counts, ratio_intervals

logger = logging.getLogger(__name__)

# The paper's acceptance criterion: a vertebra counts as found at mask IoU >= 0.5.
ACCURACY_IOU = 0.5

_SUMMARY_KEYS = (
    "accuracy",
    "recall",
    "precision",
    "f1",
    "mean_dice",
    "mean_iou",
    "level_accuracy",
    "recall_whole",
    "recall_truncated",
    "images_with_miss",
    "missed_unpaired",
    "missed_unpaired_reported",
    "images_with_level_conflicts",
    "misnamed_images_flagged",
    "num_images",
    "num_gt",
    "num_pred",
)


class VertebraEvaluator(DatasetEvaluator):
    """Recall, precision, Dice and per-level recall of vertebra masks at one score threshold.

    Returns ``{"vertebra": {...}}`` with (fractions in [0, 1], counts as floats):

    - ``recall``: matched GT / all GT; ``precision``: matched predictions / all predictions;
      ``f1``; ``mean_dice`` and ``mean_iou`` over matched pairs (match = IoU >= ``iou_thresh``).
    - ``accuracy``: fraction of GT vertebrae found with mask IoU >= 0.5, the paper's acceptance
      criterion (target > 90%). It is recall at IoU 0.5, reported under the paper's name; it
      equals ``recall`` when ``iou_thresh`` is 0.5.
    - ``images_with_miss``: images with at least one missed GT vertebra; ``num_images``,
      ``num_gt``, ``num_pred`` (predictions at or above ``score_thresh``).
    - ``recall/<level>`` (e.g. ``recall/T12``) for every level seen in the GT, in level order.
    - ``recall/<class>`` per class when the dataset has more than one class.
    - ``recall_whole`` / ``recall_truncated`` (and ``num_truncated``) when the GT says which
      vertebrae are ``truncated`` (cut by the image border or, in the built-in DRRs, by the CT's
      field of view): a fragment is a different question from a whole vertebra missed, and
      ``recall`` alone hides which one a model gets wrong. ``recall`` still counts both.
    - ``level_accuracy``: among matched pairs whose GT has a level and whose prediction carries
      one, the fraction with the same level. Predicted levels come from an optional
      ``output["pred_levels"]`` (list of str, one per instance, before score filtering) or from
      ``instances.pred_levels`` (indices into ``model_levels``, what LevelROIHeads predicts); the
      key is absent when no prediction carries a level.
    - ``missed_unpaired``: GT vertebrae that no prediction was paired with (no ZOI of their own:
      the ones an export drops, where a poor mask still leaves a ZOI), and
      ``missed_unpaired_reported``: the fraction of them that the ZOI export's
      ``suspected_missing`` would name by level (gaps in the chain, the chain's missing ends
      with ``expected_levels``, the model's levels), or that lie in an image with nothing kept
      (reported whole). What a missed vertebra must never be is silent; absent when none is
      unpaired. Per image, ``unreported`` lists the levels of the silent ones.
    - ``images_with_level_conflicts``: images whose ZOI export would list ``level_conflicts``
      (two neighbours named alike although apart, or with ``level_margin`` a chain whose names
      are not sure), and ``misnamed_images_flagged``: the share
      of images with a wrong level that it flags (absent when none has one); with levels only.
      Per image, ``level_conflicts`` counts them.

    Every image of the dataset is scored: an image the model gave nothing for has all its
    vertebrae missed. Crowd GT (``iscrowd=1``) is not counted; a prediction that is unmatched
    but lies on a crowd region of its class (intersection / prediction area >= ``iou_thresh``)
    is ignored rather than counted as a false positive, as in COCO.
    """

    def __init__(
        self,
        dataset_name,
        *,
        iou_thresh=0.5,
        score_thresh=0.5,
        levels=None,
        model_levels=None,
        distributed=True,
        output_dir=None,
        bootstrap=2000,
        gap_factor=1.6,
        expected_levels=(),
        level_margin=0.0,
    ):
        """
        Args:
            dataset_name: a dataset registered in DatasetCatalog (detectron2 standard dicts).
            iou_thresh: mask IoU for a prediction to count as finding a vertebra.
            score_thresh: predictions scoring below this are dropped before matching.
            levels: level names top to bottom, to order ``recall/<level>``; default: the
                dataset's ``vertebra_levels`` metadata, then C1..S1.
            model_levels: the level names that ``instances.pred_levels`` indexes (SPINE.LEVELS);
                default C1..S1.
            distributed: gather predictions from all ranks and evaluate on the main one.
            output_dir: if given, ``vertebra_results.json`` is written there: the metrics and,
                per image, what was missed, the false positives and the wrong levels
                (``_image_errors``; read back by tools/error_report.py).
            bootstrap: resamples of the images for the 95 % intervals of recall, precision,
                Dice and level accuracy (``evaluation.bootstrap``), logged and saved with the
                metrics; 0 skips them. The returned metrics are the same either way.
            gap_factor, expected_levels: ``ZOI.GAP_FACTOR`` and ``ZOI.EXPECTED_LEVELS``, to
                say which missed vertebrae the ZOI export's ``suspected_missing`` would name
                (``missed_unpaired_reported``).
            level_margin: ``ZOI.LEVEL_MARGIN``: an image whose ``level_margin`` is under it
                counts as flagged, as the export's "uncertain" level_conflicts entry does.
        """
        self._dataset_name = dataset_name
        self._iou_thresh = float(iou_thresh)
        self._score_thresh = float(score_thresh)
        self._distributed = distributed
        self._output_dir = output_dir
        if int(bootstrap) < 0:
            raise ValueError(f"bootstrap must be >= 0 resamples, got {bootstrap}")
        self._bootstrap = int(bootstrap)
        self._metadata = MetadataCatalog.get(dataset_name)
        if levels is None:
            levels = list(getattr(self._metadata, "vertebra_levels", [])) or VERTEBRA_LEVELS
        self._levels = list(levels)
        self._model_levels = list(model_levels or VERTEBRA_LEVELS)
        self._gap_factor = float(gap_factor)
        self._expected_levels = list(expected_levels or [])
        self._level_margin = float(level_margin)
        self._gt = None  # image_id -> ground truth, decoded once on first evaluate()
        self._predictions = []

    @classmethod
    def from_config(cls, cfg, dataset_name, output_dir=None):
        """Build from SPINE.EVAL.* and SPINE.LEVELS (called by the trainer's build_evaluator)."""
        return cls(
            dataset_name,
            iou_thresh=cfg.SPINE.EVAL.IOU_THRESH,
            score_thresh=cfg.SPINE.EVAL.SCORE_THRESH,
            levels=cfg.SPINE.LEVELS,
            model_levels=cfg.SPINE.LEVELS,
            output_dir=output_dir,
            bootstrap=cfg.SPINE.EVAL.BOOTSTRAP,
            gap_factor=cfg.ZOI.GAP_FACTOR,
            expected_levels=cfg.ZOI.EXPECTED_LEVELS,
            level_margin=cfg.ZOI.LEVEL_MARGIN,
        )

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        """Keep each image's confident predictions as RLEs: small to hold and to gather."""
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                continue
            instances = out["instances"].to(torch.device("cpu"))
            pred_levels = out.get("pred_levels")
            if pred_levels is None and instances.has("pred_levels"):  # LevelROIHeads
                pred_levels = [self._model_levels[i] for i in instances.pred_levels.tolist()]
            if pred_levels is not None and len(pred_levels) != len(instances):
                raise ValueError(
                    f"image {inp['image_id']}: {len(pred_levels)} pred_levels for "
                    f"{len(instances)} instances"
                )
            keep = instances.scores >= self._score_thresh
            if instances.has("pred_rescued"):  # under the cut, accepted by the chain rescue
                keep = keep | instances.pred_rescued
            keep = keep.nonzero().flatten().tolist()
            if keep and not instances.has("pred_masks"):
                raise ValueError(
                    f"image {inp['image_id']}: VertebraEvaluator needs pred_masks (a mask model)"
                )
            kept = instances[torch.as_tensor(keep, dtype=torch.long)]  # full-size masks: once
            levels = None if pred_levels is None else [pred_levels[i] for i in keep]
            reported, conflicts = self._chain_report(kept, levels)
            margin = level_margin(instances)
            named = any(lvl is not None for lvl in levels or [])
            if named and levels_uncertain(margin, self._level_margin):
                conflicts += 1  # the export's "uncertain" entry
            self._predictions.append(
                {
                    "image_id": inp["image_id"],
                    "rles": masks_to_rles(kept.pred_masks) if keep else [],
                    "classes": kept.pred_classes.tolist(),
                    "scores": kept.scores.tolist(),
                    "levels": levels,
                    "reported": reported,
                    "level_conflicts": conflicts,
                    "level_margin": margin,
                }
            )

    def _chain_report(self, instances, levels):
        """(the level names the ZOI export's ``suspected_missing`` would give for these kept
        detections (its chains and gap rules, ``zoi.extract.chain_suspected_missing``), or
        ``None`` for a scan with nothing kept (reported whole, as ``no_detections``); the number
        of ``level_conflicts`` its manifest line would list)."""
        if not len(instances):
            return None, 0
        masks = instances.pred_masks  # N x H x W at the original size: no float copy of it
        per_row = masks.sum(2, dtype=torch.float32)
        per_col = masks.sum(1, dtype=torch.float32)
        area = per_row.sum(1)
        rows = torch.arange(masks.shape[1], dtype=torch.float32) + 0.5  # pixel centres, as export
        cols = torch.arange(masks.shape[2], dtype=torch.float32) + 0.5
        cy = (per_row * rows).sum(1) / area.clamp(min=1)
        cx = (per_col * cols).sum(1) / area.clamp(min=1)
        if instances.has("pred_boxes"):  # an empty mask is placed by its box, as in export
            boxes = instances.pred_boxes.tensor
            cx = torch.where(area > 0, cx, (boxes[:, 0] + boxes[:, 2]) / 2)
            cy = torch.where(area > 0, cy, (boxes[:, 1] + boxes[:, 3]) / 2)
        cx, cy = cx.tolist(), cy.tolist()
        classes = instances.pred_classes.tolist()
        named, conflicts = [], 0
        for cls in sorted(set(classes)):
            members = [i for i, c in enumerate(classes) if c == cls]
            seq = order_along_spine([[cx[i], cy[i]] for i in members], self._gap_factor)
            names = [levels[members[k]] if levels else None for k in seq.order]
            for entry in chain_suspected_missing(
                names, seq.gaps, self._model_levels, self._expected_levels
            ):
                named += entry["levels"]
            conflicts += len(chain_repeats(names, seq.ratios))
        return named, conflicts

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            predictions = self._predictions
        if not predictions:
            logger.warning("[VertebraEvaluator] no predictions received: every vertebra missed.")

        if self._gt is None:
            self._gt = _load_ground_truth(self._dataset_name)
        preds_by_image = {}
        for p in predictions:
            if p["image_id"] not in self._gt:
                logger.warning(
                    "[VertebraEvaluator] image_id %r is not in %s; ignored.",
                    p["image_id"],
                    self._dataset_name,
                )
                continue
            preds_by_image[p["image_id"]] = p

        results, per_image = self._score(preds_by_image)
        intervals = self._intervals(per_image)
        self._log(results, intervals)
        if self._output_dir:
            self._save(results, per_image, intervals)
        return {"vertebra": results}

    # ------------------------------------------------------------------ internals
    def _score(self, preds_by_image):
        found = found_at_half = 0  # GT matched at iou_thresh / at ACCURACY_IOU
        ious, level_hits, level_pairs = [], 0, 0
        gt_by_level, found_by_level = defaultdict(int), defaultdict(int)
        gt_by_class, found_by_class = defaultdict(int), defaultdict(int)
        gt_by_trunc, found_by_trunc = defaultdict(int), defaultdict(int)
        num_gt = num_pred = images_with_miss = 0
        unpaired = unpaired_reported = 0
        flagged = misnamed = misnamed_flagged = 0  # the export's level_conflicts, per image
        per_image = []

        for image_id, gt in self._gt.items():
            pred = preds_by_image.get(image_id) or {"rles": [], "classes": [], "levels": None}
            if pred["rles"] and tuple(pred["rles"][0]["size"]) != gt["size"]:
                raise ValueError(
                    f"image {image_id}: predicted masks are {tuple(pred['rles'][0]['size'])}, "
                    f"ground truth is {gt['size']}; predictions must be at the original size"
                )
            pairs = _greedy_match(gt["rles"], gt["classes"], pred["rles"], pred["classes"])
            main = [(g, p, iou) for g, p, iou in pairs if iou >= self._iou_thresh]
            found += len(main)
            found_at_half += sum(iou >= ACCURACY_IOU for _, _, iou in pairs)
            n_pred = len(pred["rles"]) - _on_crowd(
                gt, pred, {p for _, p, _ in main}, self._iou_thresh
            )
            num_gt += len(gt["rles"])
            num_pred += n_pred
            images_with_miss += len(main) < len(gt["rles"])
            ious.extend(iou for _, _, iou in main)
            matched_gt = {g for g, _, _ in main}
            for g, (cls, lvl, trunc) in enumerate(
                zip(gt["classes"], gt["levels"], gt["truncated"])
            ):
                found_g = g in matched_gt
                gt_by_class[cls] += 1
                found_by_class[cls] += found_g
                if lvl is not None:
                    gt_by_level[lvl] += 1
                    found_by_level[lvl] += found_g
                if trunc is not None:
                    gt_by_trunc[trunc] += 1
                    found_by_trunc[trunc] += found_g
            image_hits = image_pairs = 0
            if pred["levels"] is not None:
                for g, p, _ in main:
                    if gt["levels"][g] is not None and pred["levels"][p] is not None:
                        image_pairs += 1
                        image_hits += str(pred["levels"][p]) == gt["levels"][g]
            level_pairs += image_pairs
            level_hits += image_hits
            errors = _image_errors(image_id, gt, pred, pairs, main, n_pred)
            # a vertebra nothing was paired with has no ZOI: does the export say it is missing?
            paired = {g for g, _, _ in pairs}
            named = None if not pred["rles"] else set(pred.get("reported") or [])
            lost = [g for g in range(len(gt["rles"])) if g not in paired]
            told = [named is None or gt["levels"][g] in named for g in lost]
            unpaired += len(lost)
            unpaired_reported += sum(told)
            errors["unreported"] = [gt["levels"][g] for g, ok in zip(lost, told) if not ok]
            # would the export's manifest warn that this image's names disagree?
            errors["level_conflicts"] = pred.get("level_conflicts", 0)
            errors["level_margin"] = pred.get("level_margin")
            flagged += errors["level_conflicts"] > 0
            misnamed += image_hits < image_pairs
            misnamed_flagged += image_hits < image_pairs and errors["level_conflicts"] > 0
            # what the intervals resample (evaluation.bootstrap.RATIOS)
            errors["dice_sum"] = float(sum(2 * iou / (1 + iou) for _, _, iou in main))
            errors["level_hits"] = image_hits
            errors["num_levelled"] = image_pairs
            per_image.append(errors)

        recall = _ratio(found, num_gt)
        precision = _ratio(found, num_pred)  # one-to-one: matched preds == matched GT
        ious = np.asarray(ious, dtype=np.float64)
        results = OrderedDict(
            accuracy=_ratio(found_at_half, num_gt),
            recall=recall,
            precision=precision,
            f1=_f1(recall, precision),
            mean_dice=float(np.mean(2 * ious / (1 + ious))) if ious.size else float("nan"),
            mean_iou=float(np.mean(ious)) if ious.size else float("nan"),
        )
        if level_pairs:
            results["level_accuracy"] = level_hits / level_pairs
            results["images_with_level_conflicts"] = float(flagged)
            if misnamed:
                results["misnamed_images_flagged"] = misnamed_flagged / misnamed
        if gt_by_trunc:
            results["recall_whole"] = _ratio(found_by_trunc[False], gt_by_trunc[False])
            results["recall_truncated"] = _ratio(found_by_trunc[True], gt_by_trunc[True])
            results["num_truncated"] = float(gt_by_trunc[True])
        if unpaired:
            results["missed_unpaired"] = float(unpaired)
            results["missed_unpaired_reported"] = unpaired_reported / unpaired
        results.update(
            images_with_miss=float(images_with_miss),
            num_images=float(len(self._gt)),
            num_gt=float(num_gt),
            num_pred=float(num_pred),
        )
        for lvl in _ordered_levels(gt_by_level, self._levels):
            results[f"recall/{lvl}"] = _ratio(found_by_level[lvl], gt_by_level[lvl])
        classes = list(getattr(self._metadata, "thing_classes", []))
        if len(classes) > 1:
            for cls in sorted(gt_by_class):
                name = classes[cls] if cls < len(classes) else str(cls)
                results[f"recall/{name}"] = _ratio(found_by_class[cls], gt_by_class[cls])
        return results, per_image

    def _intervals(self, per_image) -> dict:
        """95 % intervals by resampling images; {} when off or without images."""
        if not self._bootstrap or not per_image:
            return {}
        confidence = 0.95
        found = ratio_intervals(image_counts(per_image), self._bootstrap, confidence)
        if not found:
            return {}
        return {"confidence": confidence, "resamples": self._bootstrap, "unit": "image", **found}

    def _log(self, results, intervals=None):
        summary = {k: results[k] for k in _SUMMARY_KEYS if k in results}
        logger.info(
            "Vertebra evaluation on %s (IoU >= %.2f, score >= %.2f; fractions):\n%s",
            self._dataset_name,
            self._iou_thresh,
            self._score_thresh,
            create_small_table(summary),
        )
        ranges = {k: f"{v[0]:.4f}-{v[1]:.4f}" for k, v in (intervals or {}).items() if k in RATIOS}
        if ranges:
            logger.info(
                "95%% intervals over %d resamples of the %d images:\n%s",
                intervals["resamples"],
                int(results["num_images"]),
                create_small_table(ranges),
            )
        per_key = {k: v for k, v in results.items() if k.startswith("recall/")}
        if per_key:
            logger.info("Per-level / per-class recall:\n%s", create_small_table(per_key))

    def _save(self, results, per_image, intervals=None):
        os.makedirs(self._output_dir, exist_ok=True)
        path = os.path.join(self._output_dir, "vertebra_results.json")
        payload = {
            "dataset": self._dataset_name,
            "iou_thresh": self._iou_thresh,
            "score_thresh": self._score_thresh,
            "metrics": results,
            "intervals": intervals or {},
            "per_image": per_image,
        }
        with atomic_open(path) as f:  # readers never see a half-written file
            json.dump(payload, f, indent=1, default=str)


SWEEP_KEYS = ("recall", "recall_whole", "recall_truncated", "precision", "f1")


def sweep_score_cuts(dataset_name, detections, cuts, *, iou_thresh=0.5, to_contiguous=None):
    """VertebraEvaluator's recall / precision / F1 at each score cut, from every detection an
    evaluation dumped (COCO format, ``coco_instances_results.json``): the operating points one
    model offers, without running it again, so that two models are compared at equal precision
    rather than at one cut. Levels and the chain rescue are not re-applied.

    ``to_contiguous``: dataset category id -> contiguous id (the json holds dataset ids, the
    evaluator's ground truth contiguous ones); None when they are the same.
    Returns one dict per cut: ``score_cut`` and :data:`SWEEP_KEYS` (those the GT supports)."""
    evaluator = VertebraEvaluator(
        dataset_name, iou_thresh=iou_thresh, distributed=False, bootstrap=0
    )
    evaluator._gt = _load_ground_truth(dataset_name)
    by_image = defaultdict(list)
    for det in detections:
        if "segmentation" not in det:
            raise ValueError(f"detection of image {det.get('image_id')} has no segmentation")
        by_image[det["image_id"]].append(det)
    rows = []
    for cut in sorted(float(c) for c in cuts):
        preds = {}
        for image_id, dets in by_image.items():
            kept = [d for d in dets if d["score"] >= cut]
            cats = [d["category_id"] for d in kept]
            preds[image_id] = {
                "rles": [d["segmentation"] for d in kept],
                "classes": [to_contiguous.get(c, -1) for c in cats] if to_contiguous else cats,
                "levels": None,
            }
        results, _ = evaluator._score(preds)
        rows.append({"score_cut": cut, **{k: results[k] for k in SWEEP_KEYS if k in results}})
    return rows


def _image_errors(image_id, gt, pred, pairs, main, n_pred):
    """One image's counts and what went wrong, for error analysis (tools/error_report.py).

    ``missed``: each unmatched GT vertebra (``index`` among the record's non-crowd annotations),
    its level and ``truncated`` flag (None where the GT has none) and the IoU of the prediction
    greedily paired with it below the threshold (0.0: no prediction was left to pair with it:
    none overlapped it, or those that did matched a neighbour better; a detection miss rather
    than a poor mask).
    ``level_errors``: matched pairs named differently.
    """
    matched = {g for g, _, _ in main}
    partial = {g: iou for g, _, iou in pairs if g not in matched}
    levels = pred["levels"]
    return {
        "image_id": image_id,
        "file_name": gt.get("file_name"),
        "num_gt": len(gt["rles"]),
        "num_pred": n_pred,
        "num_matched": len(main),
        "false_positives": n_pred - len(main),
        "gt_levels": list(gt["levels"]),
        "missed": [
            {
                "index": g,
                "level": gt["levels"][g],
                "truncated": gt["truncated"][g],
                "best_iou": round(partial.get(g, 0.0), 4),
            }
            for g in range(len(gt["rles"]))
            if g not in matched
        ],
        "level_errors": [
            {"gt": gt["levels"][g], "pred": str(levels[p])}
            for g, p, _ in sorted(main)  # GT order: top to bottom where the GT is ordered
            if levels is not None
            and gt["levels"][g] is not None
            and levels[p] is not None
            and str(levels[p]) != gt["levels"][g]
        ],
    }


def _ratio(num, den):
    return num / den if den else float("nan")


def _f1(recall, precision):
    if np.isnan(recall) or np.isnan(precision):
        return float("nan")
    return 2 * recall * precision / (recall + precision) if recall + precision else 0.0


def _ordered_levels(seen, order):
    """Levels seen in the GT, in anatomical order; unknown names after, alphabetically."""
    rank = {lvl: i for i, lvl in enumerate(order)}
    return sorted(seen, key=lambda lvl: (rank.get(lvl, len(rank)), lvl))


def masks_to_rles(masks) -> list:
    """COCO RLEs of N x H x W predicted masks (a tensor or array of bools or 0/1)."""
    masks = np.asarray(masks, dtype=np.uint8)
    if len(masks) == 0:
        return []
    return mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))


def _greedy_match(gt_rles, gt_classes, pred_rles, pred_classes):
    """One-to-one (gt, pred, iou) pairs with IoU > 0, greedily by descending IoU, same class."""
    if not gt_rles or not pred_rles:
        return []
    return greedy_pairs(class_aware_iou(pred_rles, pred_classes, gt_rles, gt_classes))


def class_aware_iou(pred_rles, pred_classes, gt_rles, gt_classes) -> np.ndarray:
    """P x G mask IoU, 0 between different classes."""
    if not gt_rles or not pred_rles:
        return np.zeros((len(pred_rles), len(gt_rles)))
    iou = np.asarray(mask_util.iou(pred_rles, gt_rles, [0] * len(gt_rles)), dtype=np.float64)
    same_class = np.asarray(pred_classes)[:, None] == np.asarray(gt_classes)[None, :]
    return np.where(same_class, iou, 0.0)


def greedy_pairs(iou: np.ndarray):
    """:func:`_greedy_match` on a P x G IoU matrix: (gt, pred, iou) pairs."""
    iou = np.asarray(iou, dtype=np.float64)
    p_idx, g_idx = np.nonzero(iou > 0)
    order = np.argsort(-iou[p_idx, g_idx], kind="stable")
    used_p, used_g, pairs = set(), set(), []
    for k in order:
        p, g = int(p_idx[k]), int(g_idx[k])
        if p not in used_p and g not in used_g:
            used_p.add(p)
            used_g.add(g)
            pairs.append((g, p, float(iou[p, g])))
    return pairs


def _on_crowd(gt, pred, matched, thresh):
    """How many unmatched predictions lie on a crowd region of their class (not counted)."""
    if not gt["crowd_rles"]:
        return 0
    unmatched = [p for p in range(len(pred["rles"])) if p not in matched]
    if not unmatched:
        return 0
    rles = [pred["rles"][p] for p in unmatched]
    # iscrowd=1: IoU becomes intersection / prediction area.
    cover = np.asarray(mask_util.iou(rles, gt["crowd_rles"], [1] * len(gt["crowd_rles"])))
    same = (
        np.asarray([pred["classes"][p] for p in unmatched])[:, None]
        == np.asarray(gt["crowd_classes"])[None, :]
    )
    return int(np.any((cover >= thresh) & same, axis=1).sum())


def _load_ground_truth(dataset_name, records=None):
    """image_id -> {"file_name", "size", "rles", "classes", "levels", "truncated", "crowd_rles",
    "crowd_classes"}; the per-GT lists are aligned, None where an attribute is absent.
    ``records``: only these dataset dicts of it (all of them when None)."""
    gt = OrderedDict()
    for record in DatasetCatalog.get(dataset_name) if records is None else records:
        h, w = int(record["height"]), int(record["width"])
        entry = {
            "file_name": record.get("file_name"),
            "size": (h, w),
            "rles": [],
            "classes": [],
            "levels": [],
            "truncated": [],
            "crowd_rles": [],
            "crowd_classes": [],
        }
        for ann in record.get("annotations", []):
            rle = _annotation_rle(ann, h, w)
            if ann.get("iscrowd", 0):
                entry["crowd_rles"].append(rle)
                entry["crowd_classes"].append(int(ann["category_id"]))
                continue
            entry["rles"].append(rle)
            entry["classes"].append(int(ann["category_id"]))
            level = ann.get("level")
            entry["levels"].append(None if level is None else str(level))
            trunc = ann.get("truncated")
            entry["truncated"].append(None if trunc is None else bool(trunc))
        gt[record["image_id"]] = entry
    return gt


def _annotation_rle(ann, h, w):
    """A GT annotation as one compressed RLE; a box stands in when there is no segmentation."""
    segm = ann.get("segmentation")
    if segm is None:
        box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYWH_ABS)
        # an ndarray: pycocotools 2.0.8+ rejects a list of boxes
        return mask_util.frPyObjects(np.array([box], dtype=np.float64), h, w)[0]
    if isinstance(segm, list):  # polygons
        return mask_util.merge(mask_util.frPyObjects(segm, h, w))
    if isinstance(segm, dict):
        if isinstance(segm["counts"], list):  # uncompressed RLE
            return mask_util.frPyObjects(segm, h, w)
        counts = segm["counts"]
        return {
            "size": list(segm["size"]),
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
    raise TypeError(f"unknown segmentation type {type(segm).__name__} in annotation {ann}")
