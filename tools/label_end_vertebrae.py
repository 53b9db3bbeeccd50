#!/usr/bin/env python
"""Add pseudo-labelled end vertebrae (C7 above T1, S1 below L5) to a level-annotated COCO split.

Reads the split's COCO json and a model's detections on it (``coco_instances_results.json`` of
``tools/train_net.py --eval-only DATASETS.TEST '("<split>",)'``) and writes a copy of the json
with, per film and end, the nearest detection one spacing beyond the end body that overlaps no
annotation, named after the next level and flagged ``pseudo`` (``spine_d2/data/pseudo.py`` says
why). The input files are never changed; the output is written to a temp name, then renamed.

    python tools/label_end_vertebrae.py --coco datasets/spine_aasce/train.json \\
        --detections output/aasce/short2_v6/train_eval/inference/spine_aasce_train/coco_instances_results.json \\
        --out datasets/spine_aasce_ends/train.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _read_json(path: Path, what: str):
    from spine_d2.errors import DatasetError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(path, f"{what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(path, f"{what} is not readable JSON ({e})") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coco", required=True, help="the split's COCO json (annotations with levels)")
    ap.add_argument("--detections", required=True, help="COCO results of a model on that split")
    ap.add_argument("--out", required=True, help="COCO json to write (not one of the inputs)")
    ap.add_argument("--min-score", type=float, default=0.2, help="lowest detection score used")
    args = ap.parse_args(argv)

    from detectron2.utils.logger import setup_logger

    from spine_d2.atomic import write_atomic
    from spine_d2.data.pseudo import label_end_vertebrae
    from spine_d2.errors import DatasetError, SpineError

    logger = setup_logger(name="spine_d2", abbrev_name="spine")
    coco_path, det_path, out = Path(args.coco), Path(args.detections), Path(args.out)
    try:
        if out.resolve() in (coco_path.resolve(), det_path.resolve()):
            raise SpineError(f"{out}: --out would overwrite an input; name another file")
        if not 0 <= args.min_score <= 1:
            raise SpineError(f"--min-score must be in [0, 1], not {args.min_score}")
        coco = _read_json(coco_path, "COCO dataset")
        if not isinstance(coco, dict) or not {"images", "annotations"} <= set(coco):
            raise DatasetError(coco_path, "not a COCO dataset (needs images and annotations)")
        detections = _read_json(det_path, "detections file")
        if not isinstance(detections, list):
            raise DatasetError(det_path, "not a list of COCO detections")
        labelled, counts = label_end_vertebrae(
            coco,
            detections,
            min_score=args.min_score,
            source=str(det_path),
            coco_source=str(coco_path),
        )
        labelled.setdefault("info", {})["pseudo_labels"] = {
            "source": str(coco_path),
            "detections": str(det_path),
            "min_score": args.min_score,
            "counts": counts,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(labelled))
    except SpineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    films = len(coco["images"])
    logger.info(
        f"Wrote {out}: {films} films, pseudo-labels added "
        + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
