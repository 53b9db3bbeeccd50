"""tools/compare_runs.py: figures read from eval_results.json and log.txt of each run."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_dir(tmp_path, name, ap50, recall, segments):
    d = tmp_path / name
    (d / "inference").mkdir(parents=True)
    res = {
        "bbox": {"AP50": 90.0},
        "segm": {"AP": ap50 / 2, "AP50": ap50},
        "vertebra": {"recall": recall, "precision": 0.9, "mean_dice": 0.8, "level_accuracy": 0.7},
    }
    (d / "inference" / "eval_results.json").write_text(json.dumps(res))
    lines = [
        f"[d2.engine.hooks]: Overall training speed: {n} iterations in {t} ({s} s / it)"
        for n, t, s in segments
    ]
    (d / "log.txt").write_text("\n".join(["noise"] + lines) + "\n")
    return d


def test_table_sums_resumed_segments(tmp_path):
    a = _run_dir(tmp_path, "a", 80.0, 0.9, [(600, "0:15:00", "1.5"), (600, "0:16:00", "1.6")])
    b = _run_dir(tmp_path, "b", 50.5, 0.5, [(1200, "0:10:00", "0.5")])
    out = tmp_path / "t.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/compare_runs.py"),
            f"A={a}",
            f"B={b}",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(out.read_text())
    assert rows[0]["iterations"] == 1200 and abs(rows[0]["train_min"] - 31.0) < 1e-9
    assert abs(rows[0]["s_per_it"] - 1.55) < 1e-9
    assert rows[1]["segm_AP50"] == 50.5 and rows[1]["iterations"] == 1200
    table = r.stdout.splitlines()
    assert table[2].startswith("| A | 1200 | 31.0 | 1.55 | 40.0 | 80.0 | 0.900 |")
    assert table[3].startswith("| B | 1200 | 10.0 | 0.50 |")


def test_missing_results_is_one_line_error(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools/compare_runs.py"), f"X={tmp_path}"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "eval_results.json: not found" in r.stderr
