"""Vertebral levels that agree with each other along the spine.

A level classifier looks at one vertebra at a time, and neighbouring thoracic vertebrae look
alike; the spine itself is the stronger cue: levels increase by one from each vertebra to the
next. ``decode_levels`` orders the detections along the spine curve and picks the increasing
level sequence with the highest total log-probability (a small dynamic programme), so a single
confident vertebra (C7's long process, T1's first rib pair, L1 without ribs) fixes its
neighbours.

The spacing between consecutive detections is evidence too: about one local spacing between
neighbours, about two where the detector missed the vertebra between them. With
``spacing_weight`` > 0 a jump of k levels across a spacing ratio r costs
``spacing_weight * (k - r)**2`` more, so a chain of look-alike thoracic vertebrae cannot slide by
one level, nor skip one, against the geometry. Whether that helps depends on how regular the
spacing of a dataset is (README, Real radiographs): full-spine films yes, cropped DRR views
with slivers at their edges no, hence off by default.
"""

from __future__ import annotations

import numpy as np

from ..zoi.order import order_along_spine

__all__ = ["decode_levels"]


def decode_levels(
    centers: np.ndarray,
    log_probs: np.ndarray,
    skip_cost: float = 2.0,
    repeat_cost: float = 4.0,
    spacing_weight: float = 0.0,
) -> np.ndarray:
    """Level index per detection (rows of ``log_probs``, N x L), increasing along the spine.

    Args:
        centers: N x 2 (x, y) detection centres.
        log_probs: N x L log-probabilities of the levels, top to bottom.
        skip_cost: cost (nats) of each level skipped between consecutive detections: a missed
            vertebra is possible but needs evidence.
        repeat_cost: cost of giving two consecutive detections the same level (a duplicate
            detection), so that one duplicate does not shift every level below it.
        spacing_weight: nats per squared level of disagreement between a jump and the spacing
            ratio of the two detections (``zoi.order.spacing_ratios``); 0 ignores spacing.
    """
    if spacing_weight < 0:
        raise ValueError(f"spacing_weight must be >= 0, got {spacing_weight}")
    log_probs = np.asarray(log_probs, dtype=np.float64)
    n, num_levels = log_probs.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return log_probs.argmax(1)
    spine = order_along_spine(np.asarray(centers, dtype=np.float64))
    order, ratios = spine.order, spine.ratios
    lp = log_probs[order]
    # trans[a, b]: cost of level a followed by level b (b > a: skips; b == a: repeat; b < a: no)
    a = np.arange(num_levels)[:, None]
    b = np.arange(num_levels)[None, :]
    jump = (b - a).astype(np.float64)
    trans = np.where(b > a, -skip_cost * (jump - 1), -np.inf)
    trans = np.where(b == a, -repeat_cost, trans)
    score = lp[0].copy()
    back = np.zeros((n, num_levels), dtype=np.int64)
    for i in range(1, n):
        step = trans
        if spacing_weight > 0 and np.isfinite(
            ratios[i - 1]
        ):  # the repeat keeps its own cost: duplicates lie close
            step = np.where(b > a, trans - spacing_weight * (jump - ratios[i - 1]) ** 2, trans)
        total = score[:, None] + step  # from level a (rows) to level b (columns)
        back[i] = total.argmax(0)
        score = total.max(0) + lp[i]
    path = np.zeros(n, dtype=np.int64)
    path[-1] = int(score.argmax())
    for i in range(n - 1, 0, -1):
        path[i - 1] = back[i, path[i]]
    out = np.zeros(n, dtype=np.int64)
    out[order] = path
    return out
