"""Vertebral levels that agree with each other along the spine.

A level classifier looks at one vertebra at a time, and neighbouring thoracic vertebrae look
alike; the spine itself is the stronger cue: levels increase by one from each vertebra to the
next. ``decode_levels`` orders the detections along the spine curve and picks the increasing
level sequence with the highest total log-probability (a small dynamic programme), so a single
confident vertebra (C7's long process, T1's first rib pair, L1 without ribs) fixes its
neighbours.
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
) -> np.ndarray:
    """Level index per detection (rows of ``log_probs``, N x L), increasing along the spine.

    Args:
        centers: N x 2 (x, y) detection centres.
        log_probs: N x L log-probabilities of the levels, top to bottom.
        skip_cost: cost (nats) of each level skipped between consecutive detections: a missed
            vertebra is possible but needs evidence.
        repeat_cost: cost of giving two consecutive detections the same level (a duplicate
            detection), so that one duplicate does not shift every level below it.
    """
    log_probs = np.asarray(log_probs, dtype=np.float64)
    n, num_levels = log_probs.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return log_probs.argmax(1)
    order = order_along_spine(np.asarray(centers, dtype=np.float64)).order
    lp = log_probs[order]
    # trans[a, b]: cost of level a followed by level b (b > a: skips; b == a: repeat; b < a: no)
    a = np.arange(num_levels)[:, None]
    b = np.arange(num_levels)[None, :]
    trans = np.where(b > a, -skip_cost * (b - a - 1), -np.inf)
    trans = np.where(b == a, -repeat_cost, trans)
    score = lp[0].copy()
    back = np.zeros((n, num_levels), dtype=np.int64)
    for i in range(1, n):
        total = score[:, None] + trans  # from level a (rows) to level b (columns)
        back[i] = total.argmax(0)
        score = total.max(0) + lp[i]
    path = np.zeros(n, dtype=np.int64)
    path[-1] = int(score.argmax())
    for i in range(n - 1, 0, -1):
        path[i - 1] = back[i, path[i]]
    out = np.zeros(n, dtype=np.int64)
    out[order] = path
    return out
