"""Level decoding along the spine and the LevelROIHeads branch on synthetic scans."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from spine_d2.data.mapper import XrayDatasetMapper
from spine_d2.engine.setup import build_config
from spine_d2.modeling import LevelROIHeads, decode_levels

INSTANT = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"


def _curved_spine(n, start=(60.0, 10.0), step=14.0):
    """Centroids on a curve that runs sideways (a scoliotic S), top to bottom."""
    t = np.arange(n)
    return np.stack([start[0] + 25 * np.sin(t / 2.0), start[1] + step * t], axis=1)


def _log_probs(true_levels, num_levels, confident, rng, noise=0.3):
    """Flat, noisy level scores except for the ``confident`` detections."""
    lp = rng.normal(0, noise, (len(true_levels), num_levels))
    for i in confident:
        lp[i, true_levels[i]] += 8.0
    return lp - np.log(np.exp(lp).sum(1, keepdims=True))


def test_one_confident_vertebra_fixes_its_neighbours_in_any_input_order():
    rng = np.random.default_rng(0)
    true = np.arange(5, 13)  # 8 consecutive levels
    centers = _curved_spine(len(true))
    lp = _log_probs(true, 24, confident=[3], rng=rng)
    perm = rng.permutation(len(true))
    got = decode_levels(centers[perm], lp[perm])
    np.testing.assert_array_equal(got, true[perm])
    # the per-detection argmax alone gets most of them wrong
    assert (lp.argmax(1) != true).sum() >= 5


def test_strong_evidence_allows_a_skipped_level_and_a_lone_detection_takes_argmax():
    rng = np.random.default_rng(1)
    true = np.array([4, 5, 6, 8, 9])  # level 7 missed by the detector
    lp = _log_probs(true, 24, confident=range(5), rng=rng, noise=0.1)
    np.testing.assert_array_equal(decode_levels(_curved_spine(5), lp), true)
    assert decode_levels(_curved_spine(1), lp[:1]).tolist() == [4]
    assert decode_levels(np.zeros((0, 2)), np.zeros((0, 24))).shape == (0,)


def test_spacing_weight_puts_the_skip_where_the_geometry_shows_the_missed_vertebra():
    rng = np.random.default_rng(3)
    true = np.array([4, 5, 6, 8, 9])  # level 7 missed: a double spacing between 6 and 8
    centers = np.delete(_curved_spine(6), 3, axis=0)
    lp = _log_probs(true, 24, confident=[0], rng=rng, noise=0.1)  # only the top one is sure
    # the classifier alone cannot see the miss: the chain stays contiguous below level 4
    np.testing.assert_array_equal(decode_levels(centers, lp), [4, 5, 6, 7, 8])
    np.testing.assert_array_equal(decode_levels(centers, lp, spacing_weight=8.0), true)
    # even spacing: the same weight forbids a skip that the scores mildly prefer
    even = _curved_spine(5)
    lp_skip = _log_probs(np.array([4, 5, 6, 7, 8]), 24, confident=[0], rng=rng, noise=0.1)
    lp_skip[4, 9] += 1.5
    assert decode_levels(even, lp_skip, skip_cost=0.0)[4] == 9
    np.testing.assert_array_equal(
        decode_levels(even, lp_skip, skip_cost=0.0, spacing_weight=8.0), [4, 5, 6, 7, 8]
    )
    with pytest.raises(ValueError, match="spacing_weight must be >= 0, got -1"):
        decode_levels(even, lp_skip, spacing_weight=-1)


def test_a_duplicate_detection_does_not_shift_the_levels_below_it():
    rng = np.random.default_rng(2)
    true = np.array([3, 4, 4, 5, 6, 7])  # the second T? detected twice
    centers = _curved_spine(5)
    centers = np.insert(centers, 2, centers[1] + [1.0, 1.0], axis=0)
    lp = _log_probs(true, 24, confident=range(6), rng=rng, noise=0.1)
    np.testing.assert_array_equal(decode_levels(centers, lp), true)


@pytest.fixture
def level_model(synthetic_train):
    cfg = build_config(
        INSTANT, ["MODEL.ROI_HEADS.NAME", "LevelROIHeads", "SPINE.LEVEL_HEAD.SCORE_THRESH", "0.0"]
    )
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_mapper_gives_level_indices_into_spine_levels(level_model, synthetic_train):
    from detectron2.data import DatasetCatalog

    cfg, _ = level_model
    record = DatasetCatalog.get(synthetic_train)[0]
    out = XrayDatasetMapper(cfg, is_train=True)(record)
    ids = out["instances"].gt_level_ids.tolist()
    assert ids == [cfg.SPINE.LEVELS.index(lv) for lv in out["gt_levels"]]
    assert len(ids) == len(out["instances"]) > 0


def test_level_branch_trains_and_labels_every_detection(level_model, synthetic_train):
    from detectron2.data import DatasetCatalog

    cfg, model = level_model
    assert isinstance(model.roi_heads, LevelROIHeads)
    mapper = XrayDatasetMapper(cfg, is_train=True)
    batch = [mapper(r) for r in DatasetCatalog.get(synthetic_train)[:2]]
    model.train()
    with EventStorage():
        losses = model(batch)
        assert torch.isfinite(losses["loss_level"]) and losses["loss_level"] > 0
        losses["loss_level"].backward()
        assert model.roi_heads.level_predictor.weight.grad.abs().sum() > 0
        # unknown levels (-1) are ignored: no level loss at all
        for b in batch:
            b["instances"].gt_level_ids[:] = -1
        assert model(batch)["loss_level"].item() == 0.0

    model.eval()
    test_mapper = XrayDatasetMapper(cfg, is_train=False)
    with torch.no_grad():
        inst = model([test_mapper(DatasetCatalog.get(synthetic_train)[0])])[0]["instances"]
    assert len(inst) > 0 and inst.pred_levels.shape == (len(inst),)
    assert inst.pred_levels.min() >= 0 and inst.pred_levels.max() < len(cfg.SPINE.LEVELS)
    assert ((inst.level_scores > 0) & (inst.level_scores <= 1)).all()


def test_label_levels_decodes_confident_detections_only(level_model):
    cfg, model = level_model
    heads = model.roi_heads
    heads.level_score_thresh = 0.5
    inst = Instances((128, 128))
    inst.pred_boxes = Boxes(torch.tensor([[50, y, 80, y + 12] for y in (10.0, 30.0, 50.0, 70.0)]))
    inst.scores = torch.tensor([0.9, 0.9, 0.9, 0.1])
    logits = torch.zeros(4, len(cfg.SPINE.LEVELS))
    logits[0, 10] = 9.0  # top vertebra surely level 10; the next two undecided
    logits[3, 2] = 9.0  # the low-score one keeps its own argmax
    heads._label_levels(inst, logits)
    assert inst.pred_levels.tolist() == [10, 11, 12, 2]
    # what the decoder saw is kept: log-probabilities over SPINE.LEVELS, argmax 10 on top
    assert inst.level_log_probs.shape == (4, len(cfg.SPINE.LEVELS))
    assert torch.allclose(inst.level_log_probs.exp().sum(1), torch.ones(4))
    assert inst.level_log_probs[0].argmax() == 10
