"""SpineCheckpointer: weights are checked against their manifest before being unpickled."""

import hashlib
import json

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from spine_d2.checkpoint import SpineCheckpointer, verify_weights
from spine_d2.data.drr import pixels_digest
from spine_d2.errors import CheckpointError


def _save(path, model):
    torch.save({"model": {k: v.half() for k, v in model.state_dict().items()}}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(".json").write_text(json.dumps({"sha256": digest}))
    return digest


def test_matching_sha256_loads_fp16_weights_into_fp32_model(tmp_path):
    torch.manual_seed(0)
    src, dst = nn.Linear(4, 3), nn.Linear(4, 3)
    path = tmp_path / "w.pth"
    _save(path, src)
    SpineCheckpointer(dst).load(str(path))
    assert dst.weight.dtype == torch.float32
    torch.testing.assert_close(dst.weight, src.weight.half().float())


def test_corrupt_or_swapped_file_is_refused_before_unpickling(tmp_path):
    path = tmp_path / "w.pth"
    _save(path, nn.Linear(4, 3))
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"w\.pth: sha256 .* does not match .* in w\.json"):
        SpineCheckpointer(nn.Linear(4, 3)).load(str(path))


def test_bad_manifest_and_unreadable_file_give_one_line_errors(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match=r"w\.pth: not a readable checkpoint"):
        SpineCheckpointer(nn.Linear(4, 3)).load(str(path))
    # a picture given as weights: the unpickler's reason, not PyTorch's advice to unpickle it
    # with weights_only=False
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(CheckpointError) as e:
        SpineCheckpointer(nn.Linear(4, 3)).load(str(path))
    assert "weights_only refused it: Unsupported operand" in str(e.value)
    assert "arbitrary code" not in str(e.value) and "\n" not in str(e.value)
    path.with_suffix(".json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"w\.json: weights manifest has no 'sha256'"):
        verify_weights(path)
    with pytest.raises(CheckpointError, match=r"nope\.pth: no such weights file"):
        verify_weights(tmp_path / "nope.pth")


def test_package_weights_halves_the_model_drops_the_rest_and_records_its_hash(tmp_path):
    from spine_d2.checkpoint import package_weights, training_curve

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}}, "iteration": 9}, ckpt)
    out = tmp_path / "weights" / "spine.pth"
    manifest = package_weights(ckpt, out, {"iterations": 10})
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"model", "__author__"}
    assert saved["model"]["0.weight"].dtype == torch.float16
    assert saved["model"]["1.num_batches_tracked"].dtype == torch.int64  # not halved
    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert json.loads(out.with_suffix(".json").read_text())["iterations"] == 10
    # one model, one file: torch.save names the zip's records after a path it is given, and the
    # temporary names differ each time
    again = package_weights(ckpt, tmp_path / "again" / "spine.pth", {"iterations": 10})
    assert again["sha256"] == manifest["sha256"]
    fresh = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    SpineCheckpointer(fresh).load(str(out))
    torch.testing.assert_close(fresh[0].weight, model[0].weight, atol=1e-3, rtol=1e-3)

    rows = [
        {"iteration": 19, "total_loss": 2.0},
        {"iteration": 999, "segm/AP50": 41.0, "segm/AP": 12.0, "vertebra/recall": 0.5},
    ]
    assert training_curve(rows) == [
        {
            "iteration": 1000,
            "segm_AP50": 41.0,
            "segm_AP": 12.0,
            "recall": 0.5,
            "precision": None,
            "level_accuracy": None,
        }
    ]


def test_bad_amp_value_names_its_config_key():
    from spine_d2.errors import SpineError
    from spine_d2.modeling import inference_autocast

    with pytest.raises(SpineError, match=r"SPINE\.EVAL\.AMP 'fp8': expected '', 'fp16' or 'bf16'"):
        inference_autocast("cpu", "fp8", "SPINE.EVAL.AMP")
    with inference_autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")


def test_package_weights_tool_refuses_a_run_without_its_files(tmp_path):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "tools/package_weights.py", "--train-dir", str(tmp_path), "--out",
         str(tmp_path / "w.pth")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().endswith("model_final.pth: no such file")
    assert not (tmp_path / "w.pth").exists()


