"""XrayDatasetMapper end to end: scan on disk -> image tensor, Instances and levels."""

import copy

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, PolygonMasks

from spine_d2.config import add_spine_config
from spine_d2.data.augment import GammaTransform, LowDoseNoiseTransform
from spine_d2.data.mapper import XrayDatasetMapper
from spine_d2.errors import ScanReadError

H = W = 128
RECT = (40.0, 30.0, 90.0, 100.0)


def _polygon(rect):
    x0, y0, x1, y1 = rect
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _anno(rect, **extra):
    x0, y0, x1, y1 = rect
    return {
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": 0,
        "iscrowd": 0,
        "segmentation": _polygon(rect),
        **extra,
    }


@pytest.fixture
def record(tmp_path):
    """A 16-bit 128x128 scan with one bright vertebra-like rectangle and its annotations."""
    img = np.full((H, W), 0.2, np.float32)
    x0, y0, x1, y1 = (int(v) for v in RECT)
    img[y0:y1, x0:x1] = 0.8
    path = tmp_path / "scan.png"
    assert cv2.imwrite(str(path), np.round(img * 65535).astype(np.uint16))
    return {
        "file_name": str(path),
        "height": H,
        "width": W,
        "image_id": 1,
        "annotations": [
            _anno(RECT, level="T12"),
            _anno((5.0, 5.0, 25.0, 20.0)),  # no level
            _anno((100.0, 10.0, 120.0, 30.0), level="L1", iscrowd=1),  # crowd: skipped
        ],
    }


def _cfg(channels=3):
    cfg = get_cfg()
    add_spine_config(cfg)
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MIN_SIZE_TRAIN = (128,)
    cfg.INPUT.MAX_SIZE_TRAIN = 256
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 256
    cfg.INPUT.XRAY.CHANNELS = channels
    for key in ("LOW_DOSE", "CLAHE", "GAMMA", "WINDOW", "BLUR", "INVERT", "HFLIP"):
        cfg.INPUT.XRAY[key].ENABLED = True
        cfg.INPUT.XRAY[key].PROB = 1.0
    return cfg


def _mapper(augmentations, mask_format="polygon"):
    return XrayDatasetMapper(
        True,
        augmentations=augmentations,
        use_instance_mask=True,
        instance_mask_format=mask_format,
        recompute_boxes=True,
    )


@pytest.mark.parametrize("channels", [3, 1])
def test_mapper_from_config_end_to_end(record, channels):
    original = copy.deepcopy(record)
    np.random.seed(0)
    out = XrayDatasetMapper(_cfg(channels), is_train=True)(record)
    assert record == original  # the caller's dict is not mutated

    image = out["image"]
    assert image.dtype == torch.float32 and image.shape[0] == channels
    h, w = image.shape[1:]
    assert image.min() >= 0 and image.max() <= 255 and image.max() > 1  # 0..255, not 0..1
    if channels == 3:
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])

    inst = out["instances"]
    assert len(inst) == 2 and inst.image_size == (h, w)
    assert out["gt_levels"] == ["T12", None]
    assert "annotations" not in out
    masks = inst.gt_masks
    assert isinstance(masks, PolygonMasks)
    for polys in masks.polygons:
        pts = np.concatenate(polys).reshape(-1, 2)
        assert (pts >= 0).all() and (pts[:, 0] <= w).all() and (pts[:, 1] <= h).all()
    boxes = inst.gt_boxes.tensor
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_mapper_transforms_are_deterministic(record):
    np.random.seed(1)
    mapper = XrayDatasetMapper(_cfg(), is_train=True)
    image = np.full((H, W), 0.5, np.float32)
    aug_input = T.AugInput(image.copy())
    transforms = mapper.augmentations(aug_input)
    assert any(isinstance(t, LowDoseNoiseTransform) for t in transforms.transforms)
    first = transforms.apply_image(image.copy())
    np.testing.assert_array_equal(first, transforms.apply_image(image.copy()))
    np.testing.assert_array_equal(first, aug_input.image)


def test_masks_and_tight_boxes_follow_a_rotation(record):
    # A diamond inscribed in RECT: its rotated box is much tighter than the rotated RECT's.
    diamond = _anno(RECT, level="T11")
    diamond["segmentation"] = [[65.0, 30.0, 90.0, 65.0, 65.0, 100.0, 40.0, 65.0]]
    record["annotations"].append(diamond)
    angle = 20.0
    rotation = T.RotationTransform(H, W, angle, expand=True)
    out = _mapper([rotation], mask_format="bitmask")(record)
    inst = out["instances"]
    assert isinstance(inst.gt_masks, BitMasks) and out["gt_levels"] == ["T12", None, "T11"]
    mask = inst.gt_masks.tensor[0].numpy()
    bright = out["image"][0].numpy() > 0.5 * 255
    assert (mask & bright).sum() / (mask | bright).sum() > 0.95  # the mask is where the image is

    # Boxes come from the rotated masks (tight), not from rotating the box corners (loose).
    for i in (0, 2):
        ys, xs = np.nonzero(inst.gt_masks.tensor[i].numpy())
        np.testing.assert_allclose(
            inst.gt_boxes.tensor[i].numpy(), [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        )
    x0, y0, x1, y1 = RECT
    corners = rotation.apply_coords(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
    loose_area = np.prod(corners.max(0) - corners.min(0))
    assert inst.gt_boxes.area()[2] < 0.8 * loose_area


def test_hflip_through_the_mapper(record):
    out = _mapper([T.HFlipTransform(W)])(record)
    inst = out["instances"]
    x0, y0, x1, y1 = RECT
    np.testing.assert_allclose(inst.gt_boxes.tensor[0].numpy(), [W - x1, y0, W - x0, y1])
    np.testing.assert_allclose(
        inst.gt_masks.polygons[0][0], [W - x0, y0, W - x1, y0, W - x1, y1, W - x0, y1]
    )


def test_photometric_transforms_leave_instances_identical(record):
    plain = _mapper([])(record)
    photometric = [LowDoseNoiseTransform(0.1, 20000.0, 5.0, 5.0, seed=0), GammaTransform(1.3)]
    noisy = _mapper(photometric)(record)
    assert not torch.equal(plain["image"], noisy["image"])
    assert torch.equal(plain["instances"].gt_boxes.tensor, noisy["instances"].gt_boxes.tensor)
    for a, b in zip(plain["instances"].gt_masks.polygons, noisy["instances"].gt_masks.polygons):
        np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))


