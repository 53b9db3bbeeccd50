#!/usr/bin/env python
"""Package a trained model as the shipped checkpoint: fp16 weights + manifest (weights/).

    python tools/package_weights.py --train-dir output/pretrained_r18 \
        --eval output/pretrained_r18_eval_fp16/inference/eval_results.json \
        --out weights/spine_mask_rcnn_R_18_FPN_drr.pth

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
from spine_d2.report import read_metrics


def _log_times(log_txt: Path) -> tuple:
    """(start, [end of each evaluation]) as datetimes from detectron2's log.txt."""
    start, evals = None, []
    stamp = re.compile(r"^\[(\d\d/\d\d \d\d:\d\d:\d\d)[\] ]")
    for line in log_txt.read_text(errors="replace").splitlines():
        m = stamp.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%m/%d %H:%M:%S")
        if "Starting training from iteration" in line and start is None:
            start = t
        elif "Evaluation results for" in line and "csv format" in line:
            evals.append(t)
    return start, evals


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
    ap.add_argument("--train-dir", required=True, help="OUTPUT_DIR of the training run")
    ap.add_argument("--checkpoint", help="default: <train-dir>/model_final.pth")
    ap.add_argument("--eval", help="eval_results.json of the packaged weights on the test split")
    ap.add_argument("--dataset", default="datasets/spine_drr", help="the training data's folder")
    ap.add_argument(
        "--config-file",
        default="configs/spine_mask_rcnn_R_18_FPN_scratch_gn_cpu.yaml",
        help="the config the run was started with (its full dump is <train-dir>/config.yaml)",
    )
    ap.add_argument("--command", default="make train-pretrained", help="how the run was made")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    train = Path(args.train_dir)
    ckpt = Path(args.checkpoint or train / "model_final.pth")
    for p in (ckpt, train / "config.yaml", train / "metrics.json", train / "log.txt"):
        if not p.is_file():
            print(f"package_weights: error: {p}: no such file", file=sys.stderr)
            return 2
    rows = read_metrics(train / "metrics.json")
    curve = training_curve(rows)
    start, evals = _log_times(train / "log.txt")
    for point, t in zip(curve, evals):
        point["wall_minutes"] = round((t - start).total_seconds() / 60, 1) if start else None
    iters = max((r["iteration"] for r in rows if "total_loss" in r), default=-1) + 1
    last = max((r for r in rows if "total_loss" in r), key=lambda r: r["iteration"], default={})
    meta = json.loads((Path(args.dataset) / "meta.json").read_text())
    run_cfg = yaml.safe_load((train / "config.yaml").read_text())
    fields = {
        "config": args.config_file,
        "config_dump": (train / "config.yaml").name,
        "dataset": {
            "name": "spine_drr (built-in DRR data, default preset)",
            "generator_version": meta.get("version"),
            "seed": meta.get("seed"),
            "digest": meta.get("digest"),
            "counts": meta.get("counts"),
        },
        "iterations": iters,
        "images_per_iteration": run_cfg["SOLVER"]["IMS_PER_BATCH"],
        "final_total_loss": last.get("total_loss"),
        "wall_time_s": round((evals[-1] - start).total_seconds()) if start and evals else None,
        "hardware": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "gpu": None,
            "torch": torch.__version__,
            "precision": "bfloat16 autocast (training), weights stored fp16",
        },
        "command": args.command,
        "training_curve": curve,
        "metrics_test_split": json.loads(Path(args.eval).read_text()) if args.eval else None,
    }
    manifest = package_weights(ckpt, args.out, fields)
    print(json.dumps({k: manifest[k] for k in ("file", "sha256", "size_bytes", "iterations")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
