"""labelme <-> COCO: round trip on synthetic scans, mapping rules, and bad input naming the file."""

import json
from pathlib import Path

import numpy as np
import pytest

from spine_d2.data.labelme import LabelMapping, coco_to_labelme, labelme_to_coco, load_mapping
from spine_d2.errors import DatasetError

MAPPING = Path(__file__).resolve().parents[2] / "datasets" / "labelme_mapping.yaml"


def _labelme(tmp_path, shapes, image, name="scan.json", size=None):
    w, h = size or (128, 128)
    doc = {"shapes": shapes, "imagePath": image, "imageHeight": h, "imageWidth": w}
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((128, 128), np.uint8)).save(tmp_path / "scan.png")
    return "scan.png"


def test_round_trip_keeps_polygons_levels_and_images(synthetic_coco, tmp_path):
    json_file, image_root = synthetic_coco
    src = json.loads(Path(json_file).read_text())
    n = coco_to_labelme(json_file, image_root, tmp_path / "lm")
    assert n == len(src["images"])
    mapping = LabelMapping(
        ["vertebra"],
        {"vertebra": "vertebra"},
        level_pattern=r"^(?P<label>\w+) (?P<level>[CTLS]\d+)$",
    )
    out = tmp_path / "back.json"
    counts = labelme_to_coco(tmp_path / "lm", mapping, out, image_root=image_root)
    back = json.loads(out.read_text())
    assert counts["images"] == len(src["images"])
    assert counts["annotations"] == len(src["annotations"]) > 0
    assert [i["file_name"] for i in back["images"]] == [i["file_name"] for i in src["images"]]

    def key(coco):
        names = {i["id"]: i["file_name"] for i in coco["images"]}
        return sorted(
            (
                names[a["image_id"]],
                (a.get("attributes") or {}).get("level") or a.get("level"),
                tuple(np.round(a["segmentation"][0], 1)),
            )
            for a in coco["annotations"]
        )

    assert key(back) == key(src)


def test_mapping_file_levels_groups_rectangles_and_ignored_labels(tmp_path, image):
    mapping = load_mapping(MAPPING)
    shapes = [
        {
            "label": "body T4",
            "points": [[10, 10], [40, 10], [40, 30], [10, 30]],
            "shape_type": "polygon",
        },
        {"label": "T5", "points": [[10, 40], [40, 60]], "shape_type": "rectangle"},
        # one pedicle drawn in two pieces: one instance with two polygons
        {"label": "pedicle", "points": [[50, 10], [60, 10], [55, 20]], "group_id": 7},
        {"label": "pedicle", "points": [[50, 22], [60, 22], [55, 30]], "group_id": 7},
        {"label": "ruler", "points": [[0, 0], [5, 0], [5, 5]]},
        {"label": "body", "points": [[1, 1]], "shape_type": "point"},
    ]
    _labelme(tmp_path, shapes, image)
    out = tmp_path / "coco.json"
    counts = labelme_to_coco(tmp_path, mapping, out)
    coco = json.loads(out.read_text())
    assert counts["annotations"] == 3 and counts["ignored"] == 1 and counts["skipped_point"] == 1
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    got = [
        (cats[a["category_id"]], a["attributes"].get("level"), len(a["segmentation"]))
        for a in coco["annotations"]
    ]
    assert got == [("vertebral_body", "T4", 1), ("vertebral_body", "T5", 1), ("pedicle", None, 2)]
    assert coco["annotations"][1]["bbox"] == [10.0, 40.0, 30.0, 20.0]
    assert coco["annotations"][1]["area"] == 600.0


def test_hidden_files_and_folders_are_not_read_as_annotations(tmp_path, image):
    _labelme(tmp_path, [{"label": "body T4", "points": [[10, 10], [40, 10], [40, 30]]}], image)
    (tmp_path / "._scan.json").write_bytes(b"\x00\x05\x16\x07Mac OS X")  # AppleDouble fork
    (tmp_path / ".history").mkdir()
    _labelme(tmp_path / ".history", [], "gone.png", name="scan.json")  # an editor's old copy
    counts = labelme_to_coco(tmp_path, load_mapping(MAPPING), tmp_path / "coco.json")
    assert counts["images"] == 1 and counts["annotations"] == 1


@pytest.mark.parametrize(
    "shape,size,message",
    [
        ({"label": "vertebra?", "points": [[1, 1], [9, 1], [5, 9]]}, None, "not in the mapping"),
        ({"label": "body", "points": [[1, 1], [900, 1], [5, 9]]}, None, "leaves the 128x128"),
        ({"label": "body", "points": [[1, 1], [9, 1]]}, None, "has 2 points"),
        ({"label": "body", "points": [[1, 1], [9, 1], [5, 9]]}, (256, 128), "says 256x128"),
        ({"label": "body", "points": [[1, 1], [9, "x"], [5, 9]]}, None, "malformed points"),
        ({"label": "body", "points": [[1, 1], [9], [5, 9]]}, None, "malformed points"),
    ],
)
def test_bad_labelme_names_the_file_and_writes_nothing(tmp_path, image, shape, size, message):
    bad = _labelme(tmp_path, [shape], image, name="bad_scan.json", size=size)
    out = tmp_path / "coco.json"
    with pytest.raises(DatasetError, match=message) as e:
        labelme_to_coco(tmp_path, load_mapping(MAPPING), out)
    assert str(bad) in str(e.value)
    assert not out.exists() and not [q for q in tmp_path.iterdir() if ".tmp" in q.name]


def test_missing_image_and_bad_mapping(tmp_path):
    _labelme(tmp_path, [], "gone.png")
    with pytest.raises(DatasetError, match="gone.png is not there"):
        labelme_to_coco(tmp_path, load_mapping(MAPPING), tmp_path / "c.json")
    m = tmp_path / "m.yaml"
    m.write_text("categories: [a]\nlabels: {x: b}\n")
    with pytest.raises(DatasetError, match="maps to 'b'"):
        load_mapping(m)
    m.write_text("categories: [a]\nlabelz: {}\n")
    with pytest.raises(DatasetError, match="unknown keys"):
        load_mapping(m)
    m.write_bytes(b"\x89PNG\r\n")  # a picture saved under the mapping's name
    with pytest.raises(DatasetError, match="m.yaml: not valid YAML"):
        load_mapping(m)


def test_to_labelme_refuses_a_missing_or_non_coco_file(tmp_path):
    with pytest.raises(DatasetError, match="gone.json: annotation file not found"):
        coco_to_labelme(tmp_path / "gone.json", tmp_path, tmp_path / "lm")
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    with pytest.raises(DatasetError, match="list.json: not a COCO instances file"):
        coco_to_labelme(bad, tmp_path, tmp_path / "lm")
    assert not (tmp_path / "lm").exists()
