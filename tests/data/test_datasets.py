"""register_spine_coco: round trip, validation of each bad record kind, idempotence."""

import copy
import errno
import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from spine_d2.data.datasets import load_spine_coco, register_builtin, register_spine_coco
from spine_d2.errors import DatasetError


@pytest.fixture
def coco(synthetic_coco):
    json_file, image_root = synthetic_coco
    return json.loads(Path(json_file).read_text()), image_root


def _write(tmp_path, coco_dict):
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(coco_dict))
    return str(p)


def test_round_trip_keeps_geometry_levels_and_classes(synthetic_coco):
    json_file, image_root = synthetic_coco
    raw = json.loads(Path(json_file).read_text())
    name = "spine_test_roundtrip"
    register_spine_coco(name, json_file, image_root)
    try:
        dicts = DatasetCatalog.get(name)
        meta = MetadataCatalog.get(name)
        assert len(dicts) == len(raw["images"])
        anns = [a for d in dicts for a in d["annotations"]]
        assert len(anns) == len(raw["annotations"])
        by_id = {a["id"]: a for a in raw["annotations"]}
        for a in anns:
            src = by_id[a["id"]]
            assert a["bbox"] == src["bbox"] and a["bbox_mode"] == BoxMode.XYWH_ABS
            assert a["segmentation"] == src["segmentation"]
            assert a["level"] == src["level"] and a["category_id"] == 0
        assert Path(dicts[0]["file_name"]).is_file()
        assert meta.thing_classes == ["vertebra"]
        assert meta.evaluator_type == "spine_coco" and meta.json_file == json_file
        # levels come out in anatomical order, not alphabetical
        order = [meta.vertebra_levels.index(l) for l in ("T9", "T10") if l in meta.vertebra_levels]
        assert order == sorted(order)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_registration_is_idempotent_and_replaceable(synthetic_coco, tmp_path):
    json_file, image_root = synthetic_coco
    name = "spine_test_twice"
    register_spine_coco(name, json_file, image_root)
    register_spine_coco(name, json_file, image_root)  # same source: no error, no change
    assert DatasetCatalog.list().count(name) == 1
    other = _write(tmp_path, json.loads(Path(json_file).read_text()))
    register_spine_coco(name, other, image_root)  # new source replaces the old one
    assert MetadataCatalog.get(name).json_file == other
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _break(kind, coco):
    c = copy.deepcopy(coco)
    ann = c["annotations"][0]
    if kind == "missing image":
        c["images"][0]["file_name"] = "nope.png"
    elif kind == "escaping path":
        c["images"][0]["file_name"] = "../" + c["images"][0]["file_name"]
    elif kind == "absolute path":
        c["images"][0]["file_name"] = "/etc/passwd"
    elif kind == "short polygon":
        ann["segmentation"] = [[1.0, 1.0, 5.0, 5.0]]
    elif kind == "degenerate polygon":
        ann["segmentation"] = [[1.0, 1.0, 5.0, 5.0, 9.0, 9.0]]  # collinear
    elif kind == "polygon outside":
        ann["segmentation"] = [[1.0, 1.0, 500.0, 1.0, 500.0, 9.0]]
    elif kind == "box outside":
        ann["bbox"] = [100.0, 100.0, 60.0, 10.0]
    elif kind == "empty box":
        ann["bbox"] = [10.0, 10.0, 0.0, 5.0]
    elif kind == "unknown category":
        ann["category_id"] = 7
    elif kind == "unknown image":
        ann["image_id"] = 999
    elif kind == "RLE counts not runs":
        ann["segmentation"] = {"counts": 5, "size": [128, 128]}
    elif kind == "RLE runs short":
        ann["segmentation"] = {"counts": [100, 20], "size": [128, 128]}
    return c