def _fake_run(train, iters, lr, eval_minutes, start="12/01 10:00:00"):
    """A training OUTPUT_DIR as detectron2 leaves it: config dump, metrics.json, log.txt."""
    train.mkdir()
    (train / "config.yaml").write_text(
        f"SOLVER:\n  IMS_PER_BATCH: 2\n  BASE_LR: {lr}\n  LR_SCHEDULER_NAME: WarmupCosineLR\n"
    )
    rows = [{"iteration": i, "total_loss": 3.0 - i / iters} for i in range(9, iters, 10)]
    rows.append({"iteration": iters - 1, "segm/AP50": 50.0 + iters / 100, "segm/AP": 20.0})
    (train / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    h, m = divmod(eval_minutes, 60)
    (train / "log.txt").write_text(
        f"[{start} d2.engine.train_loop]: Starting training from iteration 0\n"
        f"[12/01 {10 + h:02d}:{m:02d}:00 d2.evaluation.testing]: Evaluation results for x in "
        "csv format:\n"
    )


def test_package_weights_tool_adds_up_the_stages_of_a_staged_run(tmp_path):
    import subprocess
    import sys

    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    _fake_run(s1, 500, 2e-4, 30)
    _fake_run(s2, 300, 1e-4, 20)
    model = nn.Linear(4, 3)
    torch.save({"model": model.state_dict()}, s2 / "model_final.pth")
    dataset = tmp_path / "data"
    dataset.mkdir()
    (dataset / "meta.json").write_text(json.dumps({"version": "1.1", "seed": 0, "digest": "aaa"}))
    out = tmp_path / "w.pth"
    base = [
        sys.executable,
        "tools/package_weights.py",
        "--dataset",
        str(dataset),
        "--out",
        str(out),
    ]
    run = subprocess.run(
        base + ["--train-dir", str(s1), "--train-dir", str(s2), "--config-file", "one.yaml"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2 and "2 --train-dir but 1 --config-file" in run.stderr
    assert not out.exists()
    two_stages = ["--train-dir", str(s1), "--train-dir", str(s2)]
    two_stages += ["--config-file", "one.yaml", "--config-file", "two.yaml"]
    run = subprocess.run(
        base[:3] + [str(tmp_path / "nodata")] + base[4:] + two_stages,
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().endswith("nodata/meta.json: no such file")
    assert not out.exists()
    run = subprocess.run(
        base + ["--train-dir", str(s1), "--train-dir", str(s2),
                "--config-file", "one.yaml", "--config-file", "two.yaml"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    m = json.loads(out.with_suffix(".json").read_text())
    assert (m["iterations"], m["wall_time_s"], m["config"]) == (800, 3000, "two.yaml")
    assert [(s["iterations"], s["wall_time_s"], s["base_lr"]) for s in m["stages"]] == [
        (500, 1800, 2e-4),
        (300, 1200, 1e-4),
    ]
    # The second stage's evaluation lands after the first stage's iterations and minutes.
    assert [(c["stage"], c["iteration"], c["wall_minutes"]) for c in m["training_curve"]] == [
        (1, 500, 30.0),
        (2, 800, 50.0),
    ]
    assert m["final_total_loss"] == pytest.approx(3.0 - 299 / 300)
    assert [s["dataset_digest"] for s in m["stages"]] == ["aaa", "aaa"]

    assert m["dataset"]["pixels_sha256"] == {}  # no split files to hash

    # A third stage from the shipped file, on regenerated data, with only its own run folder.
    # Its meta.json predates pixels_sha256, so the tool hashes the split's pixels itself.
    s3 = tmp_path / "stage3"
    _fake_run(s3, 400, 1e-4, 40)
    torch.save({"model": model.state_dict()}, s3 / "model_final.pth")
    (dataset / "meta.json").write_text(json.dumps({"version": "1.1", "seed": 0, "digest": "bbb"}))
    (dataset / "images").mkdir()
    px = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)
    cv2.imwrite(str(dataset / "images" / "a.png"), px)
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 64, "width": 48}]}
    (dataset / "test.json").write_text(json.dumps(coco))
    out3 = tmp_path / "w3.pth"
    third = base[:5] + [str(out3), "--train-dir", str(s3), "--config-file", "three.yaml"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    run = subprocess.run(third + ["--continue-from", str(bad)], capture_output=True, text=True)
    assert run.returncode == 2 and "bad.json: not a manifest" in run.stderr
    assert not out3.exists()
    missing = ["--continue-from", str(tmp_path / "gone.json")]
    run = subprocess.run(third + missing, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().endswith("gone.json: no such file")
    assert not out3.exists()
    manifest = str(out.with_suffix(".json"))
    run = subprocess.run(third + ["--continue-from", manifest], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    m3 = json.loads(out3.with_suffix(".json").read_text())
    assert (m3["iterations"], m3["wall_time_s"], m3["config"]) == (1200, 5400, "three.yaml")
    assert [(s["config"], s["dataset_digest"]) for s in m3["stages"]] == [
        ("one.yaml", "aaa"),
        ("two.yaml", "aaa"),
        ("three.yaml", "bbb"),
    ]
    assert m3["dataset"]["digest"] == "bbb"
    expected = pixels_digest(coco, dataset / "images")
    assert m3["dataset"]["pixels_sha256"] == {"test": expected}
    # A generator that recorded them is taken at its word (meta.json is written after the images).
    meta = {"version": "1.1", "seed": 0, "digest": "bbb", "pixels_sha256": {"test": "c0ffee"}}
    (dataset / "meta.json").write_text(json.dumps(meta))
    run = subprocess.run(third + ["--continue-from", manifest], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    m3 = json.loads(out3.with_suffix(".json").read_text())
    assert m3["dataset"]["pixels_sha256"] == {"test": "c0ffee"}
    # Without them, an image that does not decode is named in one line and nothing is written.
    (dataset / "meta.json").write_text(json.dumps({"version": "1.1", "seed": 0, "digest": "bbb"}))
    (dataset / "images" / "a.png").write_bytes(b"not a png")
    out3.unlink()
    run = subprocess.run(third + ["--continue-from", manifest], capture_output=True, text=True)
    assert run.returncode == 2 and "cannot hash its pixels" in run.stderr
    assert "a.png" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not out3.exists()
    assert [(c["stage"], c["iteration"], c["wall_minutes"]) for c in m3["training_curve"]] == [
        (1, 500, 30.0),
        (2, 800, 50.0),
        (3, 1200, 90.0),
    ]


def test_feature_scope_autocast_keeps_the_heads_in_fp32():
    """AMP scope 'features': backbone and RPN head under bf16, ROI heads on fp32 features,
    and no hook left on the model afterwards."""
    from detectron2.modeling import build_model

    from spine_d2.engine.setup import build_config
    from spine_d2.errors import SpineError
    from spine_d2.modeling import inference_autocast

    cfg = build_config("configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml", [])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    seen = {}
    spy = [
        model.backbone.bottom_up.stem.conv1.register_forward_hook(
            lambda m, a, out: seen.__setitem__("stem", out.dtype)
        ),
        model.roi_heads.box_head.register_forward_pre_hook(
            lambda m, a: seen.__setitem__("box_head_in", a[0].dtype)
        ),
        model.roi_heads.box_head.register_forward_hook(
            lambda m, a, out: seen.__setitem__("box_head_out", out.dtype)
        ),
    ]
    image = torch.rand(3, 128, 128) * 255
    with torch.inference_mode():
        with inference_autocast("cpu", "bf16", "ZOI.AMP", model=model, scope="features"):
            out = model.inference([{"image": image}], do_postprocess=False)
        assert seen == {
            "stem": torch.bfloat16,
            "box_head_in": torch.float32,
            "box_head_out": torch.float32,
        }
        assert out[0].pred_boxes.tensor.dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")
        with inference_autocast("cpu", "bf16", model=model, scope="model"):
            model.inference([{"image": image}], do_postprocess=False)
        assert seen["box_head_out"] == torch.bfloat16  # the whole forward, for contrast
    for h in spy:
        h.remove()
    assert not model.backbone._forward_hooks and not model.backbone._forward_pre_hooks
    with pytest.raises(
        SpineError, match=r"ZOI\.AMP_SCOPE 'heads': expected one of model, features"
    ):
        inference_autocast("cpu", "bf16", "ZOI.AMP", model=model, scope="heads")


def test_amp_scope_is_checked_in_fp32_too_and_features_needs_the_model():
    from spine_d2.errors import SpineError
    from spine_d2.modeling import inference_autocast

    with pytest.raises(SpineError, match=r"SPINE\.EVAL\.AMP_SCOPE 'heads': expected one of"):
        inference_autocast("cpu", "", "SPINE.EVAL.AMP", scope="heads")
    with pytest.raises(SpineError, match=r"ZOI\.AMP_SCOPE 'features' needs the model"):
        inference_autocast("cpu", "bf16", "ZOI.AMP", scope="features")


def test_missing_weights_a_stale_last_checkpoint_and_an_unreachable_url_are_one_line(tmp_path):
    """fvcore asserts on a missing file (a traceback) and raises whatever urllib does offline."""
    model = nn.Linear(4, 3)
    with pytest.raises(CheckpointError, match=r"nope\.pth: no such weights file \(MODEL.WEIGHTS\)"):
        SpineCheckpointer(model).load(str(tmp_path / "nope.pth"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "last_checkpoint").write_text("model_0000099.pth")  # deleted to free the disk
    with pytest.raises(CheckpointError, match=r"model_0000099.pth: named by .*last_checkpoint"):
        SpineCheckpointer(model, save_dir=str(run)).resume_or_load("", resume=True)
    # without --resume the stale file does not matter: MODEL.WEIGHTS is loaded
    path = tmp_path / "w.pth"
    _save(path, nn.Linear(4, 3))
    SpineCheckpointer(model, save_dir=str(run)).resume_or_load(str(path), resume=False)
    with pytest.raises(CheckpointError, match=r"cannot fetch it \(.*\); offline, name a local"):
        SpineCheckpointer(model).load("http://127.0.0.1:9/weights.pth")  # nothing listens


def test_package_weights_times_a_resumed_stage_without_the_pause(tmp_path):
    """A stage killed after its first evaluation and resumed hours later (another session):
    its wall time counts training, not the night between (the tool counted from the first
    start to the last evaluation)."""
    import sys
    from pathlib import Path

    tools = str(Path(__file__).resolve().parents[1] / "tools")
    sys.path.insert(0, tools)
    try:
        import package_weights
    finally:
        sys.path.remove(tools)
    log = tmp_path / "log.txt"
    log.write_text(
        "[12/01 10:00:00 d2.engine.train_loop]: Starting training from iteration 0\n"
        "[12/01 10:30:00 d2.evaluation.testing]: Evaluation results for x in csv format:\n"
        "[12/01 10:40:00 d2.utils.events]:  eta: 0:20:00  iter: 1499  total_loss: 1.0\n"
        "not a stamped line\n"
        "[12/01 18:00:00 d2.engine.train_loop]: Starting training from iteration 1500\n"
        "[12/01 18:20:00 d2.evaluation.testing]: Evaluation results for x in csv format:\n"
    )
    assert package_weights._log_times(log) == [1800.0, 2400.0 + 1200.0]
    log.write_text(log.read_text().split("not a stamped")[0])  # never resumed: as before
    assert package_weights._log_times(log) == [1800.0]


def test_saving_removes_the_partial_checkpoints_of_a_killed_run_only(tmp_path, caplog):
    """A SIGKILL mid-save leaves the hidden temporary file (no cleanup runs): the next save
    removes it, but not the file of a writer still at work (recently written)."""
    import os
    import time

    from spine_d2.atomic import temporary_name

    run = tmp_path / "run"
    run.mkdir()
    killed = temporary_name(run / "model_0000999.pth")
    killed.write_bytes(b"half of a checkpoint")
    an_hour_ago = time.time() - 3600
    os.utime(killed, (an_hour_ago, an_hour_ago))
    writing = temporary_name(run / "model_final.pth")
    writing.write_bytes(b"in progress")
    SpineCheckpointer(nn.Linear(4, 3), save_dir=str(run)).save("model_0001999")
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [writing.name, "last_checkpoint", "model_0001999.pth"]
    )
    assert (run / "last_checkpoint").read_text() == "model_0001999.pth"
    assert f"Removed 1 partial checkpoint(s) of a run killed while saving: {killed.name}" in (
        caplog.text
    )
