"""Synthetic vertebrae for the alignment tests: a textured body with a bright cortical rim on
a smooth background, moved by a known similarity."""

import cv2
import numpy as np
import pytest

from spine_d2.align.register import similarity_matrix


def _vertebra_layer(size, centre, half_w, half_h, seed):
    """Float layer (0..1) and soft mask of one vertebra: rounded box, rim, inner texture."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = (xx - centre[0]) / half_w, (yy - centre[1]) / half_h
    r = (np.abs(dx) ** 4 + np.abs(dy) ** 4) ** 0.25  # superellipse: body-like, with a direction
    inside = np.clip((1.0 - r) * 12 + 0.5, 0, 1)
    rim = np.exp(-(((1.0 - r) * 12) ** 2))
    rng = np.random.default_rng(seed)
    tex = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 2.5)
    tex = (tex - tex.mean()) / (tex.std() + 1e-6)
    layer = inside * (0.35 + 0.05 * tex) + 0.3 * rim
    # A pedicle-like bright spot on one side breaks the box's symmetry.
    spot = np.exp(
        -(
            ((xx - centre[0] - 0.5 * half_w) ** 2 + (yy - centre[1] + 0.3 * half_h) ** 2)
            / (2 * (0.15 * half_w) ** 2)
        )
    )
    return layer + 0.2 * spot * inside, inside


@pytest.fixture
def make_pair():
    """Factory: (high float image, high mask, low float image, low mask, true A->B matrix)."""

    def make(size=(160, 160), angle=4.0, scale=1.03, shift=(3.3, -2.1), noise=0.0, seed=0):
        h, w = size
        centre = (w / 2, h / 2)
        layer, soft = _vertebra_layer(size, centre, w * 0.28, h * 0.2, seed)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        bg = 0.2 + 0.1 * xx / w
        m = similarity_matrix(scale, angle, 0, 0)
        m[:, 2] = np.array(centre) + np.array(shift) - m[:, :2] @ np.array(centre)
        layer_b = cv2.warpAffine(layer, m, (w, h), flags=cv2.INTER_CUBIC)
        soft_b = cv2.warpAffine(soft, m, (w, h), flags=cv2.INTER_LINEAR)
        high = (bg + layer).astype(np.float32)
        low = (bg + layer_b).astype(np.float32)
        if noise:
            low = low + np.random.default_rng(seed + 1).normal(0, noise, low.shape).astype(
                np.float32
            )
        return high, soft >= 0.5, low, soft_b >= 0.5, m

    return make


@pytest.fixture
def to_scan():
    """Factory: float image in [0, ~1] -> spine_d2 Scan of the given integer dtype."""
    from spine_d2.data.io import Scan

    def make(image, dtype=np.uint16, path="mem.png"):
        top = np.iinfo(dtype).max
        pixels = np.clip(np.rint(np.clip(image, 0, 1) * top), 0, top).astype(dtype)
        return Scan(
            path=path,
            pixels=pixels,
            image=pixels.astype(np.float32) / top,
            bit_depth=8 * np.dtype(dtype).itemsize,
            meta={"format": "png"},
        )

    return make
