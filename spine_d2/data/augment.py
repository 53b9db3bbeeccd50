"""X-ray augmentations as detectron2 Augmentations that return deterministic Transforms.

All of them work on the mapper's image: float32 HxW in [0, 1] (``Scan.image``), after the resize,
so pixel-level parameters (photons per pixel, blur sigma) refer to pixels the model sees.
Photometric transforms change intensities only (coordinates, boxes and masks pass through
untouched); geometric ones are detectron2/fvcore transforms, so polygons, boxes and bitmasks
follow the image exactly.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import CropTransform, ScaleTransform

from .datasets import polygon_area

__all__ = [
    "LowDoseNoiseTransform",
    "CLAHETransform",
    "GammaTransform",
    "WindowTransform",
    "GaussianBlurTransform",
    "InvertTransform",
    "RandomLowDose",
    "RandomCLAHE",
    "RandomGamma",
    "RandomWindow",
    "RandomGaussianBlur",
    "RandomScaleJitter",
    "ClipCropTransform",
    "RandomClipCrop",
    "build_xray_augmentations",
]


def _unit_float(img: np.ndarray) -> np.ndarray:
    """The [0, 1] float image, contiguous (cv2 rejects the negative strides a flip leaves)."""
    if not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"X-ray transforms expect a float image in [0, 1], got {img.dtype}")
    return np.ascontiguousarray(img, dtype=np.float32)


def _log_uniform(low: float, high: float) -> float:
    # Ratios (dose, gamma, contrast) are symmetric in log space: 0.5x is as far from 1 as 2x.
    return float(math.exp(np.random.uniform(math.log(low), math.log(high))))


class _PhotometricTransform(T.Transform):
    """Intensity-only transform: coordinates, boxes, polygons and masks are returned unchanged."""

    def apply_coords(self, coords):
        return coords

    def apply_segmentation(self, segmentation):
        return segmentation


class LowDoseNoiseTransform(_PhotometricTransform):
    """Re-acquire the scan at a fraction of the dose, in the photon domain.

    A pixel value v stands for the line integral L = v * mu_max; the detector sees
    I = photons * dose * exp(-L) photons, Poisson distributed, plus Gaussian electronic noise.
    Going back through -log makes grain strongest where the body is thick (bright pixels), as in
    real low-dose radiographs. The transform owns its seed, so applying it twice gives the same
    image.
    """

    def __init__(self, dose, photons, mu_max, electronic_std, seed):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        img = _unit_float(img)
        rng = np.random.default_rng(self.seed)
        flux = self.photons * self.dose
        expected = flux * np.exp(-img.astype(np.float64) * self.mu_max)
        counts = rng.poisson(expected).astype(np.float64)
        if self.electronic_std > 0:
            counts += rng.normal(0.0, self.electronic_std, img.shape)
        line = -np.log(np.maximum(counts, 1.0) / flux)  # >= 1 photon: log stays finite
        return np.clip(line / self.mu_max, 0.0, 1.0).astype(np.float32)


def _clahe(img: np.ndarray, clip_limit: float, grid: int, bins: int = 256) -> np.ndarray:
    """CLAHE with OpenCV's semantics, evaluated on float pixels.

    OpenCV on 8 bits quantizes the scan; on 16 bits its clip limit (relative to a 65536-bin
    histogram) rounds to one count per bin, so CLIP_LIMIT stops mattering. Here tile histograms
    have 256 bins and are clipped and redistributed as OpenCV does, but each tile's mapping is
    interpolated between bins, so no precision is lost.
    """
    h, w = img.shape
    th, tw = -(-h // grid), -(-w // grid)
    padded = cv2.copyMakeBorder(img, 0, th * grid - h, 0, tw * grid - w, cv2.BORDER_REFLECT_101)
    q = np.clip(np.rint(padded * (bins - 1)), 0, bins - 1).astype(np.int64)
    tile = (np.arange(th * grid) // th)[:, None] * grid + (np.arange(tw * grid) // tw)[None, :]
    hist = np.bincount((tile * bins + q).ravel(), minlength=grid * grid * bins)
    hist = hist.reshape(grid * grid, bins)

    area = th * tw
    if clip_limit > 0:
        limit = max(int(clip_limit * area / bins), 1)
        excess = np.maximum(hist - limit, 0).sum(axis=1, keepdims=True)
        hist = np.minimum(hist, limit) + excess // bins
        residual = excess % bins
        step = np.maximum(bins // np.maximum(residual, 1), 1)
        i = np.arange(bins)[None, :]
        hist = hist + ((i % step == 0) & (i // step < residual))
    lut = np.cumsum(hist, axis=1) / float(area)  # per tile: bin -> output in [0, 1]

    p = img * (bins - 1)
    k0 = np.clip(np.floor(p), 0, bins - 2).astype(np.int64)
    frac = p - k0

    def axis_weights(n, size):
        f = np.arange(n) / size - 0.5
        t1 = np.floor(f).astype(np.int64)
        return np.clip(t1, 0, grid - 1), np.clip(t1 + 1, 0, grid - 1), f - t1

    y1, y2, ya = axis_weights(h, th)
    x1, x2, xa = axis_weights(w, tw)

    def mapped(ty, tx):
        t = ty[:, None] * grid + tx[None, :]
        return lut[t, k0] * (1 - frac) + lut[t, k0 + 1] * frac

    xa, ya = xa[None, :], ya[:, None]
    top = mapped(y1, x1) * (1 - xa) + mapped(y1, x2) * xa
    bottom = mapped(y2, x1) * (1 - xa) + mapped(y2, x2) * xa
    return np.clip(top * (1 - ya) + bottom * ya, 0.0, 1.0).astype(np.float32)


class CLAHETransform(_PhotometricTransform):
    """Contrast-limited adaptive histogram equalization: what many viewers apply to radiographs."""

    def __init__(self, clip_limit, tile_grid):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        img = _unit_float(img)
        if img.ndim != 2:
            raise ValueError(f"CLAHE expects a grayscale HxW image, got shape {img.shape}")
        return _clahe(img, self.clip_limit, int(self.tile_grid))


class GammaTransform(_PhotometricTransform):
    """v -> v ** gamma: detector response curves differ between sites."""

    def __init__(self, gamma):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        return np.power(_unit_float(img), self.gamma, dtype=np.float32)


class WindowTransform(_PhotometricTransform):
    """Map the intensity window [low, high] to [0, 1], as a viewer's window/level does."""

    def __init__(self, low, high):
        super().__init__()
        assert high > low, (low, high)
        self._set_attributes(locals())

    def apply_image(self, img):
        out = (_unit_float(img) - self.low) / (self.high - self.low)
        return np.clip(out, 0.0, 1.0).astype(np.float32)


