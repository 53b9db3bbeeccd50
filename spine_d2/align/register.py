"""Per-vertebra 2D similarity (rotation, translation, uniform scale) from high-dose to low-dose.

Initialised from mask geometry (centroids, principal axes, area ratio), then refined on
intensities by inverse-compositional Gauss-Newton (Baker & Matthews) with a per-iteration
gain/offset fit, i.e. an NCC-equivalent criterion. Inverse compositional puts the image
gradient on the *template*, the clean high-dose vertebra: the low-dose noise then enters only
the residual (zero-mean, averaged over thousands of pixels) and never the Jacobian, which is
what keeps the fit accurate at 5 % dose. The Hessian is computed once per level, so an
iteration costs one small warpAffine and a few vector products (a few ms per vertebra).

Convention: ``matrix`` (2x3) maps a point of the high-dose scan (pose A) onto the low-dose
scan (pose B): ``x_B = M @ [x_A, y_A, 1]``, as ``transforms_A_to_B`` in the built-in pairs.json.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["Registration", "similarity_matrix", "decompose", "init_from_masks", "register_vertebra"]

logger = logging.getLogger(__name__)

# Beyond these the fit is not a vertebra moving between two scans of one patient.
MAX_ROTATION_DEG = 30.0
SCALE_RANGE = (0.75, 1.33)
MIN_MASK_IOU = 0.5
MIN_NCC = 0.2


@dataclass
class Registration:
    matrix: np.ndarray  # 2x3, high-dose (A) -> low-dose (B) pixels
    quality: float  # NCC between the warped low-dose and the high-dose vertebra, in the mask
    mask_iou: float  # IoU of the warped high-dose mask with the low-dose mask
    reliable: bool
    reason: str = ""  # why it is not reliable ("" when it is)
    iterations: int = 0
    ms: float = 0.0

    @property
    def params(self) -> dict:
        return decompose(self.matrix)


def similarity_matrix(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    c, s = scale * math.cos(a), scale * math.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]], dtype=np.float64)


def decompose(m) -> dict:
    """scale, angle_deg (atan2(m10, m00), as pairs.json), tx, ty of a 2x3 similarity."""
    m = np.asarray(m, dtype=np.float64)
    return {
        "scale": float(math.hypot(m[0, 0], m[1, 0])),
        "angle_deg": float(math.degrees(math.atan2(m[1, 0], m[0, 0]))),
        "tx": float(m[0, 2]),
        "ty": float(m[1, 2]),
    }


def _h(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


def _moments(mask: np.ndarray, origin) -> tuple:
    """(centroid xy in scan pixels, principal-axis angle in degrees or None, area)."""
    m = cv2.moments(mask.astype(np.uint8), binaryImage=True)
    area = m["m00"]
    if area <= 0:
        return None, None, 0.0
    cx, cy = m["m10"] / area + origin[0], m["m01"] / area + origin[1]
    mu20, mu02, mu11 = m["mu20"] / area, m["mu02"] / area, m["mu11"] / area
    spread = math.hypot(mu20 - mu02, 2 * mu11)
    # A near-round mask has no stable principal axis: its angle would be noise.
    angle = (
        None
        if spread < 0.15 * (mu20 + mu02)
        else 0.5 * math.degrees(math.atan2(2 * mu11, mu20 - mu02))
    )
    return (cx, cy), angle, area


def init_from_masks(mask_a, origin_a, mask_b, origin_b) -> np.ndarray:
    """Similarity from mask geometry: centroids, principal axes (mod 180) and sqrt(area ratio)."""
    ca, ang_a, area_a = _moments(mask_a, origin_a)
    cb, ang_b, area_b = _moments(mask_b, origin_b)
    if ca is None or cb is None:
        raise ValueError("empty mask")
    scale = math.sqrt(area_b / area_a)
    scale = min(max(scale, SCALE_RANGE[0]), SCALE_RANGE[1])
    rot = 0.0
    if ang_a is not None and ang_b is not None:
        rot = (ang_b - ang_a + 90.0) % 180.0 - 90.0
        if abs(rot) > MAX_ROTATION_DEG:  # axes of a squat vertebra swap: trust intensities
            rot = 0.0
    m = similarity_matrix(scale, rot, 0.0, 0.0)
    m[:, 2] = np.asarray(cb) - m[:, :2] @ np.asarray(ca)
    return m


class _Template:
    """The high-dose vertebra at one smoothing level: pixels, weights, steepest descent, H^-1."""

    def __init__(self, image_a: np.ndarray, weight: np.ndarray, x0: int, y0: int, centre):
        h, w = weight.shape
        self.x0, self.y0, self.shape = x0, y0, (h, w)
        self.centre = np.asarray(centre, dtype=np.float64)
        patch = image_a[y0 : y0 + h, x0 : x0 + w]
        gy, gx = np.gradient(patch)
        yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
        sel = weight > 0
        self.sel = sel
        self.w = weight[sel].astype(np.float64)
        self.t = patch[sel].astype(np.float64)
        x = xx[sel] - self.centre[0]
        y = yy[sel] - self.centre[1]
        gx, gy = gx[sel].astype(np.float64), gy[sel].astype(np.float64)
        # Warp p = (a, b, tx, ty): [[1+a, -b, tx], [b, 1+a, ty]] about the centre.
        self.sd = np.stack([gx * x + gy * y, -gx * y + gy * x, gx, gy], axis=1)
        hess = (self.sd * self.w[:, None]).T @ self.sd
        self.hinv = np.linalg.inv(hess + 1e-9 * np.eye(4) * np.trace(hess))
        self.radius = float(np.sqrt(np.max(x**2 + y**2)))

    def sample(self, image_b: np.ndarray, m_ab: np.ndarray) -> np.ndarray:
        """Low-dose values at M(x) for the template pixels x (bilinear, sub-pixel)."""
        to_crop = np.array([[1, 0, self.x0], [0, 1, self.y0], [0, 0, 1]], dtype=np.float64)
        m = (_h(m_ab) @ to_crop)[:2]
        out = cv2.warpAffine(
            image_b,
            m,
            (self.shape[1], self.shape[0]),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=float("nan"),
        )
        return out[self.sel].astype(np.float64)


def _ncc(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> float:
    sw = w.sum()
    a = a - (w * a).sum() / sw
    b = b - (w * b).sum() / sw
    den = math.sqrt((w * a * a).sum() * (w * b * b).sum())
    return float((w * a * b).sum() / den) if den > 0 else 0.0


def _refine(tpl: _Template, image_b, m_ab, max_iter: int, tol_px: float, photometric=True):
    """IC Gauss-Newton; returns (matrix, iterations, diverged)."""
    c = tpl.centre
    centre_h = np.array([[1, 0, c[0]], [0, 1, c[1]], [0, 0, 1]], dtype=np.float64)
    # Parametrise around the centre: M_ab = P @ C^-1, P maps centred template coords to B.
    p_mat = _h(m_ab) @ centre_h
    it = 0
    for it in range(1, max_iter + 1):
        vals = tpl.sample(image_b, (p_mat @ np.linalg.inv(centre_h))[:2])
        ok = np.isfinite(vals)
        if ok.mean() < 0.6:
            return (p_mat @ np.linalg.inv(centre_h))[:2], it, True
        w = tpl.w * ok
        v = np.where(ok, vals, 0.0)
        # Gain/offset of low vs high in the mask: the residual is then NCC's, not raw SSD.
        sw = w.sum()
        mt, mv = (w * tpl.t).sum() / sw, (w * v).sum() / sw
        vt = (w * (tpl.t - mt) ** 2).sum()
        gain = (w * (tpl.t - mt) * (v - mv)).sum() / max(vt, 1e-12) if photometric else 1.0
        if not photometric:
            mt = mv = 0.0
        if not np.isfinite(gain) or abs(gain) < 1e-6:
            return (p_mat @ np.linalg.inv(centre_h))[:2], it, True
        err = (v - mv) / gain + mt - tpl.t
        dp = tpl.hinv @ ((tpl.sd * (w * err)[:, None]).sum(axis=0))
        if not np.all(np.isfinite(dp)):
            return (p_mat @ np.linalg.inv(centre_h))[:2], it, True
        a, b, tx, ty = dp
        d_mat = np.array([[1 + a, -b, tx], [b, 1 + a, ty], [0, 0, 1]], dtype=np.float64)
        p_mat = p_mat @ np.linalg.inv(d_mat)
        step = math.hypot(a, b) * tpl.radius + math.hypot(tx, ty)  # largest pixel move
        if step < tol_px:
            break
    return (p_mat @ np.linalg.inv(centre_h))[:2], it, False


def _mask_iou(mask_a, origin_a, mask_b, origin_b, m_ab) -> float:
    """IoU in B's frame of the warped A mask with the B mask, over their joint box."""
    ys, xs = np.nonzero(mask_a)
    corners = np.array(
        [
            [xs.min(), ys.min()],
            [xs.max() + 1, ys.min()],
            [xs.min(), ys.max() + 1],
            [xs.max() + 1, ys.max() + 1],
        ],
        dtype=np.float64,
    ) + np.asarray(origin_a)
    warped = corners @ m_ab[:, :2].T + m_ab[:, 2]
    hb, wb = mask_b.shape
    x0 = int(min(np.floor(warped[:, 0].min()), origin_b[0])) - 1
    y0 = int(min(np.floor(warped[:, 1].min()), origin_b[1])) - 1
    x1 = int(max(np.ceil(warped[:, 0].max()), origin_b[0] + wb)) + 1
    y1 = int(max(np.ceil(warped[:, 1].max()), origin_b[1] + hb)) + 1
    if (x1 - x0) * (y1 - y0) > 4e7:
        return 0.0
    # Crop-of-A pixel -> box-of-B pixel: T(-x0,-y0) @ M @ T(origin_a).
    m = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], float) @ _h(m_ab)
    m = (m @ np.array([[1, 0, origin_a[0]], [0, 1, origin_a[1]], [0, 0, 1]], float))[:2]
    wa = cv2.warpAffine(mask_a.astype(np.uint8), m, (x1 - x0, y1 - y0), flags=cv2.INTER_NEAREST)
    bb = np.zeros_like(wa)
    bb[origin_b[1] - y0 : origin_b[1] - y0 + hb, origin_b[0] - x0 : origin_b[0] - x0 + wb] = mask_b
    inter = np.count_nonzero(wa & bb)
    union = np.count_nonzero(wa | bb)
    return inter / union if union else 0.0


