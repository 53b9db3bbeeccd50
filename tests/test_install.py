"""The installed detectron2 is the fixed pure-Python build and runs Mask R-CNN on the CPU."""

import importlib.util

import numpy as np
import pytest
import torch


def test_detectron2_imports_and_reports_build():
    import detectron2
    from detectron2.data.transforms import ExtentTransform  # Image.LINEAR fix
    from detectron2.evaluation import COCOEvaluator  # noqa: F401  (fast_eval_api import fix)
    from detectron2.model_zoo import get_config_file  # pkg_resources fix

    assert detectron2.__version__.startswith("0.6")
    assert ExtentTransform((0, 0, 4, 4), (2, 2)).interp is not None
    assert get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml").endswith(".yaml")


def test_polygon_masks_work_with_numpy2():
    from detectron2.structures import polygons_to_bitmask

    mask = polygons_to_bitmask([np.array([2, 2, 10, 2, 10, 6, 2, 6], float)], 12, 12)
    assert mask.dtype == bool and mask.sum() == 8 * 4


@pytest.mark.skipif(
    importlib.util.find_spec("detectron2._C") is not None, reason="compiled build installed"
)
def test_missing_compiled_ops_raise_clear_error():
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    with pytest.raises(RuntimeError, match="not available"):
        pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))


def test_mask_rcnn_config_builds_and_runs_forward_on_cpu():
    from detectron2.modeling import build_model

    from spine_d2.engine import build_config

    cfg = build_config("configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml")
    model = build_model(cfg).eval()
    with torch.inference_mode():
        out = model([{"image": torch.rand(3, 128, 128) * 255, "height": 256, "width": 256}])
    inst = out[0]["instances"]
    assert inst.image_size == (256, 256)  # rescaled to the requested output size
    assert inst.pred_masks.shape[1:] == (256, 256)
