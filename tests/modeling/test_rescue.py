"""Chain rescue (spine_d2.modeling.rescue) on hand-made chains, and through LevelROIHeads, the
evaluator and the ZOI export's selection."""

import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

from spine_d2.modeling.rescue import rescue_chain
from spine_d2.zoi.extract import scale_to_original


def _box(cx, cy, w=30.0, h=24.0):
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _chain(n=17, step=40.0, x=100.0, top=30.0):
    return [_box(x, top + step * k) for k in range(n)]


def _film():
    """17 bodies 40 px apart; #8 (interior) and #16 (bottom end) only under the cut, plus
    decoys: far to the side, on top of a confident body, below the rescue's floor."""
    boxes = _chain()
    scores = [0.9] * 17
    scores[8], scores[16] = 0.3, 0.25
    boxes += [_box(220.0, 30 + 40 * 4), _box(100.0, 30 + 40 * 5 + 6), _box(100.0, -10.0)]
    scores += [0.45, 0.45, 0.1]  # 17: lateral, 18: overlaps body 5, 19: above the top, too low
    return np.array(boxes), np.array(scores)


def test_a_gap_and_an_end_are_filled_and_decoys_left_out():
    boxes, scores = _film()
    accepted = scores >= 0.5
    assert sorted(rescue_chain(boxes, scores, accepted, 17, 0.2)) == [8, 16]
    # the floor: at 0.26 only the interior body (0.3) is left to rescue
    assert rescue_chain(boxes, scores, accepted, 17, 0.26) == [8]
    # the top end's candidate (0.1) comes in once the floor allows it
    assert sorted(rescue_chain(boxes, scores, accepted, 18, 0.05)) == [8, 16, 19]


def test_complete_or_short_chains_and_off_rescue_nothing():
    boxes, scores = _film()
    accepted = scores >= 0.5
    assert rescue_chain(boxes, scores, accepted, 15, 0.2) == []  # already 15 confident
    assert rescue_chain(boxes, scores, accepted, 0, 0.2) == []  # off
    few = np.zeros(len(scores), bool)
    few[:2] = True
    assert rescue_chain(boxes, scores, few, 17, 0.2) == []  # two bodies: no spacing to go by
    # room for one: the better scored of the two
    assert rescue_chain(boxes, scores, accepted, 16, 0.2) == [8]


def test_gaps_follow_a_curved_chain():
    t = np.arange(17)
    centers = np.stack([150 + 60 * np.sin(t / 3.0), 30 + 38 * t], 1)  # a scoliotic S
    boxes = np.array([_box(x, y) for x, y in centers])
    scores = np.full(17, 0.9)
    scores[[5, 6]] = 0.3  # two missing in a row: one gap that misses two
    off = _box(centers[5, 0] + 90, centers[5, 1])  # beside the gap, off the curve
    boxes, scores = np.vstack([boxes, [off]]), np.append(scores, 0.4)
    assert sorted(rescue_chain(boxes, scores, scores >= 0.5, 17, 0.2)) == [5, 6]


@pytest.fixture
def heads():
    from detectron2.modeling import build_model

    from spine_d2.engine.setup import build_config

    cfg = build_config(
        "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml",
        ["MODEL.ROI_HEADS.NAME", "LevelROIHeads", "SPINE.LEVEL_HEAD.RESCUE.EXPECTED", "17"],
    )
    return cfg, build_model(cfg).roi_heads


def test_level_heads_decode_rescued_bodies_with_the_confident_ones(heads):
    cfg, roi = heads
    assert roi.keep_score == pytest.approx(0.2)
    boxes, scores = _film()
    inst = Instances((800, 300))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.zeros(len(scores), dtype=torch.int64)
    levels = list(cfg.SPINE.LEVELS)
    logits = torch.zeros(len(scores), len(levels))
    logits[0, levels.index("T1")] = 9.0  # the top body surely T1; the rest undecided
    roi._label_levels(inst, logits)
    assert torch.nonzero(inst.pred_rescued).flatten().tolist() == [8, 16]
    named = [levels[i] for i in inst.pred_levels[:17].tolist()]
    assert named[8] == "T9" and named[16] == "L5"  # in the chain, so named in turn

    # Downstream, rescued bodies are kept with the confident ones: the ZOI export's selection...
    inst.pred_masks = torch.ones(len(scores), 1, 28, 28)
    kept = scale_to_original(inst, 800, 300, score_thresh=0.5)
    assert len(kept) == 17
    assert len(scale_to_original(inst, 800, 300, 0.5, rescued=False)) == 15  # a stricter export
    # ...but a model without the rescue keeps only the confident ones
    inst.pred_rescued = torch.zeros(len(scores), dtype=torch.bool)
    assert len(scale_to_original(inst, 800, 300, score_thresh=0.5)) == 15


def test_rescue_settings_are_checked(heads):
    from detectron2.modeling import build_model

    from spine_d2.engine.setup import build_config

    cfg = build_config(
        "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml",
        ["MODEL.ROI_HEADS.NAME", "LevelROIHeads", "SPINE.LEVEL_HEAD.RESCUE.EXPECTED", "17",
         "SPINE.LEVEL_HEAD.RESCUE.MIN_SCORE", "0.6"],  # fmt: skip
    )
    with pytest.raises(ValueError, match="MIN_SCORE in \\(0, SPINE.LEVEL_HEAD.SCORE_THRESH=0.5\\)"):
        build_model(cfg)