def _sdf(mask: np.ndarray, pad: int, clip: float) -> np.ndarray:
    """Signed distance to the outline (positive inside), clipped: a smooth, sub-pixel picture
    of the mask shape alone, blind to whatever else the intensities contain."""
    m = np.pad(mask.astype(np.uint8), pad)
    d_in = cv2.distanceTransform(m, cv2.DIST_L2, 5)
    d_out = cv2.distanceTransform(1 - m, cv2.DIST_L2, 5)
    return np.clip(np.where(m > 0, d_in - 0.5, 0.5 - d_out), -clip, clip).astype(np.float32)


def _t(x, y) -> np.ndarray:
    return np.array([[1, 0, x], [0, 1, y], [0, 0, 1]], dtype=np.float64)


def register_masks(
    mask_a,
    origin_a,
    mask_b,
    origin_b,
    m_ab,
    band_px: int = 6,
    max_iter=30,
    shape_a=None,
    shape_b=None,
):
    """Refine ``m_ab`` so the outlines of the two masks coincide (signed-distance maps).

    Returns (matrix, iterations, diverged). Intensities inside a projected vertebra also hold
    ribs, soft tissue and overlapping neighbours that do not move with it; the outline does.
    Where a mask is cut by the image border (``shape_a/b``: scan height, width) the cut is not
    an outline: that part of the band is left out on either side.
    """
    pad = band_px + 2
    sa, sb = _sdf(mask_a, pad, band_px), _sdf(mask_b, pad, band_px)
    # Crop coordinates: x_crop_a = x_a - (origin_a - pad); same for b.
    oa = (origin_a[0] - pad, origin_a[1] - pad)
    ob = (origin_b[0] - pad, origin_b[1] - pad)
    m_crop = (_t(-ob[0], -ob[1]) @ _h(m_ab) @ _t(*oa))[:2]
    weight = (np.abs(sa) < band_px).astype(np.float32)
    yy, xx = np.mgrid[0 : sa.shape[0], 0 : sa.shape[1]].astype(np.float64)
    xa, ya = xx + oa[0], yy + oa[1]
    keep = np.ones_like(weight, dtype=bool)
    margin = band_px + 1
    if shape_a is not None:
        keep &= (xa >= margin) & (ya >= margin)
        keep &= (xa < shape_a[1] - margin) & (ya < shape_a[0] - margin)
    if shape_b is not None:
        xb = m_ab[0, 0] * xa + m_ab[0, 1] * ya + m_ab[0, 2]
        yb = m_ab[1, 0] * xa + m_ab[1, 1] * ya + m_ab[1, 2]
        keep &= (xb >= margin) & (yb >= margin)
        keep &= (xb < shape_b[1] - margin) & (yb < shape_b[0] - margin)
    if np.count_nonzero(weight * keep) >= 0.3 * np.count_nonzero(weight):
        weight = weight * keep  # else too little outline is left: use it all, flagged by IoU
    centre, _, _ = _moments(mask_a, (pad, pad))
    tpl = _Template(sa, weight, 0, 0, centre)
    m_crop, it, diverged = _refine(tpl, sb, m_crop, max_iter, 0.005, photometric=False)
    return (_t(*ob) @ _h(m_crop) @ _t(-oa[0], -oa[1]))[:2], it, diverged


