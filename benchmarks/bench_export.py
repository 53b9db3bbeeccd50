#!/usr/bin/env python
"""Benchmark the ZOI exporter against the ways a Detectron2 user would otherwise do it.

Variants, interleaved in one process on the same model, config, weights and scans:
  (a) ``ZOIExporter`` end to end (decode in workers, batched forward, local paste, PNG writes);
  (b) naive: a loop of ``DefaultPredictor`` calls (full-size masks) + per-instance OpenCV crops,
      PNG writes and a full-mask RLE per instance;
  (c) the model's bare forward pass on pre-decoded, pre-resized tensors under the exporter's
      inference settings (ZOI.AMP and its scope, the ZOI score threshold; the floor for (a));
      (b) stays fp32 with the config's test settings, as a user's loop would be;
  (d) torchvision ``maskrcnn_resnet50_fpn``, random init, same input size and detection cap.

Without ``--weights`` the model is randomly initialised (speed does not depend on the weights,
but the number of detections does: random heads score about 0.5 everywhere, so every scan
gets the detection cap). Prints one JSON line and saves it (``--out``). Timings on a shared
machine are noisy: compare variants of one run, not runs of different days.

    python benchmarks/bench_export.py --scans 48 --sizes 512,900x2400
    python benchmarks/bench_export.py --scans 4 --sizes 256 --out /tmp/bench.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
from summarize import (  # benchmarks/ is on sys.path when run as a script
    SHIPPED_CONFIG,
    SHIPPED_WEIGHTS,
    write_result,
)


def _parse_size(text: str):
    w, _, h = text.partition("x")
    return int(w), int(h or w)


def make_scans(folder: Path, n: int, width: int, height: int) -> list:
    """n synthetic 16-bit scans of width x height (rendered square, resized to the shape)."""
    from spine_d2.data.synthetic import make_synthetic_spine_dataset

    make_synthetic_spine_dataset(folder / "src", num_images=min(n, 8), size=512, seed=0)
    sources = sorted((folder / "src" / "images").glob("*.png"))
    (folder / "scans").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = cv2.imread(str(sources[i % len(sources)]), cv2.IMREAD_UNCHANGED)
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
        path = folder / "scans" / f"scan_{i:04d}.png"
        cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def run_exporter(cfg, model, folder: Path, out: Path):
    from spine_d2.zoi import ZOIExporter, discover_scans

    items, roots = discover_scans([str(folder / "scans")])
    t0 = time.perf_counter()
    summary = ZOIExporter(cfg, model).export(items, out, roots=roots, progress=False)
    return time.perf_counter() - t0, summary


def run_naive(cfg, model, paths, out: Path):
    """What a Detectron2 user writes first: DefaultPredictor per scan, crops per instance."""
    from detectron2.engine import DefaultPredictor

    from spine_d2.data.io import read_scan

    predictor = DefaultPredictor.__new__(DefaultPredictor)  # its model: ours, already built
    predictor.cfg, predictor.model = cfg, model
    from detectron2.data import transforms as T

    predictor.aug = T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )
    predictor.input_format = cfg.INPUT.FORMAT
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / "manifest.jsonl", "w") as manifest:
        for path in paths:
            scan = read_scan(path)
            bgr = np.repeat((scan.image * 255).astype(np.uint8)[:, :, None], 3, axis=2)
            inst = predictor(bgr)["instances"].to("cpu")
            inst = inst[inst.scores >= cfg.ZOI.SCORE_THRESH]
            zois = []
            for i in range(len(inst)):
                mask = inst.pred_masks[i].numpy()
                x0, y0, x1, y1 = inst.pred_boxes.tensor[i].round().int().tolist()
                crop = scan.pixels[y0:y1, x0:x1]
                alpha = (mask[y0:y1, x0:x1] * 65535).astype(np.uint16)
                name = out / f"{path.stem}_{i:02d}.png"
                cv2.imwrite(str(name), np.dstack([crop, crop, crop, alpha]))
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                zois.append({"file": name.name, "rle": rle["counts"].decode()})
            manifest.write(json.dumps({"path": path.name, "zois": zois}) + "\n")
    return time.perf_counter() - t0


def predecode(cfg, paths):
    from detectron2.data import transforms as T

    from spine_d2.data.io import read_scan

    aug = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    tensors = []
    for p in paths:
        img = read_scan(p).image
        img = aug.get_transform(img).apply_image(img)
        tensors.append(torch.from_numpy(img * 255.0)[None].repeat(3, 1, 1))
    return tensors


def run_forward(cfg, model, tensors, batch_size):
    """The floor for (a): the same batches under the exporter's inference settings (ZOI.AMP,
    ZOI.AMP_SCOPE, masks only for detections >= ZOI.SCORE_THRESH)."""
    from spine_d2.zoi import ZOIExporter

    exporter = ZOIExporter(cfg, model)
    t0 = time.perf_counter()
    with exporter.inference_context():
        for i in range(0, len(tensors), batch_size):
            batch = [{"image": t} for t in tensors[i : i + batch_size]]
            model.inference(batch, do_postprocess=False)
    return time.perf_counter() - t0


def run_torchvision(tv_model, tensors, batch_size):
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tensors), batch_size):
            tv_model([t / 255.0 for t in tensors[i : i + batch_size]])
    return time.perf_counter() - t0


def bench_size(cfg, model, tv_model, n, width, height, repeats, workdir: Path) -> dict:
    folder = workdir / f"{width}x{height}"
    paths = make_scans(folder, n, width, height)
    tensors = predecode(cfg, paths)
    times = {k: [] for k in "abcd"}
    summaries = []
    for r in range(repeats):  # interleaved: slow drifts of a shared machine hit every variant
        dt, summary = run_exporter(cfg, model, folder, folder / f"out_a{r}")
        times["a"].append(dt)
        summaries.append(summary)
        times["b"].append(run_naive(cfg, model, paths, folder / f"out_b{r}"))
        times["c"].append(run_forward(cfg, model, tensors, cfg.ZOI.BATCH_SIZE))
        times["d"].append(run_torchvision(tv_model, tensors, cfg.ZOI.BATCH_SIZE))
    best = {k: min(v) for k, v in times.items()}
    rate = {k: n / best[k] for k in best}
    summary = summaries[int(np.argmin(times["a"]))]
    return {
        "scans": n,
        "scan_size_wh": [width, height],
        "model_input_hw": list(tensors[0].shape[1:]),
        "scans_per_s": {
            "a_exporter": round(rate["a"], 3),
            "b_default_predictor_loop": round(rate["b"], 3),
            "c_model_forward": round(rate["c"], 3),
            "d_torchvision_maskrcnn_r50": round(rate["d"], 3),
        },
        "speedup_vs_default_predictor": round(rate["a"] / rate["b"], 3),
        "efficiency_vs_model_forward": round(rate["a"] / rate["c"], 3),
        "a_breakdown_s": summary["timings_s"],
        "a_zois": summary["zois"],
        "seconds_all_repeats": {k: [round(t, 2) for t in v] for k, v in times.items()},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config-file", default=SHIPPED_CONFIG)
    ap.add_argument(
        "--weights",
        default=SHIPPED_WEIGHTS if os.path.isfile(SHIPPED_WEIGHTS) else "",
        help="trained weights (default: the shipped checkpoint; '' = random init)",
    )
    ap.add_argument("--scans", type=int, default=48)
    ap.add_argument("--sizes", default="512,900x2400", help="comma-separated S or WxH")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds; best is kept")
    ap.add_argument("--out", default="output/bench/bench_export.json")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE")
    args = ap.parse_args(argv)

    from detectron2.modeling import build_model
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from spine_d2.checkpoint import SpineCheckpointer
    from spine_d2.engine.setup import build_config

    cfg = build_config(args.config_file, ["MODEL.WEIGHTS", args.weights, *args.opts])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if args.weights:
        SpineCheckpointer(model).load(args.weights)
    tv_model = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1,
        min_size=cfg.INPUT.MIN_SIZE_TEST,
        max_size=cfg.INPUT.MAX_SIZE_TEST,
        box_detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE,
    ).eval()

    result = {
        "benchmark": "bench_export",
        # what else ran: timings from a machine under load are noisy (a static note here
        # used to say the cores were shared, whether they were or not)
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "device": cfg.MODEL.DEVICE,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": args.config_file,
        "weights": args.weights or "random init",
        "batch_size": cfg.ZOI.BATCH_SIZE,
        "workers": cfg.ZOI.NUM_WORKERS,
        "amp": cfg.ZOI.AMP,
        "amp_scope": cfg.ZOI.AMP_SCOPE,
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        for size in args.sizes.split(","):
            w, h = _parse_size(size)
            result["runs"][f"{w}x{h}"] = bench_size(
                cfg, model, tv_model, args.scans, w, h, args.repeats, Path(tmp)
            )
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["peak_rss_children_mb"] = round(
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
    )
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    from spine_d2.errors import run_cli

    run_cli(main, "bench_export")