CASES = {
    "missing image": "image file not found",
    "escaping path": "escapes image_root",
    "absolute path": "is absolute",
    "short polygon": "coordinates",
    "degenerate polygon": "degenerate",
    "polygon outside": "leaves the 128x128 image",
    "box outside": "leaves the 128x128 image",
    "empty box": "has no area",
    "unknown category": "unknown category_id 7",
    "unknown image": "unknown image id",
    "RLE counts not runs": "RLE counts must be a string (compressed) or a list of run lengths",
    "RLE runs short": "RLE run lengths do not add up to the 128x128 image",
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_bad_record_gives_clear_error(kind, coco, tmp_path):
    raw, image_root = coco
    bad = _write(tmp_path, _break(kind, raw))
    with pytest.raises(DatasetError) as e:
        load_spine_coco(bad, image_root)
    msg = str(e.value)
    assert msg.startswith(bad) and CASES[kind] in msg
    assert "\n" not in msg
    if kind not in ("missing image", "escaping path", "absolute path"):
        assert f"annotation id={raw['annotations'][0]['id']}" in msg


@pytest.mark.parametrize("kind", ["short polygon", "missing image"])
def test_skip_invalid_drops_only_bad_records(kind, coco, tmp_path, caplog):
    raw, image_root = coco
    bad = _write(tmp_path, _break(kind, raw))
    dicts = load_spine_coco(bad, image_root, skip_invalid=True)
    n_anns = sum(len(d["annotations"]) for d in dicts)
    if kind == "short polygon":
        assert len(dicts) == len(raw["images"]) and n_anns == len(raw["annotations"]) - 1
    else:  # the image and all its annotations go
        first = sum(a["image_id"] == raw["images"][0]["id"] for a in raw["annotations"])
        assert len(dicts) == len(raw["images"]) - 1
        assert n_anns == len(raw["annotations"]) - first
    assert "skipped invalid records: 1 x" in caplog.text


@pytest.mark.parametrize(
    "change, message",
    [
        ({"categories": [{"id": 1}]}, "needs an integer 'id' and a 'name'"),
        ({"categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}, "share an id"),
        ({"images": {"id": 1}}, "'images' must be a list of objects"),
        ({"annotations": ["T1"]}, "'annotations' must be a list of objects"),
    ],
)
def test_malformed_top_level_lists_are_one_line(coco, tmp_path, change, message):
    raw, image_root = coco
    bad = _write(tmp_path, {**raw, **change})
    with pytest.raises(DatasetError, match=message):
        load_spine_coco(bad, image_root)


def test_not_json_and_missing_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_spine_coco(p, tmp_path)
    with pytest.raises(DatasetError, match="annotation file not found"):
        load_spine_coco(tmp_path / "none.json", tmp_path)


def test_builtin_split_missing_says_which_command_makes_it(tmp_path):
    register_builtin(tmp_path)  # nothing generated there
    try:
        with pytest.raises(DatasetError, match="make data") as e:
            DatasetCatalog.get("spine_drr_train")
        assert str(tmp_path) in str(e.value)
    finally:
        register_builtin()


def test_stale_aasce_conversion_is_warned_about(tmp_path, caplog):
    from spine_d2.data.aasce import CONVERTER_VERSION

    meta = tmp_path / "spine_aasce" / "meta.json"
    meta.parent.mkdir()
    try:
        meta.write_text(json.dumps({"converter_version": CONVERTER_VERSION}))
        register_builtin(tmp_path)
        assert "AASCE converter" not in caplog.text
        meta.write_text(json.dumps({"converter_version": "1.0"}))
        register_builtin(tmp_path)
        assert f"written by AASCE converter 1.0, this is {CONVERTER_VERSION}" in caplog.text
        assert str(meta) in caplog.text
        assert "run `make data-aasce` again" in caplog.text
        caplog.clear()
        meta.write_text("{not json")
        register_builtin(tmp_path)
        assert "written by AASCE converter unreadable" in caplog.text
        caplog.clear()
        # a newer converter's output is not to be re-converted with this older one
        meta.write_text(json.dumps({"converter_version": "99.0"}))
        register_builtin(tmp_path)
        assert "converter 99.0" in caplog.text and "update spine-d2" in caplog.text
        assert "make data-aasce" not in caplog.text
    finally:
        register_builtin()


def test_categories_keep_only_the_named_classes(coco, tmp_path):
    raw, image_root = coco
    raw = copy.deepcopy(raw)
    raw["categories"] = [{"id": 1, "name": "vertebral_body"}, {"id": 2, "name": "pedicle"}]
    # category ids listed out of order: kept classes are numbered in id order
    raw["categories"].reverse()
    for i, a in enumerate(raw["annotations"]):
        a["category_id"] = 1 + i % 2
    n_body = sum(a["category_id"] == 1 for a in raw["annotations"])
    json_file = _write(tmp_path, raw)
    name = "spine_test_body_only"
    register_spine_coco(name, json_file, image_root, categories=("vertebral_body",))
    try:
        dicts = DatasetCatalog.get(name)
        anns = [a for d in dicts for a in d["annotations"]]
        assert len(anns) == n_body and {a["category_id"] for a in anns} == {0}
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["vertebral_body"]
        # COCOEvaluator must not score against the unfiltered json
        assert not hasattr(meta, "json_file")
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    with pytest.raises(DatasetError, match="has no category spinous"):
        load_spine_coco(json_file, image_root, categories=("spinous",))


def test_synthetic_generator_names_the_image_a_full_disk_stopped(tmp_path, monkeypatch):
    # cv2.imwrite says only False on a full disk: the image is encoded in memory and written by
    # Python, so the line names the file and the reason, and no COCO file names missing images
    from spine_d2 import atomic
    from spine_d2.data import synthetic
    from spine_d2.errors import OutputError

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "open", lambda *a, **k: FullDisk(), raising=False)
    with pytest.raises(OutputError, match=r"train_000\.png: cannot write it \(No space left"):
        synthetic.make_synthetic_spine_dataset(tmp_path, num_images=2)
    assert not (tmp_path / "train.json").exists()
    assert [p.name for p in (tmp_path / "images").iterdir()] == []


def test_an_image_opencv_cannot_encode_is_named(tmp_path):
    from spine_d2.data.io import write_image

    with pytest.raises(DatasetError, match=r"a\.xyz: OpenCV cannot encode a uint8 array"):
        write_image(tmp_path / "a.xyz", np.zeros((4, 4), np.uint8))
    write_image(tmp_path / "b.png", np.full((4, 4), 513, np.uint16))
    assert cv2.imread(str(tmp_path / "b.png"), cv2.IMREAD_UNCHANGED)[0, 0] == 513
    assert [p.name for p in tmp_path.iterdir()] == ["b.png"]
