#!/usr/bin/env python
"""Mask levers at inference: segm AP and vertebra recall against the mask binarisation threshold,
with and without flip-averaged mask probabilities.

Runs the model once per scan (boxes, scores and levels of the plain pass), then the backbone and
mask head again on the horizontally flipped scan for the mirrored boxes, and feeds the project's
evaluators (COCO segm + VertebraEvaluator) every combination of ``--thresholds`` (where
detectron2's paste binarises the 28x28 probabilities; it uses 0.5) and {plain masks, mean of the
plain and the un-mirrored flipped probabilities}. The boxes never change, so box AP and the
set of detections are the same in every variant; only the masks (and so mask-IoU matching) do.
docs/results-drr.md, "Masks are what holds segm AP back".

    python benchmarks/bench_masks.py                  # the shipped checkpoint on spine_drr_val
    python benchmarks/bench_masks.py --config-file configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_drr_stage1_cpu.yaml \\
        --weights output/aasce/spine_mask_rcnn_R_18_FPN_aasce_drr_stage1_cpu/model_final.pth --dataset spine_aasce_val

Prints one JSON line and saves it.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from summarize import (  # benchmarks/ is on sys.path when run as a script
    SHIPPED_CONFIG,
    SHIPPED_WEIGHTS,
    float_list,
    write_result,
)
from tqdm import tqdm

_thresholds = float_list(lambda t: 0 < t < 1, "thresholds must be in (0, 1)")


def mirror_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """XYXY boxes of an image ``width`` pixels wide -> the same boxes in its horizontal mirror."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def mask_passes(model, batch):
    """Plain detections (at the network's input size, not yet pasted) and, per image, the mean
    of their mask probabilities with those predicted on the mirrored scan for mirrored boxes."""
    from detectron2.structures import Boxes, Instances

    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    detections, _ = model.roi_heads(images, features, proposals, None)
    # Flipping the inputs (not the padded tensor) keeps the padding on the right.
    flipped = [dict(x, image=x["image"].flip(-1)) for x in batch]
    flipped_features = model.backbone(model.preprocess_image(flipped).tensor)
    mirrored = [
        Instances(
            d.image_size,
            pred_boxes=Boxes(mirror_boxes(d.pred_boxes.tensor, size[1])),
            pred_classes=d.pred_classes,
        )
        for d, size in zip(detections, images.image_sizes)
    ]
    mirrored = model.roi_heads.forward_with_given_boxes(flipped_features, mirrored)
    averaged = [(d.pred_masks + m.pred_masks.flip(-1)) / 2 for d, m in zip(detections, mirrored)]
    return detections, averaged


def pasted(detections, masks, batch, threshold: float) -> list:
    """detector_postprocess of each image's detections with ``masks`` at ``threshold``; the
    originals are left as they are (postprocess rescales boxes in place)."""
    from detectron2.modeling.postprocessing import detector_postprocess
    from detectron2.structures import Boxes, Instances

    outputs = []
    for d, m, x in zip(detections, masks, batch):
        fields = dict(d.get_fields(), pred_boxes=Boxes(d.pred_boxes.tensor.clone()), pred_masks=m)
        inst = Instances(d.image_size, **fields)
        outputs.append(
            {"instances": detector_postprocess(inst, x["height"], x["width"], threshold)}
        )
    return outputs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-file", default=SHIPPED_CONFIG)
    ap.add_argument("--weights", default=SHIPPED_WEIGHTS)
    ap.add_argument("--dataset", default="spine_drr_val")
    ap.add_argument("--thresholds", type=_thresholds, default="0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--out", default="output/bench/bench_masks.json")
    args = ap.parse_args(argv)

    from detectron2.data import DatasetCatalog

    from spine_d2.checkpoint import SpineCheckpointer
    from spine_d2.engine.setup import build_config
    from spine_d2.engine.trainer import SpineTrainer

    cfg = build_config(args.config_file, ["MODEL.WEIGHTS", args.weights, "SPINE.EVAL.AMP", ""])
    if args.dataset not in DatasetCatalog.list():
        spine = ", ".join(n for n in DatasetCatalog.list() if n.startswith("spine_"))
        ap.error(f"--dataset {args.dataset} is not registered (registered here: {spine}; "
                 "make data generates spine_drr_*)")  # fmt: skip
    model = SpineTrainer.build_model(cfg)
    model.eval()
    SpineCheckpointer(model).load(args.weights)
    loader = SpineTrainer.build_test_loader(cfg, args.dataset)
    variants = [(flip, t) for flip in (False, True) for t in args.thresholds]
    scratch = tempfile.TemporaryDirectory(prefix="bench_masks_")
    evaluators = {}
    for flip, t in variants:
        ev = SpineTrainer.build_evaluator(cfg, args.dataset, f"{scratch.name}/{int(flip)}_{t:g}")
        ev.reset()
        evaluators[flip, t] = ev
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"bench_masks {args.dataset}", unit="scan"):
            detections, averaged = mask_passes(model, batch)
            plain = [d.pred_masks for d in detections]
            for (flip, t), ev in evaluators.items():
                ev.process(batch, pasted(detections, averaged if flip else plain, batch, t))
    t_infer = time.perf_counter() - t0
    table = {}
    for (flip, t), ev in evaluators.items():
        r = ev.evaluate()
        v = r["vertebra"]
        table.setdefault("flip" if flip else "plain", {})[f"{t:g}"] = {
            "segm_AP": round(r["segm"]["AP"], 2),
            "segm_AP50": round(r["segm"]["AP50"], 2),
            "segm_AP75": round(r["segm"]["AP75"], 2),
            "recall": round(v["recall"], 4),
            "precision": round(v["precision"], 4),
            "mean_dice": round(v["mean_dice"], 4),
        }
    scratch.cleanup()
    best = max(
        ((k, t) for k in table for t in table[k]), key=lambda kt: table[kt[0]][kt[1]]["segm_AP"]
    )
    result = {
        "bench": "masks",
        "config": args.config_file,
        "weights": args.weights,
        "dataset": args.dataset,
        "by_threshold": table,
        "segm_AP_default": table["plain"].get("0.5", {}).get("segm_AP"),
        "segm_AP_flip_default": table["flip"].get("0.5", {}).get("segm_AP"),
        "best": {"masks": best[0], "threshold": float(best[1]), **table[best[0]][best[1]]},
        "inference_s": round(t_infer, 1),
    }
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    from spine_d2.errors import run_cli

    run_cli(main, "bench_masks")
