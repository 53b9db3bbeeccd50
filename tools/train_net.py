#!/usr/bin/env python
"""Train or evaluate a spine Mask R-CNN with Detectron2's usual command line.

tools/train_net.py --config-file configs/spine_mask_rcnn_R_18_FPN_scratch_gn_cpu.yaml
tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
tools/train_net.py --config-file CFG --num-gpus 8 SOLVER.IMS_PER_BATCH 16
"""

import sys

from detectron2.engine import default_argument_parser, launch

from spine_d2.engine import main
from spine_d2.errors import SpineError


def cli():
    args = default_argument_parser().parse_args()
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except SpineError as e:
        print(f"train_net: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
