"""Pair the vertebrae of a high-dose and a low-dose scan.

By level name when both sides carry levels and neither side names two distinct neighbours alike
(a chain whose names slid: ``zoi.extract.chain_repeats``); otherwise by position along the spine. Position
matching estimates the motion between the scans from the data (a similarity fitted to the
pairs, iterated from every anchor pair) and accepts a pair only when the two centroids agree
to within a fraction of the local vertebra spacing, so a vertebra missing on one side leaves
its partner unmatched instead of shifting every pair below it by one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..zoi.extract import chain_repeats
from ..zoi.order import order_along_spine

__all__ = ["Vertebra", "Match", "match_vertebrae"]

logger = logging.getLogger(__name__)


@dataclass
class Vertebra:
    mask: np.ndarray  # bool crop
    origin: tuple  # (x0, y0) of the crop in scan pixels
    level: str | None = None
    score: float = 1.0
    id: int | None = None  # ZOI id in a manifest, annotation index otherwise

    @property
    def centroid(self) -> np.ndarray:
        m = cv2.moments(self.mask.astype(np.uint8), binaryImage=True)
        a = max(m["m00"], 1e-9)
        return np.array([m["m10"] / a + self.origin[0], m["m01"] / a + self.origin[1]])

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    @classmethod
    def from_full_mask(cls, mask: np.ndarray, **kw) -> "Vertebra":
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            raise ValueError("empty mask")
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        return cls(mask=mask[y0:y1, x0:x1].astype(bool), origin=(int(x0), int(y0)), **kw)


@dataclass
class Match:
    pairs: list  # [(index in high, index in low)], top to bottom
    unmatched_high: list = field(default_factory=list)
    unmatched_low: list = field(default_factory=list)
    method: str = "level"  # "level" or "position"


def _by_level(high, low) -> Match:
    def index(vs):
        out, dup = {}, set()
        for i, v in enumerate(vs):
            if v.level in out:
                dup.add(v.level)
                if v.score > vs[out[v.level]].score:  # two ZOIs claim a level: keep the surer
                    out[v.level] = i
            else:
                out[v.level] = i
        if dup:
            logger.warning("duplicate levels %s: keeping the highest score", sorted(dup))
        return out

    ih, il = index(high), index(low)
    common = [lv for lv in ih if lv in il]
    pairs = sorted(((ih[lv], il[lv]) for lv in common), key=lambda p: high[p[0]].centroid[1])
    used_h, used_l = {p[0] for p in pairs}, {p[1] for p in pairs}
    return Match(
        pairs,
        [i for i in range(len(high)) if i not in used_h],
        [i for i in range(len(low)) if i not in used_l],
        "level",
    )


def _fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 2D similarity src -> dst (Umeyama); translation only for one point."""
    if len(src) < 2:
        m = np.eye(2, 3)
        m[:, 2] = dst.mean(0) - src.mean(0)
        return m
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    a = (s * d).sum()
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum()
    norm = (s**2).sum()
    r = np.array([[a, -b], [b, a]]) / max(norm, 1e-12)
    return np.hstack([r, (md - r @ ms)[:, None]])


def _assign(ch, cl, m, tol) -> tuple:
    """Greedy one-to-one pairing by distance under ``tol`` (< half a spacing, so at most one
    candidate is near each centroid and greedy equals optimal); returns (pairs, total cost)."""
    pred = ch @ m[:, :2].T + m[:, 2]
    cost = np.linalg.norm(pred[:, None] - cl[None], axis=-1)
    cand = sorted(zip(*np.nonzero(cost <= tol[:, None])), key=lambda ij: cost[ij])
    used_h, used_l, pairs, total = set(), set(), [], 0.0
    for i, j in cand:
        if i not in used_h and j not in used_l:
            used_h.add(i), used_l.add(j)
            pairs.append((int(i), int(j)))
            total += float(cost[i, j])
    return pairs, total


def _by_position(high, low, tol_fraction: float) -> Match:
    ch = np.array([v.centroid for v in high])
    cl = np.array([v.centroid for v in low])
    if len(ch) == 0 or len(cl) == 0:
        return Match([], list(range(len(high))), list(range(len(low))), "position")
    # Local spacing per high vertebra: the tolerance follows vertebra size down the spine.
    order = order_along_spine(ch).order
    spacing = np.full(len(ch), np.inf)
    if len(ch) > 1:
        oc = ch[order]
        gaps = np.linalg.norm(np.diff(oc, axis=0), axis=1)
        for k, i in enumerate(order):
            near = gaps[max(k - 1, 0) : k + 1]
            spacing[i] = float(np.min(near))
    else:
        spacing[:] = np.sqrt(high[0].area)
    tol = tol_fraction * spacing
    best, best_key = [], None
    for i in range(len(ch)):
        for j in range(len(cl)):
            m = np.eye(2, 3)
            m[:, 2] = cl[j] - ch[i]
            pairs = []
            for _ in range(4):  # translation -> similarity from the pairs it explains
                pairs, cost = _assign(ch, cl, m, tol)
                if not pairs:
                    break
                idx_h, idx_l = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
                m_new = _fit_similarity(ch[idx_h], cl[idx_l])
                if abs(np.linalg.det(m_new[:, :2]) - 1) > 0.5:  # implausible global zoom
                    m_new = np.eye(2, 3)
                    m_new[:, 2] = (cl[idx_l] - ch[idx_h]).mean(0)
                m = m_new
            pairs, cost = _assign(ch, cl, m, tol)
            # Most pairs first; among equals the smaller residual, then the smaller motion.
            key = (-len(pairs), round(cost, 3), float(np.linalg.norm(m[:, 2])))
            if best_key is None or key < best_key:
                best, best_key = pairs, key
    pairs = sorted(best, key=lambda p: ch[p[0], 1])
    used_h, used_l = {p[0] for p in pairs}, {p[1] for p in pairs}
    return Match(
        pairs,
        [i for i in range(len(high)) if i not in used_h],
        [i for i in range(len(low)) if i not in used_l],
        "position",
    )


def match_vertebrae(high: list, low: list, tol_fraction: float = 0.4) -> Match:
    """Pair ``high`` and ``low`` vertebrae (lists of :class:`Vertebra`).

    Levels are used when every vertebra on both sides has one and neither side names two
    distinct neighbours alike (then its names are off by one somewhere); a pair is accepted by position
    only when the centroids agree within ``tol_fraction`` of the local spacing after the
    estimated scan-to-scan motion.
    """
    if high and low and all(v.level for v in high) and all(v.level for v in low):
        slid = [side for side, vs in (("high", high), ("low", low)) if _names_disagree(vs)]
        if not slid:
            return _by_level(high, low)
        # A repeat between distinct bodies means the names around it are off by one: pairing by
        # them would composite each vertebra onto its neighbour.
        logger.warning(
            "the %s-dose scan names two distinct neighbouring vertebrae alike (its levels "
            "slid): matching by position instead of level",
            " and ".join(slid),
        )
    return _by_position(high, low, tol_fraction)


def _names_disagree(vertebrae) -> bool:
    seq = order_along_spine(np.array([v.centroid for v in vertebrae]))
    return bool(chain_repeats([vertebrae[i].level for i in seq.order], seq.ratios))
