"""The body of tools/export_zoi.py: arguments -> config -> ZOIExporter over scan folders.

Exit codes: 0 every scan exported, 3 some scans failed (see errors.jsonl), 2 usage errors
(bad arguments, no scans, output inside an input folder, unusable config).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from detectron2.utils.logger import setup_logger

from ..errors import SpineError
from .export import ZOIExporter
from .sources import check_output_dir, discover_scans, shard

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_USAGE, EXIT_SOME_FAILED = 0, 2, 3


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="export_zoi.py",
        description="Cut every predicted vertebra (ZOI) out of unprocessed scans, with a manifest.",
        epilog="Weights: MODEL.WEIGHTS path/model_final.pth among KEY VALUE, as with train_net.",
    )
    ap.add_argument("--config-file", required=True, metavar="CFG")
    ap.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="DIR_OR_GLOB",
        help="folders (searched recursively), globs or files",
    )
    ap.add_argument("--output", required=True, metavar="OUT", help="must not be inside an input")
    ap.add_argument("--batch-size", type=int, help="scans per forward pass (ZOI.BATCH_SIZE)")
    ap.add_argument("--workers", type=int, help="decoding workers (ZOI.NUM_WORKERS)")
    ap.add_argument("--min-score", type=float, help="score threshold (ZOI.SCORE_THRESH)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="MODEL.DEVICE")
    ap.add_argument(
        "--overlays",
        action="store_true",
        help="also write overlays/<scan>.png with masks, levels and scores",
    )
    ap.add_argument("--num-shards", type=int, default=1, metavar="K")
    ap.add_argument(
        "--shard-index",
        type=int,
        default=0,
        metavar="I",
        help="take every K-th scan of the sorted list, starting at I",
    )
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    ap.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, e.g. MODEL.WEIGHTS model_final.pth ZOI.FORMAT npz",
    )
    return ap


def _config(args):
    from ..engine.setup import build_config

    opts = list(args.opts)
    for flag, key in (
        (args.batch_size, "ZOI.BATCH_SIZE"),
        (args.workers, "ZOI.NUM_WORKERS"),
        (args.min_score, "ZOI.SCORE_THRESH"),
        (args.device, "MODEL.DEVICE"),
    ):
        if flag is not None:
            opts += [key, str(flag)]
    try:
        return build_config(args.config_file, opts)
    except (KeyError, ValueError, AssertionError, OSError) as e:  # yacs' own errors
        raise SpineError(f"{args.config_file}: {type(e).__name__}: {e}") from e


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on bad arguments
    setup_logger(name="spine_d2")
    log = logging.getLogger(__name__)
    try:
        items, roots = discover_scans(args.input)
        check_output_dir(args.output, roots)
        if not items:
            raise SpineError(f"{' '.join(args.input)}: no scans found (PNG, JPEG, TIFF, DICOM)")
        items = shard(items, args.num_shards, args.shard_index)
        cfg = _config(args)
        if args.device == "cuda" and cfg.MODEL.DEVICE != "cuda":
            raise SpineError("--device cuda: no CUDA device is available")
        suffix = f"-{args.shard_index:05d}-of-{args.num_shards:05d}" if args.num_shards > 1 else ""
        log.info("Exporting %d scans to %s", len(items), args.output)
        exporter = ZOIExporter(cfg, overlays=args.overlays, config_file=args.config_file)
        summary = exporter.export(
            items, args.output, roots=roots, suffix=suffix, progress=not args.no_progress
        )
    except SpineError as e:
        print(f"export_zoi: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps({k: v for k, v in summary.items() if k != "timings_s"}))
    return EXIT_SOME_FAILED if summary["scans_failed"] else EXIT_OK
