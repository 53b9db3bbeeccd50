#!/usr/bin/env python
"""Fit the learned rescorer (``spine_d2.modeling.rescorer``) of one checkpoint.

Runs the model on a training split with the rescorer's inputs kept, matches each detection to
the ground truth (mask IoU, one-to-one by score) and fits a small MLP to predict the IoU of the
vertebra each detection gets (0 for duplicates and false detections). Then it scores a held-out
split at a row of cuts and names the cut where the smaller of recall and precision is largest:
set the config's score cuts (SPINE.LEVEL_HEAD / EVAL / ZOI.SCORE_THRESH) to it. Fit on a
training split and choose the cut on a validation split; the test split stays unseen.

    python tools/fit_rescorer.py --config-file configs/spine_mask_rcnn_R_18_FPN_drr_cpu.yaml \\
        --weights weights/spine_mask_rcnn_R_18_FPN_drr.pth --out configs/rescorer_drr_v6.json

Then set SPINE.RESCORER.FILE to the file. The rescorer belongs to the checkpoint whose
predictions it was fitted on (its sha256 is recorded; loading it with another logs a warning).
"""

from __future__ import annotations

import argparse
import sys
import time

CUTS = tuple(round(0.05 * k, 2) for k in range(1, 19))


def parse_split(spec: str):
    """``NAME``, ``NAME:K`` or ``NAME:K-L`` -> (name, K, L): only the scans of base views K and
    up (to L, inclusive; None: no upper end)."""
    name, _, views = spec.partition(":")
    first, dash, last = views.partition("-")
    try:
        first = int(first) if first else 0
        last = int(last) if dash else None
    except ValueError:
        raise SystemExit(f"{spec!r}: expected NAME, NAME:FIRST_VIEW or NAME:FIRST-LAST") from None
    if first < 0 or (last is not None and last < first):
        raise SystemExit(f"{spec!r}: view range {views} is empty or negative")
    return name, first, last


def view_filter(dataset: str, first_view: int, last_view=None):
    """The image ids of ``dataset`` whose ``base_view`` ("split/index" in the built-in DRR
    data's COCO file) has an index in [first_view, last_view]; None when not filtering."""
    if not first_view and last_view is None:
        return None
    import json
    from pathlib import Path

    from detectron2.data import MetadataCatalog

    from spine_d2.errors import SpineError

    json_file = getattr(MetadataCatalog.get(dataset), "json_file", None)
    images = json.loads(Path(json_file).read_text())["images"] if json_file else []
    last = float("inf") if last_view is None else last_view
    keep = {
        im["id"]
        for im in images
        if "/" in str(im.get("base_view", ""))
        and first_view <= int(im["base_view"].split("/")[1]) <= last
    }
    if not keep:
        span = f">= {first_view}" if last_view is None else f"{first_view}-{last_view}"
        raise SpineError(f"{dataset}: no scan of a base view {span} (base_view keys)")
    return keep


def collect(cfg, model, dataset: str, limit: int = 0, image_ids=None) -> list:
    """Per image: (features N x F, IoU N x G with the ground truth, class-aware).
    ``image_ids``: only these (all when None); ``limit``: the first N of them."""
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog
    from tqdm import tqdm

    from spine_d2.engine.trainer import SpineTrainer
    from spine_d2.evaluation.vertebra import _load_ground_truth, class_aware_iou, masks_to_rles

    # only the wanted scans are read, mapped and given ground truth
    records = [
        r for r in DatasetCatalog.get(dataset) if image_ids is None or r["image_id"] in image_ids
    ]
    records = records[:limit] if limit else records
    gt = _load_ground_truth(dataset, records)
    loader = SpineTrainer.build_test_loader(cfg, dataset, records)
    items = []
    progress = tqdm(total=len(records), desc=f"fit_rescorer {dataset}", unit="scan")
    with torch.no_grad():
        for batch in loader:
            progress.update()
            inst = model(batch)[0]["instances"].to("cpu")
            g = gt[batch[0]["image_id"]]
            rles = masks_to_rles(inst.pred_masks) if len(inst) else []
            iou = class_aware_iou(rles, inst.pred_classes.tolist(), g["rles"], g["classes"])
            items.append(
                (
                    inst.rescore_features.float().numpy(),
                    np.asarray(iou).reshape(len(inst), len(g["rles"])),
                )
            )
    progress.close()
    return items


