"""An output folder that is a file (or lies under one) is a one-line error before any work, in
every tool that writes a folder, and the file is left as it was."""

import json

import numpy as np
import pytest

from spine_d2.errors import SpineError, check_output_folder

QUICK = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"


@pytest.fixture
def taken(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("somebody's notes")
    yield path
    assert path.read_text() == "somebody's notes"  # never written over


def test_check_output_folder(tmp_path, taken):
    check_output_folder(tmp_path / "new" / "deeper")  # nothing there yet: fine
    check_output_folder(tmp_path)
    assert not (tmp_path / "new").exists()  # nothing created
    with pytest.raises(SpineError, match=r"notes.txt: exists and is not a folder$"):
        check_output_folder(taken)
    with pytest.raises(SpineError, match=r"notes.txt: exists and is not a folder \(wanted as"):
        check_output_folder(taken / "run" / "x")


def test_a_folder_that_cannot_be_written(tmp_path, monkeypatch, capsys):
    """A read-only mount (os.access says so even to root, whom folder modes do not stop)."""
    import os

    from spine_d2.zoi.cli import main

    readonly = tmp_path / "mnt"
    readonly.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: os.fspath(p) != str(readonly))
    with pytest.raises(SpineError, match=r"mnt: folder is not writable$"):
        check_output_folder(readonly)
    with pytest.raises(SpineError, match=r"mnt: folder is not writable \(wanted as a folder for"):
        check_output_folder(readonly / "run")
    check_output_folder(tmp_path / "elsewhere")
    scans = tmp_path / "scans"
    scans.mkdir()
    assert main(["--config-file", QUICK, "--input", str(scans), "--output", str(readonly)]) == 2
    assert capsys.readouterr().err.strip().endswith("mnt: folder is not writable")


def test_train_net_output_dir(taken):
    from spine_d2.engine.train import main, train_args

    args = train_args(QUICK, ["DATASETS.TEST", "('coco_2017_val',)", "OUTPUT_DIR", str(taken)])
    args.eval_only = True
    with pytest.raises(SpineError, match="notes.txt: exists and is not a folder"):
        main(args)


def test_enhance_scan_out(tmp_path, taken, capsys):
    from spine_d2.align.cli import main

    assert main(["--low", "a.png", "--high", "b.png", "--out", str(taken)]) == 2
    assert "notes.txt: exists and is not a folder" in capsys.readouterr().err


def test_export_output(tmp_path, taken, capsys):
    from spine_d2.zoi.cli import main

    scans = tmp_path / "scans"
    scans.mkdir()
    assert main(["--config-file", QUICK, "--input", str(scans), "--output", str(taken)]) != 0
    assert "notes.txt: exists and is not a folder" in capsys.readouterr().err


def test_converters_and_model_files(tmp_path, taken):
    from spine_d2.data.drr import contact_sheet
    from spine_d2.data.labelme import coco_to_labelme
    from spine_d2.modeling.jsonfile import write_model_json

    coco = tmp_path / "c.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1}]}))
    with pytest.raises(SpineError, match="notes.txt: exists and is not a folder"):
        coco_to_labelme(coco, tmp_path, taken)
    from spine_d2.data.aasce import convert_aasce

    with pytest.raises(SpineError, match="notes.txt: exists and is not a folder"):
        convert_aasce(tmp_path, taken)
    with pytest.raises(SpineError, match="notes.txt: exists and is not a folder"):
        write_model_json(taken / "prior.json", {"format": "x"}, "body", "{}")
    import cv2

    cv2.imwrite(str(tmp_path / "scan.png"), np.zeros((64, 64), np.uint8))
    record = {"file_name": str(tmp_path / "scan.png"), "height": 64, "width": 64, "annotations": []}
    with pytest.raises(SpineError, match="notes.txt: exists and is not a folder"):
        contact_sheet([record], taken / "sheet.png", tile=32)
    from spine_d2.report import atomic_png

    with pytest.raises(SpineError, match="notes.txt: exists and is not a folder"):
        atomic_png(taken / "fig.png", np.zeros((4, 4), np.uint8))
