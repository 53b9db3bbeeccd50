"""`make demo`: the whole pipeline on the built-in data, from the shipped checkpoint.

small DRR dataset (generated once, then reused) -> fine-tune the shipped checkpoint for a few
minutes (the training loop at work, with its loss curves) -> COCO + VertebraEvaluator on the
test split -> ZOI export of the test scans by ZOIExportHook -> enhancement of the low-dose test
pairs -> alignment figures against the ground truth (benchmarks/bench_align.py) -> report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from . import report
from .data.datasets import register_builtin
from .data.drr import PRESETS, default_output_dir, generate_dataset

__all__ = ["DEMO_CONFIG", "run_demo", "summarize"]

DEMO_CONFIG = "configs/demo/spine_mask_rcnn_R_18_FPN_demo_finetune.yaml"
logger = logging.getLogger(__name__)


def summarize(elapsed_s: float, eval_results: dict, zoi_summary: dict, align: dict) -> dict:
    """summary.json: the keys `make demo` promises (README), flat, floats or null."""
    segm, vert = eval_results.get("segm", {}), eval_results.get("vertebra", {})
    return {
        "elapsed_s": round(elapsed_s, 1),
        "test.segm.AP": segm.get("AP"),
        "test.segm.AP50": segm.get("AP50"),
        "test.bbox.AP50": eval_results.get("bbox", {}).get("AP50"),
        "test.vertebra.recall": vert.get("recall"),
        "test.vertebra.precision": vert.get("precision"),
        "test.vertebra.dice": vert.get("mean_dice"),
        "test.vertebra.level_accuracy": vert.get("level_accuracy"),
        "zoi.scans": zoi_summary.get("scans_ok"),
        "zoi.suspected_missing": zoi_summary.get("suspected_missing"),
        "zoi.zois": zoi_summary.get("zois"),
        "align.tre_px_median": align.get("tre_px_median_pred_masks"),
        "align.tre_px_median_gt_masks": align.get("tre_px_median_gt_masks"),
        "align.psnr_gain_db": align.get("psnr_gain_db_pred_masks"),
        "align.psnr_gain_db_gt_masks": align.get("psnr_gain_db"),
    }


def _enhance(pairs_json: str, manifest: str, lines: list, out: str) -> list:
    from .align.cli import main as enhance_main

    rc = enhance_main(
        [
            "--pairs",
            pairs_json,
            "--out",
            out,
            "--low-manifest",
            manifest,
            "--high-manifest",
            manifest,
        ]
    )
    if rc not in (0, 3):
        raise RuntimeError(f"enhance_scan failed with exit code {rc}")
    by_name = {Path(v["path"]).name: v for v in lines}
    results = []
    for d in sorted(Path(out).iterdir()):
        t = d / "transforms.json"
        if not t.is_file():
            continue
        info = json.loads(t.read_text())
        low_line = by_name.get(Path(info["low_dose"]).name, {"zois": []})
        results.append(
            {
                "low": info["low_dose"],
                "high": info["high_dose"],
                "enhanced": info["enhanced"],
                "used": info["vertebrae_used"],
                "boxes": [z["bbox_xyxy"] for z in low_line["zois"]],
            }
        )
    return results


def run_demo(out_dir="output/demo", config=DEMO_CONFIG, started_at=None, opts=()) -> dict:
    """Run every step; return summary.json's dict. ``started_at``: epoch seconds to count from
    (`make demo` passes the time before its install step)."""
    t_start = started_at or time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    t = time.time()
    data_dir = default_output_dir("vertebra", "small")
    generate_dataset(data_dir, PRESETS["small"])
    register_builtin()  # the small splits exist now
    timings["data_s"] = round(time.time() - t, 1)

    from .engine.train import main as train_main
    from .engine.train import train_args

    t = time.time()
    train_dir = str(out / "train")
    train_main(
        train_args(config, ["OUTPUT_DIR", train_dir, "ZOI.EXPORT_AFTER_EVAL", "True", *opts])
    )
    timings["train_eval_export_s"] = round(time.time() - t, 1)
    eval_results = json.loads((out / "train" / "inference" / "eval_results.json").read_text())
    export_dir = out / "train" / "zoi" / "spine_drr_small_test"
    zoi_summary = json.loads((export_dir / "summary.json").read_text())
    manifest = str(export_dir / "manifest.jsonl")

    lines = report.manifest_lines(manifest)
    t = time.time()
    enhanced = _enhance(str(data_dir / "pairs.json"), manifest, lines, str(out / "enhanced"))
    align_json = out / "align.json"
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_align.py"
    subprocess.run(
        [sys.executable, str(bench), "--root", str(data_dir), "--manifest", manifest,
         "--tune", "2", "--out", str(align_json), "--png", ""],
        check=True,
    )  # fmt: skip
    align = json.loads(align_json.read_text())
    timings["enhance_align_s"] = round(time.time() - t, 1)

    t = time.time()
    fig = out / "figures"
    figures = {
        "Fine-tuning loss curves": report.loss_curves_png(
            report.read_metrics(out / "train" / "metrics.json"), fig / "loss_curves.png"
        ),
        "Test scans: predicted masks, levels and scores": report.overlays_png(
            lines, str(data_dir / "images"), fig / "predictions.png"
        ),
        "Exported ZOIs (pixels of the unprocessed scan under each mask)": report.zoi_grid_png(
            lines, str(export_dir), fig / "zoi_grid.png"
        ),
        "Enhancement: low dose | enhanced | high-dose reference": report.enhancement_png(
            enhanced, fig / "enhancement.png"
        ),
    }
    timings["report_s"] = round(time.time() - t, 1)
    summary = summarize(time.time() - t_start, eval_results, zoi_summary, align)
    summary["timings"] = timings
    notes = [
        f"config {config}, data {data_dir} (preset small), output {out}",
        f"ZOI export: {export_dir}; enhanced pairs: {out / 'enhanced'} ({len(enhanced)} pairs)",
        "alignment at the 10-15 % dose bin with predicted masks (bench_align.py on this "
        "dataset's pairs.json; the first 2 pairs tune the NLM baseline and are left out)",
        "simulated training data from one CT: not a medical device",
    ]
    paths = report.write_report(
        out, summary=summary, eval_results=eval_results, figures=figures, notes=notes
    )
    for line in report.headline(summary):
        print(line)
    print(f"report: {paths['report.html']} ({paths['report.md']}, {paths['summary.json']})")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="output/demo")
    ap.add_argument("--config-file", default=DEMO_CONFIG)
    ap.add_argument("--started-at", type=float, help="epoch seconds the demo started (install)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE")
    args = ap.parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="spine_d2", abbrev_name="spine")
    if not os.path.isfile(args.config_file):
        print(f"demo: error: {args.config_file}: no such config", file=sys.stderr)
        return 2
    from .engine.setup import build_config

    build_config(args.config_file, args.opts)  # a broken config fails before minutes of data
    run_demo(args.out, args.config_file, args.started_at, args.opts)
    return 0
