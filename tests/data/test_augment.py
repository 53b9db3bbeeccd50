"""X-ray augmentations: geometry moves annotations exactly, photometry leaves them alone."""

import copy

import cv2
import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.structures.masks import polygons_to_bitmask

from spine_d2.config import add_spine_config
from spine_d2.data.augment import (
    CLAHETransform,
    GammaTransform,
    GaussianBlurTransform,
    InvertTransform,
    LowDoseNoiseTransform,
    RandomLowDose,
    RandomScaleJitter,
    WindowTransform,
    build_xray_augmentations,
)

H = W = 128
RECT = (40.0, 30.0, 90.0, 100.0)  # x0, y0, x1, y1: a vertebra-sized box in a 128x128 scan

PHOTOMETRIC = {
    "low_dose": LowDoseNoiseTransform(0.1, 20000.0, 5.0, 5.0, seed=3),
    "clahe": CLAHETransform(2.0, 8),
    "gamma": GammaTransform(1.4),
    "window": WindowTransform(0.1, 0.8),
    "blur": GaussianBlurTransform(1.0),
    "invert": InvertTransform(),
}


def _corners(rect):
    x0, y0, x1, y1 = rect
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _annotation(rect=RECT, level="T12"):
    x0, y0, x1, y1 = rect
    return {
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": 0,
        "segmentation": [_corners(rect).ravel().tolist()],
        "level": level,
    }


def _rect_image(rect=RECT, h=H, w=W):
    """Background 0.2, the rectangle's pixels (continuous area [x0,x1]x[y0,y1]) at 0.8."""
    img = np.full((h, w), 0.2, np.float32)
    x0, y0, x1, y1 = (int(v) for v in rect)
    img[y0:y1, x0:x1] = 0.8
    return img


def _rotated_rect_mask(rect, angle, h, w, bh, bw):
    """By hand: pixels of the (bh, bw) canvas whose centres (i + 0.5) rotate back into ``rect``."""
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    yy, xx = np.mgrid[0:bh, 0:bw] + 0.5
    dx, dy = xx - bw / 2, yy - bh / 2
    ox, oy = c * dx - s * dy + w / 2, s * dx + c * dy + h / 2
    x0, y0, x1, y1 = rect
    return (ox >= x0) & (ox <= x1) & (oy >= y0) & (oy <= y1)


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_rotation_moves_polygon_and_mask_exactly():
    angle = 25.0
    tfm = T.RotationTransform(H, W, angle, expand=True)
    # By hand: counter-clockwise (as displayed, y down) about the image centre, then shifted so
    # that the centre lands at the centre of the enlarged canvas.
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    bw = int(np.rint(H * abs(s) + W * abs(c)))
    bh = int(np.rint(H * abs(c) + W * abs(s)))
    d = _corners(RECT) - [W / 2, H / 2]
    expected = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], 1)
    expected += [bw / 2, bh / 2]

    anno = utils.transform_instance_annotations(
        copy.deepcopy(_annotation()), T.TransformList([tfm]), (bh, bw)
    )
    got = np.asarray(anno["segmentation"][0]).reshape(-1, 2)
    np.testing.assert_allclose(got, expected, atol=1e-6)

    mask = polygons_to_bitmask(anno["segmentation"], bh, bw)
    assert _iou(mask, _rotated_rect_mask(RECT, angle, H, W, bh, bw)) > 0.98
    # The image turns with the mask: the bright rectangle lands on the rotated polygon.
    rotated = tfm.apply_image(_rect_image())
    assert rotated.shape == (bh, bw)
    assert _iou(rotated > 0.5, mask) > 0.95


