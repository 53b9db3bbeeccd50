#!/usr/bin/env python
"""View generalisation of a model trained on the built-in data: seen views vs unseen views.

The built-in data is one CT seen from a handful of base views; the test split's views are never
seen in training. A model can therefore learn the training projections rather than vertebrae.
This benchmark renders ``--scans`` fresh scans (new crops, motion, dose and noise: another scan
seed) from the first ``--views`` *training* views, evaluates the model on them and on
``spine_drr_test`` (unseen views) with the same config, and reports both and the gap. A large
gap says more training views (``DrrParams.views_train``) will help more than more iterations.

    python benchmarks/bench_views.py --views 8     # the 8 views checkpoints v1/v2 were trained on
    python benchmarks/bench_views.py               # all training views of the current generator

Needs the built-in dataset (``make data``; base views come from its cache, rendered if missing).
Prints one JSON line and saves it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from summarize import (  # benchmarks/ is on sys.path when run as a script
    SHIPPED_CONFIG,
    SHIPPED_WEIGHTS,
    write_result,
)

KEYS = (
    ("segm", "AP"), ("segm", "AP50"), ("segm", "AP75"), ("bbox", "AP50"),
    ("vertebra", "recall"), ("vertebra", "precision"), ("vertebra", "mean_iou"),
    ("vertebra", "level_accuracy"), ("vertebra", "recall_whole"),
    ("vertebra", "recall_truncated"),
)  # fmt: skip


def seen_view_scans(out_dir: Path, views: int, scans: int, seed: int, data_root: Path) -> Path:
    """COCO json of fresh scans from the first ``views`` training views (cached renders)."""
    from spine_d2.data import drr

    params = drr.PRESETS["default"]
    cache = data_root / "spine_drr" / "cache"
    ct = drr.load_ct(params, cache)
    specs = drr.view_specs(replace(params, views_train=views), "train")
    bases = [drr.render_base_view(ct, s, params, cache) for s in specs]
    coco, _ = drr._split_scans(
        "train", bases, replace(params, seed=seed, num_train=scans), out_dir, progress=True
    )
    json_file = out_dir / "seen_views.json"
    drr._write_json(json_file, coco)
    return json_file


def evaluate(name, json_file, image_root, out_dir, config, weights) -> dict:
    """fp32 --eval-only of ``weights`` on one dataset (registered without code if json given)."""
    cmd = [sys.executable, "tools/train_net.py", "--config-file", config, "--eval-only",
           "MODEL.WEIGHTS", weights, "SPINE.EVAL.AMP", "", "OUTPUT_DIR", str(out_dir),
           "DATASETS.TEST", f"('{name}',)", "ZOI.EXPORT_AFTER_EVAL", "False"]  # fmt: skip
    if json_file:
        cmd += ["SPINE.COCO_DATASETS", json.dumps([[name, str(json_file), str(image_root)]])]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"bench_views: evaluation of {name} failed:\n{run.stderr[-2000:]}")
    res = json.loads((out_dir / "inference" / "eval_results.json").read_text())
    out = {}
    for task, key in KEYS:
        out.setdefault(task, {})[key] = res.get(task, {}).get(key)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-file", default=SHIPPED_CONFIG)
    ap.add_argument("--weights", default=SHIPPED_WEIGHTS)
    ap.add_argument("--views", type=int, default=0, help="first N training views (0: all)")
    ap.add_argument("--scans", type=int, default=200)
    ap.add_argument("--seed", type=int, default=777, help="scan seed (the dataset's is 0)")
    ap.add_argument("--work", default="output/bench/views", help="scans and evaluations")
    ap.add_argument("--out", default="output/bench/bench_views.json")
    args = ap.parse_args(argv)

    data_root = Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    if not (data_root / "spine_drr" / "test.json").is_file():
        raise SystemExit(f"bench_views: {data_root}/spine_drr/test.json: missing (run make data)")
    from spine_d2.data import drr

    views = args.views or drr.PRESETS["default"].views_train
    work = Path(args.work)
    t0 = time.perf_counter()
    json_file = seen_view_scans(work / "scans", views, args.scans, args.seed, data_root)
    t_scans = time.perf_counter() - t0
    seen = evaluate("spine_bench_seen_views", json_file, work / "scans" / "images",
                    work / "eval_seen", args.config_file, args.weights)  # fmt: skip
    unseen = evaluate("spine_drr_test", None, None, work / "eval_unseen", args.config_file,
                      args.weights)  # fmt: skip
    gap = {
        task: {
            k: round(v - unseen[task][k], 4)
            for k, v in vals.items()
            if None not in (v, unseen[task][k])
        }
        for task, vals in seen.items()
    }
    result = {
        "bench": "views",
        "weights": args.weights,
        "config": args.config_file,
        "train_views": views,
        "seen_view_scans": args.scans,
        "scan_seed": args.seed,
        "seen_views": seen,
        "unseen_views_test_split": unseen,
        "gap_seen_minus_unseen": gap,
        "scan_generation_s": round(t_scans, 1),
    }
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
