"""Order vertebrae along the spine, name their levels and find gaps where one was missed.

Sorting by y fails on scoliotic spines: where the column runs sideways, neighbours overlap in y
and swap. The order here follows the curve: the longest path of the centroids' minimum spanning
tree is the spine's backbone (its ends are the top and bottom vertebrae); every centroid is then
placed by its arc-length position along that backbone.

A missed vertebra leaves a spacing between neighbours about twice the local spacing. Spacing
grows slowly from cervical to lumbar, so each spacing is compared with the median of its
neighbouring spacings, not with one global value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["SpineOrder", "order_along_spine", "find_gaps", "spacing_ratios", "assign_levels"]


@dataclass
class SpineOrder:
    order: list  # indices of the input centroids, top to bottom
    position: np.ndarray  # arc-length position of each ordered centroid along the backbone
    gaps: list = field(default_factory=list)  # [(k, missing)]: `missing` vertebrae between k, k+1
    # spacing k..k+1 over its neighbours' (``spacing_ratios``), NaN where too few to compare
    ratios: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _mst_parents(points: np.ndarray) -> np.ndarray:
    """Prim's algorithm on the complete graph (n <= a few dozen: O(n^2) is nothing)."""
    n = len(points)
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    parent = np.full(n, -1)
    best = dist[0].copy()
    best_from = np.zeros(n, dtype=int)
    in_tree = np.zeros(n, dtype=bool)
    in_tree[0] = True
    best[0] = np.inf
    for _ in range(n - 1):
        j = int(np.argmin(np.where(in_tree, np.inf, best)))
        in_tree[j] = True
        parent[j] = best_from[j]
        closer = ~in_tree & (dist[j] < best)
        best[closer], best_from[closer] = dist[j][closer], j
    return parent


def _farthest(adj: list, start: int, points: np.ndarray):
    """Tree distances from ``start``; returns (farthest node, predecessor map)."""
    dist, pred, stack = {start: 0.0}, {start: -1}, [start]
    while stack:
        u = stack.pop()
        for v in adj[u]:
            if v not in dist:
                dist[v] = dist[u] + float(np.linalg.norm(points[u] - points[v]))
                pred[v] = u
                stack.append(v)
    return max(dist, key=dist.get), pred


def _project(points: np.ndarray, path: np.ndarray) -> np.ndarray:
    """Arc-length position of each point's nearest point on the polyline ``path``."""
    a, b = path[:-1], path[1:]
    seg = b - a
    seg_len = np.linalg.norm(seg, axis=1)
    start = np.concatenate([[0.0], np.cumsum(seg_len)])[:-1]
    t = np.einsum("psk,sk->ps", points[:, None] - a[None], seg) / np.maximum(seg_len**2, 1e-12)
    t = np.clip(t, 0.0, 1.0)
    nearest = a[None] + t[..., None] * seg[None]
    d = np.linalg.norm(points[:, None] - nearest, axis=-1)
    k = np.argmin(d, axis=1)
    idx = np.arange(len(points))
    return start[k] + t[idx, k] * seg_len[k]


def order_along_spine(centroids, gap_factor: float = 1.6) -> SpineOrder:
    """Order (x, y) centroids top to bottom along the spine curve and find gaps."""
    pts = np.asarray(centroids, dtype=np.float64).reshape(-1, 2)
    n = len(pts)
    if n == 0:
        return SpineOrder([], np.zeros(0))
    if n == 1:
        return SpineOrder([0], np.zeros(1))
    parent = _mst_parents(pts)
    adj = [[] for _ in range(n)]
    for child, par in enumerate(parent):
        if par >= 0:
            adj[child].append(int(par))
            adj[int(par)].append(child)
    end_a, _ = _farthest(adj, 0, pts)
    end_b, pred = _farthest(adj, end_a, pts)
    backbone = [end_b]
    while pred[backbone[-1]] != -1:
        backbone.append(pred[backbone[-1]])
    if pts[backbone[0], 1] > pts[backbone[-1], 1]:  # image y grows downwards: top end first
        backbone.reverse()
    pos = _project(pts, pts[backbone])
    order = sorted(range(n), key=lambda i: (pos[i], pts[i, 1]))
    position = pos[order]
    ratios = spacing_ratios(pts[order])
    return SpineOrder(order, position, _gaps(ratios, gap_factor), ratios)


def spacing_ratios(ordered: np.ndarray, window: int = 2) -> np.ndarray:
    """Each spacing between consecutive ``ordered`` centroids divided by the median of up to
    ``window`` spacings on each side of it (itself excluded): ~1 between neighbours, ~2 where
    one vertebra between them was missed. NaN when there are fewer than 3 spacings, because
    two cannot tell which one is the odd one out. Spacings under half the chain's median (a
    duplicate detection and its twin) are left out of the neighbours' median where others
    remain: next to a duplicate an even spacing would otherwise look like a gap."""
    ordered = np.asarray(ordered, dtype=np.float64).reshape(-1, 2)
    spacing = np.linalg.norm(np.diff(ordered, axis=0), axis=1)
    ratios = np.full(len(spacing), np.nan)
    if len(spacing) < 3:
        return ratios
    floor = 0.5 * float(np.median(spacing))
    for k, s in enumerate(spacing):
        near = np.concatenate([spacing[max(k - window, 0) : k], spacing[k + 1 : k + 1 + window]])
        if (near >= floor).any():
            near = near[near >= floor]
        ref = float(np.median(near))
        if ref > 0:
            ratios[k] = s / ref
    return ratios


def find_gaps(ordered: np.ndarray, gap_factor: float = 1.6, window: int = 2) -> list:
    """[(k, missing)] where the spacing between ordered[k] and ordered[k+1] exceeds
    ``gap_factor`` times the median of up to ``window`` spacings on each side of it."""
    return _gaps(spacing_ratios(ordered, window), gap_factor)


def _gaps(ratios: np.ndarray, gap_factor: float) -> list:
    return [
        (k, max(int(round(r)) - 1, 1))
        for k, r in enumerate(ratios)
        if np.isfinite(r) and r > gap_factor
    ]


def assign_levels(n: int, gaps: list, levels: list, anchor: str, anchor_at: str = "top") -> list:
    """Level names for ``n`` ordered vertebrae from one known level, skipping suspected gaps.

    ``anchor`` is the level of the top (``anchor_at="top"``) or bottom vertebra; names that
    would fall outside ``levels`` are None (a count that does not fit the anchor is not forced).
    """
    if n == 0 or not anchor:
        return [None] * n
    if anchor not in levels:
        raise ValueError(f"anchor level {anchor!r} is not one of SPINE.LEVELS {list(levels)}")
    skip = dict(gaps)
    offsets, off = [], 0
    for k in range(n):
        offsets.append(off)
        off += 1 + skip.get(k, 0)
    base = levels.index(anchor) - (offsets[-1] if anchor_at == "bottom" else 0)
    return [levels[base + o] if 0 <= base + o < len(levels) else None for o in offsets]
