"""Vertebral levels that agree with each other along the spine.

A level classifier looks at one vertebra at a time, and neighbouring thoracic vertebrae look
alike; the spine itself is the stronger cue: levels increase by one from each vertebra to the
next. ``decode_levels`` orders the detections along the spine curve and picks the increasing
level sequence with the highest total log-probability (a small dynamic programme), so a single
confident vertebra (C7's long process, T1's first rib pair, L1 without ribs) fixes its
neighbours.

The spacing between consecutive detections is evidence too: about one local spacing between
neighbours, about two where the detector missed the vertebra between them, about none between a
vertebra and its duplicate. With ``spacing_weight`` > 0 a jump of k levels (k = 0: a repeat) across
a spacing ratio r costs ``spacing_weight * (k - r)**2`` more, so a chain of look-alike thoracic
vertebrae cannot slide by one level, skip one, nor name two vertebrae alike, against the geometry.
Whether that helps depends on how regular the spacing of a dataset is (README, "CPU training recipe
and levels"): full-spine films yes, cropped DRR views with slivers at their edges no, hence off by
default.

A ``LevelPrior`` adds where each level sits: how far down the film its centre lies and how wide
it is next to the film's other vertebrae (T1 narrow, L5 wide), fitted from a training split's
annotations (``tools/fit_level_prior.py``). It is a framing prior: it helps on films framed like
the training films (the AASCE full-spine films put T1 at 5 % and L5 at 90 % of the height, with
a spread smaller than one vertebra) and says little where framing varies (its spreads are then
wide). Each feature's penalty is capped at ``ZMAX`` standard deviations, so an unusual film
cannot outvote clear appearance evidence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import VERTEBRA_LEVELS
from ..errors import SpineError
from ..zoi.order import order_along_spine
from .jsonfile import read_model_json, write_model_json

__all__ = ["LevelPrior", "decode_levels", "shift_margin"]

PRIOR_FORMAT = "spine_d2.level_prior/1"


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
        spacing_weight: nats per squared level of disagreement between a jump (0 for a
            repeat) and the spacing ratio of the two detections (``zoi.order.spacing_ratios``);
            0 ignores spacing.
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
        if spacing_weight > 0 and np.isfinite(ratios[i - 1]):
            # every allowed jump pays, a repeat (jump 0) too: nearly free for a duplicate
            # (ratio ~0), as dear as a skip across an even spacing for two vertebrae one spacing
            # apart; backward jumps stay -inf
            step = trans - spacing_weight * (jump - ratios[i - 1]) ** 2
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


def shift_margin(evidence: np.ndarray, decoded: np.ndarray) -> float:
    """How far the decoded names beat the same chain named one level up or down, in nats of
    the decoder's evidence (N x L, as given to :func:`decode_levels`): the smaller of the two
    differences. A shift keeps every jump, so the transition and spacing costs cancel and only
    the evidence counts. Films named one level off end to end are the level decoder's usual
    error (docs/results-aasce.md, "Where the names slide"), and a small margin is where they
    are (docs/results-aasce.md, "How sure the names are"). ``inf`` when neither shift fits in
    the L levels."""
    evidence = np.asarray(evidence, dtype=np.float64)
    decoded = np.asarray(decoded, dtype=np.int64)
    rows = np.arange(len(decoded))
    best = float(evidence[rows, decoded].sum())
    margin = np.inf
    for shift in (-1, 1):
        moved = decoded + shift
        if len(moved) and moved.min() >= 0 and moved.max() < evidence.shape[1]:
            margin = min(margin, best - float(evidence[rows, moved].sum()))
    return margin


@dataclass
class LevelPrior:
    """Per-level Gaussian over two framing features of a vertebra (``FEATURES``).

    ``mean``/``std``: len(levels) x 2. Levels never seen in fitting (C1..C7 on AASCE films) get
    the capped penalty: possible, never favoured.
    """

    levels: list
    mean: np.ndarray
    std: np.ndarray
    count: list = field(default_factory=list)
    source: str = ""

    FEATURES = ("log_relative_width", "relative_y")
    ZMAX = 3.0
    MIN_STD = 1e-3

    @staticmethod
    def features(boxes: np.ndarray, image_height: float) -> np.ndarray:
        """N x 2: log(box width / median width of the boxes), box centre y / image height.

        Both are unchanged by resizing the film, so boxes in the model's input frame and in the
        original frame give the same features.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros((0, 2))
        width = np.maximum(boxes[:, 2] - boxes[:, 0], 1e-6)
        rel_y = (boxes[:, 1] + boxes[:, 3]) / 2 / float(image_height)
        return np.stack([np.log(width / np.median(width)), rel_y], axis=1)

    @classmethod
    def fit(cls, dataset_dicts, source: str = "", min_count: int = 5) -> "LevelPrior":
        """From detectron2 dataset dicts whose annotations carry ``level``; XYWH_ABS boxes.

        The width feature is relative to the median of the film's labelled vertebrae, as at
        inference it is relative to the film's detections. Levels with fewer than
        ``min_count`` examples are left out (too few to estimate a spread).
        """
        from detectron2.structures import BoxMode

        by_level: dict = {}
        for record in dataset_dicts:
            anns = [a for a in record.get("annotations", []) if a.get("level")]
            if not anns:
                continue
            boxes = np.array(
                [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
            )
            for a, f in zip(anns, cls.features(boxes, record["height"])):
                by_level.setdefault(a["level"], []).append(f)
        order = {name: i for i, name in enumerate(VERTEBRA_LEVELS)}
        names = sorted(
            (n for n, v in by_level.items() if len(v) >= min_count),
            key=lambda n: order.get(n, len(order)),
        )
        if not names:
            raise SpineError(f"{source or 'dataset'}: no level with {min_count}+ annotations")
        feats = [np.array(by_level[n]) for n in names]
        return cls(
            levels=names,
            mean=np.array([f.mean(0) for f in feats]),
            std=np.maximum(np.array([f.std(0) for f in feats]), cls.MIN_STD),
            count=[len(f) for f in feats],
            source=source,
        )

    def log_likelihood(self, boxes: np.ndarray, image_height: float, levels) -> np.ndarray:
        """N x len(levels) log-likelihood (nats, up to a constant) of each box at each level."""
        f = self.features(boxes, image_height)
        z2 = np.minimum(((f[:, None, :] - self.mean[None]) / self.std[None]) ** 2, self.ZMAX**2)
        fitted = -0.5 * z2.sum(axis=2)
        out = np.full((len(f), len(levels)), -0.5 * self.ZMAX**2 * len(self.FEATURES))
        index = {name: i for i, name in enumerate(self.levels)}
        for j, name in enumerate(levels):
            if name in index:
                out[:, j] = fitted[:, index[name]]
        return out

    def to_dict(self) -> dict:
        return {
            "format": PRIOR_FORMAT,
            "features": list(self.FEATURES),
            "source": self.source,
            "levels": {
                name: {"mean": m.round(5).tolist(), "std": s.round(5).tolist(), "count": int(c)}
                for name, m, s, c in zip(self.levels, self.mean, self.std, self.count)
            },
        }

    def save(self, path) -> None:
        """Write JSON to a temporary name, then rename: a crash never leaves half a file."""
        d = self.to_dict()
        levels = ",\n".join(
            f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in d.pop("levels").items()
        )
        write_model_json(path, d, "levels", f"{{\n{levels}\n }}")  # one level per line

    @classmethod
    def load(cls, path) -> "LevelPrior":
        """One-line SpineError naming the file for anything that is not a level prior."""
        path = Path(path)
        data = read_model_json(path, "level prior", PRIOR_FORMAT, "tools/fit_level_prior.py")
        if data.get("features") != list(cls.FEATURES):
            raise SpineError(f"{path}: features {data.get('features')} != {list(cls.FEATURES)}")
        try:
            entries = data["levels"]
            names = list(entries)
            mean = np.array([entries[n]["mean"] for n in names], dtype=np.float64).reshape(-1, 2)
            std = np.array([entries[n]["std"] for n in names], dtype=np.float64).reshape(-1, 2)
            count = [int(entries[n].get("count", 0)) for n in names]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SpineError(f"{path}: malformed level entry ({e!r})") from None
        if not names or not np.isfinite(mean).all() or not (std > 0).all():
            raise SpineError(f"{path}: a level prior needs levels with finite means and stds > 0")
        return cls(names, mean, std, count, str(data.get("source", "")))
