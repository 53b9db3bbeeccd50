"""Error analysis (spine_d2.evaluation.errors, tools/error_report.py) on hand-made results and
on a real evaluation of synthetic 128x128 scans."""

import csv
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Instances

from spine_d2.errors import SpineError
from spine_d2.evaluation import VertebraEvaluator
from spine_d2.evaluation.errors import (
    film_shift,
    load_vertebra_results,
    summarize_errors,
    worst_films,
)
from spine_d2.evaluation.vertebra import masks_to_rles

TOOL = Path(__file__).resolve().parents[2] / "tools" / "error_report.py"
LEVELS = ["T1", "T2", "T3", "L4", "L5"]


def film(image_id, missed=(), fp=0, errors=(), gt_levels=LEVELS):
    return {
        "image_id": image_id,
        "file_name": f"f{image_id}.png",
        "num_gt": len(gt_levels),
        "num_pred": len(gt_levels) - len(missed) + fp,
        "num_matched": len(gt_levels) - len(missed),
        "false_positives": fp,
        "gt_levels": list(gt_levels),
        "missed": [{"index": LEVELS.index(l), "level": l, "best_iou": iou} for l, iou in missed],
        "level_errors": [{"gt": g, "pred": p} for g, p in errors],
    }


def test_shift_is_the_most_common_offset():
    assert film_shift(film(0, errors=[("T2", "T3"), ("T3", "L4"), ("L4", "L5")])) == 1
    assert film_shift(film(0, errors=[("T2", "T1"), ("T3", "T2"), ("L5", "T3")])) == -1
    assert film_shift(film(0)) == 0


def test_summary_counts_misses_shifts_and_ends():
    payload = {
        "dataset": "d",
        "per_image": [
            # chain one too low, L5 not found: the lowest body found took its name
            film(0, missed=[("L5", 0.0), ("T1", 0.3)], errors=[("T3", "L4"), ("L4", "L5")]),
            film(1, missed=[("T1", 0.0)], fp=2, errors=[("T2", "T1"), ("T3", "T2")]),
            film(2),
        ],
    }
    payload["per_image"][0]["unreported"] = ["L5"]  # the export would not have named it
    s = summarize_errors(payload)
    assert (s["films"], s["films_with_miss"], s["missed"], s["gt"]) == (3, 2, 3, 15)
    assert s["missed_by_level"] == {"T1": 2, "L5": 1}  # anatomical order, not alphabetical
    assert (s["missed_with_partial_mask"], s["missed_unpaired"]) == (1, 2)
    assert s["missed_unpaired_silent"] == 1
    del payload["per_image"][0]["unreported"]  # results from before the evaluator said
    assert summarize_errors(payload)["missed_unpaired_silent"] is None
    assert s["films_by_shift"] == {"-1": 1, "+1": 1}
    assert s["films_too_low_with_bottom_missed"] == 1 and s["films_too_high_with_top_missed"] == 1
    assert (s["false_positives"], s["level_errors"], s["matched"]) == (2, 4, 12)
    # badness = misses + false positives + wrong names: film 1 has 5, film 0 has 4
    assert [f["image_id"] for f in worst_films(payload["per_image"])] == [1, 0, 2]


def test_bad_results_files_are_named(tmp_path):
    with pytest.raises(SpineError, match="vertebra_results.json: no such file"):
        load_vertebra_results(tmp_path)
    bad = tmp_path / "vertebra_results.json"
    bad.write_text("{not json")
    with pytest.raises(SpineError, match="not readable as JSON"):
        load_vertebra_results(bad)
    bad.write_text(json.dumps({"per_image": [{"image_id": 1, "num_gt": 3}]}))
    with pytest.raises(SpineError, match="older spine-d2"):
        load_vertebra_results(tmp_path)


def _prediction(masks, levels, size):
    inst = Instances((size, size))
    inst.pred_masks = torch.as_tensor(np.stack(masks))
    inst.scores = torch.full((len(masks),), 0.9)
    inst.pred_classes = torch.zeros(len(masks), dtype=torch.int64)
    return {"instances": inst, "pred_levels": list(levels)}