def test_hflip_maps_x_to_width_minus_x():
    tfm = T.RandomFlip(prob=1.0, horizontal=True).get_transform(np.zeros((H, W), np.float32))
    anno = utils.transform_instance_annotations(
        copy.deepcopy(_annotation()), T.TransformList([tfm]), (H, W)
    )
    pts = np.asarray(anno["segmentation"][0]).reshape(-1, 2)
    expected = _corners(RECT)
    expected[:, 0] = W - expected[:, 0]
    np.testing.assert_array_equal(pts, expected)
    x0, y0, x1, y1 = RECT
    np.testing.assert_array_equal(anno["bbox"], [W - x1, y0, W - x0, y1])
    flipped = tfm.apply_image(_rect_image())
    assert _iou(flipped > 0.5, polygons_to_bitmask(anno["segmentation"], H, W)) > 0.99


def test_scale_jitter_scales_image_and_coords_together():
    np.random.seed(0)
    tfm = RandomScaleJitter((1.3, 1.3)).get_transform(np.zeros((H, W), np.float32))
    new_h, new_w = int(H * 1.3 + 0.5), int(W * 1.3 + 0.5)
    anno = utils.transform_instance_annotations(
        copy.deepcopy(_annotation()), T.TransformList([tfm]), (new_h, new_w)
    )
    pts = np.asarray(anno["segmentation"][0]).reshape(-1, 2)
    np.testing.assert_allclose(pts, _corners(RECT) * [new_w / W, new_h / H])
    scaled = tfm.apply_image(_rect_image())
    assert scaled.shape == (new_h, new_w) and scaled.dtype == np.float32
    mask = polygons_to_bitmask(anno["segmentation"], new_h, new_w)
    assert _iou(scaled > 0.5, mask) > 0.97


@pytest.mark.parametrize("name", sorted(PHOTOMETRIC))
def test_photometric_transform_changes_image_not_annotations(name):
    tfm = PHOTOMETRIC[name]
    image = _rect_image()
    out = tfm.apply_image(image)
    assert out.shape == image.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert np.abs(out - image).mean() > 1e-3
    np.testing.assert_array_equal(tfm.apply_image(image), out)  # deterministic
    anno = utils.transform_instance_annotations(
        copy.deepcopy(_annotation()), T.TransformList([tfm]), (H, W)
    )
    np.testing.assert_array_equal(anno["segmentation"][0], _corners(RECT).ravel())
    x0, y0, x1, y1 = RECT
    np.testing.assert_array_equal(anno["bbox"], [x0, y0, x1, y1])
    seg = np.zeros((H, W), np.uint8)
    seg[5:9, 5:9] = 1
    np.testing.assert_array_equal(tfm.apply_segmentation(seg), seg)


def test_photometric_transform_rejects_integer_images():
    with pytest.raises(TypeError, match="float image"):
        GammaTransform(1.2).apply_image(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("v", [0.3, 0.6])
def test_low_dose_variance_matches_delta_method(v):
    photons, mu, sigma_e = 20000.0, 5.0, 5.0
    flat = np.full((128, 128), v, np.float32)
    variances = []
    for dose in (0.5, 0.2, 0.05):
        out = LowDoseNoiseTransform(dose, photons, mu, sigma_e, seed=11).apply_image(flat)
        # Var[-log I'] ~ Var[I'] / I^2 with Var[I'] = I (Poisson) + sigma_e^2 (electronics).
        i = photons * dose * np.exp(-v * mu)
        predicted = (i + sigma_e**2) / i**2 / mu**2
        assert out.var() == pytest.approx(predicted, rel=0.1)
        assert out.mean() == pytest.approx(v, abs=0.01)  # noise, not a brightness change
        variances.append(out.var())
    assert variances[0] < variances[1] < variances[2]  # lower dose, more grain


def test_low_dose_grain_is_stronger_where_the_body_is_thick():
    tfm = LowDoseNoiseTransform(0.1, 20000.0, 5.0, 5.0, seed=0)
    thin = tfm.apply_image(np.full((64, 64), 0.2, np.float32)).var()
    thick = tfm.apply_image(np.full((64, 64), 0.8, np.float32)).var()
    assert thick > 10 * thin


def test_random_low_dose_samples_new_noise_but_each_transform_is_fixed():
    np.random.seed(0)
    aug = RandomLowDose((0.05, 0.5), 20000.0, 5.0, 5.0)
    img = _rect_image()
    t1, t2 = aug.get_transform(img), aug.get_transform(img)
    assert 0.05 <= t1.dose <= 0.5
    assert not np.array_equal(t1.apply_image(img), t2.apply_image(img))
    np.testing.assert_array_equal(t1.apply_image(img), t1.apply_image(img))


def test_clahe_matches_opencv_and_keeps_precision():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    smooth = 0.3 + 0.3 * np.exp(-((xx - 64) ** 2) / 400.0) + 0.05 * np.sin(yy / 9.0)
    noisy = np.clip(smooth + rng.normal(0, 0.02, smooth.shape), 0, 1)
    u8 = np.round(noisy * 255).astype(np.uint8)
    for clip in (1.0, 3.0):
        ref = cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8)).apply(u8).astype(np.float64)
        ours = CLAHETransform(clip, 8).apply_image(u8.astype(np.float32) / 255) * 255
        assert np.abs(ours - ref).max() <= 1.0  # OpenCV rounds its mappings to integers
    low = CLAHETransform(1.0, 8).apply_image(smooth.astype(np.float32))
    high = CLAHETransform(3.0, 8).apply_image(smooth.astype(np.float32))
    assert np.abs(high - low).mean() > 0.01  # the clip limit matters
    assert len(np.unique(low)) > 1024  # not quantized to 8 bits


