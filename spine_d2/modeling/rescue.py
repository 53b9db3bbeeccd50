"""Chain rescue: on films that show a known number of vertebrae, accept below-cut detections
that fill the chain.

A full-spine AP film shows T1..L5, 17 bodies. Where fewer than that are detected confidently, the
model usually did see the missing ones, with a score under the cut: L5 in the pelvis and T1 under
the clavicles most of all (``tools/error_report.py --kinds``: 82 of 194 misses of the GPU real-data
model are ``low_score``). A low score alone is not evidence enough (a lower global cut lets in as
many false bodies as true ones: docs/results-aasce.md, "Chain rescue"), but a low score *where the
chain says a body is missing* is: in a gap of about two spacings between confident neighbours, or
one spacing past either end of the chain, in line with it, not overlapping a confident body. Nothing
is rescued when the confident detections already reach the expected count, so complete films cannot
gain false bodies.

Only geometry and scores are used (boxes, before masks), so ``LevelROIHeads`` runs it before the
level decoding and the rescued bodies are named with the others.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

from ..zoi.order import order_along_spine

__all__ = ["rescue_chain"]


def rescue_chain(
    boxes,
    scores,
    accepted,
    expected: int,
    min_score: float,
    gap_factor: float = 1.6,
    max_overlap: float = 0.3,
) -> list:
    """Indices of detections under the cut to accept as the chain's missing bodies.

    Args:
        boxes: N x 4 XYXY boxes of one image's detections.
        scores: their N scores.
        accepted: N bools, the detections at or above the cut.
        expected: number of bodies the film shows (17 for T1..L5); nothing is rescued when the
            accepted ones are as many, or fewer than 3 (too few to tell the spacing).
        min_score: candidates score at least this.
        gap_factor: a spacing this many times its neighbours' is a gap (``zoi.order``).
        max_overlap: candidates overlap no accepted box by more than this box IoU.

    A candidate fills a gap between ordered neighbours a, b when it lies at least half a local
    spacing from both, between them along a->b and within one spacing of that line; it extends
    an end when it lies 0.5-1.5 local spacings beyond the end body along the chain's last step
    and within one spacing of that direction. Each gap takes as many as it misses, each end
    one, the best scored first, and never more than ``expected`` minus the accepted count.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    accepted = np.asarray(accepted, dtype=bool).reshape(-1)
    idx = np.flatnonzero(accepted)
    room = int(expected) - len(idx)
    if expected <= 0 or room <= 0 or len(idx) < 3:
        return []
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    cand = np.flatnonzero(~accepted & (scores >= min_score))
    if len(cand):
        overlap = box_iou(torch.from_numpy(boxes[cand]), torch.from_numpy(boxes[idx]))
        cand = cand[overlap.max(dim=1).values.numpy() <= max_overlap]
    if not len(cand):
        return []
    chain = order_along_spine(centers[idx], gap_factor)
    pts = centers[idx[chain.order]]
    spacing = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    picked: list = []

    def take(ok, n):
        for c in sorted(cand[ok], key=lambda i: -scores[i])[:n]:
            if c not in picked:
                picked.append(int(c))

    def along_across(origin, direction):
        u = direction / max(float(np.linalg.norm(direction)), 1e-9)
        rel = centers[cand] - origin
        return rel @ u, np.abs(rel @ np.array([-u[1], u[0]]))

    for k, n in chain.gaps:
        a, b = pts[k], pts[k + 1]
        length = float(spacing[k])
        # the chain's ratios are each spacing over the median of its neighbours'
        step = min(length / chain.ratios[k], length / 2)
        along, across = along_across(a, b - a)
        take((along >= 0.5 * step) & (along <= length - 0.5 * step) & (across <= step), n)
    # Ends: the step of the last three spacings (one of them may be a gap).
    for end, prev, near in ((pts[0], pts[1], spacing[:3]), (pts[-1], pts[-2], spacing[-3:])):
        step = float(np.median(near))
        along, across = along_across(end, end - prev)
        take((along >= 0.5 * step) & (along <= 1.5 * step) & (across <= step), 1)
    return sorted(picked, key=lambda i: -scores[i])[:room]
