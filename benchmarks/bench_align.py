#!/usr/bin/env python
"""Per-vertebra alignment and enhancement against the built-in dataset's ground truth.

For each pair of ``pairs.json`` (high dose at pose A, low dose at pose B, noise-free ideal at
pose B, true per-vertebra A->B similarities):
  * registration error with ground-truth masks (test.json polygons: registration alone) and
    with predicted masks (an export manifest: the whole pipeline), for the default outline
    registration and, on GT masks, for the optional intensity refinement;
    TRE = mean distance of the 4 corners of the vertebra's mask box (pose A) mapped by the
    estimated vs the true transform, in pixels; rotation error in degrees; scale error in %;
  * PSNR / SSIM (Gaussian window, sigma 1.5) inside the union of the low-dose GT masks and over
    the whole image, against the ideal image, of the raw low-dose scan, OpenCV non-local means
    (16-bit, NORM_L1; h tuned on the first ``--tune`` pairs, which are then left out of every
    figure: val has no pairs) and our enhanced scan;
  * time per vertebra (registration) and per scan (match + register + composite).
Figures are per low-dose bin; the headline keys are at the bin holding 10 % dose.

    python benchmarks/bench_align.py                       # all 150 test pairs (~2-4 min)
    python benchmarks/bench_align.py --max-pairs 20 --out /tmp/b.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict

import cv2
import numpy as np
from summarize import (  # benchmarks/ is on sys.path when run as a script
    SHIPPED_CONFIG,
    SHIPPED_WEIGHTS,
    write_result,
)
from tqdm import tqdm

from spine_d2.align import enhance_pair, side_by_side, vertebrae_from_coco, vertebrae_from_manifest
from spine_d2.align.register import register_vertebra
from spine_d2.data.io import read_scan
from spine_d2.zoi.manifest import load_manifest

BINS = [(0.0, 0.10), (0.10, 0.15), (0.15, 0.20), (0.20, 1.01)]


def _bin(fraction: float) -> str:
    for lo, hi in BINS:
        if lo <= fraction < hi:
            return f"{int(lo * 100)}-{min(int(hi * 100), 100)}%"
    return "other"


def ssim_map(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """SSIM (Wang et al. 2004) with a Gaussian window, images in [0, 1]."""
    c1, c2 = 0.01**2, 0.03**2
    blur = lambda x: cv2.GaussianBlur(x, (0, 0), sigma)  # noqa: E731
    a, b = a.astype(np.float64), b.astype(np.float64)
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma * ma, blur(b * b) - mb * mb, blur(a * b) - ma * mb
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))


def psnr(a, b, sel=None) -> float:
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = float(d[sel].mean() if sel is not None else d.mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def quality(img, ideal, sel) -> dict:
    s = ssim_map(img, ideal)
    return {
        "psnr_mask": psnr(img, ideal, sel),
        "psnr_whole": psnr(img, ideal),
        "ssim_mask": float(s[sel].mean()),
        "ssim_whole": float(s.mean()),
    }


def nlm(pixels: np.ndarray, h: float) -> np.ndarray:
    if pixels.dtype == np.uint16:
        return cv2.fastNlMeansDenoising(pixels, [float(h)], None, 7, 21, cv2.NORM_L1)
    return cv2.fastNlMeansDenoising(pixels, None, h / 257.0, 7, 21)


def unit(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64) / (65535.0 if pixels.dtype == np.uint16 else 255.0)


def transform_errors(reg_m, true_m, mask, origin) -> tuple:
    h, w = mask.shape
    x0, y0 = origin
    c = np.array([[x0, y0], [x0 + w, y0], [x0, y0 + h], [x0 + w, y0 + h]], np.float64)
    g = np.asarray(true_m, np.float64)
    tre = float(
        np.linalg.norm(c @ g[:, :2].T + g[:, 2] - (c @ reg_m[:, :2].T + reg_m[:, 2]), axis=1).mean()
    )
    rot = float(np.degrees(np.arctan2(reg_m[1, 0], reg_m[0, 0]) - np.arctan2(g[1, 0], g[0, 0])))
    rot = (rot + 180) % 360 - 180
    scale = float(100 * (np.hypot(reg_m[0, 0], reg_m[1, 0]) / np.hypot(g[0, 0], g[1, 0]) - 1))
    return tre, abs(rot), abs(scale)


def _levels_by_iou(pred: list, gt: list, min_iou: float = 0.5) -> list:
    """(ground-truth level, mask IoU) of each predicted vertebra; (None, 0.0) when none
    overlaps enough."""
    out = []
    for p in pred:
        best, best_iou = None, min_iou
        for g in gt:
            x0 = min(p.origin[0], g.origin[0])
            y0 = min(p.origin[1], g.origin[1])
            x1 = max(p.origin[0] + p.mask.shape[1], g.origin[0] + g.mask.shape[1])
            y1 = max(p.origin[1] + p.mask.shape[0], g.origin[1] + g.mask.shape[0])
            a = np.zeros((y1 - y0, x1 - x0), bool)
            b = np.zeros_like(a)
            a[p.origin[1] - y0 :][: p.mask.shape[0], p.origin[0] - x0 :][
                :, : p.mask.shape[1]
            ] = p.mask
            b[g.origin[1] - y0 :][: g.mask.shape[0], g.origin[0] - x0 :][
                :, : g.mask.shape[1]
            ] = g.mask
            union = np.count_nonzero(a | b)
            iou = np.count_nonzero(a & b) / union if union else 0.0
            if iou > best_iou:
                best, best_iou = g.level, iou
        out.append((best, best_iou if best else 0.0))
    return out


# TRE with predicted masks by how well both predicted masks of a pair match the ground truth:
# the outline fit inherits the masks' errors, so this says what limits the whole pipeline.
_IOU_BINS = (
    (0.75, 1.01, "iou>=0.75"),
    (0.65, 0.75, "iou0.65-0.75"),
    (0.0, 0.65, "iou<0.65"),
)


def _summ(values) -> dict:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "median": float(np.median(v)), "p95": float(np.percentile(v, 95))}


def export_test_images(root: str, config_file: str, weights: str, out: str) -> str:
    """Export images/test with the model (the exporter the CLI uses); returns the manifest."""
    from spine_d2.engine.setup import build_config
    from spine_d2.zoi.export import ZOIExporter
    from spine_d2.zoi.sources import discover_scans

    cfg = build_config(config_file, ["MODEL.WEIGHTS", weights])
    items, roots = discover_scans([os.path.join(root, "images", "test")])
    ZOIExporter(cfg, config_file=config_file).export(items, out, roots=roots)
    return os.path.join(out, "manifest.jsonl")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--root",
        default=os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "spine_drr"),
    )
    ap.add_argument(
        "--manifest",
        default="output/spine_mask_rcnn_R_18_FPN_scratch_gn_cpu/zoi_export/manifest.jsonl",
        help="export of the test images, paths relative to images/test (what `make export` "
        "writes); without it only ground-truth masks are measured",
    )
    ap.add_argument(
        "--weights",
        default=SHIPPED_WEIGHTS,
        help="without --manifest: export images/test with these weights first (the pipeline)",
    )
    ap.add_argument("--config-file", default=SHIPPED_CONFIG)
    ap.add_argument("--export-dir", default="output/bench/align_export")
    ap.add_argument("--tune", type=int, default=10, help="pairs used to tune NLM's h (excluded)")
    ap.add_argument("--max-pairs", type=int, default=0)
    ap.add_argument(
        "--intensity-pairs",
        type=int,
        default=40,
        help="pairs on which GT-mask registration is also run with intensity refinement",
    )
    ap.add_argument("--out", default="output/bench/bench_align.json")
    ap.add_argument("--png", default="output/bench/bench_align_side_by_side.png")
    args = ap.parse_args(argv)

    root = args.root
    pairs = json.load(open(os.path.join(root, "pairs.json"), encoding="utf-8"))["pairs"]
    coco = json.load(open(os.path.join(root, "test.json"), encoding="utf-8"))
    anns = defaultdict(list)
    for a in coco["annotations"]:
        anns[a["image_id"]].append(a)
    if not os.path.isfile(args.manifest) and args.weights and os.path.isfile(args.weights):
        args.manifest = export_test_images(root, args.config_file, args.weights, args.export_dir)
    manifest = load_manifest(args.manifest) if os.path.isfile(args.manifest) else {}
    img = lambda rel: os.path.join(root, "images", rel)  # noqa: E731

    # --- tune NLM's h on the first pairs (val has no pairs); those pairs are not evaluated.
    grid = [257 * h for h in (1, 2, 4, 8, 16, 32, 64)]
    tune_psnr = defaultdict(list)
    for p in tqdm(pairs[: args.tune], desc="tune NLM h"):
        low, ideal = read_scan(img(p["low_dose"])), read_scan(img(p["ideal"]))
        for h in grid:
            tune_psnr[h].append(psnr(unit(nlm(low.pixels, h)), unit(ideal.pixels)))
    h_best = max(grid, key=lambda h: np.mean(tune_psnr[h]))

    evaluate = pairs[args.tune :]
    if args.max_pairs:
        evaluate = evaluate[: args.max_pairs]
    per_bin = defaultdict(lambda: defaultdict(list))
    shown = False
    for k, p in enumerate(tqdm(evaluate, desc="pairs")):
        b = _bin(p["low_dose_fraction"])
        acc = per_bin[b]
        high, low = read_scan(img(p["high_dose"])), read_scan(img(p["low_dose"]))
        ideal = read_scan(img(p["ideal"]))
        h_img, w_img = low.height, low.width
        va = vertebrae_from_coco(anns[p["image_ids"][0]], high.height, high.width)
        vb = vertebrae_from_coco(anns[p["image_ids"][1]], h_img, w_img)
        truth = p["transforms_A_to_B"]
        res = enhance_pair(high, low, va, vb)
        acc["scan_ms_gt"].append(res.seconds * 1000)
        for (ih, _), reg in zip(res.match.pairs, res.registrations):
            v = va[ih]
            tre, rot, sc = transform_errors(reg.matrix, truth[v.level]["matrix"], v.mask, v.origin)
            acc["tre_gt"].append(tre), acc["rot_gt"].append(rot), acc["scale_gt"].append(sc)
            acc["ms_vertebra"].append(reg.ms)
            acc["unreliable_gt"].append(not reg.reliable)
        if k < args.intensity_pairs:  # the optional intensity stage, registration only
            ca, cb = {}, {}
            by_level = {v.level: v for v in vb}
            for v in va:
                if v.level in by_level:
                    w = by_level[v.level]
                    reg = register_vertebra(
                        high.image,
                        v.mask,
                        v.origin,
                        low.image,
                        w.mask,
                        w.origin,
                        smooth_sigmas=(2.0, 0.0),
                        smoothed_a=ca,
                        smoothed_b=cb,
                    )
                    tre, rot, _ = transform_errors(
                        reg.matrix, truth[v.level]["matrix"], v.mask, v.origin
                    )
                    acc["tre_gt_intensity"].append(tre), acc["rot_gt_intensity"].append(rot)
                    acc["ms_vertebra_intensity"].append(reg.ms)
        # Enhancement quality, inside the union of the low-dose GT masks and over the image.
        sel = np.zeros((h_img, w_img), bool)
        for v in vb:
            sel[
                v.origin[1] : v.origin[1] + v.mask.shape[0],
                v.origin[0] : v.origin[0] + v.mask.shape[1],
            ] |= v.mask
        ref = unit(ideal.pixels)
        t0 = time.perf_counter()
        den = nlm(low.pixels, h_best)
        acc["nlm_ms"].append((time.perf_counter() - t0) * 1000)
        full = enhance_pair(high, low, va, vb, adaptive=False, guided_radius=0).pixels  # pasted
        variants = (("raw", low.pixels), ("nlm", den), ("enhanced_gt", res.pixels))
        for name, pix in variants + (("enhanced_gt_full_blend", full),):
            for key, val in quality(unit(pix), ref, sel).items():
                acc[f"{key}_{name}"].append(val)
        # Whole pipeline: predicted masks from the export manifest.
        # Paths relative to images/test (an export of that folder) or to images/ (the hook's
        # export of the test split).
        line_h = manifest.get(p["high_dose"]) or manifest.get(
            os.path.relpath(p["high_dose"], "test")
        )
        line_l = manifest.get(p["low_dose"]) or manifest.get(os.path.relpath(p["low_dose"], "test"))
        if line_h and line_l:
            pa = vertebrae_from_manifest(line_h)
            pb = vertebrae_from_manifest(line_l)
            acc["pred_vertebrae_low"].append(len(pb)), acc["gt_vertebrae_low"].append(len(vb))
            try:
                rp = enhance_pair(high, low, pa, pb)
            except Exception as e:  # noqa: BLE001 - a benchmark records and goes on
                acc["pred_failed"].append(str(e))
                continue
            la_iou, lb_iou = _levels_by_iou(pa, va), _levels_by_iou(pb, vb)
            la, lb = [x[0] for x in la_iou], [x[0] for x in lb_iou]
            for (ih, il), reg in zip(rp.match.pairs, rp.registrations):
                if la[ih] is None or lb[il] is None:
                    acc["pred_pairs_unscored"].append(1)
                elif la[ih] != lb[il]:
                    acc["pred_pairs_mismatched"].append(1)
                else:
                    v = pa[ih]
                    tre, rot, _ = transform_errors(
                        reg.matrix, truth[la[ih]]["matrix"], v.mask, v.origin
                    )
                    acc["tre_pred"].append(tre), acc["rot_pred"].append(rot)
                    acc["unreliable_pred"].append(not reg.reliable)
                    iou = min(la_iou[ih][1], lb_iou[il][1])
                    for lo, hi, name in _IOU_BINS:
                        if lo <= iou < hi:
                            acc[f"tre_pred_{name}"].append(tre)
            for key, val in quality(unit(rp.pixels), ref, sel).items():
                acc[f"{key}_enhanced_pred"].append(val)
        if not shown and 0.10 <= p["low_dose_fraction"] < 0.15 and args.png:
            os.makedirs(os.path.dirname(args.png) or ".", exist_ok=True)
            cv2.imwrite(args.png, side_by_side(low.pixels, res.pixels))  # the default (guided)
            shown = True

    table = {}
    for b in sorted(per_bin):
        acc = per_bin[b]
        row = {"pairs": len(acc["scan_ms_gt"])}
        for key in (
            "tre_gt",
            "rot_gt",
            "scale_gt",
            "tre_gt_intensity",
            "rot_gt_intensity",
            "tre_pred",
            "rot_pred",
            *(f"tre_pred_{name}" for _, _, name in _IOU_BINS),
        ):
            row[key] = _summ(acc[key])
        for key in list(acc):
            if key.startswith(("psnr_", "ssim_")):
                row[key] = float(np.mean(acc[key]))
        row["ms_per_vertebra"] = float(np.median(acc["ms_vertebra"]))
        row["ms_per_vertebra_intensity"] = (
            float(np.median(acc["ms_vertebra_intensity"])) if acc["ms_vertebra_intensity"] else None
        )
        row["ms_per_scan"] = float(np.median(acc["scan_ms_gt"]))
        row["nlm_ms_per_scan"] = float(np.median(acc["nlm_ms"]))
        row["unreliable_gt"] = int(np.sum(acc["unreliable_gt"]))
        row["unreliable_pred"] = int(np.sum(acc["unreliable_pred"]))
        row["pred_pairs_mismatched"] = len(acc["pred_pairs_mismatched"])
        row["pred_pairs_unscored"] = len(acc["pred_pairs_unscored"])
        row["pred_failed"] = len(acc["pred_failed"])
        row["mean_pred_vertebrae_low"] = (
            float(np.mean(acc["pred_vertebrae_low"])) if acc["pred_vertebrae_low"] else 0.0
        )
        row["mean_gt_vertebrae_low"] = (
            float(np.mean(acc["gt_vertebrae_low"])) if acc["gt_vertebrae_low"] else 0.0
        )
        table[b] = row
    at = table.get(_bin(0.10), {})
    g = lambda d, k: (
        d.get(k, {}).get("median") if isinstance(d.get(k), dict) else None
    )  # noqa: E731
    result = {
        "bench": "align",
        "dose_bin_10pct": _bin(0.10),
        "tre_px_median_gt_masks": g(at, "tre_gt"),
        "tre_px_p95_gt_masks": at.get("tre_gt", {}).get("p95"),
        "tre_px_median_pred_masks": g(at, "tre_pred"),
        "rot_deg_median_gt_masks": g(at, "rot_gt"),
        "scale_pct_median_gt_masks": g(at, "scale_gt"),
        "tre_px_median_gt_masks_intensity_refined": g(at, "tre_gt_intensity"),
        "tre_px_median_pred_masks_by_mask_iou": {
            name: {
                "n": at.get(f"tre_pred_{name}", {}).get("n"),
                "median": g(at, f"tre_pred_{name}"),
            }
            for _, _, name in _IOU_BINS
        },
        "psnr_gain_db": at.get("psnr_mask_enhanced_gt", np.nan) - at.get("psnr_mask_raw", np.nan),
        "psnr_gain_vs_denoiser_db": at.get("psnr_mask_enhanced_gt", np.nan)
        - at.get("psnr_mask_nlm", np.nan),
        "psnr_gain_db_full_blend": at.get("psnr_mask_enhanced_gt_full_blend", np.nan)
        - at.get("psnr_mask_raw", np.nan),
        "psnr_gain_db_pred_masks": at.get("psnr_mask_enhanced_pred", np.nan)
        - at.get("psnr_mask_raw", np.nan),
        "ms_per_vertebra": at.get("ms_per_vertebra"),
        "ms_per_scan": at.get("ms_per_scan"),
        "nlm_h": h_best,
        "nlm_tune_psnr": {int(h): round(float(np.mean(v)), 2) for h, v in tune_psnr.items()},
        "nlm_tuned_on": f"first {args.tune} test pairs (excluded from the figures; val has no pairs)",
        "pairs_evaluated": len(evaluate),
        "manifest": args.manifest if manifest else None,
        "per_dose": table,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": cv2.getNumThreads(),
        },
    }
    result = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
    if args.out:
        write_result(result, args.out)
    else:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    from spine_d2.errors import run_cli

    run_cli(main, "bench_align")
