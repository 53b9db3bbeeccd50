"""SPINE.LEVEL_HEAD.OUTPUT_RANGE: LevelROIHeads outputs only the detections named in the range."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from spine_d2.engine.setup import build_config

QUICK = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"


def _heads(*opts):
    cfg = build_config(QUICK, ["MODEL.ROI_HEADS.NAME", "LevelROIHeads", *opts])
    return cfg, build_model(cfg).roi_heads


def _chain(levels, names):
    """One confident body per name, 40 px apart top to bottom, the branch sure of each name."""
    n = len(names)
    inst = Instances((40 * n + 40, 200))
    inst.pred_boxes = Boxes(
        torch.tensor([[85.0, 28 + 40 * k, 115.0, 52 + 40 * k] for k in range(n)])
    )
    inst.scores = torch.full((n,), 0.9)
    inst.pred_classes = torch.zeros(n, dtype=torch.int64)
    logits = torch.zeros(n, len(levels))
    for k, name in enumerate(names):
        logits[k, levels.index(name)] = 9.0
    return inst, logits


def test_bodies_named_outside_the_range_are_left_out():
    cfg, roi = _heads("SPINE.LEVEL_HEAD.OUTPUT_RANGE", "['T1', 'L5']")
    levels = list(cfg.SPINE.LEVELS)
    names = ["C7"] + levels[levels.index("T1") : levels.index("L5") + 1] + ["S1"]
    inst, logits = _chain(levels, names)
    roi._label_levels(inst, logits)
    kept = roi._in_output_range(inst)
    assert len(kept) == 17
    assert [levels[i] for i in kept.pred_levels.tolist()] == names[1:-1]
    # the fields travel with the detections: the top one left is the second box of the film
    assert kept.pred_boxes.tensor[0, 1].item() == pytest.approx(68.0)
    assert kept.level_log_probs.shape == (17, len(levels))

    _, off = _heads()  # off by default: every detection
    inst, logits = _chain(levels, names)
    off._label_levels(inst, logits)
    assert len(off._in_output_range(inst)) == 19


@pytest.mark.parametrize(
    "value, message",
    [("['T1']", "must be \\[\\] or \\[first, last\\]"), ("['T1', 'X9']", "two of SPINE.LEVELS"),
     ("['L5', 'T1']", "L5 comes after T1")],  # fmt: skip
)
def test_a_bad_range_is_one_line(value, message):
    with pytest.raises(ValueError, match=message):
        _heads("SPINE.LEVEL_HEAD.OUTPUT_RANGE", value)
