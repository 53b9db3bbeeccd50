#!/usr/bin/env python
"""Training step time of our model against torchvision's Mask R-CNN built the same way.

Both models: ResNet-18 (GroupNorm, from scratch) + FPN of the CPU config's width, the same
batch of synthetic scans at the CPU config's input size with ~12 vertebra targets each, one
process, steps interleaved (ours, theirs, ours, ...) so that machine noise hits both alike.
A step is forward + backward + optimizer step. Each precision (fp32, and bf16 autocast on the
CPU / fp16 autocast on CUDA) is timed separately. Prints one JSON line and saves it.

    python benchmarks/bench_train.py                    # CPU config, 384 px, batch 2
    python benchmarks/bench_train.py --steps 3 --size 128 --out /tmp/bench_train.json  # smoke
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from summarize import write_result  # benchmarks/ is on sys.path when run as a script
from torch import nn

DEFAULT_CONFIG = "configs/spine_mask_rcnn_R_18_FPN_scratch_gn_cpu.yaml"


def synthetic_batch(cfg, size: int, batch: int, seed: int = 0):
    """Mapper output for ``batch`` synthetic scans resized to ``size`` (real masks and levels)."""
    import tempfile

    from spine_d2.data.datasets import load_spine_coco
    from spine_d2.data.mapper import XrayDatasetMapper
    from spine_d2.data.synthetic import make_synthetic_spine_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    json_file, root = make_synthetic_spine_dataset(tmp, num_images=batch, size=size, seed=seed)
    records = load_spine_coco(json_file, root, "bench_train")
    mapper = XrayDatasetMapper(cfg, is_train=True, augmentations=[])
    return [mapper(r) for r in records]


def torchvision_model(cfg, size: int):
    """torchvision Mask R-CNN with the same backbone depth, norm, FPN width and head sizes
    (box MLP width, mask convs; no level branch: it has none);
    its transform keeps the ``size`` px inputs as they are (no second resize)."""
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    norm = partial(nn.GroupNorm, 32)
    body = resnet18(weights=None, norm_layer=norm)
    fpn_ch = cfg.MODEL.FPN.OUT_CHANNELS
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
        in_channels_list=[64, 128, 256, 512],
        out_channels=fpn_ch,
    )
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1
    fc, mask_dim = cfg.MODEL.ROI_BOX_HEAD.FC_DIM, cfg.MODEL.ROI_MASK_HEAD.CONV_DIM
    mask_norm = norm if cfg.MODEL.ROI_MASK_HEAD.NORM == "GN" else None
    return MaskRCNN(
        backbone,
        num_classes=None,
        # the CPU config's head sizes: 2 FC of FC_DIM; NUM_CONV x CONV_DIM mask convs (GN)
        box_head=TwoMLPHead(fpn_ch * 7 * 7, fc),
        box_predictor=FastRCNNPredictor(fc, num_classes),
        mask_head=MaskRCNNHeads(
            fpn_ch, [mask_dim] * cfg.MODEL.ROI_MASK_HEAD.NUM_CONV, 1, norm_layer=mask_norm
        ),
        mask_predictor=MaskRCNNPredictor(mask_dim, mask_dim, num_classes),
        min_size=size,
        max_size=size,
        image_mean=[m / 255 for m in cfg.MODEL.PIXEL_MEAN],
        image_std=[s / 255 for s in cfg.MODEL.PIXEL_STD],
        rpn_pre_nms_top_n_train=cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN,
        rpn_post_nms_top_n_train=cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN,
        box_batch_size_per_image=cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
        box_detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE,
    )


def torchvision_inputs(batch):
    images = [b["image"] / 255.0 for b in batch]
    targets = []
    for b in batch:
        inst = b["instances"]
        h, w = inst.image_size
        targets.append(
            {
                "boxes": inst.gt_boxes.tensor,
                "labels": inst.gt_classes + 1,
                "masks": _bitmasks(inst, h, w),
            }
        )
    return images, targets


def _bitmasks(inst, h, w):
    from detectron2.structures import polygons_to_bitmask

    return torch.stack(
        [torch.from_numpy(polygons_to_bitmask(p, h, w)) for p in inst.gt_masks.polygons]
    ).to(torch.uint8)


def make_step(model, loss_fn, amp: str, device: str):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def step():
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            losses = loss_fn()
        loss = sum(v.float() for v in losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-file", default=DEFAULT_CONFIG)
    ap.add_argument("--size", type=int, default=0, help="input size (default: MIN_SIZE_TEST)")
    ap.add_argument("--batch", type=int, default=0, help="default: SOLVER.IMS_PER_BATCH")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per model and precision")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="output/bench/bench_train.json")
    args = ap.parse_args()

    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from spine_d2.engine.setup import build_config

    cfg = build_config(args.config_file)
    size = args.size or cfg.INPUT.MIN_SIZE_TEST
    batch_n = args.batch or cfg.SOLVER.IMS_PER_BATCH
    device = cfg.MODEL.DEVICE
    torch.manual_seed(0)
    batch = synthetic_batch(cfg, size, batch_n)
    ours = build_model(cfg).train()
    theirs = torchvision_model(cfg, size).to(device).train()
    tv_images, tv_targets = torchvision_inputs(batch)
    tv_images = [i.to(device) for i in tv_images]
    tv_targets = [{k: v.to(device) for k, v in t.items()} for t in tv_targets]
    precisions = ["fp32", "bf16" if device == "cpu" else "fp16"]
    result = {
        "config": args.config_file,
        "size": size,
        "batch": batch_n,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "steps": args.steps,
    }
    with EventStorage():
        for amp in precisions:
            runs = {
                "detectron2": make_step(ours, lambda: ours(batch), amp, device),
                "torchvision": make_step(
                    theirs, lambda: theirs(tv_images, tv_targets), amp, device
                ),
            }
            times = {k: [] for k in runs}
            for i in range(args.warmup + args.steps):
                for name, step in runs.items():
                    t = step()
                    if i >= args.warmup:
                        times[name].append(t)
            med = {k: statistics.median(v) for k, v in times.items()}
            result[amp] = {
                "s_per_step_detectron2": round(med["detectron2"], 4),
                "s_per_step_torchvision": round(med["torchvision"], 4),
                "ratio_detectron2_over_torchvision": round(
                    med["detectron2"] / med["torchvision"], 3
                ),
            }
    fp32, low = result["fp32"], result[precisions[1]]
    result["autocast_speedup_detectron2"] = round(
        fp32["s_per_step_detectron2"] / low["s_per_step_detectron2"], 3
    )
    write_result(result, args.out)


if __name__ == "__main__":
    from spine_d2.errors import run_cli

    run_cli(main, "bench_train")
