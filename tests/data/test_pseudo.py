"""Pseudo-labels for the end vertebrae outside the annotated range (spine_d2.data.pseudo) and
its tool, on a hand-made 128 x 128 film."""

import copy
import json
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest

from spine_d2.data.pseudo import label_end_vertebrae
from spine_d2.errors import DatasetError

H = W = 128


def _quad(cx, cy, w=24, h=12):
    x0, y0 = cx - w / 2, cy - h / 2
    return [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]


def _film():
    """T1..T3 annotated 20 px apart at x 64, y 44 / 64 / 84."""
    anns = []
    for k, level in enumerate(["T1", "T2", "T3"]):
        poly = _quad(64, 44 + 20 * k)
        anns.append(
            {"id": k + 1, "image_id": 7, "category_id": 1, "segmentation": [poly],
             "area": 288.0, "bbox": [52.0, 38.0 + 20 * k, 24.0, 12.0], "iscrowd": 0,
             "attributes": {"level": level}}  # fmt: skip
        )
    images = [{"id": 7, "file_name": "film.png", "width": W, "height": H}]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "vb"}]}


def _det(cx, cy, score, w=24, h=12):
    rle = mask_util.merge(mask_util.frPyObjects([_quad(cx, cy, w, h)], H, W))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"image_id": 7, "category_id": 1, "bbox": [cx - w / 2, cy - h / 2, w, h],
            "score": score, "segmentation": rle}  # fmt: skip


def _detections():
    return [
        _det(64, 44, 0.95),  # T1 itself: overlaps its annotation, not a new vertebra
        _det(65, 24, 0.6),  # one spacing above T1: C7
        _det(64, 6, 0.9),  # two spacings above: beyond max_steps (C6 is not labelled)
        _det(110, 24, 0.9),  # level with C7 but far off the spine's line
        _det(63, 104, 0.3),  # one spacing below T3: T4
        _det(64, 124, 0.1, h=6),  # further down, under min_score
    ]


def test_the_next_vertebra_beyond_each_end_is_added_and_named():
    coco = _film()
    before = copy.deepcopy(coco)
    out, counts = label_end_vertebrae(coco, _detections())
    assert coco == before  # the input is left as it was
    assert counts == {"C7": 1, "T4": 1}
    added = out["annotations"][3:]
    assert [a["attributes"] for a in added] == [
        {"level": "C7", "pseudo": True},
        {"level": "T4", "pseudo": True},
    ]
    assert [a["id"] for a in added] == [4, 5]
    c7_box = np.array(added[0]["bbox"])
    assert abs(c7_box[0] + c7_box[2] / 2 - 65) < 1.5 and abs(c7_box[1] + c7_box[3] / 2 - 24) < 1.5
    assert added[0]["area"] == pytest.approx(288, rel=0.15)
    # a stricter score floor leaves the T4 candidate (0.3) out
    assert label_end_vertebrae(coco, _detections(), min_score=0.5)[1] == {"C7": 1}


def test_nothing_is_added_without_room_or_candidates():
    coco = _film()
    # the top annotated level is the first of all levels: no name above it
    levels = ["T1", "T2", "T3", "T4"]
    assert label_end_vertebrae(coco, _detections(), levels=levels)[1] == {"T4": 1}
    assert label_end_vertebrae(coco, [])[1] == {}
    one = copy.deepcopy(coco)
    one["annotations"] = one["annotations"][:1]  # one body: no spacing to go by
    assert label_end_vertebrae(one, _detections())[1] == {}


def test_the_spacing_is_per_level_when_a_body_between_is_unlabelled():
    coco = _film()
    del coco["annotations"][1]  # T2 not annotated: T1 and T3 are two spacings apart
    assert label_end_vertebrae(coco, _detections())[1] == {"C7": 1, "T4": 1}
    # a candidate 1.8 spacings above T1 is too far, whatever the gap below T1
    far = [_det(64, 8, 0.9)]
    assert label_end_vertebrae(coco, far)[1] == {}
    assert label_end_vertebrae(coco, far, max_steps=2.0)[1] == {"C7": 1}
    # two annotations of one level (a labelling slip) do not break the ordering
    coco["annotations"].append(dict(coco["annotations"][0], id=9))
    assert label_end_vertebrae(coco, _detections())[1] == {"T4": 1}


