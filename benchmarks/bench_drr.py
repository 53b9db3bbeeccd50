#!/usr/bin/env python
"""Throughput of the built-in DRR generator: CT preparation, base renders, scans per second.

Runs in a temporary folder with an empty cache (cold), on the shipped CT, default parameters:
the CT volume is prepared once, one base 3D view is rendered (DiffDRR), then ``--scans`` train
scans are synthesised from it (2D motion, exposure, noise, masks, COCO polygons, PNG writes).
Prints one JSON line and saves it.

    python benchmarks/bench_drr.py --scans 100
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from summarize import write_result  # benchmarks/ is on sys.path when run as a script


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=100)
    ap.add_argument("--out", default="output/bench/bench_drr.json")
    args = ap.parse_args(argv)

    import torch

    from spine_d2.data import drr

    params = replace(drr.PRESETS["default"], num_train=args.scans)
    with tempfile.TemporaryDirectory(prefix="bench_drr_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ct = drr.load_ct(params, tmp / "cache")
        t_ct = time.perf_counter() - t0
        spec = drr.view_specs(params, "train")[0]
        t0 = time.perf_counter()
        base = drr.render_base_view(ct, spec, params, tmp / "cache")
        t_view = time.perf_counter() - t0
        t0 = time.perf_counter()
        coco, _ = drr._split_scans("train", [base], params, tmp / "out", progress=False)
        t_scans = time.perf_counter() - t0
    result = {
        "bench": "drr",
        "ct_prepare_s": round(t_ct, 2),
        "base_view_render_s": round(t_view, 2),
        "scans": args.scans,
        "scans_per_s": round(args.scans / t_scans, 2),
        "instances_per_scan": round(len(coco["annotations"]) / max(args.scans, 1), 2),
        "scan_size": params.size,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
