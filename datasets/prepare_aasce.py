#!/usr/bin/env python
"""Convert the AASCE 2019 spine radiographs (SpineWeb Dataset 16) to COCO, split by patient.

python datasets/prepare_aasce.py --src ../shared/data/aasce            # -> datasets/spine_aasce
python datasets/prepare_aasce.py --src DIR --out DIR --val-fraction 0.2 --seed 0

Writes train.json / val.json (category vertebral_body, attribute level T1..L5), meta.json
(counts of every label error fixed or skipped, and the patients of each split) and images/, a
link to the source images (never copied). Registered as spine_aasce_train / spine_aasce_val.
Logic: spine_d2/data/aasce.py (label checks and the patient key are documented there).
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from detectron2.utils.logger import setup_logger

from spine_d2.data.aasce import convert_aasce
from spine_d2.errors import SpineError


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--src", required=True, help="AASCE folder holding data/ and labels/")
    ap.add_argument(
        "--out", help="output folder (default $DETECTRON2_DATASETS/spine_aasce)", default=None
    )
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, help="convert only the first N images (sorted)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    setup_logger(name="spine_d2")
    out = Path(args.out or Path(os.environ.get("DETECTRON2_DATASETS", "datasets")) / "spine_aasce")
    try:
        meta = convert_aasce(
            args.src,
            out,
            val_fraction=args.val_fraction,
            seed=args.seed,
            limit=args.limit,
            progress=not args.no_progress,
        )
    except SpineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    log = logging.getLogger("spine_d2")
    c = meta["counts"]
    for part in ("train", "val"):
        log.info(
            "%s: %d images, %d vertebral bodies, %d patients",
            part,
            c[part]["images"],
            c[part]["annotations"],
            c[part]["patients"],
        )
    log.info("label checks: %s", c["checks"] or "none")
    log.info("Wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
