"""Confidence intervals for VertebraEvaluator's ratios, by resampling images.

Recall, precision, Dice and level accuracy are ratios of sums over vertebrae, but vertebrae of one
film are not independent: a film whose chain slid by one level has all its levels wrong at once, a
dark pelvis hides L5 and L4 together. So the unit of resampling is the image (film), the way a new
test set would differ: resample images with replacement, recompute each ratio of sums, take the
percentile interval. On 91 AASCE films a level accuracy of 0.86 comes with an interval about +-0.03
wide (docs/results-aasce.md, "How sure these figures are"): a change of 0.01 between two models is
not evidence by itself. ``paired_difference`` compares two evaluations of the same images on the
same resamples, which cancels the films both find hard and is far tighter than two separate
intervals.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RATIOS", "image_counts", "ratio_intervals", "paired_difference"]

# metric -> (numerator, denominator) per-image fields of vertebra_results.json
RATIOS = {
    "recall": ("num_matched", "num_gt"),
    "precision": ("num_matched", "num_pred"),
    "mean_dice": ("dice_sum", "num_matched"),
    "level_accuracy": ("level_hits", "num_levelled"),
}
_CHUNK = 250  # resamples per batch: bounds memory at 250 x images


def image_counts(per_image: list) -> dict:
    """field -> per-image float array, for the fields ``RATIOS`` uses (KeyError when absent)."""
    fields = {f for pair in RATIOS.values() for f in pair}
    return {f: np.array([float(im[f]) for im in per_image]) for f in sorted(fields)}


def _resample_sums(arrays: list, n_boot: int, seed: int) -> list:
    """Sum of each array over ``n_boot`` resamples of its indices, the same resamples for all."""
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    out = [np.empty(n_boot) for _ in arrays]
    for start in range(0, n_boot, _CHUNK):
        k = min(_CHUNK, n_boot - start)
        # how often each image is drawn in each resample
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=k)
        for a, o in zip(arrays, out):
            o[start : start + k] = counts @ a
    return out


def _interval(values: np.ndarray, confidence: float) -> list:
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    tail = 50.0 * (1.0 - confidence)
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def ratio_intervals(
    counts: dict, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """metric -> [low, high] percentile interval of each ``RATIOS`` metric whose denominator is
    not zero overall (a dataset without levels gets no level interval). Deterministic for a
    seed, so a saved result can be reproduced."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    names = [m for m, (_, den) in RATIOS.items() if counts[den].sum() > 0]
    if not names or len(counts[RATIOS[names[0]][1]]) == 0:
        return {}
    arrays = [counts[f] for m in names for f in RATIOS[m]]
    sums = _resample_sums(arrays, n_boot, seed)
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for i, m in enumerate(names):
            out[m] = _interval(sums[2 * i] / sums[2 * i + 1], confidence)
    return out


def paired_difference(
    counts_a: dict, counts_b: dict, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """metric -> {"a", "b", "diff" (b - a), "low", "high", "p_b_better"} for two evaluations of
    the same images in the same order, on shared resamples. ``p_b_better``: the fraction of
    resamples where b's ratio is higher."""
    n = len(next(iter(counts_a.values())))
    if n != len(next(iter(counts_b.values()))):
        raise ValueError("paired_difference needs the same images in both evaluations")
    names = [
        m for m, (_, den) in RATIOS.items() if counts_a[den].sum() > 0 and counts_b[den].sum() > 0
    ]
    # one set of resamples for every metric: the same draws, drawn once
    arrays = [c[f] for m in names for c in (counts_a, counts_b) for f in RATIOS[m]]
    sums = iter(_resample_sums(arrays, n_boot, seed)) if names else iter(())
    out = {}
    for m in names:
        num, den = RATIOS[m]
        na, da, nb, db = (next(sums) for _ in range(4))
        with np.errstate(divide="ignore", invalid="ignore"):
            diff = nb / db - na / da
        ok = np.isfinite(diff)
        a = counts_a[num].sum() / counts_a[den].sum()
        b = counts_b[num].sum() / counts_b[den].sum()
        low, high = _interval(diff, confidence)
        out[m] = {
            "a": float(a),
            "b": float(b),
            "diff": float(b - a),
            "low": low,
            "high": high,
            "p_b_better": float((diff[ok] > 0).mean()) if ok.any() else float("nan"),
        }
    return out
