"""Ordering along a curved spine, gap detection and level naming."""

import numpy as np
import torch

from spine_d2.config import VERTEBRA_LEVELS
from spine_d2.zoi.extract import ScanPredictions, extract_zois, level_conflicts
from spine_d2.zoi.order import assign_levels, find_gaps, order_along_spine, spacing_ratios


def _curved_spine(n=14):
    """Centroids on a strongly scoliotic curve: a 200-degree arc, where sorting by y fails."""
    t = np.linspace(-0.55 * np.pi, 0.55 * np.pi, n)
    return np.stack([300 + 120 * np.cos(t), 300 + 120 * np.sin(t)], axis=1)


def test_order_follows_the_curve_not_y():
    pts = _curved_spine()
    perm = np.random.default_rng(0).permutation(len(pts))
    seq = order_along_spine(pts[perm])
    recovered = [int(perm[i]) for i in seq.order]
    assert recovered == list(range(len(pts)))  # top end first, then along the arc
    assert list(np.argsort(pts[:, 1])) != recovered  # plain y-sorting would get it wrong
    assert np.all(np.diff(seq.position) > 0) and seq.gaps == []


def test_gap_found_where_one_vertebra_was_removed():
    # spacing grows slowly from top to bottom, as from thoracic to lumbar
    y = np.cumsum(np.linspace(20, 30, 12))
    pts = np.stack([100 + 10 * np.sin(y / 80), y], axis=1)
    assert find_gaps(pts) == []
    removed = np.delete(pts, 6, axis=0)
    seq = order_along_spine(removed[::-1])
    assert seq.gaps == [(5, 1)]
    # the ratios the gaps come from (and the level decoder uses): ~2 at the gap, ~1 elsewhere
    assert len(seq.ratios) == len(removed) - 1
    assert 1.8 < seq.ratios[5] < 2.2
    assert np.all(np.abs(np.delete(seq.ratios, 5) - 1) < 0.2)


def test_a_duplicate_detection_fakes_no_gap_next_to_it():
    y = np.arange(6) * 20.0
    pts = np.stack([np.full(6, 50.0), y], axis=1)
    pts = np.insert(pts, 2, pts[1] + [2.0, 1.5], axis=0)  # the second vertebra found twice
    ratios = spacing_ratios(pts)
    assert ratios[1] < 0.2  # the twins
    # the top spacing against its only neighbours (the twins' 2.5 and 18.6 -> median 10.6)
    # would be 1.9, a gap, were the twins' spacing not left out of the reference
    assert np.all(np.abs(np.delete(ratios, 1) - 1) < 0.15), ratios
    assert find_gaps(pts) == []


def test_levels_from_anchor_skip_the_gap():
    levels = list(VERTEBRA_LEVELS)
    assert assign_levels(4, [(1, 1)], levels, "T10") == ["T10", "T11", "L1", "L2"]
    assert assign_levels(3, [], levels, "L5", anchor_at="bottom") == ["L3", "L4", "L5"]
    assert assign_levels(2, [], levels, "") == [None, None]


def test_extract_reports_the_missing_vertebra_with_its_level():
    # box-shaped masks (probabilities 1) of 9 vertebrae down a 400 px scan, the 5th removed
    centres = [(64 + 3 * k, 30 + 40 * k) for k in range(9)]
    del centres[4]
    boxes = torch.tensor(
        [[x - 14, y - 10, x + 14, y + 10] for x, y in centres], dtype=torch.float32
    )
    n = len(boxes)
    pred = ScanPredictions(
        boxes, torch.linspace(0.9, 0.99, n), torch.zeros(n, dtype=torch.long), torch.ones(n, 28, 28)
    )
    pixels = np.random.default_rng(0).integers(0, 65535, (400, 128), dtype=np.uint16)
    entries, files, missing = extract_zois(
        pixels, pred, zoi_dir="zoi/x", anchor_level="T4", levels=list(VERTEBRA_LEVELS)
    )
    assert [e["level"] for e in entries] == ["T4", "T5", "T6", "T7", "T9", "T10", "T11", "T12"]
    assert [e["centroid"][1] for e in entries] == sorted(e["centroid"][1] for e in entries)
    assert missing == [{"reason": "gap", "after": 3, "before": 4, "count": 1, "levels": ["T8"]}]
    assert sorted(files) == sorted(e["file"] for e in entries)
    assert entries[0]["file"] == "zoi/x/00_T4.png"


def test_no_detections_is_a_suspected_miss_not_an_error():
    empty = ScanPredictions(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 28, 28)
    )
    entries, files, missing = extract_zois(np.zeros((64, 64), np.uint8), empty, zoi_dir="zoi/e")
    assert entries == [] and files == {}
    assert missing[0]["reason"] == "no_detections"


def _column(centres, levels=None):
    boxes = torch.tensor(
        [[x - 14, y - 10, x + 14, y + 10] for x, y in centres], dtype=torch.float32
    )
    n = len(boxes)
    return ScanPredictions(
        boxes,
        torch.linspace(0.9, 0.99, n),
        torch.zeros(n, dtype=torch.long),
        torch.ones(n, 28, 28),
        levels,
    )


