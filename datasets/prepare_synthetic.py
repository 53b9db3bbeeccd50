#!/usr/bin/env python
"""Write a small synthetic spine dataset (COCO) for smoke runs: rounded vertebral bodies on a
smooth background, exact masks and levels. For real anatomy use prepare_spine_drr.py.

    python datasets/prepare_synthetic.py --out datasets/spine_synthetic --train 60 --test 20
"""

import argparse

from spine_d2.data.synthetic import make_synthetic_spine_dataset


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="datasets/spine_synthetic")
    ap.add_argument("--train", type=int, default=60, help="training scans")
    ap.add_argument("--test", type=int, default=20, help="test scans")
    ap.add_argument("--size", type=int, default=384, help="scan width and height in pixels")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for split, n, seed in (("train", args.train, args.seed), ("test", args.test, args.seed + 1)):
        json_file, image_root = make_synthetic_spine_dataset(
            args.out, num_images=n, size=args.size, vertebrae=(4, 9), seed=seed, split=split
        )
        print(f"{split}: {n} scans -> {json_file} (images in {image_root})")


if __name__ == "__main__":
    main()
