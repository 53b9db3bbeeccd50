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

    # an --eval-only dir (no training segments in its log) leaves the time columns empty
    c = _run_dir(tmp_path, "c", 60.0, 0.8, [])
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools/compare_runs.py"), f"C={c}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.splitlines()[2].startswith("| C | - | - | - | 30.0 | 60.0 | 0.800 |")


def test_missing_results_is_one_line_error(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools/compare_runs.py"), f"X={tmp_path}"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "eval_results.json: not found" in r.stderr


def test_unreadable_or_incomplete_results_are_one_line_errors(tmp_path):
    d = _run_dir(tmp_path, "a", 80.0, 0.9, [])
    results = d / "inference" / "eval_results.json"
    cases = (
        (b"\x89PNG\r\n", "eval_results.json: not readable as JSON ("),
        (json.dumps({"bbox": {"AP50": 1.0}, "segm": {"AP50": 2.0}}).encode(), "no 'AP' figure"),
        (b"[1, 2]", "eval_results.json: not an evaluation's results"),
    )
    for content, message in cases:
        results.write_bytes(content)
        r = subprocess.run(
            [sys.executable, str(ROOT / "tools/compare_runs.py"), f"A={d}", "--json",
             str(tmp_path / "t.json")],
            capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr
        assert not (tmp_path / "t.json").exists()


def _vertebra_results(run_dir, matched, image_ids=None, dataset="spine_x"):
    d = run_dir / "inference" / dataset
    d.mkdir(parents=True)
    per_image = [
        {"image_id": i, "missed": [], "num_matched": m, "num_gt": 10, "num_pred": 10,
         "dice_sum": 0.9 * m, "level_hits": m, "num_levelled": m}  # fmt: skip
        for i, m in zip(image_ids or range(len(matched)), matched)
    ]
    (d / "vertebra_results.json").write_text(json.dumps({"per_image": per_image}))


def test_paired_differences_with_intervals_need_the_same_images(tmp_path):
    a = _run_dir(tmp_path, "a", 80.0, 0.9, [(600, "0:15:00", "1.5")])
    b = _run_dir(tmp_path, "b", 81.0, 0.95, [(600, "0:15:00", "1.5")])
    _vertebra_results(a, [8, 9, 7, 9] * 10)
    _vertebra_results(b, [9, 9, 8, 9] * 10)  # one more body in half the films
    out = tmp_path / "t.json"
    cmd = [sys.executable, str(ROOT / "tools/compare_runs.py"), f"A={a}", f"B={b}", "--paired"]
    r = subprocess.run(cmd + ["--json", str(out)], capture_output=True, text=True, check=True)
    d = json.loads(out.read_text())["paired"][0]
    assert d["run"] == "B" and d["vs"] == "A"
    assert abs(d["recall"]["diff"] - 0.05) < 1e-9 and 0 < d["recall"]["low"] <= 0.05
    assert d["precision"]["diff"] == d["recall"]["diff"]  # 10 predictions per film in both
    assert "| B | +0.050 (" in r.stdout
    c = _run_dir(tmp_path, "c", 81.0, 0.95, [(600, "0:15:00", "1.5")])
    _vertebra_results(c, [9] * 40, image_ids=range(1, 41))
    r = subprocess.run(cmd[:3] + [f"C={c}", "--paired"], capture_output=True, text=True)
    assert r.returncode != 0 and "--paired needs the same test set" in r.stderr
    r = subprocess.run(cmd[:2] + [f"X={tmp_path}", f"A={a}", "--paired"], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode != 0 and "eval_results.json: not found" in r.stderr


def test_paired_asks_to_evaluate_again_for_results_without_per_image_counts(tmp_path):
    a = _run_dir(tmp_path, "a", 80.0, 0.9, [(600, "0:15:00", "1.5")])
    b = _run_dir(tmp_path, "b", 81.0, 0.95, [(600, "0:15:00", "1.5")])
    _vertebra_results(a, [8, 9])
    old = b / "inference" / "spine_x"
    old.mkdir(parents=True)
    (old / "vertebra_results.json").write_text(
        json.dumps({"per_image": [{"missed": [], "image_id": 0}]})
    )
    cmd = [sys.executable, str(ROOT / "tools/compare_runs.py"), f"A={a}", f"B={b}", "--paired"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert (
        r.returncode != 0 and "evaluate again" in r.stderr and "vertebra_results.json" in r.stderr
    )
    assert len(r.stderr.strip().splitlines()) == 1


def test_paired_names_the_missing_or_ambiguous_results(tmp_path):
    a = _run_dir(tmp_path, "a", 80.0, 0.9, [(600, "0:15:00", "1.5")])
    b = _run_dir(tmp_path, "b", 81.0, 0.95, [(600, "0:15:00", "1.5")])
    _vertebra_results(a, [8, 9])
    cmd = [sys.executable, str(ROOT / "tools/compare_runs.py"), f"A={a}", f"B={b}", "--paired"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0 and "no */vertebra_results.json for --paired" in r.stderr
    _vertebra_results(b, [8, 9], dataset="one")
    _vertebra_results(b, [8, 9], dataset="two")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0 and "results of one, two: name one with --dataset" in r.stderr
    _vertebra_results(a, [8, 9], dataset="two")
    r = subprocess.run(cmd + ["--dataset", "two"], capture_output=True, text=True, check=True)
    assert "| B | +0.000 (+0.000, +0.000)" in r.stdout
