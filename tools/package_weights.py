#!/usr/bin/env python
"""Package a trained model as the shipped checkpoint: fp16 weights + manifest (weights/).

    python tools/package_weights.py --train-dir output/pretrained_r18 \
        --train-dir output/pretrained_r18_stage2 \
        --config-file configs/pretrain/spine_mask_rcnn_R_18_FPN_drr_stage1_cpu.yaml \
        --config-file configs/pretrain/spine_mask_rcnn_R_18_FPN_drr_stage2_cpu.yaml \
        --eval output/pretrained_r18_eval_fp16/inference/eval_results.json \
        --out weights/spine_mask_rcnn_R_18_FPN_drr.pth

A model trained in stages (each a new cosine cycle from the last one's final model) is given as
one --train-dir per stage, in order, with one --config-file each; the weights are the last
stage's, iterations and wall time add up, and the training curve runs on across the stages.

A new stage trained from an already shipped checkpoint (whose run folders are long gone) is
packaged with --continue-from <its manifest>: the manifest's stages, iterations, wall time and
curve come first, and each stage records the digest of the dataset it was trained on.

The manifest records the sha256 (checked before every load), the config, the dataset's
generator version, seed and digest, iterations, wall time, hardware, the training curve of the
run's periodic test-split evaluations (wall minutes from log.txt) and the test-split metrics
given by --eval (evaluate the packaged fp16 file itself, then re-run with --eval to record it).
"""

import argparse
import json
import os
import platform
import re
import sys
from datetime import datetime
from pathlib import Path

import yaml

from spine_d2.checkpoint import package_weights, training_curve
from spine_d2.errors import SpineError
from spine_d2.report import read_metrics


def _log_times(log_txt: Path) -> list:
    """Seconds of training at the end of each evaluation, from detectron2's log.txt. The clock
    runs from each "Starting training from iteration" line to the last stamped line before the
    next one, so a run resumed (--resume) in a later session does not count the pause between;
    a run that was never resumed reads as before: the evaluation's time less the start."""
    done, start, last, evals = 0.0, None, None, []
    stamp = re.compile(r"^\[(\d\d/\d\d \d\d:\d\d:\d\d)[\] ]")
    for line in log_txt.read_text(errors="replace").splitlines():
        m = stamp.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%m/%d %H:%M:%S")
        if "Starting training from iteration" in line:
            if start is not None:
                done += (last - start).total_seconds()
            start = t
        elif start is not None and "Evaluation results for" in line and "csv format" in line:
            evals.append(done + (t - start).total_seconds())
        if start is not None:
            last = t
    return evals


DEFAULT_CONFIG = "configs/spine_mask_rcnn_R_18_FPN_scratch_gn_cpu.yaml"
STAGE_FILES = ("config.yaml", "metrics.json", "log.txt")


def _stage(train: Path) -> dict:
    """Iterations, wall time, last logged losses, config and eval curve of one training run."""
    rows = read_metrics(train / "metrics.json", latest=False)  # its evals pair with log.txt's
    curve = training_curve(rows)
    evals = _log_times(train / "log.txt")
    for point, t in zip(curve, evals):
        point["wall_minutes"] = round(t / 60, 1)
    losses = [r for r in rows if "total_loss" in r]
    return {
        "curve": curve,
        "iterations": max((r["iteration"] for r in losses), default=-1) + 1,
        "last": max(losses, key=lambda r: r["iteration"], default={}),
        "wall_time_s": round(evals[-1]) if evals else None,
        "cfg": yaml.safe_load((train / "config.yaml").read_text()),
    }


def _earlier_stages(manifest_path: Path) -> tuple:
    """(stages, curve, iterations, wall seconds) of a shipped checkpoint's manifest; stages that
    predate per-stage digests take the manifest's dataset digest."""
    m = json.loads(manifest_path.read_text())
    digest = m["dataset"]["digest"]
    stages = [dict({"dataset_digest": digest}, **s) for s in m["stages"]]
    return stages, list(m["training_curve"]), int(m["iterations"]), int(m["wall_time_s"] or 0)


