"""The learned rescorer (SPINE.RESCORER): its features computed by hand on a duplicate and a
neighbour, the JSON format and its one-line errors, the fitting target, the cut rule, and the
LevelROIHeads path (a rescorer that passes the NMS score through gives the plain model's output)."""

import importlib.util
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from spine_d2.engine.setup import build_config
from spine_d2.errors import SpineError
from spine_d2.modeling.rescorer import (
    FEATURES,
    DetectionRescorer,
    choose_cut,
    file_sha256,
    fit_rescorer,
    match_targets,
    recall_precision,
    rescore_features,
)

INSTANT = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"
F = {name: k for k, name in enumerate(FEATURES)}


def _logit(p):
    return math.log(p / (1 - p))


def _one_hot_log_probs(levels, num=5):
    p = torch.full((len(levels), num), 1e-6)
    for row, level in enumerate(levels):
        p[row, level] = 1.0
    return torch.log(p / p.sum(1, keepdim=True))


def test_features_of_a_duplicate_and_a_neighbour_as_computed_by_hand():
    # A (score 0.9) at the image's top-left corner; B a lower duplicate of A, same level; C a
    # neighbour half a box lower, another level; D apart, in the middle. 20 x 10 px boxes.
    boxes = torch.tensor(
        [[0.0, 0.0, 20.0, 10.0], [0.0, 0.0, 20.0, 10.0], [0.0, 5.0, 20.0, 15.0], [30, 30, 40, 40]]
    )
    before = torch.tensor([0.9, 0.8, 0.7, 0.6])
    after = torch.tensor([0.9, 0.4, 0.5, 0.6])
    probs = torch.ones(4, 1, 4, 4)  # full boxes, maskness 1
    probs[3, 0, :, :2] = 0.75  # D: still all inside (> 0.5), maskness (8 * 0.75 + 8) / 16
    f = rescore_features(boxes, before, after, probs, _one_hot_log_probs([3, 3, 4, 1]), (64, 64))
    assert f.shape == (4, len(FEATURES))
    a, b, c, d = f.tolist()
    assert a[F["score_logit"]] == pytest.approx(_logit(0.9), abs=1e-4)
    assert b[F["nms_score_logit"]] == pytest.approx(_logit(0.4), abs=1e-4)
    assert d[F["maskness"]] == pytest.approx(0.875) and a[F["maskness"]] == pytest.approx(1.0)
    # A: nothing above it
    assert a[F["max_box_iou_above"]] == 0 and a[F["max_mask_iou_above"]] == 0
    assert a[F["box_overlapper_score_logit"]] == -14.0 and a[F["dy_mask_overlapper"]] == 1.0
    # B: the same pixels as A, the same level
    assert b[F["max_box_iou_above"]] == pytest.approx(1.0)
    assert b[F["max_mask_iou_above"]] == pytest.approx(1.0)
    assert b[F["box_overlapper_score_logit"]] == pytest.approx(_logit(0.9), abs=1e-4)
    assert b[F["box_overlapper_same_level"]] == pytest.approx(1.0, abs=1e-4)
    assert b[F["own_covered"]] == pytest.approx(200 / 201, abs=1e-3)
    assert b[F["dy_mask_overlapper"]] == 0 and b[F["n_box_overlaps_above"]] == 1
    # C: half of A's and B's pixels (IoU 100 / 300), shifted by half its height, another level
    assert c[F["max_box_iou_above"]] == pytest.approx(1 / 3, abs=1e-3)
    assert c[F["max_mask_iou_above"]] == pytest.approx(1 / 3, abs=0.02)
    assert c[F["box_overlapper_same_level"]] == pytest.approx(0.0, abs=1e-4)
    assert c[F["dy_mask_overlapper"]] == pytest.approx(0.5, abs=0.05)
    assert c[F["dx_mask_overlapper"]] == pytest.approx(0.0, abs=0.05)
    assert c[F["own_covered"]] == pytest.approx(0.5, abs=0.03)
    assert c[F["n_box_overlaps_above"]] == 2 and c[F["n_mask_overlaps_above"]] == 2
    # at the border or not; areas against the median of the confident ones (all 200 px but D)
    assert (a[F["at_border"]], d[F["at_border"]]) == (1.0, 0.0)
    assert d[F["log_area_rel"]] == pytest.approx(math.log(101 / 201), abs=0.05)
    empty = rescore_features(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), probs[:0], torch.zeros(0, 5), (64, 64)
    )
    assert empty.shape == (0, len(FEATURES))


