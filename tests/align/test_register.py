import numpy as np
import pytest

from spine_d2.align.match import Vertebra
from spine_d2.align.register import decompose, register_vertebra


def _tre(m, truth, mask):
    ys, xs = np.nonzero(mask)
    c = np.array(
        [[xs.min(), ys.min()], [xs.max(), ys.min()], [xs.min(), ys.max()], [xs.max(), ys.max()]],
        float,
    )
    return np.linalg.norm(
        c @ m[:, :2].T + m[:, 2] - (c @ truth[:, :2].T + truth[:, 2]), axis=1
    ).max()


def _register(high, mask_a, low, mask_b, **kw):
    va, vb = Vertebra.from_full_mask(mask_a), Vertebra.from_full_mask(mask_b)
    return register_vertebra(high, va.mask, va.origin, low, vb.mask, vb.origin, **kw)


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_recovers_known_similarity_from_masks(make_pair, noise):
    high, ma, low, mb, truth = make_pair(noise=noise)
    reg = _register(high, ma, low, mb)
    assert reg.reliable, reg.reason
    assert _tre(reg.matrix, truth, ma) < 0.35
    got, want = decompose(reg.matrix), decompose(truth)
    assert abs(got["angle_deg"] - want["angle_deg"]) < 0.25
    assert abs(got["scale"] / want["scale"] - 1) < 0.005


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_intensity_refinement_recovers_known_similarity(make_pair, noise):
    high, ma, low, mb, truth = make_pair(angle=-6.0, scale=0.97, shift=(-4.2, 2.7), noise=noise)
    reg = _register(high, ma, low, mb, smooth_sigmas=(2.0, 0.0))
    assert reg.reliable, reg.reason
    assert _tre(reg.matrix, truth, ma) < (0.2 if noise == 0 else 0.4)
    assert reg.quality > (0.99 if noise == 0 else 0.5)


def test_wrong_partner_is_flagged(make_pair):
    high, ma, low, _, _ = make_pair()
    wrong = np.zeros_like(ma)
    wrong[10:16, 10:90] = True  # a sliver: nothing like the high-dose vertebra
    reg = _register(high, ma, low, wrong)
    assert not reg.reliable and reg.reason
