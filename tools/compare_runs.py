#!/usr/bin/env python
"""Markdown table of training runs: iterations, wall time and final evaluation of each.

python tools/compare_runs.py "AASCE only=output/aasce/..._scratch_cpu" "DRR only=output/..." ...

Each OUTPUT_DIR needs inference/eval_results.json (written by every evaluation) and log.txt
(its "Overall training speed" line gives iterations and wall time). Prints the table; --json
also writes the figures.
"""

import argparse
import json
import re
import sys
from pathlib import Path

_SPEED = re.compile(r"Overall training speed: (\d+) iterations in ([\d:]+) \(([\d.]+) s / it\)")


def _hms(s: str) -> float:
    parts = [float(p) for p in s.split(":")]
    return sum(v * 60**i for i, v in enumerate(reversed(parts)))


def run_summary(out_dir) -> dict:
    out_dir = Path(out_dir)
    res_path = out_dir / "inference" / "eval_results.json"
    if not res_path.is_file():
        raise SystemExit(f"error: {res_path}: not found (evaluate the run first)")
    res = json.loads(res_path.read_text())
    row = {
        "segm_AP": res["segm"]["AP"],
        "segm_AP50": res["segm"]["AP50"],
        "bbox_AP50": res["bbox"]["AP50"],
        "recall": res["vertebra"]["recall"],
        "precision": res["vertebra"]["precision"],
        "dice": res["vertebra"]["mean_dice"],
        "level_accuracy": res["vertebra"].get("level_accuracy"),
    }
    log = out_dir / "log.txt"
    speeds = _SPEED.findall(log.read_text(errors="replace")) if log.is_file() else []
    if speeds:  # one line per (resumed) segment of the run
        row["iterations"] = sum(int(s[0]) for s in speeds)
        row["train_min"] = sum(_hms(s[1]) for s in speeds) / 60
        row["s_per_it"] = 60 * row["train_min"] / row["iterations"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=OUTPUT_DIR")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    rows = []
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep:
            ap.error(f"'{spec}' is not LABEL=OUTPUT_DIR")
        rows.append({"run": label, "dir": path, **run_summary(path)})
    head = "| run | iterations | train min | s/it | segm AP | segm AP50 | recall | precision | Dice | level acc. |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        lv = r["level_accuracy"]
        print(
            f"| {r['run']} | {r.get('iterations', '-')} | {r.get('train_min', float('nan')):.1f} "
            f"| {r.get('s_per_it', float('nan')):.2f} | {r['segm_AP']:.1f} | {r['segm_AP50']:.1f} "
            f"| {r['recall']:.3f} | {r['precision']:.3f} | {r['dice']:.3f} "
            f"| {'-' if lv is None else f'{lv:.3f}'} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