def _cfg(**xray):
    cfg = get_cfg()
    add_spine_config(cfg)
    for key, value in xray.items():
        cfg.INPUT.XRAY[key].ENABLED = value
    return cfg


def test_build_xray_augmentations_follows_config():
    train = build_xray_augmentations(_cfg(), is_train=True)
    assert isinstance(train[0], T.ResizeShortestEdge)
    names = [type(a).__name__ for a in train]
    assert "RandomRotation" in names and "RandomFlip" in names
    assert "RandomScaleJitter" in names
    wrapped = [type(a.aug).__name__ for a in train if isinstance(a, T.RandomApply)]
    assert "RandomLowDose" in wrapped and "RandomCLAHE" in wrapped
    assert not any("Invert" in n for n in wrapped)  # INVERT is off by default

    off = dict.fromkeys(
        ["LOW_DOSE", "CLAHE", "GAMMA", "WINDOW", "BLUR", "INVERT", "ROTATION", "SCALE_JITTER"],
        False,
    )
    bare = build_xray_augmentations(_cfg(HFLIP=False, **off), is_train=True)
    assert [type(a) for a in bare] == [T.ResizeShortestEdge]

    test = build_xray_augmentations(_cfg(), is_train=False)
    assert len(test) == 1 and isinstance(test[0], T.ResizeShortestEdge)
    assert test[0].get_transform(np.zeros((100, 150), np.float32)).new_h == 800


def test_equalize_is_the_same_fixed_clahe_in_training_and_inference():
    cfg = _cfg()
    cfg.INPUT.XRAY.EQUALIZE.ENABLED = True
    cfg.INPUT.XRAY.EQUALIZE.CLIP_LIMIT = 2.5
    train = build_xray_augmentations(cfg, is_train=True)
    test = build_xray_augmentations(cfg, is_train=False)
    for augs in (train, test):  # right after the resize, before any rotation adds canvas
        assert isinstance(augs[0], T.ResizeShortestEdge)
        assert isinstance(augs[1], CLAHETransform)
        assert (augs[1].clip_limit, augs[1].tile_grid) == (2.5, 8)
    assert len(test) == 2
    # a dim, low-contrast film comes out stretched, the same way every time
    rng = np.random.default_rng(0)
    img = (0.4 + 0.1 * rng.random((H, W))).astype(np.float32)
    aug_input = T.AugInput(img.copy())
    T.AugmentationList(test)(aug_input)
    out = aug_input.image
    assert out.std() > 2 * img.std()
    again = T.AugInput(img.copy())
    T.AugmentationList(test)(again)
    np.testing.assert_array_equal(again.image, out)
