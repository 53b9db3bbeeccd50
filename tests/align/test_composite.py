import cv2
import numpy as np
import pytest

from spine_d2.align import composite, enhance_pair
from spine_d2.align.match import Vertebra


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_outside_masks_identical_and_bit_depth_kept(make_pair, to_scan, dtype):
    high, ma, low, mb, truth = make_pair(noise=0.04)
    hs, ls = to_scan(high, dtype), to_scan(low, dtype)
    va, vb = Vertebra.from_full_mask(ma, level="L1"), Vertebra.from_full_mask(mb, level="L1")
    res = enhance_pair(hs, ls, [va], [vb], feather_px=3.0)
    assert res.pixels.dtype == dtype and res.pixels.shape == ls.pixels.shape
    assert res.registrations[0].reliable
    near = cv2.dilate(mb.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    assert np.array_equal(res.pixels[~near], ls.pixels[~near])
    assert not np.array_equal(res.pixels[mb], ls.pixels[mb])
    # Inside the vertebra the composite is closer to the noise-free truth than the noisy scan.
    clean = to_scan(cv2.warpAffine(high, truth, high.shape[::-1]), dtype).pixels.astype(float)
    inner = cv2.erode(mb.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    err_raw = np.abs(ls.pixels[inner] - clean[inner]).mean()
    err_enh = np.abs(res.pixels[inner] - clean[inner]).mean()
    assert err_enh < 0.5 * err_raw


def test_unreliable_fit_is_not_composited(make_pair, to_scan):
    high, ma, low, _, _ = make_pair()
    wrong = np.zeros_like(ma)
    wrong[10:16, 10:90] = True
    hs, ls = to_scan(high), to_scan(low)
    res = enhance_pair(hs, ls, [Vertebra.from_full_mask(ma)], [Vertebra.from_full_mask(wrong)])
    assert not res.registrations[0].reliable
    assert res.records[0]["used"] is False and res.records[0]["reason"]
    assert np.array_equal(res.pixels, ls.pixels)


def test_float_scans_with_nan_stay_finite_around_it(make_pair):
    """A float low-dose scan with a NaN band (a processed field's edge) through the vertebra:
    the band stays NaN, every other pixel of the composite is finite and enhanced as with the
    band filled in."""
    from spine_d2.data.io import Scan

    high, ma, low, mb, _ = make_pair(noise=0.04)
    holed = low.copy()
    band = np.zeros(low.shape, bool)
    band[:, 70:74] = True
    holed[band] = np.nan
    holed[0, 0] = np.inf
    va, vb = Vertebra.from_full_mask(ma, level="L1"), Vertebra.from_full_mask(mb, level="L1")

    def scan(pixels):
        return Scan(path="mem.tif", pixels=pixels, image=pixels, bit_depth=32, meta={})

    res = enhance_pair(scan(high), scan(holed), [va], [vb], feather_px=3.0)
    ref = enhance_pair(scan(high), scan(low), [va], [vb], feather_px=3.0)
    assert res.pixels.dtype == np.float32
    assert np.isnan(res.pixels[band]).all() and np.isinf(res.pixels[0, 0])
    rest = ~band
    rest[0, 0] = False
    assert np.isfinite(res.pixels[rest]).all()
    assert not np.array_equal(res.pixels[mb & rest], low[mb & rest])  # composited
    away = rest & (cv2.dilate(band.astype(np.uint8), np.ones((15, 15), np.uint8)) == 0)
    assert np.abs(res.pixels[away & mb] - ref.pixels[away & mb]).mean() < 0.01


def test_composite_without_items_is_a_copy():
    low = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    out = composite(low, low, [])
    assert out.dtype == np.uint16 and np.array_equal(out, low) and out is not low


def test_guided_composite_does_not_paste_static_anatomy(make_pair, to_scan):
    """A rib crossing the vertebra stays put between the scans; pasting the warped high-dose
    pixels moves it with the vertebra, the guided filter keeps it where the low-dose scan has it."""
    high, ma, low, mb, truth = make_pair(noise=0.03, shift=(6.0, -4.0))
    yy = np.mgrid[0:160, 0:160][0]
    rib = 0.25 * (np.abs(yy - 80) < 3)  # static horizontal band over the vertebra
    clean_low = low - np.random.default_rng(1).normal(0, 0.03, low.shape)  # same seed as fixture
    hs, ls = to_scan(high + rib), to_scan(low + rib)
    clean = to_scan(clean_low + rib).pixels.astype(float)
    va, vb = Vertebra.from_full_mask(ma, level="L1"), Vertebra.from_full_mask(mb, level="L1")
    guided = enhance_pair(hs, ls, [va], [vb]).pixels.astype(float)
    pasted = enhance_pair(hs, ls, [va], [vb], adaptive=False, guided_radius=0).pixels.astype(float)
    inner = cv2.erode(mb.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    err = {
        name: np.abs(img[inner] - clean[inner]).mean()
        for name, img in (("raw", ls.pixels.astype(float)), ("guided", guided), ("pasted", pasted))
    }
    assert err["guided"] < 0.9 * err["raw"]  # grain reduced...
    assert err["guided"] < 0.6 * err["pasted"]  # ...without dragging the rib along
