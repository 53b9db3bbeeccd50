#!/usr/bin/env python
"""Contact sheet of a registered dataset: scans with mask outlines and level names.

python tools/visualize_data.py spine_drr_train --out sheet.png --num 12
"""

import argparse
import sys

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

import spine_d2  # noqa: F401  (registers the built-in datasets)
from spine_d2.data.drr import contact_sheet
from spine_d2.errors import SpineError


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("dataset", help="registered dataset name, e.g. spine_drr_train")
    ap.add_argument("--out", default=None, help="PNG to write (default <dataset>.png)")
    ap.add_argument("--num", type=int, default=12, help="scans on the sheet")
    ap.add_argument("--cols", type=int, default=4)
    ap.add_argument("--tile", type=int, default=384, help="tile size in pixels")
    ap.add_argument("--seed", type=int, default=0, help="which scans are picked")
    args = ap.parse_args(argv)
    setup_logger(name="spine_d2")
    if args.dataset not in DatasetCatalog.list():
        print(f"error: dataset '{args.dataset}' is not registered", file=sys.stderr)
        return 1
    try:
        records = DatasetCatalog.get(args.dataset)
        rng = np.random.default_rng(args.seed)
        pick = sorted(rng.choice(len(records), size=min(args.num, len(records)), replace=False))
        names = MetadataCatalog.get(args.dataset).get("thing_classes")
        out = contact_sheet([records[i] for i in pick], args.out or f"{args.dataset}.png",
                            cols=args.cols, tile=args.tile, class_names=names)  # fmt: skip
    except SpineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
