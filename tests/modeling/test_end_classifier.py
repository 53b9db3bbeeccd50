"""The end classifier: its training boxes, crops, evidence, files, training, and the decoder."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode, ImageList

from spine_d2.engine.setup import build_config
from spine_d2.errors import SpineError
from spine_d2.modeling.end_classifier import (
    END_NAMES,
    EndClassifier,
    add_end_evidence,
    context_boxes,
    crop_contexts,
    end_samples,
    train_end_classifier,
)

QUICK = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"
R18 = {"DEPTH": 18, "NORM": "GN", "STRIDE_IN_1X1": False, "RES2_OUT_CHANNELS": 64}


def _record(levels, height=400, top=60.0, step=20.0):
    annos = [
        {"bbox": [40.0, top + step * k, 30.0, 14.0], "bbox_mode": BoxMode.XYWH_ABS, "level": n}
        for k, n in enumerate(levels)
    ]
    return {"height": height, "width": 120, "annotations": annos}


def test_c7_and_s1_are_placed_one_step_beyond_the_annotated_ends():
    levels = ["T1", "T2", "T3", "T4", "L3", "L4", "L5"]
    s = end_samples(_record(levels))
    assert sorted(s) == sorted(["C7", "T1", "T2", "T3", "L3", "L4", "L5", "S1"])
    np.testing.assert_allclose(s["T1"], [40, 60, 70, 74])
    np.testing.assert_allclose(s["C7"], [40, 40, 70, 54])  # T1 minus the T1->T2 step
    np.testing.assert_allclose(s["S1"], [40, 200, 70, 214])  # L5 plus the L4->L5 step
    # off the film: a T1 at the top edge has no C7, an L5 at the bottom edge no S1
    edge = end_samples(_record(levels, height=140, top=2.0, step=20.0))
    assert "C7" not in edge and "S1" not in edge and "T1" in edge and "L5" in edge
    assert end_samples({"height": 10, "annotations": [{"bbox": [0, 0, 1, 1]}]}) == {}


def test_crops_are_centred_on_the_body_and_sized_by_it():
    image = torch.zeros(1, 128, 128)
    image[0, 50:60, 40:50] = 1.0  # the body: 10 x 10 px
    crop = crop_contexts(image, [[40.0, 50.0, 50.0, 60.0]], size=(70, 32), half=(1.6, 3.5))[0, 0]
    # the context box is 32 x 70 px, so the crop is 1:1 and the body sits in its middle
    rows, cols = torch.nonzero(crop > 0.5, as_tuple=True)
    assert rows.min().item() == 30 and rows.max().item() == 39
    assert cols.min().item() == 11 and cols.max().item() == 20
    assert crop.sum().item() == pytest.approx(100.0, abs=1.0)
    # by default 8 body widths by 7 heights: wide enough for the iliac crests beside L5
    np.testing.assert_allclose(context_boxes([[40, 50, 50, 60]]), [[5, 20, 85, 90]])


def test_end_evidence_goes_to_the_top_and_bottom_rows_only():
    levels = ["C7", "T1", "T2", "T3", "T4", "L3", "L4", "L5", "S1"]
    centers = np.array([[50, 30], [50, 10], [50, 50], [50, 90], [50, 70]], float)  # unsorted
    top = np.log([0.1, 0.7, 0.1, 0.1])
    bottom = np.log([0.05, 0.05, 0.2, 0.7])
    ev = add_end_evidence(np.zeros((5, len(levels))), centers, top, bottom, levels, 2.0, -7.0)
    np.testing.assert_allclose(ev[1, :4], 2 * top)  # row 1 is the topmost (y 10)
    np.testing.assert_allclose(ev[1, 4:], -14.0)
    np.testing.assert_allclose(ev[3, 5:], 2 * bottom)  # row 3 the lowest (y 90)
    np.testing.assert_allclose(ev[3, :5], -14.0)
    assert not ev[[0, 2, 4]].any()
    assert add_end_evidence(np.zeros((5, 9)), centers, None, None, levels, 2.0, -7.0).sum() == 0


def _biased(top_name, bottom_name):
    """A real classifier whose last layer ignores the image and favours two names."""
    model = EndClassifier(R18).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[END_NAMES.index(top_name)] = 6.0
        model.fc.bias[END_NAMES.index(bottom_name)] = 6.0
    return model


def test_files_round_trip_and_refuse_changed_weights(tmp_path):
    model = _biased("C7", "S1")
    path = tmp_path / "ends.json"
    model.save(path, {"dataset": "test"})
    loaded = EndClassifier.load(path)
    image = torch.randn(3, 96, 64)
    box = [[20.0, 40.0, 40.0, 52.0]]
    np.testing.assert_allclose(
        loaded.log_probs(image, box, 0), model.log_probs(image, box, 0), atol=1e-2
    )
    assert loaded.log_probs(image, box, 0)[0].argmax() == 0  # C7
    assert loaded.log_probs(image, box, 1)[0].argmax() == 3  # S1
    assert loaded.source == {"dataset": "test"}
    weights = tmp_path / "ends.pth"
    first = weights.read_bytes()
    model.save(tmp_path / "again" / "ends.json", {"dataset": "test"})
    assert (tmp_path / "again" / "ends.pth").read_bytes() == first  # one state, one file

    blob = bytearray(first)
    blob[-100] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(SpineError, match="sha256 does not match"):
        EndClassifier.load(path)
    # a file whose hash was written into the JSON by hand but holds no weights
    weights.write_bytes(b"not a checkpoint")
    meta = json.loads(path.read_text())
    meta["sha256"] = hashlib.sha256(b"not a checkpoint").hexdigest()
    path.write_text(json.dumps(meta))
    with pytest.raises(SpineError, match="ends.pth: not end classifier weights"):
        EndClassifier.load(path)
    weights.unlink()
    with pytest.raises(SpineError, match="weights .* are missing"):
        EndClassifier.load(path)
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(SpineError, match="not a vertebra end classifier"):
        EndClassifier.load(tmp_path / "other.json")


def test_training_learns_what_tells_the_ends_apart():
    """Each name has a bright bar at its own height in the context (as the ribs or the pelvis
    sit around an end body; mirror-symmetric, like anatomy, since training and inference
    mirror the crops): training must learn it (chance is 0.25)."""
    torch.manual_seed(0)
    heights = [-12, -5, 5, 12]
    films = []
    for f in range(6):
        image = 0.05 * torch.randn(3, 8 * 40, 64)
        boxes = {}
        for k, name in enumerate(END_NAMES):
            cx, cy = 32, 20 + 40 * k
            dy = heights[k % 4]
            image[:, cy + dy - 2 : cy + dy + 2, 8:56] += 2.0
            boxes[name] = np.array([cx - 8.0, cy - 8.0, cx + 8.0, cy + 8.0])
        films.append((image, boxes))
    model = EndClassifier(R18, crop_size=(32, 32), context_half=(1.0, 1.0))
    losses = train_end_classifier(model, films, epochs=12, batch_size=16, lr=1e-3, jitter=0.02)
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    hits = [
        model.log_probs(img, [b], END_NAMES.index(n) // 4)[0].argmax() == END_NAMES.index(n) % 4
        for img, s in films
        for n, b in s.items()
    ]
    assert np.mean(hits) >= 0.75
    with pytest.raises(SpineError, match="nothing to train on"):
        train_end_classifier(model, [(films[0][0], {})], epochs=1)


def test_one_seed_trains_one_classifier_whatever_the_rng_held_before():
    """Two runs of one seed start in different global RNG states (other processes, a detector
    built first): the new layer and the training must both follow the seed alone."""
    small = {"crop_size": (32, 32), "context_half": (1.0, 1.0)}
    bottom_up = EndClassifier(R18, **small).body.state_dict()
    image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(5))
    films = [(image, {"T1": np.array([16.0, 16.0, 40.0, 40.0]), "L5": np.array([8.0, 20, 30, 44])})]
    runs = []
    for state, seed in ((1, 0), (2, 0), (1, 1)):
        torch.manual_seed(state)
        model = EndClassifier.from_detector(R18, bottom_up, seed, **small)
        assert torch.equal(model.body.stem.conv1.weight, bottom_up["stem.conv1.weight"])
        first_fc = model.fc.weight.detach().clone()
        train_end_classifier(model, films, epochs=1, batch_size=2, seed=seed)
        runs.append((first_fc, model.state_dict()))
    (fc_a, a), (fc_b, b), (fc_c, c) = runs
    assert torch.equal(fc_a, fc_b) and not torch.equal(fc_a, fc_c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])


def _heads(*opts):
    from detectron2.modeling import build_model

    cfg = build_config(QUICK, ["MODEL.ROI_HEADS.NAME", "LevelROIHeads", *opts])
    return cfg, build_model(cfg).roi_heads


def test_the_decoder_names_the_chain_from_the_ends(tmp_path):
    """18 bodies, C7..L5, whose level branch calls the top one T1 (as a branch fine-tuned on
    films annotated T1..L5 does): the branch alone names the chain one level off at the top;
    with the end classifier and the branch left out, it is named right."""
    from detectron2.structures import Boxes, Instances

    path = tmp_path / "ends.json"
    _biased("C7", "L5").save(path, {})
    cfg, roi = _heads()
    levels = list(cfg.SPINE.LEVELS)
    names = levels[levels.index("C7") : levels.index("L5") + 1]
    n = len(names)
    inst = Instances((40 * n + 40, 200))
    inst.pred_boxes = Boxes(
        torch.tensor([[85.0, 28 + 40 * k, 115.0, 52 + 40 * k] for k in range(n)])
    )
    inst.scores = torch.full((n,), 0.9)
    logits = torch.zeros(n, len(levels))
    branch = ["T1"] + names[1:]  # C7 called T1: the chain then repeats a name lower down
    for k, name in enumerate(branch):
        logits[k, levels.index(name)] = 9.0
    images = ImageList(torch.zeros(1, 3, 40 * n + 40, 200), [(40 * n + 40, 200)])

    roi._label_levels(inst, logits)
    assert levels[inst.pred_levels[0]] == "T1"

    _, with_ends = _heads(
        "SPINE.LEVEL_HEAD.END_CLASSIFIER.FILE", str(path), "SPINE.LEVEL_HEAD.BRANCH_WEIGHT", "0.0"
    )
    assert "end_classifier" not in dict(with_ends.named_children())  # not in checkpoints
    with_ends._input_images = images
    with_ends._label_levels(inst, logits, 0)
    assert [levels[i] for i in inst.pred_levels.tolist()] == names
    # no input image (e.g. boxes given from outside): the decoder works as without a classifier
    with_ends._input_images = None
    with_ends._label_levels(inst, logits, 0)
    _, plain = _heads("SPINE.LEVEL_HEAD.BRANCH_WEIGHT", "0.0")
    expected = inst.pred_levels.clone()
    plain._label_levels(inst, logits)
    assert torch.equal(inst.pred_levels, expected)


@pytest.mark.parametrize(
    "opts, error, message",
    [
        (["SPINE.LEVEL_HEAD.END_CLASSIFIER.FILE", "nope/ends.json"], SpineError, "not found"),
        (["SPINE.LEVEL_HEAD.BRANCH_WEIGHT", "-1.0"], ValueError, "BRANCH_WEIGHT"),
        (["SPINE.LEVEL_HEAD.END_CLASSIFIER.FLOOR", "1.0"], ValueError, "FLOOR <= 0"),
    ],
)
def test_bad_settings_are_one_line(opts, error, message):
    with pytest.raises(error, match=message):
        _heads(*opts)


def test_the_tool_refuses_an_unknown_dataset(tmp_path):
    out = tmp_path / "ends.json"
    run = subprocess.run(
        [sys.executable, "tools/train_end_classifier.py", "--config-file", QUICK,
         "--dataset", "no_such_split", "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 1
    assert "error: no_such_split: not a registered dataset" in run.stderr.strip().splitlines()[-1]
    assert not out.exists()


def test_the_tool_trains_a_classifier_of_the_context_it_is_given(tmp_path):
    """--context-half and --crop-size shape the classifier (a wider box sees the pelvis beside
    L5); the file records them and loads back with them."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from spine_d2.data.datasets import register_spine_coco
    from spine_d2.data.synthetic import make_synthetic_spine_dataset

    # seed 0's three scans hold T1..T3 / L3..L5 bodies, the only ones the classifier learns
    register_spine_coco("spine_ends_train", *make_synthetic_spine_dataset(tmp_path, 3, seed=0))
    sys.path.insert(0, "tools")
    try:
        from train_end_classifier import main
    finally:
        sys.path.pop(0)
    out = tmp_path / "ends.json"
    rc = main(
        ["--config-file", QUICK, "--dataset", "spine_ends_train", "--out", str(out), "--epochs",
         "1", "--context-half", "4", "3.5", "--crop-size", "64", "96", "MODEL.DEVICE", "cpu"]
    )  # fmt: skip
    DatasetCatalog.remove("spine_ends_train")
    MetadataCatalog.remove("spine_ends_train")
    assert rc == 0
    head = json.loads(out.read_text())
    assert (head["context_half"], head["crop_size"]) == ([4.0, 3.5], [64, 96])
    model = EndClassifier.load(out)
    assert model.crops(torch.zeros(1, 128, 128), [[40, 40, 60, 50]]).shape == (1, 3, 64, 96)


def test_the_tool_refuses_a_context_of_no_size(capsys):
    sys.path.insert(0, "tools")
    try:
        from train_end_classifier import main
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as e:
        main(["--config-file", QUICK, "--out", "x.json", "--crop-size", "0", "96"])
    assert e.value.code == 2
    assert "--crop-size [0, 96]: sizes must be positive" in capsys.readouterr().err
