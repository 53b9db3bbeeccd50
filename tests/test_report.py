"""The demo report: figures from the run's own files, tables, summary.json, headline lines."""

import json

import cv2
import numpy as np
import pycocotools.mask as mask_util

from spine_d2 import report
from spine_d2.demo import summarize
from spine_d2.zoi.extract import encode_png


def _export(tmp_path):
    """One 16-bit scan, its manifest line and one ZOI file, as the exporter writes them."""
    scan = np.full((64, 64), 1000, np.uint16)
    scan[20:40, 10:30] = 50000
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), scan)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 10:30] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    zoi = np.zeros((20, 20, 2), np.uint16)  # 16-bit gray + alpha, the exporter's encoder
    zoi[..., 0] = np.linspace(30000, 60000, 20, dtype=np.uint16)[None, :]
    zoi[..., 1] = 65535
    zoi[:5, :5, 1] = 0  # outside the mask
    zoi[:5, :5, 0] = 1000
    (tmp_path / "export" / "zoi" / "a").mkdir(parents=True)
    (tmp_path / "export" / "zoi" / "a" / "0_T7.png").write_bytes(encode_png(zoi))
    line = {
        "path": "a.png",
        "zois": [
            {"id": 0, "class": "vertebra", "level": "T7", "score": 0.98, "mask_rle": rle,
             "bbox_xyxy": [10, 20, 30, 40], "file": "zoi/a/0_T7.png"}
        ],
        "suspected_missing": [],
    }  # fmt: skip
    return line, str(images), str(tmp_path / "export")


def test_figures_show_the_exported_pixels(tmp_path):
    line, image_root, export_dir = _export(tmp_path)
    grid = cv2.imread(report.zoi_grid_png([line], export_dir, tmp_path / "grid.png", tile=40))
    assert grid.shape[:2] == (40, 40)
    assert grid[2, 2].max() == 0  # the alpha-0 corner stays black
    assert grid[27, 35].max() == 0  # beyond the ZOI: background
    assert grid[15, 20].min() > 0  # masked pixels are shown
    over = cv2.imread(report.overlays_png([line], image_root, tmp_path / "ov.png", tile=64))
    assert over.shape == (64, 64, 3)
    curves = report.loss_curves_png(
        [{"iteration": i, "total_loss": 2.0 / (i + 1), "loss_mask": 0.5} for i in range(5)],
        tmp_path / "loss.png",
    )
    assert cv2.imread(curves) is not None


def test_report_tables_and_summary_carry_the_run_figures(tmp_path):
    eval_results = {
        "segm": {"AP": 71.25, "AP50": 97.5},
        "bbox": {"AP": 70.0, "AP50": 98.0},
        "vertebra": {"recall": 0.975, "precision": 0.98, "mean_dice": 0.93, "recall/T7": 1.0},
    }
    zoi = {"scans_ok": 40, "suspected_missing": 3, "zois": 400}
    align = {"tre_px_median_pred_masks": 0.61, "psnr_gain_db_pred_masks": 7.25}
    summary = summarize(123.4, eval_results, zoi, align)
    assert summary["test.segm.AP50"] == 97.5 and summary["test.vertebra.dice"] == 0.93
    assert summary["zoi.suspected_missing"] == 3 and summary["align.tre_px_median"] == 0.61
    assert summary["test.vertebra.level_accuracy"] is None
    paths = report.write_report(tmp_path, summary=summary, eval_results=eval_results, figures={})
    saved = json.loads(open(paths["summary.json"]).read())
    assert saved == summary
    md = open(paths["report.md"]).read()
    assert "| test.segm.AP50 | 97.5 |" in md and "| T7 |" in md
    assert "<td>0.975</td>" in open(paths["report.html"]).read()
    lines = report.headline(summary)
    assert "AP50 97.5" in lines[0] and "level accuracy n/a" in lines[0]
    assert "3 suspected missed vertebrae" in lines[1] and "+7.2 dB" in lines[2]


def test_metrics_of_a_run_started_again_or_resumed_in_the_same_folder(tmp_path):
    path = tmp_path / "metrics.json"
    first = [{"iteration": i, "total_loss": 2.0} for i in (19, 39, 59, 79)]
    again = [{"iteration": i, "total_loss": 1.0} for i in (19, 39)]  # the demo run a second time
    path.write_text("\n".join(json.dumps(r) for r in first + again) + "\n")
    assert report.read_metrics(path) == again
    assert report.read_metrics(path, latest=False) == first + again
    # resumed from the checkpoint at 50 after a crash at 79: 59 and 79 are written again
    resumed = [{"iteration": i, "total_loss": 0.5} for i in (59, 79, 99)]
    path.write_text("\n".join(json.dumps(r) for r in first + resumed) + "\n")
    assert [(r["iteration"], r["total_loss"]) for r in report.read_metrics(path)] == [
        (19, 2.0),
        (39, 2.0),
        (59, 0.5),
        (79, 0.5),
        (99, 0.5),
    ]


def test_demo_refuses_a_missing_config(capsys):
    from spine_d2.demo import main

    assert main(["--config-file", "configs/nope.yaml", "--out", "/nonexistent/demo"]) == 2
    assert "configs/nope.yaml: no such config" in capsys.readouterr().err
