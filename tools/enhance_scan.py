#!/usr/bin/env python
"""Enhance low-dose scans with their high-dose reference, vertebra by vertebra.

    tools/enhance_scan.py --config-file CFG --low low.png --high high.png --out out/ \
        MODEL.WEIGHTS model_final.pth
    tools/enhance_scan.py --low low.png --high high.png --out out/ \
        --low-manifest zoi/manifest.jsonl --high-manifest zoi/manifest.jsonl
    tools/enhance_scan.py --pairs datasets/spine_drr/pairs.json --out out/ \
        --low-manifest m.jsonl --high-manifest m.jsonl

Writes enhanced.png/.tif (the low-dose scan's bit depth), transforms.json, side_by_side.png.
Exit codes: 0 all pairs enhanced, 3 some pairs failed (errors.jsonl), 2 usage errors.
"""

import sys

from spine_d2.align.cli import main

if __name__ == "__main__":
    sys.exit(main())
