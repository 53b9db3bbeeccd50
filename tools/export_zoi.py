#!/usr/bin/env python
"""Export every vertebra (ZOI) of a folder of scans, cut from the unprocessed pixels.

    tools/export_zoi.py --config-file CFG --input scans/ --output zoi_out/ MODEL.WEIGHTS model.pth
    tools/export_zoi.py --config-file CFG --input 'archive/**/*.dcm' --output out/ \
        --num-shards 4 --shard-index 0 --overlays

Exit codes: 0 all scans exported, 3 some failed (errors.jsonl), 2 usage errors.
"""

import sys

from spine_d2.zoi.cli import main

if __name__ == "__main__":
    sys.exit(main())
