"""Pixels, masks and coordinates of ZOIs at the original resolution."""

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.modeling.postprocessing import detector_postprocess

from spine_d2.zoi.extract import encode_png, extract_zois, rle_from_local, scale_to_original


@pytest.mark.parametrize(
    "dtype,channels", [(np.uint8, 2), (np.uint16, 2), (np.uint16, 4), (np.uint8, 1)]
)
def test_png_round_trip(dtype, channels):
    a = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, (17, 23, channels)).astype(dtype)
    b = cv2.imdecode(np.frombuffer(encode_png(a), np.uint8), cv2.IMREAD_UNCHANGED)
    assert b.dtype == dtype
    if channels == 2:  # OpenCV reads gray + alpha as BGRA
        assert np.array_equal(b[..., 0], a[..., 0]) and np.array_equal(b[..., 3], a[..., 1])
    elif channels == 4:
        assert np.array_equal(b[..., [2, 1, 0, 3]], a)
    else:
        assert np.array_equal(b, a[..., 0])


@pytest.mark.parametrize("y0,x0,h,w", [(0, 0, 5, 7), (10, 3, 6, 4), (27, 33, 5, 7), (0, 33, 32, 7)])
def test_rle_from_local_equals_pycocotools(y0, x0, h, w):
    H, W = 32, 40
    local = np.random.default_rng(y0 + x0).random((h, w)) > 0.4
    local[-1, -1] = True  # also a mask that reaches the last pixel of the image
    full = np.zeros((H, W), np.uint8)
    full[y0 : y0 + h, x0 : x0 + w] = local
    expected = mask_util.encode(np.asfortranarray(full))
    got = rle_from_local(local, y0, x0, H, W)
    assert got["counts"] == expected["counts"].decode() and got["size"] == [H, W]


@pytest.mark.parametrize("min_size,shape", [(96, (128, 160)), (200, (131, 97))])
def test_predictions_map_back_exactly_after_resize(random_model, export_cfg, min_size, shape):
    """Boxes and masks equal detectron2's own postprocess at the original size, bit for bit."""
    cfg = export_cfg("INPUT.MIN_SIZE_TEST", str(min_size), "INPUT.MAX_SIZE_TEST", "400")
    from detectron2.data import transforms as T

    h, w = shape
    image = np.random.default_rng(1).random((h, w)).astype(np.float32)
    resized = (
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        .get_transform(image)
        .apply_image(image)
    )
    assert resized.shape != image.shape
    inp = {"image": torch.from_numpy(resized * 255)[None].repeat(3, 1, 1), "height": h, "width": w}
    with torch.inference_mode():
        raw = random_model.inference([inp], do_postprocess=False)[0]
        pred = scale_to_original(raw, h, w)
        ref = detector_postprocess(raw, h, w)  # scales raw's boxes in place: after ours
    assert len(pred) == len(ref) > 0
    assert torch.equal(pred.boxes, ref.pred_boxes.tensor)
    pixels = np.arange(h * w, dtype=np.uint16).reshape(h, w)
    entries, files, _ = extract_zois(pixels, pred, zoi_dir="zoi/s", margin=3)
    # entries are in spine order: match them to detectron2's instances by score and box
    for e in entries:
        k = next(
            i
            for i in range(len(ref))
            if ref.pred_boxes.tensor[i].tolist() == pytest.approx(e["bbox_xyxy"], abs=1e-3)
        )
        assert np.array_equal(
            mask_util.decode(e["mask_rle"]), ref.pred_masks[k].numpy().astype(np.uint8)
        )