class GaussianBlurTransform(_PhotometricTransform):
    """Detector unsharpness; masks are not blurred (the anatomy did not move)."""

    def __init__(self, sigma):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        return cv2.GaussianBlur(
            _unit_float(img), (0, 0), self.sigma, borderType=cv2.BORDER_REFLECT_101
        )


class InvertTransform(_PhotometricTransform):
    """MONOCHROME1 vs MONOCHROME2: bone dark instead of bright."""

    def apply_image(self, img):
        return 1.0 - _unit_float(img)


class RandomLowDose(T.Augmentation):
    """Low-dose re-acquisition at a dose fraction sampled log-uniformly from ``dose_range``."""

    def __init__(self, dose_range, photons, mu_max, electronic_std):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        return LowDoseNoiseTransform(
            dose=_log_uniform(*self.dose_range),
            photons=self.photons,
            mu_max=self.mu_max,
            electronic_std=self.electronic_std,
            seed=int(np.random.randint(2**31 - 1)),  # from np.random: follows worker seeding
        )


class RandomCLAHE(T.Augmentation):
    """CLAHE with a clip limit sampled uniformly from ``clip_range``."""

    def __init__(self, clip_range, tile_grid):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        return CLAHETransform(float(np.random.uniform(*self.clip_range)), self.tile_grid)


class RandomGamma(T.Augmentation):
    """Gamma sampled log-uniformly from ``gamma_range``."""

    def __init__(self, gamma_range):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        return GammaTransform(_log_uniform(*self.gamma_range))


class RandomWindow(T.Augmentation):
    """Random window: centre shifted by up to ``brightness``, width divided by the contrast."""

    def __init__(self, brightness, contrast_range):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        centre = 0.5 + float(np.random.uniform(-self.brightness, self.brightness))
        width = 1.0 / _log_uniform(*self.contrast_range)
        return WindowTransform(centre - width / 2, centre + width / 2)


class RandomGaussianBlur(T.Augmentation):
    """Gaussian blur with sigma sampled uniformly from ``sigma_range`` (pixels)."""

    def __init__(self, sigma_range):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        return GaussianBlurTransform(float(np.random.uniform(*self.sigma_range)))


class RandomScaleJitter(T.Augmentation):
    """Rescale by a factor sampled uniformly from ``scale_range`` (patient size, magnification)."""

    def __init__(self, scale_range):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        s = float(np.random.uniform(*self.scale_range))
        return ScaleTransform(h, w, max(int(h * s + 0.5), 1), max(int(w * s + 0.5), 1), "bilinear")