def nms_scores(features):
    """Each detection's score after NMS, from its ``nms_score_logit`` feature."""
    import numpy as np

    from spine_d2.modeling.rescorer import FEATURES

    return 1 / (1 + np.exp(-features[:, FEATURES.index("nms_score_logit")]))


def load_cache(path: str, key: dict):
    """(train, val) kept by an earlier run with the same ``key``, else None."""
    import os
    import pickle

    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except Exception:  # a cache is disposable: any unreadable one is simply rebuilt
        return None
    return data["items"] if isinstance(data, dict) and data.get("key") == key else None


def save_cache(path: str, key: dict, items) -> None:
    import os
    import pickle

    from spine_d2.atomic import atomic_open

    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "wb") as f:
        pickle.dump({"key": key, "items": items}, f)


def fit_on(train, args, weights_sha256: str):
    """Fit a rescorer on the kept detections of the training splits -> (rescorer, loss)."""
    import numpy as np

    from spine_d2.errors import SpineError
    from spine_d2.modeling.rescorer import fit_rescorer, match_targets

    if not train:
        raise SpineError(f"{args.train_dataset}: no scans to fit on")
    features = np.concatenate([f for f, _ in train])
    # matched in the order of the scores after NMS (a feature), not of the config's final
    # scores: those depend on its cut (MASK_RESCORE pivots there), which this run chooses
    targets = np.concatenate([match_targets(iou, nms_scores(f)) for f, iou in train])
    if len(features) < 2:
        raise SpineError(f"{args.train_dataset}: the model detected nothing to fit on")
    source = {
        "config": args.config_file,
        "weights": args.weights,
        "weights_sha256": weights_sha256,
        "train_datasets": list(args.train_dataset),
        "train_images": len(train),
        "detections": int(len(features)),
        "matched": int((targets > 0).sum()),
        "target": "mask IoU of the matched vertebra (0: none)",
        "hidden": args.hidden,
        "epochs": args.epochs,
        "seed": args.seed,
    }
    return fit_rescorer(features, targets, args.hidden, args.epochs, args.seed, source=source)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-file", required=True, help="the config the model runs with")
    ap.add_argument("--weights", required=True, help="the checkpoint (MODEL.WEIGHTS)")
    ap.add_argument("--out", required=True, help="JSON to write (temp name, then renamed)")
    ap.add_argument(
        "--train-dataset",
        action="append",
        help="split to fit on (repeat for several; default spine_drr_train); NAME:K keeps the "
        "scans of base views K and up, e.g. the views that --views-train 64 adds to the 32 a "
        "checkpoint trained on (views it never saw); NAME:K-L views K to L",
    )
    ap.add_argument(
        "--val-dataset",
        default="spine_drr_val",
        help="split to choose the cut on (NAME:K-L as for --train-dataset)",
    )
    ap.add_argument(
        "--recut",
        metavar="RESCORER_JSON",
        default="",
        help="no fit: keep this rescorer and choose its cut again on --val-dataset (e.g. your "
        "own validation scans); --out gets it with the new cut and table",
    )
    ap.add_argument("--hidden", type=int, default=32, help="hidden units (0: logistic)")
    ap.add_argument("--epochs", type=int, default=600, help="full-batch Adam steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-images", type=int, default=0, help="use the first N (0: all)")
    ap.add_argument(
        "--cache",
        default="",
        help="keep what the model found here (pickle) and reuse it while the config, weights "
        "and splits are the same: other --hidden / --epochs / --seed refit in seconds",
    )
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    args = ap.parse_args(argv)
    args.train_dataset = args.train_dataset or ["spine_drr_train"]

    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.utils.logger import setup_logger

    import spine_d2.data  # noqa: F401  (registers the built-in datasets)
    from spine_d2.checkpoint import SpineCheckpointer, verify_weights
    from spine_d2.engine.setup import build_config
    from spine_d2.engine.trainer import SpineTrainer
    from spine_d2.errors import SpineError
    from spine_d2.modeling.rescorer import (
        DetectionRescorer,
        choose_cut,
        file_sha256,
        recall_precision,
    )

    logger = setup_logger(name="spine_d2", abbrev_name="spine")
    try:
        opts = ["MODEL.WEIGHTS", args.weights, "SPINE.RESCORER.FILE", "", *args.opts]
        cfg = build_config(args.config_file, opts)
        train_splits = [] if args.recut else [parse_split(spec) for spec in args.train_dataset]
        val_name, val_first, val_last = parse_split(args.val_dataset)
        fixed = DetectionRescorer.load(args.recut) if args.recut else None
        verify_weights(args.weights)  # missing or not its manifest's file: one line, before hours
        for name in [n for n, _, _ in train_splits] + [val_name]:
            if name not in DatasetCatalog.list():
                raise SpineError(f"{name}: not a registered dataset (make data generates it)")
        model = SpineTrainer.build_model(cfg)
        heads = getattr(model, "roi_heads", None)
        if not hasattr(heads, "collect_rescore_features") or not cfg.MODEL.MASK_ON:
            raise SpineError(
                f"{args.config_file}: the rescorer needs ROI_HEADS.NAME LevelROIHeads and masks"
            )
        heads.collect_rescore_features = True
        model.eval()
        start = time.perf_counter()
        key = {
            "format": 2,  # (features, IoU) per scan
            "config": cfg.dump(),
            "weights_sha256": file_sha256(args.weights),
            "train": [] if args.recut else args.train_dataset,
            "val": args.val_dataset,
            "max_images": args.max_images,
        }
        cached = load_cache(args.cache, key)
        if cached is not None:
            logger.info(f"Reusing the detections kept in {args.cache}")
            train, val = cached
        else:
            SpineCheckpointer(model).load(args.weights)
            train = []
            for name, first_view, last_view in train_splits:
                ids = view_filter(name, first_view, last_view)
                train += collect(cfg, model, name, args.max_images, ids)
            val = collect(cfg, model, val_name, 0, view_filter(val_name, val_first, val_last))
            save_cache(args.cache, key, (train, val))
        if fixed is not None:
            rescorer, loss = fixed, float(fixed.source.get("final_loss", float("nan")))
            if fixed.source.get("weights_sha256") not in (None, key["weights_sha256"]):
                logger.warning(
                    f"{args.recut} was fitted on another checkpoint than {args.weights}: "
                    "its scores may not rank this one's detections well"
                )
            rescorer.source["recut_from"] = args.recut
        else:
            rescorer, loss = fit_on(train, args, key["weights_sha256"])
        val_scores = [rescorer(torch.as_tensor(f)).numpy() for f, _ in val]
        val_ious = [iou for _, iou in val]
        own_scores = [nms_scores(f) for f, _ in val]
        table = []
        for cut in CUTS:
            r, p, f1 = recall_precision(val_ious, val_scores, cut)
            own = recall_precision(val_ious, own_scores, cut)
            table.append({"cut": cut, "recall": r, "precision": p, "f1": f1})
            table[-1].update({"own_recall": own[0], "own_precision": own[1], "own_f1": own[2]})
        cut = choose_cut(table)
        rescorer.source.update(
            {
                "final_loss": round(loss, 5),
                "val_dataset": args.val_dataset,
                "val_images": len(val),
                "val_table_note": "recall / precision / f1 with the rescorer; own_*: the "
                "model's own scores after NMS (no mask rescoring) at the same cut",
                "val_table": [{k: round(v, 4) for k, v in row.items()} for row in table],
                "cut": cut,
                "cut_rule": "largest min(recall, precision) on val_dataset, F1 breaks ties",
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        rescorer.save(args.out)
    except SpineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logger.info(f"{args.val_dataset}, rescored (the model's own after NMS in brackets):")
    for row in table:
        mark = "  <- chosen" if row["cut"] == cut else ""
        logger.info(
            f"  cut {row['cut']:.2f}: recall {row['recall']:.4f} ({row['own_recall']:.4f}) "
            f"precision {row['precision']:.4f} ({row['own_precision']:.4f}) "
            f"F1 {row['f1']:.4f} ({row['own_f1']:.4f}){mark}"
        )
    fitted = (
        f"the fit of {args.recut} kept"
        if args.recut
        else f"{rescorer.source['detections']} detections of {len(train)} scans, loss {loss:.4f}"
    )
    logger.info(
        f"Wrote {args.out} ({fitted}); set SPINE.RESCORER.FILE to it and the score cuts to {cut}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
