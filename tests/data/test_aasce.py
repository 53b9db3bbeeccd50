"""AASCE converter: label checks on crafted quads, patient key and split, and a real conversion
of a handful of the shared radiographs (skipped where ../shared/data/aasce is not there)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from spine_d2.data.aasce import (
    AASCE_LEVELS,
    check_vertebrae,
    convert_aasce,
    patient_key,
    patient_split,
    read_landmarks,
)
from spine_d2.data.datasets import load_spine_coco
from spine_d2.errors import DatasetError

AASCE_DIR = Path(
    os.environ.get("SPINE_AASCE_DIR", Path(__file__).resolve().parents[3] / "shared/data/aasce")
)
needs_aasce = pytest.mark.skipif(
    not (AASCE_DIR / "data" / "training").is_dir(), reason=f"AASCE data not at {AASCE_DIR}"
)


def _spine(n=17, pitch=40.0, w=60.0, h=24.0, x=200.0, y0=50.0):
    """(n, 4, 2) corners TL, TR, BL, BR of upright bodies stacked top to bottom."""
    quads = []
    for i in range(n):
        top = y0 + i * pitch
        quads.append([[x, top], [x + w, top], [x, top + h], [x + w, top + h]])
    return np.asarray(quads, dtype=float)


def test_clean_spine_passes_unchanged_in_drawing_order():
    q = _spine()
    res = check_vertebrae(q)
    assert res.skip_reason is None and res.fixed == []
    # TL, TR, BR, BL: a simple quad whose area is w * h
    np.testing.assert_allclose(res.polygons[0], q[0][[0, 1, 3, 2]])


@pytest.mark.parametrize("swap", [(0, 2), (1, 3), (0, 1)])
def test_swapped_corners_are_a_bow_tie_fixed_to_the_hull(swap):
    q = _spine()
    i, j = swap
    q[3, [i, j]] = q[3, [j, i]]
    res = check_vertebrae(q)
    assert res.fixed == ["bow_tie:T4"]
    poly = res.polygons[3]
    # the fixed outline covers the full body: area w * h, corners TL, TR, BR, BL
    np.testing.assert_allclose(poly, _spine()[3][[0, 1, 3, 2]])


def test_vertebra_listed_last_but_drawn_on_top_is_reordered():
    q = _spine()
    q = np.concatenate([q[1:], q[:1]])  # T1's corners stored in the L5 slot
    res = check_vertebrae(q)
    assert res.fixed == ["order"]
    ys = [p[:, 1].mean() for p in res.polygons]
    assert ys == sorted(ys)
    np.testing.assert_allclose(res.polygons[0], _spine()[0][[0, 1, 3, 2]])


def test_ambiguous_order_degenerate_size_outlier_and_overlap_are_skipped():
    q = _spine()
    q[5] = q[6] + [70.0, 1.0]  # beside its neighbour at the same height: which is above?
    assert check_vertebrae(q).skip_reason == "order_ambiguous"
    q = _spine()
    q[2, :, 1] = q[2, 0, 1]  # flat
    assert check_vertebrae(q).skip_reason == "degenerate:T3"
    q = _spine()
    q[16, [1, 3], 0] += 800  # corners from far away: one huge quad
    assert check_vertebrae(q).skip_reason == "size_outlier:L5"
    q = _spine()
    q[8] += [0.0, 30.0]  # pushed half into T10
    assert check_vertebrae(q).skip_reason == "overlap:T9-T10"
    assert check_vertebrae(_spine(n=16)).skip_reason == "expected 17 x 4 corners"


def test_quads_spanning_the_discs_are_skipped():
    # bodies 24 px tall with 16 px discs pass; corners paired across the discs instead give
    # 16 px quads with 24 px gaps between them
    assert check_vertebrae(_spine(h=24.0)).skip_reason is None
    assert check_vertebrae(_spine(h=16.0)).skip_reason == "disc_shift:T1-L5"
    tilted = _spine(h=16.0)
    tilted[:, :, 0] += tilted[:, :, 1] * 0.3  # a leaning spine: heights measured along it
    assert check_vertebrae(tilted).skip_reason == "disc_shift:T1-L5"

    def across_discs(first, last):  # those quads moved onto the disc below their body
        q = _spine(h=24.0)
        q[first : last + 1, :2, 1] += 24.0
        q[first : last + 1, 2:, 1] += 16.0
        return q

    # T6..T10 on the discs: gaps T5/T6 (40 px), then 24 px between the 16 px quads, then 0
    assert check_vertebrae(across_discs(5, 9)).skip_reason == "disc_shift:T5-T10"
    # two quads on discs make two tall gaps in a row: within what correct films show
    assert check_vertebrae(across_discs(5, 6)).skip_reason is None


def test_patient_key_groups_films_of_one_patient_across_dates():
    assert patient_key("sunhl-1th-02-Jan-2017-162 A AP.jpg") == "patient-162"
    assert patient_key("sunhl-1th-02-Jan-2017-162 B AP.jpg") == "patient-162"
    assert patient_key("sunhl-1th-04-Jan-2017-165 C AP.jpg") == patient_key(
        "sunhl-1th-03-Jan-2017-165 A AP.jpg"
    )
    assert patient_key("sunhl-1th-21-Nov-2016-138 D AP2.jpg") == "patient-138"
    assert patient_key("sunhl-1th-22-Nov-2016-142 A AP (2).jpg") == "patient-142"
    assert patient_key("sunhl-1th-20-Jul-2016-coronal6.jpg") == patient_key(
        "sunhl-1th-20-Jul-2016-coronal12.jpg"
    )
    assert patient_key("sunhl-1th-02-Jan-2017-16 A AP.jpg") != "patient-162"


def test_patient_split_is_disjoint_sized_and_deterministic():
    names = [
        f"sunhl-1th-0{d}-Jan-2017-{p} {c} AP.jpg"
        for p in range(100, 140)
        for d, c in ((1, "A"), (2, "B"))
    ]
    names += [f"sunhl-1th-20-Jul-2016-coronal{i}.jpg" for i in range(1, 9)]
    split = patient_split(names, val_fraction=0.25, seed=3)
    assert split == patient_split(list(reversed(names)), val_fraction=0.25, seed=3)
    keys = {s: {patient_key(n) for n, v in split.items() if v == s} for s in ("train", "val")}
    assert keys["train"] and keys["val"] and not keys["train"] & keys["val"]
    n_val = sum(v == "val" for v in split.values())
    assert 0.25 * len(names) <= n_val <= 0.25 * len(names) + 8


def test_bad_source_and_output_inside_source(tmp_path):
    with pytest.raises(DatasetError, match="data/training.*not found"):
        convert_aasce(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "src/data/training").mkdir(parents=True)
    (tmp_path / "src/labels/training").mkdir(parents=True)
    with pytest.raises(DatasetError, match="inside the source"):
        convert_aasce(tmp_path / "src", tmp_path / "src/out")
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match="bad.mat"):
        read_landmarks(bad)


@needs_aasce
def test_converts_a_handful_of_real_radiographs(tmp_path):
    before = sorted(p.stat().st_mtime_ns for p in (AASCE_DIR / "labels/training").glob("*.mat"))[:5]
    meta = convert_aasce(AASCE_DIR, tmp_path / "aasce", val_fraction=0.3, limit=12)
    out = tmp_path / "aasce"
    c = meta["counts"]
    skipped = sum(v for k, v in c["checks"].items() if k.startswith("skipped"))
    assert c["train"]["images"] + c["val"]["images"] + skipped == 12
    assert c["val"]["images"] >= 1 and c["train"]["images"] >= 1
    assert (out / "images").is_symlink()
    assert (out / "images").resolve() == (AASCE_DIR / "data/training").resolve()
    patients = {}
    for split in ("train", "val"):
        coco = json.loads((out / f"{split}.json").read_text())
        assert [c["name"] for c in coco["categories"]] == ["vertebral_body"]
        assert len(coco["annotations"]) == 17 * len(coco["images"])
        size = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        by_image = {}
        for a in coco["annotations"]:
            w, h = size[a["image_id"]]
            xy = np.asarray(a["segmentation"][0]).reshape(-1, 2)
            assert xy.shape == (4, 2)
            assert xy[:, 0].min() >= 0 and xy[:, 0].max() <= w
            assert xy[:, 1].min() >= 0 and xy[:, 1].max() <= h
            by_image.setdefault(a["image_id"], []).append(a)
        for anns in by_image.values():
            assert [a["attributes"]["level"] for a in anns] == AASCE_LEVELS
            ys = [np.mean(a["segmentation"][0][1::2]) for a in anns]
            assert ys == sorted(ys)  # top to bottom
        patients[split] = {im["patient"] for im in coco["images"]}
        # the same checks as any registered dataset, with the linked images found
        assert len(load_spine_coco(out / f"{split}.json", out / "images")) == len(coco["images"])
    assert not patients["train"] & patients["val"]
    assert meta["patients"] == {k: sorted(v) for k, v in patients.items()}
    after = sorted(p.stat().st_mtime_ns for p in (AASCE_DIR / "labels/training").glob("*.mat"))[:5]
    assert before == after  # the source is only read
    # converting again into the same folder reuses the link and gives the same files
    again = convert_aasce(AASCE_DIR, out, val_fraction=0.3, limit=12)
    assert again["digest"] == meta["digest"]


@needs_aasce
def test_known_label_error_of_the_readme_is_fixed():
    name = "sunhl-1th-12-Jan-2017-262 A AP.jpg"
    res = check_vertebrae(read_landmarks(AASCE_DIR / "labels/training" / f"{name}.mat"))
    assert res.polygons is not None and "order" in res.fixed
    ys = [p[:, 1].mean() for p in res.polygons]
    assert ys == sorted(ys)


@needs_aasce
def test_film_labelled_on_the_discs_is_skipped():
    # this film's quads lie on the discs (docs/results-aasce.md, "Label errors in the val films");
    # the next film is fine
    labels = AASCE_DIR / "labels/training"
    res = check_vertebrae(read_landmarks(labels / "sunhl-1th-06-Jan-2017-184 A AP.jpg.mat"))
    assert res.skip_reason.startswith("disc_shift:")
    res = check_vertebrae(read_landmarks(labels / "sunhl-1th-06-Jan-2017-187 A AP.jpg.mat"))
    assert res.skip_reason is None


def test_csv_landmarks_read_and_bad_rows_name_the_file(tmp_path):
    from spine_d2.data.aasce import read_landmarks_csv

    q = _spine() / 1000.0
    (tmp_path / "filenames.csv").write_text("a.jpg\nb.jpg\n")
    row = ",".join(str(v) for v in np.concatenate([q[..., 0].ravel(), q[..., 1].ravel()]))
    (tmp_path / "landmarks.csv").write_text(f"{row}\n{row}\n")
    marks = read_landmarks_csv(tmp_path)
    np.testing.assert_allclose(marks["b.jpg"], q)
    (tmp_path / "landmarks.csv").write_text(f"{row}\n1,2,3\n")
    with pytest.raises(DatasetError, match="landmarks.csv: row 2 has 3 values, expected 136"):
        read_landmarks_csv(tmp_path)
    (tmp_path / "landmarks.csv").write_text(f"{row}\n")
    with pytest.raises(DatasetError, match="1 rows for 2 names"):
        read_landmarks_csv(tmp_path)
