"""Soft NMS (SPINE.NMS): hand-computed scores, equivalence with hard NMS above 0.5, and the
LevelROIHeads path that maps each detection back to its proposal."""

import math

import pytest
import torch
from detectron2.layers import batched_nms
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from spine_d2.engine.setup import build_config
from spine_d2.modeling.soft_nms import soft_nms

INSTANT = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"

# A and B overlap by box IoU 0.6 (A: 0..10, B: 2.5..12.5 in x, same rows), C stands apart
A, B, C = [0.0, 0.0, 10.0, 10.0], [2.5, 0.0, 12.5, 10.0], [50.0, 50.0, 60.0, 60.0]
IOU_AB = 75.0 / 125.0


def _run(method, classes=(0, 0, 0), score_thresh=0.05, sigma=0.5):
    boxes = torch.tensor([A, B, C])
    scores = torch.tensor([0.9, 0.8, 0.7])
    return soft_nms(boxes, scores, torch.tensor(classes), method, 0.5, sigma, score_thresh)


def test_each_rule_rescores_the_overlapping_box_as_computed_by_hand():
    keep, scores = _run("hard")
    assert keep.tolist() == [0, 2] and scores.tolist() == pytest.approx([0.9, 0.7])
    keep, scores = _run("linear")  # B keeps 1 - 0.6 of 0.8 and falls below C
    assert keep.tolist() == [0, 2, 1]
    assert scores.tolist() == pytest.approx([0.9, 0.7, 0.8 * (1 - IOU_AB)])
    keep, scores = _run("gaussian", sigma=0.5)  # every overlap decays, C's (0) by nothing
    assert keep.tolist() == [0, 2, 1]
    assert scores.tolist() == pytest.approx([0.9, 0.7, 0.8 * math.exp(-(IOU_AB**2) / 0.5)])
    # a rescored box under the score threshold is dropped
    keep, _ = _run("linear", score_thresh=0.4)
    assert keep.tolist() == [0, 2]
    # boxes of different classes never suppress each other
    keep, scores = _run("linear", classes=(0, 1, 0))
    assert keep.tolist() == [0, 1, 2] and scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    with pytest.raises(ValueError, match="SPINE.NMS.METHOD must be one of"):
        _run("soft")
    keep, scores = soft_nms(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), "linear", 0.5, 0.5, 0
    )
    assert len(keep) == len(scores) == 0
    keep, scores = _run("linear", score_thresh=0.95)  # nothing reaches the threshold
    assert len(keep) == len(scores) == 0


def test_linear_rule_at_0_5_keeps_hard_nms_detections_above_0_5_exactly():
    """Why the evaluator's and the export's operating point does not move: a demoted detection
    keeps (1 - IoU) < 0.5 of its score, and the undemoted ones are hard NMS's, in its order."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        xy = torch.rand(60, 2, generator=g) * 100
        wh = 10 + torch.rand(60, 2, generator=g) * 30
        boxes = torch.cat([xy, xy + wh], dim=1)
        scores = torch.rand(60, generator=g)
        classes = torch.randint(0, 2, (60,), generator=g)
        hard = batched_nms(boxes, scores, classes, 0.5)
        hard = hard[scores[hard] >= 0.5]
        keep, new = soft_nms(boxes, scores, classes, "linear", 0.5, 0.5, 0.05)
        assert keep[new >= 0.5].tolist() == hard.tolist()
        assert len(keep) > len(hard)  # the demoted ones are still there, lower
        assert torch.equal(new[new >= 0.5], scores[hard])


def _heads(method):
    cfg = build_config(
        INSTANT, ["MODEL.ROI_HEADS.NAME", "LevelROIHeads", "SPINE.NMS.METHOD", method]
    )
    torch.manual_seed(0)
    return build_model(cfg).roi_heads.eval()


def test_level_heads_soft_nms_maps_each_detection_to_its_proposal():
    heads = _heads("linear")
    k = heads.num_classes
    proposals = Instances((100, 100))
    proposals.proposal_boxes = Boxes(torch.tensor([C, A, B, [0.0, 0.0, 1.0, float("nan")]]))
    # class logits: vertebra probabilities ~0.7, 0.9, 0.8 (zero deltas: boxes stay the proposals)
    logits = torch.full((4, k + 1), -20.0)
    for row, p in enumerate([0.7, 0.9, 0.8, 0.9]):
        logits[row, 0], logits[row, k] = math.log(p), math.log(1 - p)
    deltas = torch.zeros(4, heads.box_predictor.bbox_pred.out_features)
    [inst], [kept] = heads._inference((logits, deltas), [proposals])
    # the non-finite proposal is skipped, and indices still point at the input proposals
    assert kept.tolist() == [1, 0, 2]
    assert inst.scores.tolist() == pytest.approx([0.9, 0.7, 0.8 * (1 - IOU_AB)], rel=1e-4)
    assert inst.pred_boxes.tensor.tolist() == [A, C, B]
    hard = _heads("hard")
    [inst], [kept] = hard._inference((logits, deltas), [proposals])
    assert inst.scores.tolist() == pytest.approx([0.9, 0.7], rel=1e-4)


def _model_with_unchecked(**spine):
    """build_config refuses bad values first (tests/engine/test_configs.py); code that builds the
    heads from a config of its own meets the heads' own checks."""
    cfg = build_config(INSTANT, ["MODEL.ROI_HEADS.NAME", "LevelROIHeads"])
    cfg.defrost()
    for key, value in spine.items():
        node, name = (cfg.SPINE.NMS, key[4:]) if key.startswith("NMS_") else (cfg.SPINE, key)
        setattr(node, name, value)
    if spine.get("MASK_RESCORE"):
        cfg.MODEL.MASK_ON = False
    return build_model(cfg)


