#!/usr/bin/env python
"""Collect output/bench/*.json (one JSON line each) into output/bench/README.md: one table of
the headline figures, each with the command that made it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The shipped checkpoint and the config it runs with (its training scale): the default model of
# the benchmarks that measure the pipeline rather than a training recipe.
SHIPPED_CONFIG = "configs/spine_mask_rcnn_R_18_FPN_drr_cpu.yaml"
SHIPPED_WEIGHTS = "weights/spine_mask_rcnn_R_18_FPN_drr.pth"


def float_list(ok, requirement: str):
    """argparse type for comma-separated numbers that each pass ``ok``; ``requirement`` words
    the error (e.g. "weights must be >= 0")."""

    def parse(text: str) -> list:
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}")
        if not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"{requirement}: {text!r}")
        return values

    return parse


def write_result(result: dict, out) -> str:
    """Print a benchmark's result as one JSON line and save it to ``out`` (temp + rename), the
    format main() below reads back."""
    from spine_d2.atomic import write_json

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    line = write_json(out, result, indent=None)  # strict JSON: a NaN figure reads null
    print(line)
    return line


# bench name -> (command, [(key, label)])
HEADLINES = {
    "bench_train": (
        "python benchmarks/bench_train.py",
        [("fp32.s_per_step_detectron2", "train step fp32, ours (s)"),
         ("fp32.s_per_step_torchvision", "train step fp32, torchvision (s)"),
         ("fp32.ratio_detectron2_over_torchvision", "ratio ours / torchvision, fp32"),
         ("bf16.s_per_step_detectron2", "train step bf16, ours (s)"),
         ("bf16.ratio_detectron2_over_torchvision", "ratio ours / torchvision, bf16"),
         ("autocast_speedup_detectron2", "bf16 autocast speed-up")],
    ),
    "bench_export": (
        "python benchmarks/bench_export.py",
        [("runs.512x512.scans_per_s.a_exporter", "export scans/s (512 px)"),
         ("runs.512x512.scans_per_s.b_default_predictor_loop", "DefaultPredictor loop scans/s (512 px)"),
         ("runs.512x512.speedup_vs_default_predictor", "speed-up vs DefaultPredictor loop (512 px)"),
         ("runs.512x512.efficiency_vs_model_forward", "exporter / bare forward (512 px)"),
         ("runs.900x2400.speedup_vs_default_predictor", "speed-up vs DefaultPredictor loop (900x2400)"),
         ("runs.900x2400.efficiency_vs_model_forward", "exporter / bare forward (900x2400)"),
         ("peak_rss_mb", "peak RSS (MB)")],
    ),
    "bench_align": (
        "python benchmarks/bench_align.py",
        [("tre_px_median_gt_masks", "TRE median, GT masks (px)"),
         ("tre_px_median_pred_masks", "TRE median, predicted masks (px)"),
         ("psnr_gain_db", "PSNR gain in masks vs low dose (dB)"),
         ("psnr_gain_vs_denoiser_db", "PSNR gain vs NLM (dB)"),
         ("ms_per_vertebra", "registration ms per vertebra")],
    ),
    "bench_views": (
        "python benchmarks/bench_views.py",
        [("train_views", "training views of the generator"),
         ("seen_views.segm.AP", "segm AP, fresh scans of training views"),
         ("unseen_views_test_split.segm.AP", "segm AP, spine_drr_test (unseen views)"),
         ("seen_views.vertebra.recall", "recall, training views"),
         ("unseen_views_test_split.vertebra.recall", "recall, unseen views"),
         ("gap_seen_minus_unseen.vertebra.level_accuracy", "level accuracy gap, seen - unseen")],
    ),
    "bench_levels": (
        "python benchmarks/bench_levels.py",
        [("level_accuracy_by_spacing_weight.0", "level accuracy, spacing weight 0 (spine_drr_test)"),
         ("level_accuracy_by_spacing_weight.8", "level accuracy, spacing weight 8"),
         ("best_spacing_weight", "best spacing weight")],
    ),
    "bench_masks": (
        "python benchmarks/bench_masks.py",
        [("segm_AP_default", "segm AP, mask threshold 0.5 (spine_drr_val)"),
         ("segm_AP_flip_default", "segm AP, flip-averaged masks, threshold 0.5"),
         ("best.threshold", "best mask threshold"),
         ("best.masks", "best masks (plain / flip)")],
    ),
    "bench_drr": (
        "python benchmarks/bench_drr.py",
        [("base_view_render_s", "DRR base view render (s)"),
         ("scans_per_s", "DRR scans/s")],
    ),
}  # fmt: skip


def _get(d, dotted):
    for part in dotted.split("."):
        if isinstance(d, list):
            d = d[int(part)] if part.isdigit() and int(part) < len(d) else None
        elif isinstance(d, dict):
            d = d.get(part)
        if d is None:
            return None
    return d


def main(folder="output/bench") -> int:
    folder = Path(folder)
    rows = ["| benchmark | figure | value | command |", "|---|---|---|---|"]
    for name, (cmd, keys) in HEADLINES.items():
        f = folder / f"{name}.json"
        if not f.is_file():
            rows.append(f"| {name} | (not run) | | `{cmd}` |")
            continue
        data = json.loads(f.read_text().strip().splitlines()[-1])
        for key, label in keys:
            v = _get(data, key)
            v = f"{v:.3f}" if isinstance(v, float) else ("n/a" if v is None else v)
            rows.append(f"| {name} | {label} | {v} | `{cmd}` |")
    text = "# make bench\n\n" + "\n".join(rows) + "\n"
    from spine_d2.atomic import write_atomic

    write_atomic(folder / "README.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