def _pixel_digests(dataset: Path, meta: dict) -> dict:
    """Per split, the sha256 of the decoded pixels the model was trained and tested on: the
    parameter digest cannot tell two machines' renders apart. From meta.json when the generator
    recorded it, else computed from the images (datasets made before it did)."""
    if isinstance(meta.get("pixels_sha256"), dict):
        return meta["pixels_sha256"]
    from spine_d2.data.drr import SPLITS, pixels_digest

    out = {}
    for split in SPLITS:
        coco_path = dataset / f"{split}.json"
        if coco_path.is_file():
            out[split] = pixels_digest(json.loads(coco_path.read_text()), dataset / "images")
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--train-dir",
        required=True,
        action="append",
        help="OUTPUT_DIR of the training run; once per stage, in order",
    )
    ap.add_argument("--checkpoint", help="default: <last train-dir>/model_final.pth")
    ap.add_argument("--eval", help="eval_results.json of the packaged weights on the test split")
    ap.add_argument("--dataset", default="datasets/spine_drr", help="the training data's folder")
    ap.add_argument(
        "--config-file",
        action="append",
        help="the config each stage was started with, in order (its full dump is "
        f"<train-dir>/config.yaml); default: {DEFAULT_CONFIG}",
    )
    ap.add_argument("--command", default="make train-pretrained", help="how the run was made")
    ap.add_argument(
        "--continue-from",
        metavar="MANIFEST",
        help="manifest of the shipped checkpoint the first --train-dir started from",
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    train_dirs = [Path(d) for d in args.train_dir]
    configs = args.config_file or [DEFAULT_CONFIG]
    if len(configs) != len(train_dirs):
        print(
            f"package_weights: error: {len(train_dirs)} --train-dir but {len(configs)} "
            "--config-file (give one config per stage)",
            file=sys.stderr,
        )
        return 2
    ckpt = Path(args.checkpoint or train_dirs[-1] / "model_final.pth")
    needed = [ckpt] + [train / n for train in train_dirs for n in STAGE_FILES]
    needed.append(Path(args.dataset) / "meta.json")
    if args.continue_from:
        needed.append(Path(args.continue_from))
    for p in needed:
        if not p.is_file():
            print(f"package_weights: error: {p}: no such file", file=sys.stderr)
            return 2
    meta = json.loads((Path(args.dataset) / "meta.json").read_text())
    try:
        pixels = _pixel_digests(Path(args.dataset), meta)
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        SpineError,
    ) as e:  # a split that does not read
        print(f"package_weights: error: {args.dataset}: cannot hash its pixels ({e})",
              file=sys.stderr)  # fmt: skip
        return 2
    stages, curve, iters, wall, last = [], [], 0, 0, {}
    if args.continue_from:
        try:
            stages, curve, iters, wall = _earlier_stages(Path(args.continue_from))
        except (ValueError, KeyError, TypeError) as e:
            print(f"package_weights: error: {args.continue_from}: not a manifest ({e})",
                  file=sys.stderr)  # fmt: skip
            return 2
    first = len(stages)
    for k, (train, config) in enumerate(zip(train_dirs, configs)):
        st = _stage(train)
        for point in st["curve"]:
            point = dict(point, stage=first + k + 1, iteration=point["iteration"] + iters)
            if point.get("wall_minutes") is not None:
                point["wall_minutes"] = round(point["wall_minutes"] + wall / 60, 1)
            curve.append(point)
        stages.append(
            {
                "config": config,
                "train_dir": str(train),
                "iterations": st["iterations"],
                "wall_time_s": st["wall_time_s"],
                "base_lr": st["cfg"]["SOLVER"]["BASE_LR"],
                "lr_scheduler": st["cfg"]["SOLVER"]["LR_SCHEDULER_NAME"],
                "dataset_digest": meta.get("digest"),
            }
        )
        iters += st["iterations"]
        wall += st["wall_time_s"] or 0
        last, run_cfg = st["last"], st["cfg"]
    fields = {
        "config": configs[-1],
        "config_dump": (train_dirs[-1] / "config.yaml").name,
        "dataset": {
            "name": "spine_drr (built-in DRR data, default preset)",
            "generator_version": meta.get("version"),
            "seed": meta.get("seed"),
            "digest": meta.get("digest"),
            "counts": meta.get("counts"),
            "pixels_sha256": pixels,
        },
        "iterations": iters,
        "images_per_iteration": run_cfg["SOLVER"]["IMS_PER_BATCH"],
        "final_total_loss": last.get("total_loss"),
        "wall_time_s": wall or None,
        "hardware": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "gpu": None,
            "torch": torch.__version__,
            "precision": "bfloat16 autocast (training), weights stored fp16",
        },
        "command": args.command,
        "stages": stages,
        "training_curve": curve,
        "metrics_test_split": json.loads(Path(args.eval).read_text()) if args.eval else None,
    }
    manifest = package_weights(ckpt, args.out, fields)
    print(json.dumps({k: manifest[k] for k in ("file", "sha256", "size_bytes", "iterations")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