def test_bad_nms_settings_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="SPINE.NMS.METHOD must be one of hard, linear, gaussian"):
        _model_with_unchecked(NMS_METHOD="softer")
    with pytest.raises(ValueError, match="SPINE.NMS.SIGMA must be > 0, not 0.0"):
        _model_with_unchecked(NMS_METHOD="gaussian", NMS_SIGMA=0.0)
    with pytest.raises(ValueError, match="SPINE.MASK_RESCORE needs a mask head"):
        _model_with_unchecked(MASK_RESCORE=True)


def _heads_with(*opts):
    cfg = build_config(INSTANT, ["MODEL.ROI_HEADS.NAME", "LevelROIHeads", *opts])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_mask_rescore_moves_scores_by_maskness_towards_the_cut_never_across():
    _, model = _heads_with("SPINE.MASK_RESCORE", "True", "SPINE.LEVEL_HEAD.SCORE_THRESH", "0.5")
    inst = Instances((20, 20))
    inst.scores = torch.tensor([0.9, 0.3, 0.6, 0.7])
    probs = torch.zeros(4, 1, 4, 4)
    probs[0, 0, :2] = 0.8  # maskness 0.8 (the zeros outside the mask do not count)
    probs[1, 0] = 0.6  # maskness 0.6
    probs[2, 0, 0, 0] = 0.4  # nothing over 0.5: an empty mask, maskness 0
    probs[3, 0] = 1.0  # a certain mask keeps its score
    inst.pred_masks = probs
    empty = Instances((20, 20), scores=torch.zeros(0), pred_masks=torch.zeros(0, 1, 4, 4))
    model.roi_heads._rescore_by_masks([inst, empty])
    assert inst.scores.tolist() == pytest.approx([0.5 + 0.4 * 0.8, 0.3 * 0.6, 0.5, 0.7])


def test_mask_rescore_keeps_the_same_detections_over_the_cut(synthetic_train):
    from detectron2.data import DatasetCatalog

    from spine_d2.data.mapper import XrayDatasetMapper

    cfg, model = _heads_with("SPINE.NMS.METHOD", "linear")
    model.eval()
    scan = XrayDatasetMapper(cfg, is_train=False)(DatasetCatalog.get(synthetic_train)[0])
    with torch.no_grad():
        plain = model([scan])[0]["instances"]
        assert len(plain) >= 4
        cut = float(plain.scores.median())  # an untrained model: a cut inside its scores
        model.roi_heads.level_score_thresh = cut
        plain = model([scan])[0]["instances"]
        model.roi_heads.mask_rescore = True
        rescored = model([scan])[0]["instances"]
    assert torch.equal(plain.pred_boxes.tensor, rescored.pred_boxes.tensor)
    assert torch.equal(plain.scores >= cut, rescored.scores >= cut)
    assert torch.equal(plain.pred_levels, rescored.pred_levels)
    assert (rescored.scores <= plain.scores + 1e-6).all()
    assert (rescored.scores < plain.scores - 1e-4).any()  # the ranking input did change


def test_given_boxes_without_scores_get_masks_under_mask_rescore():
    """detectron2's forward_with_given_boxes asks for pred_boxes and pred_classes only (as
    bench_masks' mirrored pass gives them): with SPINE.MASK_RESCORE the heads failed on the
    missing scores; given scores are still rescored."""
    _, model = _heads_with("SPINE.MASK_RESCORE", "True")
    model.eval()
    features = {
        f: torch.randn(1, s.channels, 64 // s.stride, 64 // s.stride)
        for f, s in model.backbone.output_shape().items()
    }
    boxes = Boxes(torch.tensor([[8.0, 8.0, 30.0, 20.0], [10.0, 30.0, 34.0, 44.0]]))
    bare = Instances((64, 64), pred_boxes=boxes, pred_classes=torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        [out] = model.roi_heads.forward_with_given_boxes(features, [bare])
        assert out.pred_masks.shape[0] == 2 and not out.has("scores")
        scored = Instances((64, 64), pred_boxes=boxes, pred_classes=torch.zeros(2).long(),
                           scores=torch.tensor([0.95, 0.9]))  # fmt: skip
        [out] = model.roi_heads.forward_with_given_boxes(features, [scored])
    assert (out.scores < torch.tensor([0.95, 0.9])).all()  # a random mask head: maskness < 1