def test_a_mask_of_another_size_names_the_source():
    det = _det(65, 24, 0.6)
    det["segmentation"]["size"] = [64, 64]
    with pytest.raises(DatasetError, match=r"^dets.json: image 7: detection mask is \[64, 64\]"):
        label_end_vertebrae(_film(), [det], source="dets.json")
    polygon = dict(_det(65, 24, 0.6), segmentation=[_quad(65, 24)])
    for bad in ({"image_id": 7}, polygon, dict(_det(65, 24, 0.6), bbox=[1, 2, 3])):
        with pytest.raises(DatasetError, match="^dets.json: detection 1 is not a COCO result"):
            label_end_vertebrae(_film(), [_det(64, 44, 0.9), bad], source="dets.json")


def test_a_malformed_dataset_names_the_file():
    coco = _film()
    del coco["images"][0]["height"]
    with pytest.raises(DatasetError, match="^train.json: image 0 needs an id and a positive"):
        label_end_vertebrae(coco, _detections(), coco_source="train.json")
    coco = _film()
    del coco["annotations"][2]["bbox"]
    with pytest.raises(DatasetError, match="^train.json: annotation 2 needs id, image_id"):
        label_end_vertebrae(coco, _detections(), coco_source="train.json")


def test_tool_writes_a_new_file_and_refuses_bad_input(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, "tools")
    try:
        import label_end_vertebrae as tool
    finally:
        sys.path.remove("tools")
    coco, dets = tmp_path / "train.json", tmp_path / "dets.json"
    coco.write_text(json.dumps(_film()))
    dets.write_text(json.dumps(_detections()))
    out = tmp_path / "ends" / "train.json"
    assert tool.main(["--coco", str(coco), "--detections", str(dets), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert len(written["annotations"]) == 5
    assert written["info"]["pseudo_labels"]["counts"] == {"C7": 1, "T4": 1}
    assert not [q for q in out.parent.iterdir() if ".tmp" in q.name]
    assert json.loads(coco.read_text()) == _film()

    assert tool.main(["--coco", str(coco), "--detections", str(dets), "--out", str(coco)]) == 1
    assert "would overwrite an input" in capsys.readouterr().err
    assert json.loads(coco.read_text()) == _film()
    dets.write_text("{not json")
    assert tool.main(["--coco", str(coco), "--detections", str(dets), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {dets}: detections file is not readable JSON")
        and err.count("\n") == 1
    )


def test_annotations_are_read_as_the_evaluator_reads_them():
    from spine_d2.data.pseudo import _annotation_rles

    rle = mask_util.encode(np.asfortranarray(np.ones((20, 30), dtype=np.uint8)))
    anns = [
        {"bbox": [2, 3, 10, 5]},  # no segmentation: its box
        {"bbox": [2, 3, 10, 5], "segmentation": []},  # empty: its box too
        {"bbox": [0, 0, 4, 4], "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
        {"bbox": [0, 0, 30, 20], "segmentation": dict(rle, counts=rle["counts"].decode())},
    ]
    assert [int(mask_util.area(r)) for r in _annotation_rles(anns, 20, 30)] == [50, 50, 16, 600]


def test_tool_refuses_a_bad_score_and_files_of_the_wrong_shape(tmp_path, capsys):
    sys.path.insert(0, "tools")
    try:
        import label_end_vertebrae as tool
    finally:
        sys.path.remove("tools")
    coco, dets, out = tmp_path / "train.json", tmp_path / "dets.json", tmp_path / "out.json"
    coco.write_text(json.dumps(_film()))
    dets.write_text(json.dumps(_detections()))
    args = ["--coco", str(coco), "--detections", str(dets), "--out", str(out)]
    assert tool.main(args + ["--min-score", "2"]) == 1
    assert "--min-score must be in [0, 1], not 2.0" in capsys.readouterr().err
    dets.write_text(json.dumps({"annotations": []}))
    assert tool.main(args) == 1
    assert f"{dets}: not a list of COCO detections" in capsys.readouterr().err
    coco.write_text(json.dumps([]))
    assert tool.main(args) == 1
    assert f"{coco}: not a COCO dataset" in capsys.readouterr().err
    assert not out.exists()
