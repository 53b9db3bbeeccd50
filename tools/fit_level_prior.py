#!/usr/bin/env python
"""Fit the framing prior of the level decoder (``spine_d2.modeling.levels.LevelPrior``).

Reads a registered training split whose annotations carry levels and writes, per level, the mean
and spread of two features: the vertebra's centre height in the film (fraction of the image
height) and its width relative to the film's median vertebra. Fit on a training split only: the
prior is a model parameter, and the test split must stay unseen.

    python tools/fit_level_prior.py --dataset spine_aasce_train --out configs/aasce/level_prior_aasce_train.json

Then set SPINE.LEVEL_HEAD.PRIOR_FILE to the file and SPINE.LEVEL_HEAD.PRIOR_WEIGHT > 0.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dataset", required=True, help="registered dataset name, e.g. spine_aasce_train"
    )
    ap.add_argument(
        "--out", required=True, help="JSON file to write (written to a temp name, then renamed)"
    )
    ap.add_argument("--min-count", type=int, default=5, help="fewest examples a level needs")
    ap.add_argument(
        "--config-file", default="", help="register the config's SPINE.COCO_DATASETS first"
    )
    args = ap.parse_args(argv)

    from detectron2.data import DatasetCatalog
    from detectron2.utils.logger import setup_logger

    import spine_d2.data  # noqa: F401  (registers the built-in datasets)
    from spine_d2.errors import SpineError
    from spine_d2.modeling.levels import LevelPrior

    logger = setup_logger(name="spine_d2", abbrev_name="spine")
    try:
        if args.config_file:
            from spine_d2.engine.setup import build_config

            build_config(args.config_file)
        if args.dataset not in DatasetCatalog.list():
            raise SpineError(
                f"{args.dataset}: not a registered dataset (for AASCE run make data-aasce first)"
            )
        prior = LevelPrior.fit(DatasetCatalog.get(args.dataset), args.dataset, args.min_count)
        prior.save(args.out)
    except SpineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, m, s, c in zip(prior.levels, prior.mean, prior.std, prior.count):
        logger.info(
            f"{name:>4}: relative y {m[1]:.3f} +- {s[1]:.3f}, "
            f"log relative width {m[0]:+.3f} +- {s[0]:.3f} (n={c})"
        )
    logger.info(f"Wrote {args.out}: {len(prior.levels)} levels from {args.dataset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