def _gt_masks(record):
    h, w = record["height"], record["width"]
    return [
        mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w))) > 0
        for a in record["annotations"]
    ]


def test_report_from_a_real_evaluation(synthetic_train, tmp_path):
    all_records = DatasetCatalog.get(synthetic_train)
    records = all_records[:2]
    size = records[0]["height"]
    eval_dir = tmp_path / "inference"
    evaluator = VertebraEvaluator(synthetic_train, output_dir=str(eval_dir))
    evaluator.reset()
    coco = []
    # a COCO dump holds the dataset's category ids, not the contiguous ones
    to_contiguous = MetadataCatalog.get(synthetic_train).thing_dataset_id_to_contiguous_id
    dataset_id = next(d for d, c in to_contiguous.items() if c == 0)
    for k, rec in enumerate(all_records):
        masks = _gt_masks(rec)
        levels = [a["level"] for a in rec["annotations"]]
        if k == 0:  # image 0: its second vertebra missed, a stray blob found instead
            stray = np.zeros((size, size), bool)
            stray[2:10, 2:10] = True
            masks, levels = masks[:1] + masks[2:] + [stray], levels[:1] + levels[2:] + ["C7"]
        elif k == 1:  # image 1: everything found, every name one level too low
            levels = levels[1:] + ["L5"]
        out = _prediction(masks, levels, size)
        evaluator.process([{"image_id": rec["image_id"]}], [out])
        for rle in masks_to_rles(np.stack(masks)):
            rle["counts"] = rle["counts"].decode("ascii")
            coco.append({"image_id": rec["image_id"], "category_id": dataset_id,
                         "segmentation": rle, "score": 0.9})  # fmt: skip
    evaluator.evaluate()
    (eval_dir / "coco_instances_results.json").write_text(json.dumps(coco))

    spec = importlib.util.spec_from_file_location("error_report", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "errors"
    args = [str(eval_dir), "--out", str(out), "--overlays", "2", "--kinds"]
    assert tool.main(args + ["--score-cuts", "0.95,0.5"]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["missed"], summary["false_positives"]) == (1, 1)
    # every detection scored 0.9: all of them at 0.5 (the evaluation's one miss and one false
    # positive), none at 0.95
    num_gt = sum(len(r["annotations"]) for r in all_records)
    low, high = summary["score_cuts"]
    assert [low["score_cut"], high["score_cut"]] == [0.5, 0.95]
    assert low["recall"] == pytest.approx((num_gt - 1) / num_gt)
    assert low["precision"] == pytest.approx((num_gt - 1) / num_gt)
    assert high["recall"] == 0.0
    assert summary["missed_by_kind"]["not_detected"] == 1  # the stray blob is far from it
    assert summary["films_by_shift"] == {"+1": 1}
    rows = list(csv.DictReader((out / "errors.csv").open()))
    assert len(rows) == len(all_records)
    first = {r["image_id"]: r for r in rows}[str(records[0]["image_id"])]
    level = records[0]["annotations"][1]["level"]
    assert first["missed"] == f"{level}(not_detected)"  # nothing overlapped it
    assert first["false_positives"] == "1"
    second = {r["image_id"]: r for r in rows}[str(records[1]["image_id"])]
    assert second["shift"] == "+1" and second["missed"] == ""

    pngs = sorted((out / "overlays").glob("*.png"))
    assert len(pngs) == 2
    yellow = [int(np.all(cv2.imread(str(p)) == (0, 215, 255), axis=2).sum()) for p in pngs]
    by_name = dict(zip([p.name for p in pngs], yellow))
    missed_png = next(n for n in by_name if Path(records[0]["file_name"]).stem in n)
    shifted_png = next(n for n in by_name if Path(records[1]["file_name"]).stem in n)
    assert by_name[missed_png] > 20 and by_name[shifted_png] == 0  # only the miss is yellow


def test_bad_score_cuts_are_refused(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("error_report", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for bad in ("0.5,x", "1.5", ""):
        with pytest.raises(SystemExit):
            tool.main([str(tmp_path), "--score-cuts", bad])
        assert "comma-separated scores in [0, 1]" in capsys.readouterr().err


def test_overlays_need_the_dataset_registered(tmp_path):
    results = {"dataset": "spine_not_registered_here", "score_thresh": 0.5,
               "per_image": [film(0, missed=[("T1", 0.0)])]}  # fmt: skip
    (tmp_path / "vertebra_results.json").write_text(json.dumps(results))
    spec = importlib.util.spec_from_file_location("error_report", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(tmp_path), "--overlays", "1"]) == 1
    assert not (tmp_path / "errors" / "summary.json").exists()


def test_overlay_draws_rle_ground_truth_and_marks_the_missed_one():
    from spine_d2.evaluation.errors import error_overlay

    size = 64
    anns = []
    for y0 in (8, 36):
        m = np.zeros((size, size), np.uint8)
        m[y0 : y0 + 16, 20:44] = 1
        rle = mask_util.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")  # as read from COCO json
        anns.append({"segmentation": rle, "level": "T1" if y0 == 8 else "T2", "iscrowd": 0})
    record = {"annotations": anns}
    missed_second = {
        "missed": [{"index": 1, "level": "T2", "best_iou": 0.0}],
        "false_positives": 0,
        "level_errors": [],
    }
    img = error_overlay(np.full((size, size), 0.5, np.float32), record, [], missed_second, 128)
    b, g, r = (img[..., i].astype(int) for i in range(3))  # anti-aliased lines blend: by hue
    yellow = (r > 180) & (g > 150) & (b < 100)
    green = (g > r + 40) & (g > b + 40)
    rows_y, rows_g = np.nonzero(yellow)[0], np.nonzero(green)[0]
    assert yellow.sum() > 50 and green.sum() > 30
    assert rows_g.min() < rows_y.min()  # T1 (found, green) is drawn above T2 (missed, yellow)


def test_results_that_are_not_an_evaluators_are_named(tmp_path):
    (tmp_path / "vertebra_results.json").write_text(json.dumps([1, 2]))
    with pytest.raises(SpineError, match="no per_image list: not a VertebraEvaluator result"):
        load_vertebra_results(tmp_path)


def test_overlays_name_a_missing_predictions_file_and_an_unknown_image(
    synthetic_train, tmp_path, capsys
):
    spec = importlib.util.spec_from_file_location("error_report", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    results = {"dataset": synthetic_train, "score_thresh": 0.5,
               "per_image": [film(999, missed=[("T1", 0.0)])]}  # fmt: skip
    (tmp_path / "vertebra_results.json").write_text(json.dumps(results))
    assert tool.main([str(tmp_path), "--overlays", "1"]) == 1
    assert "coco_instances_results.json: needed for --overlays" in capsys.readouterr().err
    (tmp_path / "coco_instances_results.json").write_bytes(b"\x89PNG\r\n")  # not UTF-8
    assert tool.main([str(tmp_path), "--kinds"]) == 1
    assert "coco_instances_results.json: needed for --kinds and not readable (" in (
        capsys.readouterr().err
    )
    (tmp_path / "coco_instances_results.json").write_text('{"not": "a list"}')
    assert tool.main([str(tmp_path), "--kinds"]) == 1
    assert "coco_instances_results.json: not a list of COCO detections" in capsys.readouterr().err
    (tmp_path / "coco_instances_results.json").write_text("[]")
    assert tool.main([str(tmp_path), "--overlays", "1"]) == 1
    assert f"image_id 999 is not in {synthetic_train}" in capsys.readouterr().err
    assert not (tmp_path / "errors" / "summary.json").exists()


def _rle_json(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _band(rows, h=96, w=64):
    m = np.zeros((h, w), np.uint8)
    m[rows[0] : rows[1], 20:44] = 1
    return m


def test_misses_are_classified_by_what_lies_over_them():
    from spine_d2.evaluation.errors import MISS_KINDS, classify_misses

    names = ["T1", "T2", "T3", "L4", "L5", "S1"]
    bands = [(4, 15), (16, 27), (28, 39), (40, 51), (52, 61), (70, 81)]
    record = {
        "height": 96,
        "width": 64,
        "annotations": [
            {"segmentation": _rle_json(_band(b)), "level": n, "category_id": 0, "iscrowd": 0}
            for n, b in zip(names, bands)
        ],
    }
    preds = [
        (_band((4, 15)), 0.9, 7),  # T1 found
        (_band((21, 32)), 0.9, 7),  # T2's own, slid half a body down: IoU 0.38 with T2
        (_band((28, 39)), 0.3, 7),  # T3 exactly, under the score cut
        (_band((44, 61)), 0.9, 7),  # L5's (IoU 0.53), reaching over most of L4
        (_band((70, 81)), 0.9, 8),  # over S1 but of another class
    ]
    coco = [
        {"image_id": 3, "category_id": c, "segmentation": _rle_json(m), "score": s}
        for m, s, c in preds
    ]
    missed = [{"index": i, "level": names[i], "best_iou": 0.0} for i in (1, 2, 3, 5)]
    payload = {
        "path": "r.json",
        "score_thresh": 0.5,
        "iou_thresh": 0.5,
        "per_image": [
            {"image_id": 3, "file_name": "f3.png", "num_gt": 6, "num_pred": 4,
             "num_matched": 2, "false_positives": 2, "gt_levels": names, "missed": missed,
             "level_errors": []}  # fmt: skip
        ],
    }
    counts = classify_misses(payload, coco, {3: record}, pred_classes={7: 0, 8: 1})
    kinds = {m["level"]: m["kind"] for m in payload["per_image"][0]["missed"]}
    assert kinds == {"T2": "poor_mask", "T3": "low_score", "L4": "under_neighbour",
                     "S1": "not_detected"}  # fmt: skip
    assert counts == {k: int(k != "unmatched") for k in MISS_KINDS}
    # Class-agnostic, the other class's mask fits S1 (IoU 1) though the evaluator did not pair it.
    classify_misses(payload, coco, {3: record})
    assert missed[3]["kind"] == "unmatched"

    summary = summarize_errors(payload, names)
    assert summary["missed_by_kind"] == {k: int(k != "not_detected") for k in MISS_KINDS}
    assert summary["missed_by_kind_and_level"] == {
        "poor_mask": {"T2": 1}, "low_score": {"T3": 1}, "under_neighbour": {"L4": 1},
        "unmatched": {"S1": 1}}  # fmt: skip


def test_classify_misses_names_results_of_another_dataset():
    from spine_d2.evaluation.errors import classify_misses

    record = {"height": 96, "width": 64, "annotations": []}
    payload = {"path": "r.json", "score_thresh": 0.5,
               "per_image": [film(3, missed=[("T2", 0.0)])]}  # fmt: skip
    with pytest.raises(SpineError, match="missed index 1 but 0 annotations"):
        classify_misses(payload, [], {3: record})
    with pytest.raises(SpineError, match="image_id 3 has no record"):
        classify_misses(payload, [], {})


def test_summary_counts_the_films_the_export_would_flag_for_level_conflicts():
    films = [
        film(0, errors=[("T3", "L4"), ("L4", "L5")]),  # named off, flagged
        film(1, errors=[("T2", "T1")]),  # named off, silent
        film(2),  # right, flagged (a duplicate a spacing apart)
        film(3),
    ]
    for f, n in zip(films, (1, 0, 2, 0)):
        f["level_conflicts"] = n
    s = summarize_errors({"dataset": "d", "per_image": films})
    assert (s["films_with_level_conflicts"], s["films_with_level_errors_flagged"]) == (2, 1)
    for f in films:
        del f["level_conflicts"]  # results from before the evaluator counted them
    s = summarize_errors({"dataset": "d", "per_image": films})
    assert s["films_with_level_conflicts"] is None is s["films_with_level_errors_flagged"]