def register_vertebra(
    image_a: np.ndarray,
    mask_a: np.ndarray,
    origin_a,
    image_b: np.ndarray,
    mask_b: np.ndarray,
    origin_b,
    *,
    use_masks: bool = True,
    smooth_sigmas=(),
    margin_px: int = 3,
    max_iter: int = 40,
    tol_px: float = 0.01,
    init: np.ndarray | None = None,
    smoothed_a: dict | None = None,
    smoothed_b: dict | None = None,
) -> Registration:
    """Register one vertebra: ``mask_*`` are boolean crops whose top-left is ``origin_*`` (x, y)
    in the float images ``image_*`` (same intensity polarity, any range).

    ``smooth_sigmas`` is the coarse-to-fine schedule (Gaussian sigma per stage; a smoothed
    stage widens the capture range against residual misfit of the mask-based start).
    ``smoothed_a/b`` cache {sigma: image} per scan so that each scan is blurred once, not per
    vertebra.
    """
    t0 = time.perf_counter()
    origin_a = (int(origin_a[0]), int(origin_a[1]))
    origin_b = (int(origin_b[0]), int(origin_b[1]))
    m0 = init_from_masks(mask_a, origin_a, mask_b, origin_b) if init is None else np.asarray(init)
    m = m0.copy()
    # Template support: the mask grown by a margin (the cortical edge is the signal), clipped.
    pad = int(margin_px)
    h, w = image_a.shape
    x0, y0 = origin_a[0] - pad, origin_a[1] - pad
    weight = np.pad(mask_a.astype(np.uint8), pad)
    if pad:
        weight = cv2.dilate(weight, np.ones((2 * pad + 1, 2 * pad + 1), np.uint8))
    weight = weight.astype(np.float32)
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + weight.shape[1], w), min(y0 + weight.shape[0], h)
    weight = weight[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    x0, y0 = cx0, cy0
    centre, _, _ = _moments(mask_a, origin_a)
    iters, diverged = 0, False
    if use_masks:
        m, iters, diverged = register_masks(
            mask_a, origin_a, mask_b, origin_b, m, shape_a=image_a.shape, shape_b=image_b.shape
        )
    for sigma in smooth_sigmas if not diverged else ():
        ia = _smoothed(image_a, sigma, smoothed_a)
        ib = _smoothed(image_b, sigma, smoothed_b)
        tpl = _Template(ia, weight, x0, y0, centre)
        m, n, diverged = _refine(tpl, ib, m, max_iter, tol_px)
        iters += n
        if diverged:
            break
    # Quality on the unsmoothed images: what the composite will actually show.
    tpl = _Template(_smoothed(image_a, 0.0, smoothed_a), weight, x0, y0, centre)
    raw_a = image_a[y0 : y0 + weight.shape[0], x0 : x0 + weight.shape[1]][tpl.sel]
    vals = tpl.sample(_smoothed(image_b, 0.0, smoothed_b), m)
    ok = np.isfinite(vals)
    quality = (
        _ncc(np.where(ok, vals, 0.0), raw_a.astype(np.float64), tpl.w * ok) if ok.any() else 0.0
    )
    iou = _mask_iou(mask_a, origin_a, mask_b, origin_b, m)
    p = decompose(m)
    reason = ""
    if diverged or not np.all(np.isfinite(m)):
        reason = "diverged"
    elif abs(p["angle_deg"]) > MAX_ROTATION_DEG:
        reason = f"rotation {p['angle_deg']:.1f} deg"
    elif not SCALE_RANGE[0] <= p["scale"] <= SCALE_RANGE[1]:
        reason = f"scale {p['scale']:.3f}"
    elif iou < MIN_MASK_IOU:
        reason = f"mask overlap {iou:.2f}"
    elif quality < MIN_NCC:
        reason = f"low correlation {quality:.2f}"
    return Registration(
        matrix=m,
        quality=float(quality),
        mask_iou=float(iou),
        reliable=not reason,
        reason=reason,
        iterations=iters,
        ms=(time.perf_counter() - t0) * 1000,
    )


def _smoothed(image: np.ndarray, sigma: float, cache: dict | None) -> np.ndarray:
    if cache is not None and sigma in cache:
        return cache[sigma]
    out = image.astype(np.float32, copy=False)
    if sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    if cache is not None:
        cache[sigma] = out
    return out
