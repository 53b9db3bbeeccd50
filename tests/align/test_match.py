import numpy as np
import pytest

from spine_d2.align.match import Vertebra, match_vertebrae

LEVELS = ["T8", "T9", "T10", "T11", "T12", "L1"]


def _column(shift=(0.0, 0.0), jitter=0.0, seed=0, with_levels=False):
    """Six box 'vertebrae' down a gently curved column, sizes growing downwards."""
    rng = np.random.default_rng(seed)
    out = []
    for k, level in enumerate(LEVELS):
        w, h = 40 + 2 * k, 24 + k
        cx = 100 + 6 * np.sin(k / 2) + shift[0] + rng.normal(0, jitter)
        cy = 30 + 36 * k + shift[1] + rng.normal(0, jitter)
        out.append(
            Vertebra(
                mask=np.ones((h, w), bool),
                origin=(int(cx - w / 2), int(cy - h / 2)),
                level=level if with_levels else None,
                id=k,
            )
        )
    return out


def _ids(high, low, match):
    return [(high[i].id, low[j].id) for i, j in match.pairs]


@pytest.mark.parametrize("missing", [0, 2, 5])
@pytest.mark.parametrize("side", ["high", "low"])
def test_missing_vertebra_leaves_other_pairs_right(missing, side):
    high = _column()
    low = _column(shift=(4, 9), jitter=1.5, seed=1)
    (high if side == "high" else low).pop(missing)
    match = match_vertebrae(high, low)
    assert match.method == "position"
    pairs = _ids(high, low, match)
    assert all(a == b for a, b in pairs), pairs  # never shifted by one
    assert len(pairs) == len(LEVELS) - 1
    unmatched = match.unmatched_low if side == "high" else match.unmatched_high
    assert [(low if side == "high" else high)[i].id for i in unmatched] == [missing]


def test_large_motion_between_scans_is_followed():
    high = _column()
    low = _column(shift=(30, 25), jitter=1.0, seed=2)  # more than half a vertebra spacing
    low.pop(3)
    pairs = _ids(high, low, match_vertebrae(high, low))
    assert all(a == b for a, b in pairs) and len(pairs) == 5


def test_levels_are_used_when_known():
    high = _column(with_levels=True)
    low = _column(shift=(0, 36), with_levels=True)  # one full spacing: position would shift
    low.pop(0)
    match = match_vertebrae(high, low)
    assert match.method == "level"
    assert [high[i].level for i, _ in match.pairs] == [low[j].level for _, j in match.pairs]
    assert [high[i].level for i in match.unmatched_high] == ["T8"]


def test_a_scan_whose_names_slid_is_matched_by_position():
    """The low-dose chain calls its T12 'T11' too (a repeat between two distinct bodies): by
    level, T12 and L1 would pair with their neighbours; the matcher pairs by position instead.
    A duplicate detection of one body (2 px away, same name) is no reason to."""
    high = _column(with_levels=True)
    low = _column(shift=(4, 9), jitter=1.5, seed=1, with_levels=True)
    for v, name in zip(low[4:], ["T11", "T12"]):
        v.level = name
    match = match_vertebrae(high, low)
    assert match.method == "position"
    assert _ids(high, low, match) == [(k, k) for k in range(len(LEVELS))]
    twin = _column(with_levels=True)[2]
    twin.origin = (twin.origin[0] + 2, twin.origin[1])
    twin.score = 0.5
    match = match_vertebrae(high, _column(shift=(4, 9), with_levels=True) + [twin])
    assert match.method == "level" and len(match.pairs) == len(LEVELS)
