"""The body of tools/enhance_scan.py: pairs of scans -> vertebrae -> enhanced scans.

Vertebrae come from export manifests (``--low-manifest/--high-manifest``, scans looked up by
content hash, so the manifest's relative paths need not match) or from running the model
(``--config-file`` + ``MODEL.WEIGHTS``) through the same exporter as tools/export_zoi.py.

Exit codes: 0 every pair enhanced, 3 some pairs failed (errors.jsonl, folder mode: a missing
scan fails its pair only), 2 usage errors (bad arguments, a missing file of a single pair, no
vertebra, incompatible scans).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

from ..atomic import single_writer
from ..data.io import file_sha256, read_scan
from ..errors import OutputError, SpineError, check_output_folder
from ..zoi.manifest import append_line, load_manifest
from .pipeline import enhance_pair, vertebrae_from_manifest, write_outputs

__all__ = ["build_parser", "main", "pairs_from_file", "pairs_from_patterns"]

EXIT_OK, EXIT_USAGE, EXIT_SOME_FAILED = 0, 2, 3
logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="enhance_scan.py",
        description="Composite the clear high-dose vertebrae onto a low-dose scan, per vertebra.",
        epilog="Single pair: --low --high. Folder mode: --pairs FILE, or --input-dir with "
        "--low-pattern/--high-pattern (the part matched by '*' pairs the scans).",
    )
    ap.add_argument("--config-file", metavar="CFG", help="model config (not needed with manifests)")
    ap.add_argument("--low", metavar="LOW", help="low-dose scan")
    ap.add_argument("--high", metavar="HIGH", help="high-dose reference scan")
    ap.add_argument(
        "--pairs", metavar="JSON", help="pairs file ({'pairs': [{high_dose, low_dose}]})"
    )
    ap.add_argument("--image-root", metavar="DIR", help="root of the pairs file's paths")
    ap.add_argument("--input-dir", metavar="DIR", help="folder of scans to pair by name")
    ap.add_argument("--low-pattern", default="*_low.*", metavar="GLOB")
    ap.add_argument("--high-pattern", default="*_high.*", metavar="GLOB")
    ap.add_argument("--low-manifest", metavar="JSONL", help="export manifest of the low-dose scans")
    ap.add_argument(
        "--high-manifest", metavar="JSONL", help="export manifest of the high-dose scans"
    )
    ap.add_argument("--out", required=True, metavar="OUT")
    ap.add_argument("--feather", type=float, default=3.0, metavar="PX", help="blend edge width")
    ap.add_argument("--no-side-by-side", action="store_true", help="skip side_by_side.png")
    ap.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE")
    return ap


def _stem_key(name: str, pattern: str) -> str | None:
    """The part of ``name`` matched by the pattern's '*' (None when it does not match)."""
    if not fnmatch.fnmatch(name, pattern):
        return None
    head, _, tail = pattern.partition("*")
    tail_fixed = tail.split("*")[-1] if "*" in tail else tail
    if "." in tail_fixed and tail_fixed.endswith(".*"):
        tail_fixed = tail_fixed[:-2]
        name = os.path.splitext(name)[0]
    return name[len(head) : len(name) - len(tail_fixed) if tail_fixed else None]


def pairs_from_patterns(folder: str, low_pattern: str, high_pattern: str) -> list:
    """[(high, low)] for scans whose names match the two patterns with the same '*' part."""
    if not os.path.isdir(folder):
        raise SpineError(f"{folder}: no such folder")
    lows, highs = {}, {}
    for name in sorted(os.listdir(folder)):
        for table, pat in ((lows, low_pattern), (highs, high_pattern)):
            key = _stem_key(name, pat)
            if key is not None:
                table[key] = os.path.join(folder, name)
    pairs = [(highs[k], lows[k]) for k in sorted(lows) if k in highs]
    if not pairs:
        raise SpineError(f"{folder}: no scans pair up as {high_pattern} / {low_pattern}")
    return pairs


def pairs_from_file(path: str, image_root: str | None = None) -> list:
    """[(high, low)] from a pairs.json as written by datasets/prepare_spine_drr.py."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise SpineError(f"{path}: cannot read pairs file ({e})") from None
    entries = data.get("pairs", data) if isinstance(data, dict) else data
    if image_root is None:
        base = Path(path).parent
        image_root = str(base / "images") if (base / "images").is_dir() else str(base)
    try:
        return [
            (os.path.join(image_root, e["high_dose"]), os.path.join(image_root, e["low_dose"]))
            for e in entries
        ]
    except (KeyError, TypeError) as e:
        raise SpineError(f"{path}: each pair needs 'high_dose' and 'low_dose' ({e})") from e


class _ManifestIndex:
    """Manifest lines by content hash: a scan is found whatever folder it was exported from."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise SpineError(f"{path}: no such manifest")
        self.path = path
        lines = load_manifest(path).values()
        self.by_sha = {line["sha256"]: line for line in lines if "sha256" in line}

    def vertebrae(self, scan) -> list:
        line = self.by_sha.get(scan.meta.get("sha256") or file_sha256(scan.path))
        if line is None:
            raise SpineError(f"{scan.path}: not in manifest {self.path}")
        return vertebrae_from_manifest(line)


