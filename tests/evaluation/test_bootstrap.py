"""Intervals by resampling images (spine_d2.evaluation.bootstrap) on counts worked out by hand."""

import numpy as np
import pytest

from spine_d2.evaluation.bootstrap import image_counts, paired_difference, ratio_intervals


def films(matched, gt=17, pred=None, level_hits=None):
    """per_image entries as VertebraEvaluator saves them (Dice 0.9 per matched vertebra)."""
    out = []
    for i, m in enumerate(matched):
        out.append(
            {
                "num_matched": m,
                "num_gt": gt,
                "num_pred": m if pred is None else pred[i],
                "dice_sum": 0.9 * m,
                "level_hits": m if level_hits is None else level_hits[i],
                "num_levelled": m,
            }
        )
    return image_counts(out)


def test_equal_films_give_a_point_interval_and_mixed_films_a_wide_one():
    same = ratio_intervals(films([16] * 50))
    assert same["recall"] == [pytest.approx(16 / 17), pytest.approx(16 / 17)]
    assert same["mean_dice"] == [pytest.approx(0.9), pytest.approx(0.9)]
    # half the films lose their whole chain's levels: the interval must be wide
    mixed = ratio_intervals(films([17] * 50, level_hits=[17, 0] * 25))
    lo, hi = mixed["level_accuracy"]
    assert lo < 0.4 < 0.5 < 0.6 < hi and hi - lo < 0.45
    more = ratio_intervals(films([17] * 400, level_hits=[17, 0] * 200))["level_accuracy"]
    assert more[1] - more[0] < (hi - lo) / 2  # 8x the films: under half the width


def test_intervals_are_reproducible_for_a_seed_and_skip_metrics_without_denominator():
    c = films([15, 16, 17, 12, 17, 14])
    assert ratio_intervals(c, seed=3) == ratio_intervals(c, seed=3)
    c["num_levelled"] = np.zeros(6)  # a model without levels
    assert "level_accuracy" not in ratio_intervals(c) and "recall" in ratio_intervals(c)
    with pytest.raises(ValueError, match="confidence"):
        ratio_intervals(c, confidence=95)


def test_paired_difference_sees_a_small_consistent_gain_that_separate_intervals_miss():
    rng = np.random.default_rng(0)
    base = rng.integers(10, 18, size=60)  # films differ a lot in how much is found
    a = films(list(base))
    b = films(list(np.minimum(base + (np.arange(60) % 3 == 0), 17)))  # a third gain one body
    ia, ib = ratio_intervals(a)["recall"], ratio_intervals(b)["recall"]
    assert ib[0] < ia[1]  # the separate intervals overlap
    d = paired_difference(a, b)["recall"]
    assert d["diff"] == pytest.approx(
        b["num_matched"].sum() / b["num_gt"].sum() - a["num_matched"].sum() / a["num_gt"].sum()
    )
    assert 0 < d["low"] <= d["diff"] <= d["high"] and d["p_b_better"] == 1.0
    same = paired_difference(a, a)["precision"]
    assert (same["low"], same["high"], same["diff"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same images"):
        paired_difference(a, films([17] * 5))