def test_empty_instances_are_filtered_with_their_levels(record):
    record["annotations"].insert(0, _anno((60.0, 60.0, 60.0, 80.0), level="T11"))  # zero width
    out = _mapper([])(record)
    assert len(out["instances"]) == 2
    assert out["gt_levels"] == ["T12", None]


def test_inference_resizes_and_drops_annotations(record):
    out = XrayDatasetMapper(_cfg(), is_train=False)(record)
    assert out["image"].shape == (3, 96, 96)
    assert "annotations" not in out and "instances" not in out
    assert (out["height"], out["width"]) == (H, W)  # evaluation rescales predictions back
    np.testing.assert_allclose(out["image"].max().item(), 0.8 * 255, atol=0.5)  # no photometry


def test_unreadable_scan_raises_project_error(record, tmp_path):
    record["file_name"] = str(tmp_path / "missing.png")
    with pytest.raises(ScanReadError, match="missing.png"):
        _mapper([])(record)


def test_bad_channels_rejected():
    with pytest.raises(ValueError, match="CHANNELS"):
        XrayDatasetMapper(_cfg(channels=2), is_train=True)


def test_crop_clips_masks_recomputes_boxes_and_drops_vertebrae_cut_away(record):
    from spine_d2.data.augment import ClipCropTransform

    # rows 50..128 of the scan: RECT (rows 30-100) is cut to rows 50-100, the no-level box
    # (rows 5-20) leaves the film with nothing of it left
    out = _mapper([ClipCropTransform(0, 50, W, H - 50)])(record)
    inst = out["instances"]
    assert out["gt_levels"] == ["T12"] and inst.image_size == (H - 50, W)
    np.testing.assert_allclose(inst.gt_boxes.tensor[0].numpy(), [40, 0, 90, 50])
    assert inst.gt_masks.area()[0].item() == pytest.approx(50 * 50)
    assert out["image"].shape[1:] == (H - 50, W)


def test_polygon_clipping_keeps_the_exact_area_of_a_concave_polygon():
    from spine_d2.data.augment import ClipCropTransform

    # an L shape: 0..10 x 0..4 plus 0..4 x 4..10 (area 64); the window x >= 2, y >= 2
    ell = np.array([[0, 0], [10, 0], [10, 4], [4, 4], [4, 10], [0, 10]], dtype=np.float64)
    (clipped,) = ClipCropTransform(2, 2, 20, 20).apply_polygons([ell])
    x, y = clipped[:, 0], clipped[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    assert area == pytest.approx(8 * 2 + 2 * 6)  # (2..10 x 2..4) + (2..4 x 4..10), shifted
    assert x.min() == 0 and y.min() == 0  # in the crop's frame
    assert ClipCropTransform(50, 50, 10, 10).apply_polygons([ell]) == []


def test_input_crop_from_config_cuts_heights_only_with_relative_range(record):
    from spine_d2.data.augment import ClipCropTransform, build_xray_augmentations

    cfg = _cfg()
    assert not any(isinstance(a, T.RandomCrop) for a in build_xray_augmentations(cfg, True))
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "relative_range"
    cfg.INPUT.CROP.SIZE = [0.5, 1.0]
    augs = build_xray_augmentations(cfg, True)
    assert isinstance(augs[0], T.RandomCrop)  # first, on the scan as read
    assert not any(isinstance(a, T.RandomCrop) for a in build_xray_augmentations(cfg, False))
    np.random.seed(0)
    heights = set()
    for _ in range(20):
        t = augs[0].get_transform(np.zeros((200, 80), np.float32))
        assert isinstance(t, ClipCropTransform) and t.w == 80 and t.x0 == 0
        assert 100 <= t.h <= 200 and 0 <= t.y0 <= 200 - t.h
        heights.add(t.h)
    assert len(heights) > 5


def test_truncated_comes_from_the_flag_or_from_a_border_the_augmentation_cut(record):
    from spine_d2.data.augment import ClipCropTransform

    record["annotations"][1]["truncated"] = True  # the no-level box, inside the scan
    out = _mapper([])(record)
    assert out["instances"].gt_truncated.tolist() == [False, True]
    # the crop starts at row 50: RECT (rows 30-100) now touches the top border
    del record["annotations"][1]["truncated"]
    cropped = _mapper([ClipCropTransform(0, 50, W, H - 50)])(record)
    assert cropped["instances"].gt_truncated.tolist() == [True]
    uncut = _mapper([ClipCropTransform(0, 2, W, H - 2)])(record)  # both stay 3+ px inside
    assert uncut["instances"].gt_truncated.tolist() == [False, False]
