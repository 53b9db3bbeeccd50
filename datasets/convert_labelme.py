#!/usr/bin/env python
"""labelme JSON polygons -> one COCO instances file that spine-d2 trains on (and back).

python datasets/convert_labelme.py --src DIR --mapping datasets/labelme_mapping.yaml --out train.json
python datasets/convert_labelme.py --src DIR --mapping M.yaml --out x.json --image-root IMAGES
python datasets/convert_labelme.py --to-labelme --coco train.json --image-root IMAGES --out DIR

The label -> class mapping (and how levels are read from labels) is a small YAML: see
datasets/labelme_mapping.yaml and spine_d2/data/labelme.py. The COCO file gets the validation of
register_spine_coco before it is written; bad input names the labelme file and writes nothing.
Register the result without code: SPINE.COCO_DATASETS [[name, json, image_root]].
"""

import argparse
import logging
import sys

from detectron2.utils.logger import setup_logger

from spine_d2.data.labelme import coco_to_labelme, labelme_to_coco, load_mapping
from spine_d2.errors import SpineError


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--src", help="folder of labelme JSON files (searched recursively)")
    ap.add_argument("--mapping", help="label -> class YAML")
    ap.add_argument("--out", required=True, help="COCO json (or, with --to-labelme, a folder)")
    ap.add_argument("--image-root", help="COCO file_name is relative to this (default --src)")
    ap.add_argument("--to-labelme", action="store_true", help="COCO -> labelme instead")
    ap.add_argument("--coco", help="with --to-labelme: the COCO json to convert")
    args = ap.parse_args(argv)
    setup_logger(name="spine_d2")
    log = logging.getLogger("spine_d2")
    try:
        if args.to_labelme:
            if not (args.coco and args.image_root):
                ap.error("--to-labelme needs --coco and --image-root")
            n = coco_to_labelme(args.coco, args.image_root, args.out)
            log.info("Wrote %d labelme files under %s", n, args.out)
        else:
            if not (args.src and args.mapping):
                ap.error("needs --src and --mapping")
            counts = labelme_to_coco(
                args.src, load_mapping(args.mapping), args.out, args.image_root
            )
            log.info("Wrote %s: %s", args.out, counts)
    except SpineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
