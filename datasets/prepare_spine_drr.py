#!/usr/bin/env python
"""Generate the built-in DRR spine dataset (see datasets/README.md).

python datasets/prepare_spine_drr.py                 # default: 2000/200/300 scans
python datasets/prepare_spine_drr.py --preset small  # demo and tests
python datasets/prepare_spine_drr.py --taxonomy parts --preview
python datasets/prepare_spine_drr.py --views-val 24 --num-val 2400 --num-train 0 --num-test 0 \
    --out datasets/spine_drr_val24 --cache datasets/spine_drr/cache   # unseen-view calibration
"""

import argparse
import logging
import sys
from dataclasses import fields, replace

from detectron2.utils.logger import setup_logger

from spine_d2.data.drr import PRESETS, default_output_dir, generate_dataset, preview
from spine_d2.errors import SpineError


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--taxonomy", choices=["vertebra", "parts"], default="vertebra")
    ap.add_argument(
        "--out", help="output folder (default $DETECTRON2_DATASETS/spine_drr[_parts][_small])"
    )
    ap.add_argument("--cache", help="base-render cache folder (default <out>/cache)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--num-train", type=int, help="scans (0: leave the split empty)")
    ap.add_argument("--num-val", type=int, help="scans (0: leave the split empty)")
    ap.add_argument("--num-test", type=int, help="scan pairs x 2 (0: leave the split empty)")
    ap.add_argument(
        "--views-train",
        type=int,
        help="base 3D views of the training split (the first N of a seed"
        " are the same for any larger N; val and test do not depend on it)",
    )
    ap.add_argument(
        "--views-val",
        type=int,
        help="base 3D views of the validation split, drawn from the test angle bins (the first N"
        " are the same for any larger N): a larger set of unseen views to choose operating"
        " points on, e.g. --views-val 24 --num-val 2400 --num-train 0 --num-test 0",
    )
    ap.add_argument("--size", type=int, help="output scans are SIZE x SIZE pixels")
    ap.add_argument("--bit-depth", type=int, choices=[8, 16])
    ap.add_argument(
        "--image-format", choices=["png", "dicom"], help="scan files (default 16-bit PNG)"
    )
    ap.add_argument("--preview", action="store_true", help="write preview_<split>.png sheets")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    setup_logger(name="spine_d2")
    params = replace(PRESETS[args.preset], taxonomy=args.taxonomy)
    names = {f.name for f in fields(params)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    params = replace(params, **overrides)
    out = args.out or default_output_dir(args.taxonomy, args.preset)
    try:
        meta = generate_dataset(out, params, progress=not args.no_progress, cache_dir=args.cache)
        log = logging.getLogger("spine_d2")
        for split, c in meta["counts"].items():
            log.info("%s: %d images, %d instances", split, c["images"], c["annotations"])
        if args.preview:
            for split in ("train", "test"):
                log.info("Preview: %s", preview(out, split))
    except SpineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
