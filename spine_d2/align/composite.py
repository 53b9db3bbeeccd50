"""Composite registered high-dose vertebrae into the low-dose scan.

Each reliable vertebra is warped into the low-dose frame (bilinear, sub-pixel), its intensities
are mapped onto the low-dose scan's (a gain/offset fitted over the mask, plus a smooth local
correction: the vertebra moved over soft tissue and scatter differs between the scans, so the
background under it differs slowly), and it is blended in with a feathered edge centred on the
mask outline. Pixels farther than ``feather_px / 2`` outside every warped mask are copied from
the low-dose scan unchanged, and the output keeps the low-dose scan's dtype.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

__all__ = ["composite", "side_by_side"]

logger = logging.getLogger(__name__)


def _h(m):
    return np.vstack([np.asarray(m, np.float64), [0.0, 0.0, 1.0]])


def _dest_box(mask_a, origin_a, m_ab, pad, shape):
    ys, xs = np.nonzero(mask_a)
    pts = np.array(
        [[xs.min(), ys.min()], [xs.max() + 1, ys.min()], [xs.min(), ys.max() + 1]]
        + [[xs.max() + 1, ys.max() + 1]],
        np.float64,
    ) + np.asarray(origin_a)
    w = pts @ m_ab[:, :2].T + m_ab[:, 2]
    x0 = max(int(np.floor(w[:, 0].min())) - pad, 0)
    y0 = max(int(np.floor(w[:, 1].min())) - pad, 0)
    x1 = min(int(np.ceil(w[:, 0].max())) + pad + 1, shape[1])
    y1 = min(int(np.ceil(w[:, 1].max())) + pad + 1, shape[0])
    return x0, y0, x1, y1


def _normalized_smooth(values, weight, sigma):
    """Gaussian average of ``values`` over the pixels where ``weight`` > 0 (normalized conv.)."""
    num = cv2.GaussianBlur((values * weight).astype(np.float32), (0, 0), sigma)
    den = cv2.GaussianBlur(weight.astype(np.float32), (0, 0), sigma)
    return num / np.maximum(den, 1e-6)


def composite(
    low_pixels: np.ndarray,
    high_pixels: np.ndarray,
    items: list,
    *,
    feather_px: float = 3.0,
    local_sigma_px: float = 6.0,
    adaptive: bool = True,
    guided_radius: int = 2,
    guided_eps: float = 1e-3,
) -> np.ndarray:
    """Enhanced scan in ``low_pixels``' dtype.

    ``items``: (mask_a bool crop, origin_a (x, y), matrix 2x3 A->B) per vertebra to composite.
    ``local_sigma_px`` = 0 keeps only the per-vertebra gain/offset. ``adaptive`` weighs the
    composite per vertebra by how its misfit compares with the low-dose noise (see
    ``_wiener_weight``); off, every reliable vertebra replaces the low-dose pixels fully.

    ``guided_radius`` > 0 (default): the composite is not pasted but used as the *guide* of a
    guided filter (He et al.) of the low-dose scan inside the masks. Pasting brings along the
    ribs and soft tissue that sat behind the vertebra at the high-dose pose, which do not move
    with it; the guided filter keeps only structure that the low-dose scan confirms locally
    (window radius ``guided_radius``, regularization ``guided_eps`` in [0, 1] intensity units)
    and replaces the rest by local means, i.e. removes the grain. ``adaptive`` is then unused.
    """
    if low_pixels.ndim != 2 or high_pixels.ndim != 2:
        raise ValueError("composite works on single-channel scans")
    low = _finite(low_pixels.astype(np.float32))
    high = _finite(high_pixels.astype(np.float32))
    acc_v = np.zeros_like(low)
    acc_w = np.zeros_like(low)
    half = feather_px / 2.0
    pad = int(np.ceil(half)) + 2
    for mask_a, origin_a, m_ab in items:
        m_ab = np.asarray(m_ab, np.float64)
        x0, y0, x1, y1 = _dest_box(mask_a, origin_a, m_ab, pad, low.shape)
        if x1 <= x0 or y1 <= y0:
            continue
        to_box = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64)
        from_crop = np.array([[1, 0, origin_a[0]], [0, 1, origin_a[1]], [0, 0, 1]], np.float64)
        size = (x1 - x0, y1 - y0)
        warped = cv2.warpAffine(
            high,
            (to_box @ _h(m_ab))[:2],
            size,
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        soft = cv2.warpAffine(
            mask_a.astype(np.float32),
            (to_box @ _h(m_ab) @ from_crop)[:2],
            size,
            flags=cv2.INTER_LINEAR,
        )
        inside = (soft >= 0.5).astype(np.uint8)
        if not inside.any():
            continue
        # Signed distance to the outline: weight 0.5 on it, 1 at half a feather inside, 0 outside.
        d_in = cv2.distanceTransform(inside, cv2.DIST_L2, 5)
        d_out = cv2.distanceTransform(1 - inside, cv2.DIST_L2, 5)
        signed = np.where(inside > 0, d_in - 0.5, 0.5 - d_out)
        weight = (
            np.clip(0.5 + signed / max(feather_px, 1e-6), 0.0, 1.0)
            if feather_px > 0
            else (inside.astype(np.float32))
        )
        lowbox = low[y0:y1, x0:x1]
        sel = inside > 0
        hv, lv = warped[sel].astype(np.float64), lowbox[sel].astype(np.float64)
        var = hv.var()
        gain = ((hv - hv.mean()) * (lv - lv.mean())).mean() / var if var > 0 else 1.0
        if not np.isfinite(gain) or gain <= 0:
            gain = 1.0
        matched = (warped - hv.mean()) * gain + lv.mean()
        if local_sigma_px > 0:
            resid = lowbox - matched
            matched = matched + _normalized_smooth(resid, inside.astype(np.float32), local_sigma_px)
        if adaptive and guided_radius <= 0:
            weight = weight * _wiener_weight(lowbox, matched, sel)
        acc_v[y0:y1, x0:x1] += weight * matched
        acc_w[y0:y1, x0:x1] += weight
    out = low_pixels.copy()
    touched = acc_w > 0
    if not touched.any():
        return out
    wsum = acc_w[touched]
    value = acc_v[touched] / wsum
    alpha = np.minimum(wsum, 1.0)
    if guided_radius > 0:
        scale = float(np.iinfo(out.dtype).max) if np.issubdtype(out.dtype, np.integer) else 1.0
        guide = low.copy()
        guide[touched] = value
        filtered = _guided_filter(guide / scale, low / scale, guided_radius, guided_eps) * scale
        value = filtered[touched]
    blended = alpha * value + (1 - alpha) * low[touched]
    if np.issubdtype(out.dtype, np.integer):
        info = np.iinfo(out.dtype)
        blended = np.clip(np.rint(blended), info.min, info.max)
    out[touched] = blended.astype(out.dtype)
    if out.dtype.kind == "f":  # a float scan's NaN / inf pixels held no value: they stay so
        held_none = ~np.isfinite(low_pixels)
        out[held_none] = low_pixels[held_none]
    return out


def _finite(img: np.ndarray) -> np.ndarray:
    """``img`` with NaN / inf (float scans may hold them) replaced by the median of the rest,
    so that gains, box filters and blends stay finite around them."""
    bad = ~np.isfinite(img)
    if not bad.any():
        return img
    img = img.copy()
    img[bad] = float(np.median(img[~bad])) if (~bad).any() else 0.0
    return img


def _box(x: np.ndarray, r: int) -> np.ndarray:
    return cv2.boxFilter(x, -1, (2 * r + 1, 2 * r + 1), borderType=cv2.BORDER_REFLECT)


def _guided_filter(guide: np.ndarray, src: np.ndarray, r: int, eps: float) -> np.ndarray:
    """He, Sun, Tang: guided image filtering (ECCV 2010), gray guide, box windows."""
    guide, src = guide.astype(np.float32), src.astype(np.float32)
    m_i, m_p = _box(guide, r), _box(src, r)
    cov = _box(guide * src, r) - m_i * m_p
    var = _box(guide * guide, r) - m_i * m_i
    a = cov / (var + eps)
    b = m_p - a * m_i
    return _box(a, r) * guide + _box(b, r)


def _noise_var(img: np.ndarray, sel: np.ndarray) -> float:
    """White-noise variance from the Laplacian-like operator of Immerkaer (1996); structure
    inflates it a little, which errs towards compositing."""
    k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    r = cv2.filter2D(img.astype(np.float32), -1, k, borderType=cv2.BORDER_REFLECT)
    sigma = np.sqrt(np.pi / 2) * float(np.abs(r[sel]).mean()) / 6.0
    return sigma * sigma


def _wiener_weight(low: np.ndarray, matched: np.ndarray, sel: np.ndarray) -> float:
    """Blend weight of the composite: two estimates of the same pixels, the low-dose scan
    (error = noise, variance n) and the warped high-dose vertebra (error = misfit: the static
    anatomy that did not move with the vertebra, overlapping neighbours, variance m), combine
    with least error at weight n / (n + m). Where the low-dose noise dominates (real low-dose
    scans) it is ~1; where the scan is nearly clean it stops the composite from doing harm."""
    n = _noise_var(low, sel)
    d = (low - matched)[sel].astype(np.float64)
    m = max(float(d.var()) - n, 0.0)
    return float(n / (n + m)) if n + m > 0 else 1.0


def _to8(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    img = np.nan_to_num(img.astype(np.float32), nan=lo, posinf=hi, neginf=lo)  # float scans
    return np.clip((img - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255).astype(np.uint8)


def side_by_side(low_pixels: np.ndarray, enhanced: np.ndarray, outlines=()) -> np.ndarray:
    """8-bit [low-dose | enhanced] on one window (0.5-99.5 percentiles of the low-dose scan);
    ``outlines``: boolean full-size masks drawn in yellow on the enhanced half."""
    finite = low_pixels[np.isfinite(low_pixels)]  # a float scan may hold NaN (read_scan)
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    a, b = _to8(low_pixels, lo, hi), _to8(enhanced, lo, hi)
    left = cv2.cvtColor(a, cv2.COLOR_GRAY2BGR)
    right = cv2.cvtColor(b, cv2.COLOR_GRAY2BGR)
    for m in outlines:
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(right, contours, -1, (0, 220, 255), 1)
    gap = np.full((left.shape[0], 4, 3), 255, np.uint8)
    return np.hstack([left, gap, right])
