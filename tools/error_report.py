#!/usr/bin/env python
"""Film-by-film errors of an evaluation: which vertebrae were missed, false positives, wrong levels.

Reads what an evaluation wrote (``OUTPUT_DIR/inference/<dataset>/vertebra_results.json`` and,
for the overlays, ``coco_instances_results.json`` beside it) and writes into ``--out`` (default:
``errors/`` beside the results): ``errors.csv`` (one row per film, worst first),
``summary.json`` (also printed) and, with ``--overlays N``, PNGs of the N worst films.
``--kinds`` tags each miss with what the model put over it (``missed_by_kind``: a poor mask of
its own, its own detection under the score cut, only a neighbour's mask, nothing), from every
dumped detection; ``--score-cuts 0.3,0.5,0.7`` adds recall, precision and F1 at those score
cuts (``score_cuts``; to compare two models at equal precision, not at one cut). These three
need the dataset registered as for the evaluation.

    python tools/error_report.py output/aasce/run/inference/spine_aasce_val --kinds --overlays 8
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

import spine_d2  # noqa: F401  (registers the built-in datasets)
from spine_d2.config import VERTEBRA_LEVELS
from spine_d2.data.io import read_scan
from spine_d2.engine.trainer import write_eval_results
from spine_d2.errors import SpineError
from spine_d2.evaluation.errors import (
    badness,
    classify_misses,
    error_overlay,
    load_vertebra_results,
    summarize_errors,
    worst_films,
    write_errors_csv,
)
from spine_d2.evaluation.vertebra import sweep_score_cuts
from spine_d2.report import atomic_png


def _records_and_predictions(payload, results_dir: Path, flag: str):
    """The evaluated dataset's records by image_id and every dumped detection (COCO json)."""
    dataset = payload.get("dataset")
    if dataset not in DatasetCatalog.list():
        raise SpineError(
            f"{payload['path']}: dataset '{dataset}' is not registered here, so {flag} cannot "
            "read its films (is DETECTRON2_DATASETS set as for the evaluation?)"
        )
    coco = results_dir / "coco_instances_results.json"
    try:
        predictions = json.loads(coco.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise SpineError(f"{coco}: needed for {flag} and not readable ({e})") from None
    if not isinstance(predictions, list):
        raise SpineError(f"{coco}: not a list of COCO detections")
    return {r["image_id"]: r for r in DatasetCatalog.get(dataset)}, predictions


def _kinds(payload, records, predictions) -> dict:
    meta = MetadataCatalog.get(payload["dataset"])
    # COCO json holds dataset category ids; the records hold contiguous ones.
    to_contiguous = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
    return classify_misses(payload, predictions, records, pred_classes=to_contiguous)


def _score_cuts(text: str) -> list:
    try:
        cuts = [float(c) for c in text.split(",") if c.strip()]
    except ValueError:
        cuts = []
    if not cuts or not all(0.0 <= c <= 1.0 for c in cuts):
        raise argparse.ArgumentTypeError(f"comma-separated scores in [0, 1], not {text!r}")
    return cuts


def _overlays(payload, records, predictions, out: Path, n: int) -> list:
    dataset = payload.get("dataset")
    thresh = float(payload.get("score_thresh") or 0.0)
    by_image = defaultdict(list)
    for p in predictions:
        if p.get("score", 0.0) >= thresh and "segmentation" in p:
            by_image[p["image_id"]].append(p)
    films = [f for f in worst_films(payload["per_image"]) if badness(f)][:n]
    written = []
    for rank, film in enumerate(tqdm(films, desc="overlays", unit="film"), 1):
        record = records.get(film["image_id"])
        if record is None:
            raise SpineError(f"{payload['path']}: image_id {film['image_id']} is not in {dataset}")
        img = error_overlay(read_scan(record["file_name"]).image, record,
                            by_image.get(film["image_id"], []), film)  # fmt: skip
        stem = Path(str(record["file_name"])).stem.replace(" ", "_")
        written.append(atomic_png(out / "overlays" / f"{rank:03d}_{stem}.png", img))
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("results", help="vertebra_results.json or the folder holding it")
    ap.add_argument("--out", default=None, help="output folder (default: errors/ beside results)")
    ap.add_argument("--overlays", type=int, default=0, help="draw the N worst films as PNG")
    ap.add_argument(
        "--kinds", action="store_true", help="tag each miss with what was over it (missed_by_kind)"
    )
    ap.add_argument(
        "--score-cuts",
        type=_score_cuts,
        default=None,
        help="recall / precision / F1 at these score cuts, e.g. 0.3,0.5,0.7 (score_cuts)",
    )
    args = ap.parse_args(argv)
    setup_logger(name="spine_d2")
    try:
        payload = load_vertebra_results(args.results)
        results_dir = Path(payload["path"]).parent
        out = Path(args.out) if args.out else results_dir / "errors"
        out.mkdir(parents=True, exist_ok=True)
        if args.kinds or args.overlays > 0 or args.score_cuts:
            flag = (
                "--kinds" if args.kinds else "--overlays" if args.overlays > 0 else "--score-cuts"
            )
            records, predictions = _records_and_predictions(payload, results_dir, flag)
        if args.kinds:
            _kinds(payload, records, predictions)
        summary = summarize_errors(payload, VERTEBRA_LEVELS)
        summary["csv"] = write_errors_csv(payload, out / "errors.csv", VERTEBRA_LEVELS)
        if args.score_cuts:
            meta = MetadataCatalog.get(payload["dataset"])
            try:
                summary["score_cuts"] = sweep_score_cuts(
                    payload["dataset"],
                    predictions,
                    args.score_cuts,
                    iou_thresh=float(payload.get("iou_thresh") or 0.5),
                    to_contiguous=getattr(meta, "thing_dataset_id_to_contiguous_id", None),
                )
            except ValueError as e:  # a dump that is not a mask model's
                raise SpineError(f"{results_dir / 'coco_instances_results.json'}: {e}") from None
        if args.overlays > 0:
            summary["overlays"] = _overlays(payload, records, predictions, out, args.overlays)
        write_eval_results(summary, str(out / "summary.json"))
    except SpineError as e:
        print(f"error_report: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k != "overlays"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
