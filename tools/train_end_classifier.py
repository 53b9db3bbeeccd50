#!/usr/bin/env python
"""Train the end classifier (``spine_d2.modeling.end_classifier``) on an annotated split.

The films go through the config's test-time mapper and normalisation, so the classifier sees
exactly the input image the detector crops it from at inference. Its ResNet starts from the
bottom-up weights of ``--init`` (a detector checkpoint of the config's MODEL.RESNETS shape; the
shipped DRR checkpoint by default, which has never seen a real film, so that a fold of the
training films held out of the classifier is also unseen by its features).

    python tools/train_end_classifier.py \
      --config-file configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_drr_stage5_cpu.yaml \
      --dataset spine_aasce_train --val-dataset spine_aasce_val \
      --out output/aasce/end_classifier.json

Then set SPINE.LEVEL_HEAD.END_CLASSIFIER.FILE to the JSON
(configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_end_classifier_cpu.yaml names this one; make
end-classifier-aasce runs both steps).
"""

from __future__ import annotations

import argparse
import sys
import time


def _films(cfg, records, desc):
    """(normalised C x H x W image, {end name: box in that image}) per record with ends."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from spine_d2.data.mapper import XrayDatasetMapper
    from spine_d2.modeling.end_classifier import end_samples

    mapper = XrayDatasetMapper(cfg, is_train=False)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1)
    films = []
    for r in tqdm(records, desc=desc, unit="film", mininterval=10):
        boxes = end_samples(r)
        if not boxes:
            continue
        image = mapper(r)["image"]
        sx, sy = image.shape[2] / r["width"], image.shape[1] / r["height"]
        scale = np.array([sx, sy, sx, sy])
        image = ((image - mean) / std).half()  # half the memory; the crops read it as float32
        films.append((image, {n: b * scale for n, b in boxes.items()}))
    return films


def accuracy(model, films) -> dict:
    """Share of the annotated (and placed) end boxes named right within their group."""
    from spine_d2.modeling.end_classifier import END_NAMES

    hits = {0: [0, 0], 1: [0, 0]}
    for image, boxes in films:
        for name, box in boxes.items():
            k = END_NAMES.index(name)
            group = k // 4
            lp = model.log_probs(image, [box], group)[0]
            hits[group][0] += int(lp.argmax()) == k % 4
            hits[group][1] += 1
    return {g: round(h / max(n, 1), 4) for g, (h, n) in zip(("top", "bottom"), hits.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-file", required=True, help="the detector's config (mapper, RESNETS)")
    ap.add_argument("--dataset", default="spine_aasce_train", help="annotated training split")
    ap.add_argument("--val-dataset", default="", help="report accuracy on this split too")
    ap.add_argument(
        "--init",
        default="weights/spine_mask_rcnn_R_18_FPN_drr.pth",
        help="detector checkpoint whose backbone.bottom_up weights start the ResNet",
    )
    ap.add_argument("--out", required=True, help="JSON to write; the weights go beside it (.pth)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--context-half",
        type=float,
        nargs=2,
        metavar=("WIDTHS", "HEIGHTS"),
        default=None,
        help="half-size of the context box in body widths and heights (default 4 3.5)",
    )
    ap.add_argument(
        "--crop-size",
        type=int,
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        default=None,
        help="pixels the context box is sampled to (default 256 320)",
    )
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    args = ap.parse_args(argv)
    for flag in ("context_half", "crop_size"):
        if any(v <= 0 for v in getattr(args, flag) or ()):
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: sizes must be positive")

    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model
    from detectron2.utils.logger import setup_logger
    from tqdm import tqdm

    from spine_d2.checkpoint import SpineCheckpointer
    from spine_d2.engine.setup import build_config
    from spine_d2.errors import SpineError
    from spine_d2.modeling.end_classifier import EndClassifier, train_end_classifier

    logger = setup_logger(name="spine_d2", abbrev_name="spine")
    try:
        cfg = build_config(args.config_file, ["MODEL.WEIGHTS", args.init, *args.opts])
        for name in filter(None, (args.dataset, args.val_dataset)):
            if name not in DatasetCatalog.list():
                raise SpineError(
                    f"{name}: not a registered dataset (for AASCE run make data-aasce first)"
                )
        films = _films(cfg, DatasetCatalog.get(args.dataset), args.dataset)
        resnets = {k: v for k, v in cfg.MODEL.RESNETS.items() if k != "OUT_FEATURES"}
        detector = build_model(cfg)
        SpineCheckpointer(detector).load(args.init)
        shape = {"context_half": args.context_half, "crop_size": args.crop_size}
        model = EndClassifier.from_detector(
            resnets,
            detector.backbone.bottom_up.state_dict(),
            args.seed,
            **{k: v for k, v in shape.items() if v is not None},
        )
        del detector
        model.to(cfg.MODEL.DEVICE)  # films stay on the CPU; each batch of crops moves
        t0 = time.perf_counter()
        n = sum(len(b) for _, b in films)
        with tqdm(total=args.epochs * -(-n // 32), desc="end classifier", mininterval=30) as bar:
            losses = train_end_classifier(model, films, args.epochs, seed=args.seed, progress=bar)
        wall = time.perf_counter() - t0
        model.eval()
        source = {
            "dataset": args.dataset,
            "films": len(films),
            "samples": n,
            "init": args.init,
            "config": args.config_file,
            "epochs": args.epochs,
            "seed": args.seed,
            "train_s": round(wall, 1),
            "loss_by_epoch": [round(v, 4) for v in losses],
            "train_accuracy": accuracy(model, films),
        }
        if args.val_dataset:
            val = _films(cfg, DatasetCatalog.get(args.val_dataset), args.val_dataset)
            source["val_dataset"] = args.val_dataset
            source["val_accuracy"] = accuracy(model, val)
        model.save(args.out, source)
    except SpineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logger.info(
        f"end classifier: {n} boxes of {len(films)} films, {args.epochs} epochs in {wall:.0f} s; "
        f"accuracy train {source['train_accuracy']}"
        + (f", {args.val_dataset} {source['val_accuracy']}" if args.val_dataset else "")
        + f"; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