def _clip_polygon(poly: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """The part of a polygon (N x 2) inside the box, by Sutherland-Hodgman: one pass per side.
    Exact in area for any simple polygon (a concave one may keep zero-width seams along the box
    edge, which rasterize to nothing)."""
    for axis, bound, keep_above in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        if len(poly) == 0:
            break
        inside = poly[:, axis] >= bound if keep_above else poly[:, axis] <= bound
        out = []
        for i in range(len(poly)):
            a, b = poly[i - 1], poly[i]
            ina, inb = inside[i - 1], inside[i]
            if ina != inb:  # the edge crosses the side: keep the crossing point
                t = (bound - a[axis]) / (b[axis] - a[axis])
                out.append(a + t * (b - a))
            if inb:
                out.append(b)
        poly = np.asarray(out, dtype=np.float64).reshape(-1, 2)
    return poly


class ClipCropTransform(CropTransform):
    """fvcore's crop with polygons clipped to the window in numpy: fvcore's own clipping needs
    shapely, which nothing else here does. A polygon left with no area is dropped, so a vertebra
    cropped away loses its mask and the mapper drops the instance (and its level)."""

    def apply_polygons(self, polygons: list) -> list:
        x1, y1 = self.x0 + self.w, self.y0 + self.h
        out = []
        for p in polygons:
            q = _clip_polygon(
                np.asarray(p, dtype=np.float64).reshape(-1, 2), self.x0, self.y0, x1, y1
            )
            if len(q) >= 3 and polygon_area(q[:, 0], q[:, 1]) > 1e-6:
                out.append(self.apply_coords(q))
        return out


class RandomClipCrop(T.RandomCrop):
    """detectron2's RandomCrop (INPUT.CROP.TYPE / SIZE) returning a :class:`ClipCropTransform`."""

    def get_transform(self, image):
        t = super().get_transform(image)
        return ClipCropTransform(t.x0, t.y0, t.w, t.h)


def build_xray_augmentations(cfg, is_train: bool) -> list:
    """Train: detectron2's INPUT.CROP when enabled, resize, geometric, then photometric
    augmentations enabled under INPUT.XRAY.
    Test: resize only. With INPUT.XRAY.EQUALIZE, both apply a fixed CLAHE right after the resize.

    Photometric order follows acquisition then display: blur (detector), dose (noise), then
    CLAHE, gamma, window and invert (what a viewer does to the acquired scan).
    """
    x = cfg.INPUT.XRAY
    # Before any rotation: the canvas it adds would count in the tile histograms.
    equalize = (
        [CLAHETransform(float(x.EQUALIZE.CLIP_LIMIT), int(x.EQUALIZE.TILE_GRID))]
        if x.EQUALIZE.ENABLED
        else []
    )
    if not is_train:
        resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
        return [resize, *equalize]
    # detectron2's INPUT.CROP, first as in its DatasetMapper: on the scan as read, so that the
    # resize sets the scale of what is left. "relative_range" with SIZE [h, 1.0] cuts tall films
    # at random heights only: the end vertebrae meet the border, or leave the film.
    crop = (
        [RandomClipCrop(cfg.INPUT.CROP.TYPE, tuple(cfg.INPUT.CROP.SIZE))]
        if cfg.INPUT.CROP.ENABLED
        else []
    )
    augs = [
        *crop,
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        ),
        *equalize,
    ]
    if x.SCALE_JITTER.ENABLED:
        augs.append(RandomScaleJitter(tuple(x.SCALE_JITTER.RANGE)))
    if x.ROTATION.ENABLED and x.ROTATION.ANGLE > 0:
        # expand=True: the canvas grows so that no vertebra is cut at the corners.
        augs.append(T.RandomRotation([-x.ROTATION.ANGLE, x.ROTATION.ANGLE], expand=True))
    if x.HFLIP.ENABLED:
        augs.append(T.RandomFlip(prob=x.HFLIP.PROB, horizontal=True, vertical=False))
    photometric = [
        (x.BLUR, lambda: RandomGaussianBlur(tuple(x.BLUR.SIGMA_RANGE))),
        (
            x.LOW_DOSE,
            lambda: RandomLowDose(
                tuple(x.LOW_DOSE.DOSE_RANGE),
                x.LOW_DOSE.PHOTONS,
                x.LOW_DOSE.MU_MAX,
                x.LOW_DOSE.ELECTRONIC_STD,
            ),
        ),
        (x.CLAHE, lambda: RandomCLAHE(tuple(x.CLAHE.CLIP_LIMIT), x.CLAHE.TILE_GRID)),
        (x.GAMMA, lambda: RandomGamma(tuple(x.GAMMA.RANGE))),
        (x.WINDOW, lambda: RandomWindow(x.WINDOW.BRIGHTNESS, tuple(x.WINDOW.CONTRAST))),
        (x.INVERT, InvertTransform),
    ]
    for node, make in photometric:
        if node.ENABLED and node.PROB > 0:
            augs.append(T.RandomApply(make(), prob=node.PROB))
    return augs