def _rescorer(hidden=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(FEATURES)
    layers = [(torch.randn(hidden, n, generator=g), torch.randn(hidden, generator=g))]
    layers.append((torch.randn(1, hidden, generator=g), torch.randn(1, generator=g)))
    mean, std = torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.5
    return DetectionRescorer(mean, std, layers, {"weights_sha256": "ab" * 32})


def test_rescorer_round_trips_through_json_and_computes_the_mlp(tmp_path):
    rescorer = _rescorer()
    path = tmp_path / "sub" / "rescorer.json"
    rescorer.save(path)
    assert not [q for q in path.parent.iterdir() if ".tmp" in q.name]
    loaded = DetectionRescorer.load(path)
    x = torch.randn(7, len(FEATURES), generator=torch.Generator().manual_seed(1))
    (w1, b1), (w2, b2) = rescorer.layers
    h = np.maximum(((x - rescorer.mean) / rescorer.std).numpy() @ w1.numpy().T + b1.numpy(), 0)
    by_hand = 1 / (1 + np.exp(-(h @ w2.numpy().T + b2.numpy())[:, 0]))
    assert loaded(x).numpy() == pytest.approx(by_hand, abs=1e-5)
    assert loaded.source == {"weights_sha256": "ab" * 32}


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_bad_rescorer_files_are_one_line_errors_naming_the_file(tmp_path):
    good = _rescorer().to_json()
    cases = {
        "missing.json": (None, "rescorer file not found"),
        "text.json": ("{not json", "not a JSON rescorer"),
        "prior.json": ({"format": "spine_d2.level_prior/1"}, "not a rescorer"),
        "old.json": (dict(good, features=list(FEATURES[:-1])), "refit it with"),
        "shape.json": (dict(good, mean=good["mean"][:-1]), "malformed rescorer"),
        "nan.json": (dict(good, std=[float("nan")] * len(FEATURES)), "malformed rescorer"),
        "nokey.json": ({k: v for k, v in good.items() if k != "layers"}, "malformed rescorer"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name if data is None else _write(tmp_path, name, data)
        with pytest.raises(SpineError, match=message) as err:
            DetectionRescorer.load(path)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    with pytest.raises(SpineError, match="missing.json: rescorer file not found"):
        build_config(INSTANT, ["SPINE.RESCORER.FILE", str(tmp_path / "missing.json")])
    path = tmp_path / "ok.json"
    _rescorer().save(path)
    with pytest.raises(SpineError, match="SPINE.RESCORER.FILE needs MODEL.ROI_HEADS.NAME"):
        build_config(INSTANT, ["SPINE.RESCORER.FILE", str(path), "MODEL.MASK_ON", "False"])


def test_targets_give_a_duplicate_nothing_and_a_demoted_neighbour_its_own_vertebra():
    # vertebrae 0 and 1; detection 0 covers vertebra 0; detection 1 is its duplicate; detection
    # 2, demoted, covers vertebra 1 but also overlaps vertebra 0; detection 3 covers nothing.
    iou = np.array([[0.8, 0.1], [0.85, 0.2], [0.55, 0.6], [0.3, 0.0]])
    scores = np.array([0.9, 0.7, 0.2, 0.6])
    assert match_targets(iou, scores).tolist() == pytest.approx([0.8, 0.0, 0.6, 0.0])
    # by score, not by IoU: the duplicate ranked higher takes the vertebra
    assert match_targets(iou, np.array([0.7, 0.9, 0.2, 0.6]))[:2].tolist() == [0.0, 0.85]
    assert match_targets(np.zeros((2, 0)), np.array([0.5, 0.4])).tolist() == [0.0, 0.0]


def test_recall_precision_and_the_cut_rule():
    ious = [np.array([[0.9, 0.0], [0.0, 0.6], [0.7, 0.0]]), np.zeros((1, 1))]
    scores = [np.array([0.9, 0.3, 0.5]), np.array([0.8])]
    # at 0.4: detections 0 and 2 of image 1 (2 a duplicate), image 2's false one; 1 of 3 truths
    assert recall_precision(ious, scores, 0.4) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    r, p, _ = recall_precision(ious, scores, 0.2)
    assert (r, p) == pytest.approx((2 / 3, 2 / 4))
    table = [
        {"cut": 0.2, "recall": 0.99, "precision": 0.95, "f1": 0.97},
        {"cut": 0.3, "recall": 0.975, "precision": 0.972, "f1": 0.9735},
        {"cut": 0.5, "recall": 0.96, "precision": 0.999, "f1": 0.979},
    ]
    assert choose_cut(table) == 0.3  # not F1's 0.5: recall 0.96 there
    with pytest.raises(ValueError):
        choose_cut([])


def test_fitting_learns_what_tells_a_duplicate_from_a_neighbour():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, len(FEATURES)))
    x[:, F["max_mask_iou_above"]] = rng.uniform(0, 1, 400)
    # duplicates (mask IoU > 0.75 with a detection above) get nothing, whatever their score
    targets = np.where(x[:, F["max_mask_iou_above"]] > 0.75, 0.0, 0.8)
    rescorer, loss = fit_rescorer(x, targets, hidden=8, epochs=300, seed=0)
    again, _ = fit_rescorer(x, targets, hidden=8, epochs=300, seed=0)
    probe = np.zeros((2, len(FEATURES)), dtype=np.float32)
    probe[:, F["max_mask_iou_above"]] = [0.9, 0.5]
    dup, neighbour = rescorer(torch.as_tensor(probe)).tolist()
    assert dup < 0.2 < 0.6 < neighbour
    assert torch.equal(rescorer(torch.as_tensor(probe)), again(torch.as_tensor(probe)))
    with pytest.raises(ValueError, match="N x 20 features"):
        fit_rescorer(x[:, :3], targets)


def _pass_through(tmp_path):
    """A rescorer whose output is sigmoid(logit(NMS score)): the NMS score itself."""
    n = len(FEATURES)
    weight = torch.zeros(1, n)
    weight[0, F["nms_score_logit"]] = 1.0
    path = tmp_path / "pass.json"
    DetectionRescorer(torch.zeros(n), torch.ones(n), [(weight, torch.zeros(1))]).save(path)
    return path


def test_level_heads_with_a_pass_through_rescorer_give_the_plain_output(synthetic_train, tmp_path):
    from spine_d2.data.mapper import XrayDatasetMapper

    path = _pass_through(tmp_path)
    outputs = {}
    for name, opts in {"plain": [], "rescored": ["SPINE.RESCORER.FILE", str(path)]}.items():
        cfg = build_config(INSTANT, ["SPINE.NMS.METHOD", "linear", *opts])
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        scan = XrayDatasetMapper(cfg, is_train=False)(DatasetCatalog.get(synthetic_train)[0])
        with torch.no_grad():
            outputs[name] = model([scan])[0]["instances"]
            if name == "rescored":
                assert model.roi_heads.rescorer is not None
                assert model.roi_heads.keep_score == 0.0  # the export keeps every detection
                model.roi_heads.collect_rescore_features = True
                outputs["collected"] = model([scan])[0]["instances"]
    plain, rescored = outputs["plain"], outputs["rescored"]
    assert len(plain) >= 4
    assert torch.allclose(plain.scores, rescored.scores, atol=1e-5)
    assert torch.equal(plain.pred_levels, rescored.pred_levels)
    assert torch.equal(plain.pred_boxes.tensor, rescored.pred_boxes.tensor)
    assert not rescored.has("rescore_features") and not rescored.has("scores_before_nms")
    features = outputs["collected"].rescore_features
    assert features.shape == (len(plain), len(FEATURES))
    logits = torch.log(plain.scores / (1 - plain.scores))
    assert torch.allclose(features[:, F["nms_score_logit"]], logits, atol=1e-4)
    # the scores before soft NMS are at least those after it
    assert (features[:, F["score_logit"]] >= features[:, F["nms_score_logit"]] - 1e-5).all()


def test_a_rescorer_fitted_on_another_checkpoint_is_reported(tmp_path, caplog):
    from spine_d2.modeling.roi_heads import _load_rescorer

    path = _pass_through(tmp_path)
    data = json.loads(path.read_text())
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"not the fitted checkpoint")
    for sha, warned in (("0" * 64, True), (file_sha256(weights), False)):
        data["source"] = {"weights_sha256": sha}
        path.write_text(json.dumps(data))
        cfg = build_config(INSTANT, ["SPINE.RESCORER.FILE", str(path)])
        cfg.defrost()
        cfg.MODEL.WEIGHTS = str(weights)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert _load_rescorer(cfg) is not None
        assert ("fitted on the predictions of another checkpoint" in caplog.text) == warned


