#!/usr/bin/env python
"""Markdown table of training runs: iterations, wall time and final evaluation of each.

python tools/compare_runs.py "AASCE only=output/aasce/..._scratch_cpu" "DRR only=output/..." ...

Each OUTPUT_DIR needs inference/eval_results.json (written by every evaluation) and log.txt
(its "Overall training speed" line gives iterations and wall time). Prints the table; --json
also writes the figures.

--paired adds a second table: each run against the first on the same test images, the
difference in recall, precision, Dice and level accuracy with its 95 % interval from shared
resamples of the images (spine_d2.evaluation.bootstrap), read from the runs'
inference/<dataset>/vertebra_results.json. A difference whose interval holds 0 is not evidence.
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
    try:
        res = json.loads(res_path.read_text(encoding="utf-8"))
        row = {
            "segm_AP": res["segm"]["AP"],
            "segm_AP50": res["segm"]["AP50"],
            "bbox_AP50": res["bbox"]["AP50"],
            "recall": res["vertebra"]["recall"],
            "precision": res["vertebra"]["precision"],
            "dice": res["vertebra"]["mean_dice"],
            "level_accuracy": res["vertebra"].get("level_accuracy"),
        }
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise SystemExit(f"error: {res_path}: not readable as JSON ({e})") from None
    except (KeyError, TypeError, AttributeError) as e:
        missing = f"no {e} figure" if isinstance(e, KeyError) else "not an evaluation's results"
        raise SystemExit(
            f"error: {res_path}: {missing} (needs the segm, bbox and vertebra results of an "
            "evaluation with VertebraEvaluator)"
        ) from None
    log = out_dir / "log.txt"
    speeds = _SPEED.findall(log.read_text(errors="replace")) if log.is_file() else []
    if speeds:  # one line per (resumed) segment of the run
        row["iterations"] = sum(int(s[0]) for s in speeds)
        row["train_min"] = sum(_hms(s[1]) for s in speeds) / 60
        row["s_per_it"] = 60 * row["train_min"] / row["iterations"]
    return row


def per_image_counts(out_dir, dataset: str = "") -> tuple:
    """(image ids, counts) of a run's vertebra_results.json; SystemExit naming the file when it
    is missing, ambiguous or from a spine-d2 without the per-image counts."""
    from spine_d2.errors import SpineError
    from spine_d2.evaluation.bootstrap import image_counts
    from spine_d2.evaluation.errors import load_vertebra_results

    inference = Path(out_dir) / "inference"
    found = sorted(inference.glob(f"{dataset or '*'}/vertebra_results.json"))
    if len(found) != 1:
        if not found:
            raise SystemExit(
                f"error: {inference}: no {dataset or '*'}/vertebra_results.json for --paired "
                "(evaluate the run with an output dir first)"
            )
        names = ", ".join(p.parent.name for p in found)
        raise SystemExit(f"error: {inference}: results of {names}: name one with --dataset")
    try:
        payload = load_vertebra_results(found[0])
        return [im["image_id"] for im in payload["per_image"]], image_counts(payload["per_image"])
    except SpineError as e:
        raise SystemExit(f"error: {e}")
    except KeyError as e:
        raise SystemExit(f"error: {found[0]}: no per-image {e} (written before spine-d2 saved "
                         "the counts the intervals need); evaluate again")  # fmt: skip


def paired_rows(rows, dataset: str = "") -> list:
    """Each run after the first against the first: bootstrap.paired_difference per metric."""
    from spine_d2.evaluation.bootstrap import paired_difference

    ids0, base = per_image_counts(rows[0]["dir"], dataset)
    out = []
    for r in rows[1:]:
        ids, counts = per_image_counts(r["dir"], dataset)
        if ids != ids0:
            raise SystemExit(
                f"error: {r['dir']}: evaluated on other images than {rows[0]['dir']} "
                f"({len(ids)} vs {len(ids0)}); --paired needs the same test set"
            )
        out.append({"run": r["run"], "vs": rows[0]["run"], **paired_difference(base, counts)})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=OUTPUT_DIR")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--paired", action="store_true",
                    help="also each run minus the first, with 95%% intervals")  # fmt: skip
    ap.add_argument("--dataset", default="", help="with --paired: the test set's folder name")
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
        # an --eval-only output dir has no training log: its time columns stay empty
        minutes = f"{r['train_min']:.1f}" if "train_min" in r else "-"
        per_it = f"{r['s_per_it']:.2f}" if "s_per_it" in r else "-"
        print(
            f"| {r['run']} | {r.get('iterations', '-')} | {minutes} "
            f"| {per_it} | {r['segm_AP']:.1f} | {r['segm_AP50']:.1f} "
            f"| {r['recall']:.3f} | {r['precision']:.3f} | {r['dice']:.3f} "
            f"| {'-' if lv is None else f'{lv:.3f}'} |"
        )
    paired = paired_rows(rows, args.dataset) if args.paired and len(rows) > 1 else []
    if paired:
        names = {"recall": "recall", "precision": "precision", "mean_dice": "Dice",
                 "level_accuracy": "level acc."}  # fmt: skip
        keys = [k for k in names if all(k in p for p in paired)]
        print()
        print("| run - " + paired[0]["vs"] + " | " + " | ".join(names[k] for k in keys) + " |")
        print("|---" * (len(keys) + 1) + "|")
        for p in paired:
            cells = [f"{p[k]['diff']:+.3f} ({p[k]['low']:+.3f}, {p[k]['high']:+.3f})" for k in keys]
            print(f"| {p['run']} | " + " | ".join(cells) + " |")
    if args.json:  # to a temporary name, then renamed: an interrupted run leaves no half file
        from spine_d2.atomic import write_atomic

        write_atomic(
            args.json, json.dumps({"runs": rows, "paired": paired} if paired else rows, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