def _detector(args, out: str, scans: list):
    """Run the exporter once over every scan; returns a manifest index of the results."""
    from ..engine.setup import build_config
    from ..zoi.export import ZOIExporter
    from ..zoi.sources import discover_scans

    try:
        cfg = build_config(args.config_file, list(args.opts))
    except (KeyError, ValueError, AssertionError, OSError) as e:
        raise SpineError(f"{args.config_file}: {type(e).__name__}: {e}") from e
    items, roots = discover_scans(sorted(set(scans)))
    ZOIExporter(cfg, config_file=args.config_file).export(
        items, os.path.join(out, "zoi"), roots=roots
    )
    return _ManifestIndex(os.path.join(out, "zoi", "manifest.jsonl"))


def _check_exists(*paths):
    for p in paths:
        if p and not os.path.exists(p):
            raise SpineError(f"{p}: no such file")


def _one(high_path, low_path, index_high, index_low, out_dir, args) -> dict:
    high, low = read_scan(high_path), read_scan(low_path)
    result = enhance_pair(
        high, low, index_high.vertebrae(high), index_low.vertebrae(low), feather_px=args.feather
    )
    return write_outputs(result, high, low, out_dir, side_by_side_png=not args.no_side_by_side)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.ExitStack() as held:
        return _run(args, held)


def _run(args, held: contextlib.ExitStack) -> int:
    try:
        check_output_folder(args.out)
        modes = [bool(args.low or args.high), bool(args.pairs), bool(args.input_dir)]
        if sum(modes) != 1:
            raise SpineError("give one of: --low and --high, --pairs, --input-dir")
        if modes[0]:
            if not (args.low and args.high):
                raise SpineError("--low and --high go together")
            _check_exists(args.low, args.high)
            pairs = [(args.high, args.low)]
        elif args.pairs:
            _check_exists(args.pairs)
            pairs = pairs_from_file(args.pairs, args.image_root)
        else:
            pairs = pairs_from_patterns(args.input_dir, args.low_pattern, args.high_pattern)
        _check_exists(args.low_manifest, args.high_manifest)
        if bool(args.low_manifest) != bool(args.high_manifest):
            raise SpineError("--low-manifest and --high-manifest go together")
        if not args.low_manifest and not args.config_file:
            raise SpineError(
                "--config-file is needed unless --low-manifest and --high-manifest are given"
            )
        # one run at a time per output folder: two would write the same pairs' files and
        # truncate each other's errors.jsonl
        os.makedirs(args.out, exist_ok=True)
        held.enter_context(single_writer(Path(args.out, ".enhance.lock"), "enhance_scan run"))
        if args.low_manifest:
            index_low, index_high = _ManifestIndex(args.low_manifest), _ManifestIndex(
                args.high_manifest
            )
        else:
            # a batch goes on past a missing scan (its pair is recorded in errors.jsonl); the
            # single pair was checked above
            scans = [p for pair in pairs for p in pair]
            present = [p for p in scans if os.path.exists(p)]
            if not present:
                raise SpineError(f"{scans[0]}: no such file (nor any other scan of the pairs)")
            index_low = index_high = _detector(args, args.out, present)
        if modes[0]:
            summary = _one(args.high, args.low, index_high, index_low, args.out, args)
            print(json.dumps({k: v for k, v in summary.items() if k != "vertebrae"}))
            return EXIT_OK
    except SpineError as e:
        print(f"enhance_scan: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    failed = 0
    os.makedirs(args.out, exist_ok=True)
    try:
        with open(os.path.join(args.out, "errors.jsonl"), "w", encoding="utf-8") as errors:
            for high_path, low_path in tqdm(pairs, desc="enhance", unit="pair"):
                out_dir = os.path.join(args.out, Path(low_path).stem)
                try:
                    _one(high_path, low_path, index_high, index_low, out_dir, args)
                except OutputError:
                    raise  # a full disk: every later pair would fail alike
                except SpineError as e:
                    failed += 1
                    append_line(errors, {"low": low_path, "high": high_path, "error": str(e)})
                    logger.warning("%s", e)
    except OutputError as e:
        print(f"enhance_scan: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps({"pairs": len(pairs), "failed": failed, "out": args.out}))
    return EXIT_SOME_FAILED if failed else EXIT_OK