def test_model_levels_decide_the_gap_count_and_names():
    levels = list(VERTEBRA_LEVELS)
    pixels = np.zeros((400, 128), np.uint16)
    even = [(64, 30 + 40 * k) for k in range(8)]
    # the level decoder skipped T8 where the spacing looks ordinary: still a suspected miss
    names = ["T4", "T5", "T6", "T7", "T9", "T10", "T11", "T12"]
    _, _, missing = extract_zois(pixels, _column(even, names), zoi_dir="z", levels=levels)
    assert missing == [{"reason": "gap", "after": 3, "before": 4, "count": 1, "levels": ["T8"]}]
    # a wide spacing (would count 2) between T2 and T4: the levels say one, T3
    wide = [(64, 30), (64, 70), (64, 190), (64, 230), (64, 270)]
    _, _, missing = extract_zois(
        pixels, _column(wide, ["T1", "T2", "T4", "T5", "T6"]), zoi_dir="z", levels=levels
    )
    assert missing == [{"reason": "gap", "after": 1, "before": 2, "count": 1, "levels": ["T3"]}]
    # consecutive levels across a wide spacing contradict it: reported, without names
    _, _, missing = extract_zois(
        pixels, _column(wide, ["T1", "T2", "T3", "T4", "T5"]), zoi_dir="z", levels=levels
    )
    assert missing == [{"reason": "gap", "after": 1, "before": 2, "count": 2, "levels": []}]
    # no levels at all: the spacing alone
    _, _, missing = extract_zois(pixels, _column(wide), zoi_dir="z", levels=levels)
    assert missing == [{"reason": "gap", "after": 1, "before": 2, "count": 2, "levels": []}]


def test_expected_levels_report_the_chain_ends_that_were_not_found():
    """A full-spine film shows T1..L5; a chain named T2..L4 lacks both ends, which leave no gap
    in it: with ZOI.EXPECTED_LEVELS they are reported, above the first and below the last."""
    levels = list(VERTEBRA_LEVELS)
    pixels = np.zeros((800, 128), np.uint16)
    names = ["T2", "T3", "T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2"]
    names += ["L3", "L4"]
    column = _column([(64, 30 + 40 * k) for k in range(len(names))], names)
    _, _, missing = extract_zois(pixels, column, zoi_dir="z", levels=levels)
    assert missing == []  # without the expectation nothing is missing: the spacing is even
    _, _, missing = extract_zois(
        pixels, column, zoi_dir="z", levels=levels, expected_levels=["T1", "L5"]
    )
    last = len(names) - 1
    assert missing == [
        {"reason": "gap", "after": None, "before": 0, "count": 1, "levels": ["T1"]},
        {"reason": "gap", "after": last, "before": None, "count": 1, "levels": ["L5"]},
    ]
    # top and bottom in order around an inner gap; a chain reaching past the range (C7 above
    # T1) misses nothing above; two missing at the bottom are both named
    inner = ["C7", "T1", "T2", "T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12", "L1"]
    inner += ["L2", "L3"]
    column = _column([(64, 30 + 40 * k) for k in range(len(inner))], inner)
    _, _, missing = extract_zois(
        pixels, column, zoi_dir="z", levels=levels, expected_levels=["T1", "L5"]
    )
    assert missing == [
        {"reason": "gap", "after": 2, "before": 3, "count": 1, "levels": ["T3"]},
        {
            "reason": "gap",
            "after": len(inner) - 1,
            "before": None,
            "count": 2,
            "levels": ["L4", "L5"],
        },
    ]
    # unknown levels (no level head, no anchor) say nothing about the ends
    column = _column([(64, 30 + 40 * k) for k in range(5)])
    _, _, missing = extract_zois(
        pixels, column, zoi_dir="z", levels=levels, expected_levels=["T1", "L5"]
    )
    assert missing == []
    # a film with nothing found misses the whole range
    empty = ScanPredictions(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 28, 28)
    )
    _, _, missing = extract_zois(
        pixels, empty, zoi_dir="z", levels=levels, expected_levels=["T1", "L5"]
    )
    assert missing == [
        {
            "reason": "no_detections",
            "after": None,
            "before": None,
            "count": 17,
            "levels": levels[levels.index("T1") : levels.index("L5") + 1],
        }
    ]


def test_two_distinct_bodies_with_one_name_are_a_level_conflict():
    """A C7 read as T1 above the real T1 makes the decoder repeat a name lower down: the export
    says so. A duplicate detection of one body (spacing ~0) is the decoder's intended repeat."""
    levels = list(VERTEBRA_LEVELS)
    pixels = np.zeros((400, 128), np.uint16)
    even = [(64, 30 + 40 * k) for k in range(8)]
    names = ["T1", "T2", "T3", "T4", "T5", "T6", "L5", "L5"]
    entries, _, _ = extract_zois(pixels, _column(even, names), zoi_dir="z", levels=levels)
    assert level_conflicts(entries) == [{"reason": "repeat", "ids": [6, 7], "level": "L5"}]
    # the same name on a body found twice (2 px apart) is no conflict
    twins = even[:3] + [(66, 112)] + even[3:]
    names = ["T1", "T2", "T3", "T3", "T4", "T5", "T6", "T7", "T8"]
    entries, _, _ = extract_zois(pixels, _column(twins, names), zoi_dir="z", levels=levels)
    assert [e["level"] for e in entries][2:4] == ["T3", "T3"]
    assert level_conflicts(entries) == []
    # two bodies, nothing to compare their spacing with: reported (never trusted silently)
    entries, _, _ = extract_zois(
        pixels, _column(even[:2], ["L5", "L5"]), zoi_dir="z", levels=levels
    )
    assert level_conflicts(entries) == [{"reason": "repeat", "ids": [0, 1], "level": "L5"}]
    # no levels: nothing to say
    entries, _, _ = extract_zois(pixels, _column(even), zoi_dir="z", levels=levels)
    assert level_conflicts(entries) == []