def test_fit_rescorer_tool_writes_a_loadable_rescorer(
    synthetic_train, tmp_path, capsys, caplog, monkeypatch
):
    tool = Path(__file__).resolve().parents[2] / "tools" / "fit_rescorer.py"
    spec = importlib.util.spec_from_file_location("fit_rescorer", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = build_config(INSTANT)
    torch.manual_seed(0)
    weights = tmp_path / "model.pth"
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("model")
    out = tmp_path / "sub" / "rescorer.json"
    common = ["--config-file", INSTANT, "--weights", str(weights), "--val-dataset", synthetic_train]
    cache = tmp_path / "cache" / "detections.pkl"
    args = [*common, "--train-dataset", synthetic_train, "--epochs", "5", "--out", str(out)]
    assert module.main([*args, "--cache", str(cache)]) == 0
    first = out.read_text()
    # the kept detections refit to the same file without running the model again
    collect = module.collect
    module.collect = lambda *a, **k: pytest.fail("the cache was not used")
    out.unlink()
    assert module.main([*args, "--cache", str(cache)]) == 0
    module.collect = collect
    strip = lambda text: {k: v for k, v in json.loads(text)["source"].items() if k != "seconds"}
    assert strip(out.read_text()) == strip(first)
    assert json.loads(out.read_text())["layers"] == json.loads(first)["layers"]
    rescorer = DetectionRescorer.load(out)
    source = rescorer.source
    assert source["weights_sha256"] == file_sha256(weights)
    assert source["train_images"] == 6 and source["detections"] > 0
    assert len(source["val_table"]) == len(module.CUTS) and source["cut"] in module.CUTS
    assert not [q for q in out.parent.iterdir() if ".tmp" in q.name]
    # --recut keeps the fit (same layers, same fit record) and only chooses the cut again
    recut = tmp_path / "recut.json"
    runs = []
    module.collect = lambda *a, **k: runs.append(a[2]) or collect(*a, **k)
    assert module.main([*common, "--recut", str(out), "--out", str(recut)]) == 0
    module.collect = collect
    assert runs == [synthetic_train]  # the model ran on the validation split only
    again = DetectionRescorer.load(recut)
    assert json.loads(recut.read_text())["layers"] == json.loads(out.read_text())["layers"]
    for k in ("detections", "train_datasets", "weights_sha256", "final_loss"):
        assert again.source[k] == source[k]
    assert again.source["recut_from"] == str(out)
    assert again.source["val_table"] == source["val_table"] and again.source["cut"] == source["cut"]
    # a rescorer of another checkpoint is recut with a warning; a file that is not one, refused
    other = json.loads(out.read_text())
    other["source"]["weights_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    logger = logging.getLogger("test_fit_rescorer")
    monkeypatch.setattr("detectron2.utils.logger.setup_logger", lambda **kwargs: logger)
    with caplog.at_level("WARNING", logger="test_fit_rescorer"):
        recut_other = [*common, "--recut", str(tmp_path / "other.json"), "--out", str(recut)]
        assert module.main(recut_other) == 0
    assert "other.json was fitted on another checkpoint than" in caplog.text
    (tmp_path / "not.json").write_text('{"format": "something else"}')
    recut_bad = [*common, "--recut", str(tmp_path / "not.json"), "--out", str(tmp_path / "x.json")]
    assert module.main(recut_bad) == 1
    assert "not.json: not a rescorer (format is not" in capsys.readouterr().err
    bad = [*common, "--train-dataset", "no_such_split", "--out", str(tmp_path / "x.json")]
    assert module.main(bad) == 1
    assert "no_such_split: not a registered dataset" in capsys.readouterr().err
    # NAME:K keeps the scans of base views K and up; the synthetic scans name no base view
    views = [*common, "--train-dataset", f"{synthetic_train}:1", "--out", str(tmp_path / "x.json")]
    assert module.main(views) == 1
    assert f"{synthetic_train}: no scan of a base view >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_the_tool_keeps_the_scans_of_the_views_asked_for(synthetic_coco, tmp_path, monkeypatch):
    from spine_d2.data.datasets import register_spine_coco
    from spine_d2.data.mapper import XrayDatasetMapper

    tool = Path(__file__).resolve().parents[2] / "tools" / "fit_rescorer.py"
    spec = importlib.util.spec_from_file_location("fit_rescorer", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    json_file, image_root = synthetic_coco
    coco = json.loads(Path(json_file).read_text())
    for k, image in enumerate(coco["images"]):
        image["base_view"] = f"train/{k}"
    viewed = tmp_path / "viewed.json"
    viewed.write_text(json.dumps(coco))
    register_spine_coco("spine_synthetic_viewed", viewed, image_root)
    try:
        ids = [image["id"] for image in coco["images"]]
        assert module.view_filter("spine_synthetic_viewed", 4) == set(ids[4:])
        assert module.view_filter("spine_synthetic_viewed", 0) is None
        assert module.view_filter("spine_synthetic_viewed", 0, 1) == set(ids[:2])
        assert module.view_filter("spine_synthetic_viewed", 2, 3) == set(ids[2:4])
        with pytest.raises(SpineError, match="no scan of a base view 40-41"):
            module.view_filter("spine_synthetic_viewed", 40, 41)
        assert module.parse_split("spine_drr_v64_train:32") == ("spine_drr_v64_train", 32, None)
        assert module.parse_split("spine_drr_train") == ("spine_drr_train", 0, None)
        assert module.parse_split("spine_drr_val24_val:12-23") == ("spine_drr_val24_val", 12, 23)
        with pytest.raises(SystemExit, match="expected NAME, NAME:FIRST_VIEW or NAME:FIRST-LAST"):
            module.parse_split("spine_drr_train:x")
        with pytest.raises(SystemExit, match="view range 5-2 is empty"):
            module.parse_split("spine_drr_train:5-2")
        # the model runs on those scans, the first N with a limit; no other scan is even read
        cfg = build_config(INSTANT)
        model = build_model(cfg).eval()
        model.roi_heads.collect_rescore_features = True
        read = []
        call = XrayDatasetMapper.__call__
        monkeypatch.setattr(
            XrayDatasetMapper,
            "__call__",
            lambda self, d: read.append(d["image_id"]) or call(self, d),
        )
        items = module.collect(cfg, model, "spine_synthetic_viewed", 0, set(ids[2:4]))
        assert read == ids[2:4] and len(items) == 2
        assert [iou.shape[1] for _, iou in items] == [
            len(coco_annotations_of(coco, i)) for i in ids[2:4]
        ]
        read.clear()
        assert len(module.collect(cfg, model, "spine_synthetic_viewed", 1, set(ids[2:4]))) == 1
        assert read == ids[2:3]
    finally:
        DatasetCatalog.remove("spine_synthetic_viewed")
        MetadataCatalog.remove("spine_synthetic_viewed")


def coco_annotations_of(coco: dict, image_id) -> list:
    return [a for a in coco["annotations"] if a["image_id"] == image_id and not a.get("iscrowd")]


def test_fit_rescorer_tool_names_missing_weights_before_running(synthetic_train, tmp_path, capsys):
    tool = Path(__file__).resolve().parents[2] / "tools" / "fit_rescorer.py"
    spec = importlib.util.spec_from_file_location("fit_rescorer", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.collect = lambda *a, **k: pytest.fail("the model ran before the weights were checked")
    args = ["--config-file", INSTANT, "--weights", str(tmp_path / "gone.pth"), "--val-dataset",
            synthetic_train, "--train-dataset", synthetic_train, "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert module.main(args) == 1
    assert "gone.pth: no such weights file" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "r.json").exists()
