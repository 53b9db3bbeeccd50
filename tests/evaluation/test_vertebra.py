"""VertebraEvaluator on synthetic 128x128 masks whose metrics can be worked out by hand."""

import contextlib
import json
import math
import uuid

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from spine_d2.config import add_spine_config
from spine_d2.evaluation import VertebraEvaluator
from spine_d2.evaluation.errors import summarize_errors

SIZE = 128
LEVELS = ["T11", "T12", "L1", "L2"]  # alphabetical order differs from anatomical order
# Four stacked "vertebrae" per image: (x, y, w, h), top to bottom.
RECTS = [(40, 8, 40, 20), (42, 36, 38, 22), (44, 66, 36, 24), (45, 98, 34, 24)]


def rect_mask(x, y, w, h):
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[y : y + h, x : x + w] = True
    return m


def gt_annotation(rect, category_id=0, level=None, rle=False):
    """One GT vertebra, as a polygon or as a compressed RLE with str counts (as read from json)."""
    x, y, w, h = rect
    if rle:
        segm = mask_util.encode(np.asfortranarray(rect_mask(*rect).astype(np.uint8)))
        segm["counts"] = segm["counts"].decode("ascii")
    else:
        segm = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    ann = {"bbox": [x, y, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": category_id}
    ann["segmentation"] = segm
    if level is not None:
        ann["level"] = level
    return ann


def image_record(image_id, annotations):
    return {
        "file_name": f"img{image_id}.png",
        "image_id": image_id,
        "height": SIZE,
        "width": SIZE,
        "annotations": annotations,
    }


def two_images():
    """Image 0 with polygon GT, image 1 with RLE GT; every vertebra carries its level."""
    return [
        image_record(0, [gt_annotation(r, level=l) for r, l in zip(RECTS, LEVELS)]),
        image_record(1, [gt_annotation(r, level=l, rle=True) for r, l in zip(RECTS, LEVELS)]),
    ]


@contextlib.contextmanager
def registered(records, thing_classes=("vertebra",)):
    """Register the records under a unique name and remove them afterwards."""
    name = f"spine_test_vertebra_eval_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=list(thing_classes))
    try:
        yield name
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def prediction(masks, classes=None, scores=None):
    """A model output dict: bool masks, boxes derived from the masks (pixel-edge XYXY)."""
    n = len(masks)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    inst = Instances((SIZE, SIZE))
    inst.pred_masks = torch.as_tensor(np.stack(masks) if n else np.zeros((0, SIZE, SIZE), bool))
    inst.pred_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.as_tensor([1.0] * n if scores is None else scores, dtype=torch.float32)
    inst.pred_classes = torch.as_tensor([0] * n if classes is None else classes, dtype=torch.int64)
    return {"instances": inst}


def run(evaluator, image_ids, outputs):
    evaluator.reset()
    inputs = [{"image_id": i, "height": SIZE, "width": SIZE} for i in image_ids]
    for inp, out in zip(inputs, outputs):  # one image per batch, as in inference_on_dataset
        evaluator.process([inp], [out])
    return evaluator.evaluate()


def perfect_outputs():
    masks = [rect_mask(*r) for r in RECTS]
    return [prediction(masks), prediction(masks)]


def test_perfect_predictions_score_one_and_coco_ap_100(tmp_path):
    with registered(two_images()) as name:
        res = run(VertebraEvaluator(name, output_dir=str(tmp_path)), [0, 1], perfect_outputs())
        coco = run(
            COCOEvaluator(name, tasks=("bbox", "segm"), output_dir=str(tmp_path)),
            [0, 1],
            perfect_outputs(),
        )
    m = res["vertebra"]
    for key in ("recall", "precision", "f1", "mean_dice", "mean_iou", "accuracy"):
        assert m[key] == pytest.approx(1.0, abs=1e-9), key
    assert (m["num_images"], m["num_gt"], m["num_pred"], m["images_with_miss"]) == (2, 8, 8, 0)
    assert all(isinstance(v, float) for v in m.values())
    assert coco["segm"]["AP"] == pytest.approx(100.0)
    assert coco["bbox"]["AP"] == pytest.approx(100.0)
    saved = json.loads((tmp_path / "vertebra_results.json").read_text())
    assert saved["metrics"]["recall"] == 1.0 and len(saved["per_image"]) == 2
    assert not [q for q in tmp_path.iterdir() if ".tmp" in q.name]


def test_one_missed_vertebra_lowers_recall_only():
    masks = [rect_mask(*r) for r in RECTS]
    outputs = [prediction(masks[:2] + masks[3:]), prediction(masks)]  # image 0 misses L1
    with registered(two_images()) as name:
        m = run(VertebraEvaluator(name), [0, 1], outputs)["vertebra"]
    assert m["recall"] == 7 / 8 and m["accuracy"] == 7 / 8
    assert m["precision"] == 1.0
    assert m["images_with_miss"] == 1.0
    assert m["f1"] == pytest.approx(2 * (7 / 8) / (1 + 7 / 8))


def test_image_without_predictions_misses_all_and_empty_gt_costs_precision():
    records = two_images() + [image_record(2, [])]
    masks = [rect_mask(*r) for r in RECTS]
    outputs = [prediction(masks), prediction(masks[:1])]  # image 1 gets nothing: not processed
    with registered(records) as name:
        m = run(VertebraEvaluator(name), [0, 2], outputs)["vertebra"]
    assert m["num_images"] == 3.0
    assert m["recall"] == 4 / 8 and m["images_with_miss"] == 1.0
    assert m["num_pred"] == 5.0 and m["precision"] == 4 / 5


def test_shifted_mask_lowers_dice_by_hand_computed_amount():
    # 20 wide x 30 high, shifted 4 px in x: overlap 16x30 = 480, Dice = 2*480/1200 = 0.8.
    rect = (50, 40, 20, 30)
    shifted = rect_mask(rect[0] + 4, *rect[1:])
    with registered([image_record(0, [gt_annotation(rect)])]) as name:
        m = run(VertebraEvaluator(name), [0], [prediction([shifted])])["vertebra"]
    assert m["mean_dice"] == pytest.approx(0.8, abs=1e-6)
    assert m["mean_iou"] == pytest.approx(480 / 720, abs=1e-6)
    assert m["recall"] == 1.0


def test_from_config_iou_thresh_above_match_keeps_accuracy_at_half():
    """IoU 2/3 misses at SPINE.EVAL.IOU_THRESH 0.7, yet still counts for accuracy (IoU 0.5)."""
    cfg = add_spine_config(get_cfg())
    cfg.SPINE.EVAL.IOU_THRESH = 0.7
    rect = (50, 40, 20, 30)
    shifted = rect_mask(rect[0] + 4, *rect[1:])
    with registered([image_record(0, [gt_annotation(rect)])]) as name:
        ev = VertebraEvaluator.from_config(cfg, name)
        m = run(ev, [0], [prediction([shifted])])["vertebra"]
    assert m["recall"] == 0.0 and m["precision"] == 0.0 and m["f1"] == 0.0
    assert m["accuracy"] == 1.0
    assert math.isnan(m["mean_dice"])
    assert m["images_with_miss"] == 1.0


def test_score_threshold_drops_low_score_predictions():
    masks = [rect_mask(*r) for r in RECTS]
    false_pos = rect_mask(2, 2, 10, 10)
    scores = [0.9, 0.5, 0.49, 0.8, 0.3]  # 0.5 is kept (>=), the L1 mask and the FP are dropped
    outputs = [prediction(masks + [false_pos], scores=scores), prediction(masks)]
    with registered(two_images()) as name:
        m = run(VertebraEvaluator(name, score_thresh=0.5), [0, 1], outputs)["vertebra"]
    assert m["num_pred"] == 7.0 and m["precision"] == 1.0
    assert m["recall"] == 7 / 8
    assert m["recall/L1"] == 0.5


def test_detections_the_chain_rescue_accepted_are_kept_under_the_cut():
    masks = [rect_mask(*r) for r in RECTS]
    scores = [0.9, 0.9, 0.3, 0.9, 0.3]  # L1 and a false positive under the cut
    out = prediction(masks + [rect_mask(2, 2, 10, 10)], scores=scores)
    out["instances"].pred_rescued = torch.tensor([False, False, True, False, False])
    with registered(two_images()) as name:
        m = run(VertebraEvaluator(name, score_thresh=0.5), [0, 1], [out, prediction(masks)])
    m = m["vertebra"]
    assert m["recall"] == 1.0 and m["num_pred"] == 8.0  # L1 kept, the unflagged 0.3 not


def test_matching_is_class_aware_with_per_class_recall():
    classes = ("vertebra", "sacrum")
    records = [image_record(0, [gt_annotation(RECTS[0], 0), gt_annotation(RECTS[1], 1)])]
    masks = [rect_mask(*RECTS[0]), rect_mask(*RECTS[1])]
    out = prediction(masks, classes=[0, 0])  # the sacrum is predicted as a vertebra
    with registered(records, thing_classes=classes) as name:
        m = run(VertebraEvaluator(name), [0], [out])["vertebra"]
    assert m["recall"] == 0.5 and m["precision"] == 0.5
    assert m["recall/vertebra"] == 1.0 and m["recall/sacrum"] == 0.0


def test_per_level_recall_in_level_order_and_level_accuracy():
    masks = [rect_mask(*r) for r in RECTS]
    out0 = prediction(masks[:2] + masks[3:])  # L1 missed in image 0
    out0["pred_levels"] = ["T11", "T11", "L2"]  # the T12 mask is labelled T11
    out1 = prediction(masks)
    with registered(two_images()) as name:
        m = run(VertebraEvaluator(name, levels=LEVELS), [0, 1], [out0, out1])["vertebra"]
        plain = run(VertebraEvaluator(name), [0, 1], [prediction(masks)] * 2)["vertebra"]
    assert [k for k in m if k.startswith("recall/")] == [f"recall/{lvl}" for lvl in LEVELS]
    assert (m["recall/T11"], m["recall/T12"], m["recall/L1"], m["recall/L2"]) == (1, 1, 0.5, 1)
    assert m["level_accuracy"] == 2 / 3  # only image 0 carries predicted levels
    assert "level_accuracy" not in plain  # no pred_levels: nothing to score
    assert [k for k in plain if k.startswith("recall/")] == [f"recall/{lvl}" for lvl in LEVELS]


def test_prediction_on_crowd_region_is_not_a_false_positive():
    crowd = dict(gt_annotation((80, 80, 40, 40)), iscrowd=1)
    records = [image_record(0, [gt_annotation(RECTS[0]), crowd])]
    out = prediction([rect_mask(*RECTS[0]), rect_mask(85, 85, 20, 20)])
    with registered(records) as name:
        m = run(VertebraEvaluator(name), [0], [out])["vertebra"]
    assert m["num_gt"] == 1.0 and m["num_pred"] == 1.0 and m["precision"] == 1.0


def test_level_accuracy_from_instances_pred_levels_indices():
    """LevelROIHeads puts level indices (into SPINE.LEVELS) on the instances themselves."""
    masks = [rect_mask(*r) for r in RECTS]
    out = prediction(masks)
    out["instances"].pred_levels = torch.tensor([0, 1, 3, 3])  # into model_levels below
    with registered(two_images()) as name:
        ev = VertebraEvaluator(name, levels=LEVELS, model_levels=LEVELS)
        m = run(ev, [0, 1], [out, prediction(masks)])["vertebra"]
    assert m["level_accuracy"] == 3 / 4  # L1 labelled L2


def test_recall_split_into_whole_and_truncated_vertebrae(tmp_path):
    # Image 0: the top vertebra is a truncated fragment and is missed, and L1 (whole) is missed;
    # image 1 is found entirely. Whole: 5 of 6 found, truncated: 1 of 2.
    records = two_images()
    for rec in records:
        for k, ann in enumerate(rec["annotations"]):
            ann["truncated"] = k == 0
    masks = [rect_mask(*r) for r in RECTS]
    outputs = [prediction([masks[1], masks[3]]), prediction(masks)]
    with registered(records) as name:
        m = run(VertebraEvaluator(name, output_dir=str(tmp_path)), [0, 1], outputs)["vertebra"]
    assert m["recall"] == 6 / 8
    payload = json.loads((tmp_path / "vertebra_results.json").read_text())
    missed = payload["per_image"][0]["missed"]
    assert [(x["level"], x["truncated"]) for x in missed] == [("T11", True), ("L1", False)]
    assert summarize_errors(payload)["missed_truncated"] == 1
    assert m["recall_whole"] == 5 / 6
    assert m["recall_truncated"] == 1 / 2
    assert m["num_truncated"] == 2.0
    with registered(two_images()) as name:  # no truncated attribute: no split reported
        m = run(VertebraEvaluator(name), [0, 1], outputs)["vertebra"]
    assert "recall_whole" not in m and "recall_truncated" not in m


def test_saved_per_image_errors_name_misses_false_positives_and_level_errors(tmp_path):
    masks = [rect_mask(*r) for r in RECTS]
    shifted_t12 = rect_mask(42, 50, 38, 22)  # 8 of its 22 rows on T12: IoU 8/36, a poor mask
    stray = rect_mask(0, 0, 10, 10)
    out0 = prediction([masks[0], shifted_t12, masks[3], stray])  # L1 not found at all
    out0["pred_levels"] = ["T11", "T12", "L1", "T1"]  # L2 named L1
    outputs = [out0, prediction(masks)]
    with registered(two_images()) as name:
        m = run(VertebraEvaluator(name, output_dir=str(tmp_path)), [0, 1], outputs)["vertebra"]
    saved = json.loads((tmp_path / "vertebra_results.json").read_text())["per_image"]
    img0, img1 = saved
    assert img0["file_name"] == "img0.png" and img0["num_matched"] == 2
    assert img0["missed"] == [
        {"index": 1, "level": "T12", "truncated": None, "best_iou": round(8 / 36, 4)},
        {"index": 2, "level": "L1", "truncated": None, "best_iou": 0.0},
    ]
    assert img0["false_positives"] == 2 and img0["num_pred"] == 4
    assert img0["level_errors"] == [{"gt": "L2", "pred": "L1"}]
    assert img0["gt_levels"] == LEVELS
    assert (img1["missed"], img1["false_positives"], img1["level_errors"]) == ([], 0, [])
    assert m["recall"] == 6 / 8 and m["precision"] == 6 / 8


def test_saved_per_image_counts_rebuild_the_metrics_and_intervals_bracket_them(tmp_path):
    masks = [rect_mask(*r) for r in RECTS]
    shifted = rect_mask(42, 40, 38, 22)  # T12 moved 4 rows: IoU 18/26, matched, Dice 0.818
    out0 = prediction([masks[0], shifted, masks[3]])
    out0["pred_levels"] = ["T11", "T12", "L1"]  # L2 named L1
    out1 = prediction(masks)
    out1["pred_levels"] = list(LEVELS)
    with registered(two_images()) as name:
        m = run(VertebraEvaluator(name, output_dir=str(tmp_path)), [0, 1], [out0, out1])
    m = m["vertebra"]
    saved = json.loads((tmp_path / "vertebra_results.json").read_text())
    img0, img1 = saved["per_image"]
    assert (img0["num_levelled"], img0["level_hits"]) == (3, 2)
    assert (img1["num_levelled"], img1["level_hits"]) == (4, 4)
    assert img0["dice_sum"] == pytest.approx(2 + 2 * (18 / 26) / (1 + 18 / 26))
    assert (img0["dice_sum"] + img1["dice_sum"]) / 7 == pytest.approx(m["mean_dice"])
    assert m["level_accuracy"] == 6 / 7 and m["recall"] == 7 / 8
    iv = saved["intervals"]
    assert iv["resamples"] == 2000 and iv["unit"] == "image"
    # two images: resamples are {0,0}, {0,1}, {1,1}; recall 3/4 .. 1
    assert iv["recall"] == [pytest.approx(0.75), pytest.approx(1.0)]
    for k in ("recall", "precision", "mean_dice", "level_accuracy"):
        assert iv[k][0] <= m[k] <= iv[k][1]
    with registered(two_images()) as name:
        run(VertebraEvaluator(name, output_dir=str(tmp_path), bootstrap=0), [0, 1], [out0, out1])
    assert json.loads((tmp_path / "vertebra_results.json").read_text())["intervals"] == {}


def test_negative_bootstrap_count_is_refused():
    with registered(two_images()) as name:
        with pytest.raises(ValueError, match="bootstrap must be >= 0"):
            VertebraEvaluator(name, bootstrap=-1)


def test_score_cut_sweep_counts_by_hand_from_coco_detections():
    from spine_d2.evaluation.vertebra import sweep_score_cuts

    records = two_images()
    for ann, cut in zip(records[0]["annotations"], (False, False, True, True)):
        ann["truncated"] = cut
    for ann in records[1]["annotations"]:
        ann["truncated"] = False

    def det(image_id, rect, score, category_id=1):
        rle = mask_util.encode(np.asfortranarray(rect_mask(*rect).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")  # as read from COCO json
        return {"image_id": image_id, "category_id": category_id, "segmentation": rle,
                "score": score}  # fmt: skip

    # image 0: the two truncated vertebrae scored 0.4; image 1: all four at 0.9, a false
    # positive at 0.6 and a detection of a class the dataset does not know at 0.9
    dets = [det(0, r, s) for r, s in zip(RECTS, (0.9, 0.9, 0.4, 0.4))]
    dets += [det(1, r, 0.9) for r in RECTS] + [det(1, (0, 0, 12, 12), 0.6)]
    dets.append(det(1, RECTS[0], 0.9, category_id=7))
    with registered(records) as name:
        rows = sweep_score_cuts(name, dets, [0.7, 0.3, 0.5], to_contiguous={1: 0})
    assert [r["score_cut"] for r in rows] == [0.3, 0.5, 0.7]
    at = {r["score_cut"]: r for r in rows}
    assert at[0.3]["recall"] == 1.0 and at[0.3]["precision"] == pytest.approx(8 / 10)
    assert at[0.5]["recall"] == pytest.approx(6 / 8)
    assert at[0.5]["precision"] == pytest.approx(6 / 8)
    assert (at[0.5]["recall_whole"], at[0.5]["recall_truncated"]) == (1.0, 0.0)
    assert at[0.7]["precision"] == pytest.approx(6 / 7)
    assert at[0.7]["f1"] == pytest.approx(2 * (6 / 8) * (6 / 7) / (6 / 8 + 6 / 7))


def test_score_cut_sweep_names_a_detection_without_segmentation():
    from spine_d2.evaluation.vertebra import sweep_score_cuts

    with registered(two_images()) as name:
        with pytest.raises(ValueError, match="detection of image 1 has no segmentation"):
            sweep_score_cuts(name, [{"image_id": 1, "category_id": 0, "score": 0.9}], [0.5])


def test_ground_truth_without_segmentation_is_its_box():
    # pycocotools 2.0.8+ takes boxes only as an ndarray: a list of boxes raised a TypeError here
    from spine_d2.evaluation.vertebra import _annotation_rle

    box = {"bbox": [10.0, 20.0, 30.0, 8.0], "bbox_mode": BoxMode.XYWH_ABS}
    rle = _annotation_rle(box, SIZE, SIZE)
    assert int(mask_util.area(rle)) == 240
    assert mask_util.toBbox(rle).tolist() == [10.0, 20.0, 30.0, 8.0]
    xyxy = dict(box, bbox=[10.0, 20.0, 40.0, 28.0], bbox_mode=BoxMode.XYXY_ABS)
    assert int(mask_util.area(_annotation_rle(xyxy, SIZE, SIZE))) == 240


def test_unpaired_misses_are_counted_as_reported_when_the_export_would_name_them():
    """A vertebra with no detection of its own gets no ZOI; the export must say it is missing.
    Image 0 misses L1 between T12 and L2 (a gap the chain shows), image 1 misses L2 at the bottom
    (no gap: only an expected range names it) and has T11 poorly segmented (paired, so it keeps a
    ZOI and is not counted), image 2 has nothing found (reported whole)."""
    records = two_images() + [
        image_record(2, [gt_annotation(r, level=l) for r, l in zip(RECTS, LEVELS)])
    ]
    masks = [rect_mask(*r) for r in RECTS]
    poor_t11 = rect_mask(40, 20, 40, 20)  # IoU 0.25 with T11's (40, 8, 40, 20)

    def outputs():
        out0 = prediction([masks[0], masks[1], masks[3]])
        out0["pred_levels"] = ["T11", "T12", "L2"]
        out1 = prediction([poor_t11, masks[1], masks[2]])
        out1["pred_levels"] = ["T11", "T12", "L1"]
        return [out0, out1, prediction([])]

    with registered(records) as name:
        plain = run(VertebraEvaluator(name, bootstrap=0), [0, 1, 2], outputs())["vertebra"]
        ends = VertebraEvaluator(name, bootstrap=0, expected_levels=["T11", "L2"], output_dir=None)
        ranged = run(ends, [0, 1, 2], outputs())["vertebra"]
    assert plain["recall"] == 5 / 12  # T11 of image 1 is missed too (poor mask)
    assert plain["missed_unpaired"] == 6.0  # L1, L2 and the four of image 2, not the poor T11
    assert plain["missed_unpaired_reported"] == 5 / 6  # the bottom L2 is silent
    assert ranged["missed_unpaired_reported"] == 1.0


def test_unpaired_misses_are_silent_without_levels_unless_a_gap_shows():
    # no level branch: a gap in the chain still flags the scan but names no level
    masks = [rect_mask(*r) for r in RECTS]
    with registered(two_images()) as name:
        ev = VertebraEvaluator(name, bootstrap=0, output_dir=None)
        m = run(ev, [0, 1], [prediction([masks[0], masks[1], masks[3]]), prediction(masks)])
    assert m["vertebra"]["missed_unpaired"] == 1.0
    assert m["vertebra"]["missed_unpaired_reported"] == 0.0


def test_images_whose_names_disagree_are_counted_as_the_export_would_flag_them():
    """Image 0's chain is named one level off with a repeat (T12, L1, L2, L2: the export lists a
    level conflict); image 1's is one off with no repeat (silent); image 2 all right."""
    records = two_images() + [
        image_record(2, [gt_annotation(r, level=l) for r, l in zip(RECTS, LEVELS)])
    ]
    masks = [rect_mask(*r) for r in RECTS]
    outs = [prediction(masks) for _ in range(3)]
    outs[0]["pred_levels"] = ["T12", "L1", "L2", "L2"]
    outs[1]["pred_levels"] = ["T12", "L1", "L2", "L3"]
    outs[2]["pred_levels"] = list(LEVELS)
    with registered(records) as name:
        ev = VertebraEvaluator(name, bootstrap=0, output_dir=None)
        m = run(ev, [0, 1, 2], outs)["vertebra"]
        per_image = {
            e["image_id"]: e["level_conflicts"]
            for e in ev._score({p["image_id"]: p for p in ev._predictions})[1]
        }
    assert m["level_accuracy"] == pytest.approx(5 / 12)  # image 0: only L2 right; image 1: none
    assert m["images_with_level_conflicts"] == 1.0
    assert m["misnamed_images_flagged"] == 0.5
    assert per_image == {0: 1, 1: 0, 2: 0}


def test_a_chain_named_by_a_thin_margin_is_flagged_as_the_export_would():
    """Image 1 is named one level off with no repeat: silent by repeats alone, flagged when its
    level_margin (the decoder's lead over the chain named one level off) is under
    ZOI.LEVEL_MARGIN. Image 2, named right by a wide margin, is not flagged."""
    records = two_images() + [
        image_record(2, [gt_annotation(r, level=l) for r, l in zip(RECTS, LEVELS)])
    ]
    masks = [rect_mask(*r) for r in RECTS]
    outs = [prediction(masks) for _ in range(3)]
    for out, names, margin in zip(
        outs,
        (["T12", "L1", "L2", "L2"], ["T12", "L1", "L2", "L3"], list(LEVELS)),
        (30.0, 3.0, 20.0),
    ):
        out["pred_levels"] = names
        out["instances"].level_margin = torch.full((len(masks),), margin)
    with registered(records) as name:
        flagged = []
        for threshold in (0.0, 5.0, 25.0):
            ev = VertebraEvaluator(name, bootstrap=0, output_dir=None, level_margin=threshold)
            flagged.append(run(ev, [0, 1, 2], outs)["vertebra"])
        per_image = ev._score({p["image_id"]: p for p in ev._predictions})[1]
    assert [m["images_with_level_conflicts"] for m in flagged] == [1.0, 2.0, 3.0]
    assert [m["misnamed_images_flagged"] for m in flagged] == [0.5, 1.0, 1.0]
    assert [e["level_margin"] for e in per_image] == [30.0, 3.0, 20.0]
