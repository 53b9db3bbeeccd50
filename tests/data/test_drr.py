"""DRR generator: physics and geometry on a small phantom, plus one small render of the real CT."""

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest

pytest.importorskip("diffdrr")  # the `drr` extra

from spine_d2.data import drr as D  # noqa: E402
from spine_d2.errors import DatasetError  # noqa: E402

LEVELS = ["T5", "T6", "T7"]
PARAMS = replace(
    D.PRESETS["small"],
    num_train=4, num_val=2, num_test=4, views_train=2, views_val=1, views_test=1,
    size=96, z_spacing_mm=2.0, base_pixel_mm=1.0, base_width_mm=160.0,
    pixel_mm_range=(1.0, 1.4), mask_smooth_px=0.0, min_area_px=16,
)  # fmt: skip


def _phantom() -> D.CtVolume:
    """Soft-tissue cylinder with three bony 'vertebrae' (ellipsoids) stacked along z."""
    shape = (80, 80, 60)  # 2 mm voxels
    x, y, z = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    mu = np.where(x**2 + y**2 < 30**2, 0.02, 0.0).astype(np.float32)
    labels = np.zeros(shape, np.int16)
    for i, zc in enumerate((-16, 0, 16)):
        inside = (x / 9) ** 2 + ((y + 4 + 2 * i) / 7) ** 2 + ((z - zc) / 5.5) ** 2 < 1
        mu[inside] = 0.05
        labels[inside] = i + 1
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return D.CtVolume(mu, labels, affine, LEVELS, [(lvl, None, None) for lvl in LEVELS])


SPEC = {"split": "train", "index": 0, "kind": "AP", "rotation_deg": 7.0, "tilt_deg": 3.0,
        "sdd_mm": 1100.0}  # fmt: skip


@pytest.fixture(scope="module")
def phantom():
    return _phantom()


@pytest.fixture(scope="module")
def base(phantom, tmp_path_factory):
    return D.render_base_view(phantom, SPEC, PARAMS, tmp_path_factory.mktemp("cache"))


def test_layers_sum_to_full_render(phantom):
    import torch

    layers, _, drr = D.render_layers(phantom, SPEC, PARAMS, 48, 40)
    with torch.no_grad():
        full = drr(D.view_pose(SPEC, PARAMS), n_points=400)[0, 0].numpy()
        full_same = drr(D.view_pose(SPEC, PARAMS), mask_to_channels=True, n_points=400)[0].numpy()
    np.testing.assert_allclose(full_same.sum(0), full, rtol=1e-4, atol=1e-4)
    # Different sampling along the rays, same integral within the quadrature error.
    np.testing.assert_allclose(layers.sum(0), full, rtol=0.03, atol=0.02)
    assert layers[1:].sum() > 0.1 * layers.sum()


def test_masks_lie_where_labels_project(phantom, base):
    import torch

    h, w = base.background.shape
    drr, _ = D._drr_module(phantom, SPEC, PARAMS, h, w)
    thr = PARAMS.mask_path_mm * PARAMS.mu_water
    for c, (y0, x0, arr) in enumerate(base.layers):
        mask = np.zeros((h, w), bool)
        mask[y0 : y0 + arr.shape[0], x0 : x0 + arr.shape[1]] = arr > thr
        idx = np.argwhere(phantom.labels == c + 1)
        world = (phantom.affine @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
        uv = drr.perspective_projection(
            D.view_pose(SPEC, PARAMS), torch.tensor(world[None]).float()
        )
        uv = np.floor(uv[0].numpy()).astype(int)
        assert ((uv >= 0) & (uv < [w, h])).all()
        assert mask[uv[:, 1], uv[:, 0]].mean() > 0.99, phantom.channel_info[c]
        hit = np.zeros_like(mask)
        hit[uv[:, 1], uv[:, 0]] = True
        hit = cv2.dilate(hit.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert (mask & ~hit).sum() < 0.05 * mask.sum()  # and the mask is no bigger than that


def test_pair_transforms_map_high_dose_masks_onto_low_dose(base):
    params = replace(PARAMS, size=192, pixel_mm_range=(0.5, 0.7))
    for seed in range(4):
        rng = np.random.default_rng(seed)
        geom_a = D.sample_scan(base, params, rng)
        geom_b = D.pair_motion(base, geom_a, params, rng)
        _, inst_a = D.synthesize(base, geom_a, params)
        _, inst_b = D.synthesize(base, geom_b, params)
        assert len(inst_a) == len(inst_b) == 3
        for (info, ma, _), (_, mb, _) in zip(inst_a, inst_b):
            a = geom_a["crop"] @ geom_a["motion"][info[0]]
            t = geom_b["crop"] @ geom_b["motion"][info[0]] @ np.linalg.inv(a)
            moved = cv2.warpAffine(ma.astype(np.float32), t[:2], mb.shape[::-1]) > 0.5
            inter, union = (moved & mb).sum(), (moved | mb).sum()
            if mb.sum() > 50 and not (
                mb[0].any() or mb[-1].any() or mb[:, 0].any() or mb[:, -1].any()
            ):
                assert inter / union >= 0.95, (seed, info, inter / union)


def test_noise_variance_follows_dose():
    line = np.full((128, 128), 3.0, np.float32)
    params = replace(PARAMS, blur_mm=0.0)
    var, expected = {}, {}
    for dose in (1.0, 0.25, 0.05):
        rng = np.random.default_rng(0)
        i0 = 1e5 * dose
        p = D.expose(line, i0, rng, params, 1.0, 0.0)
        var[dose] = float(p.var())
        n = i0 * np.exp(-3.0)  # photons behind the object
        expected[dose] = (n + params.electronic_std**2) / n**2  # var(log I) = var(I) / I^2
    for dose in (0.25, 0.05):
        assert var[dose] / var[1.0] == pytest.approx(expected[dose] / expected[1.0], rel=0.15)
    assert var[0.05] > 15 * var[1.0]  # noise grows as the dose falls


def test_train_and_test_view_angles_are_disjoint():
    params = replace(PARAMS, views_train=60, views_test=60, views_val=20)
    bins = {}
    for split in ("train", "val", "test"):
        for spec in D.view_specs(params, split):
            max_deg = (
                params.ap_rotation_deg if spec["kind"] in ("AP", "PA") else params.lat_rotation_deg
            )
            b = int((spec["rotation_deg"] + max_deg) // params.angle_bin_deg)
            bins.setdefault(split, set()).add((spec["kind"] in ("AP", "PA"), b))
            assert abs(spec["rotation_deg"]) <= max_deg and abs(spec["tilt_deg"]) <= params.tilt_deg
    assert bins["train"].isdisjoint(bins["test"]) and bins["train"].isdisjoint(bins["val"])
    assert len(bins["train"]) > 3 and len(bins["test"]) > 3


def test_more_training_views_extend_the_first_ones():
    # `prepare_spine_drr.py --views-train N` must keep the views of a smaller N (their cached
    # renders are reused) and change neither held-out split.
    few, many = replace(PARAMS, views_train=8), replace(PARAMS, views_train=24)
    assert D.view_specs(many, "train")[:8] == D.view_specs(few, "train")
    assert len({s["rotation_deg"] for s in D.view_specs(many, "train")}) == 24
    for split in ("val", "test"):
        assert D.view_specs(many, split) == D.view_specs(few, split)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"views_train": 0}, "views_train must be at least 1, not 0"),
        ({"views_val": 0}, "views_val must be at least 1, not 0"),
        ({"num_test": -1}, "num_test must be at least 0, not -1"),
        ({"num_train": 0, "num_val": 0, "num_test": 0}, "all 0: nothing to make"),
        ({"size": 3}, "size must be 32..4096 px, not 3"),
        ({"size": 100000}, "size must be 32..4096 px, not 100000"),
    ],
)
def test_no_views_or_no_scans_at_all_is_a_one_line_error(tmp_path, change, message):
    with pytest.raises(DatasetError, match=message):
        D.generate_dataset(tmp_path / "out", replace(PARAMS, **change), progress=False)
    assert not (tmp_path / "out").exists()  # nothing written


def test_an_output_or_cache_that_is_a_file_is_a_one_line_error(tmp_path):
    from spine_d2.errors import SpineError

    taken = tmp_path / "scan.png"
    taken.write_bytes(b"somebody's scan")
    with pytest.raises(SpineError, match="scan.png: exists and is not a folder"):
        D.generate_dataset(taken, PARAMS, progress=False)
    with pytest.raises(SpineError, match="scan.png: exists and is not a folder"):
        D.generate_dataset(tmp_path / "out", PARAMS, progress=False, cache_dir=taken)
    assert taken.read_bytes() == b"somebody's scan" and not (tmp_path / "out").exists()


def test_a_validation_only_set_of_more_views(phantom, tmp_path):
    # --views-val N --num-train 0 --num-test 0: a calibration set of unseen views; its first
    # views are the default val's, the empty splits' views are listed but not rendered
    params = replace(PARAMS, views_val=3, num_val=6, num_train=0, num_test=0)
    assert D.view_specs(params, "val")[: PARAMS.views_val] == D.view_specs(PARAMS, "val")
    meta = D.generate_dataset(tmp_path / "cal", params, progress=False, ct=phantom)
    assert meta["counts"]["train"] == {"images": 0, "annotations": 0}
    assert meta["counts"]["test"] == {"images": 0, "annotations": 0}
    assert meta["counts"]["val"]["images"] == 6 and meta["counts"]["val"]["annotations"] > 0
    val = json.loads((tmp_path / "cal" / "val.json").read_text())
    assert {im["base_view"] for im in val["images"]} <= {"val/0", "val/1", "val/2"}
    assert len({im["base_view"] for im in val["images"]}) > 1
    assert json.loads((tmp_path / "cal" / "pairs.json").read_text())["pairs"] == []
    rendered = list((tmp_path / "cal" / "cache").glob("view-*.npz"))
    assert len(rendered) == 3  # the val views only


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "cache" not in p.parts and p.name != "meta.json"}  # fmt: skip


@pytest.fixture(scope="module")
def generated(phantom, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    cache = root / "cache"
    for name in ("a", "b"):
        D.generate_dataset(root / name, PARAMS, progress=False, cache_dir=cache, ct=phantom)
    return root


def test_same_seed_gives_identical_files_and_reruns_reuse(generated, phantom):
    a, b = _tree(generated / "a"), _tree(generated / "b")
    assert a == b and any(k.endswith(".png") for k in a)
    meta = json.loads((generated / "a" / "meta.json").read_text())
    again = D.generate_dataset(generated / "a", PARAMS, progress=False,
                               cache_dir=generated / "cache", ct=phantom)  # fmt: skip
    assert again == meta  # reused, not regenerated
    other = replace(PARAMS, seed=1)
    D.generate_dataset(generated / "b", other, progress=False, cache_dir=generated / "cache",
                       ct=phantom)  # fmt: skip
    assert _tree(generated / "b") != a  # replaced, not mixed
    meta_b = json.loads((generated / "b" / "meta.json").read_text())
    assert meta_b["digest"] == other.digest()
    assert set(meta["pixels_sha256"]) == {"train", "val", "test"}
    assert all(meta_b["pixels_sha256"][k] != meta["pixels_sha256"][k] for k in ("train", "test"))


def test_pixels_digest_sees_one_pixel_and_not_the_png_encoding(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    scans = {f"s{i}.png": rng.integers(0, 65535, (32, 32), dtype=np.uint16) for i in range(2)}
    for name, px in scans.items():
        cv2.imwrite(str(images / name), px, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    coco = {"images": [{"file_name": n} for n in scans]}
    before = D.pixels_digest(coco, images)
    cv2.imwrite(str(images / "s1.png"), scans["s1.png"], [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert D.pixels_digest(coco, images) == before  # other bytes, same pixels
    changed = scans["s1.png"].copy()
    changed[5, 7] ^= 1
    cv2.imwrite(str(images / "s1.png"), changed)
    assert D.pixels_digest(coco, images) != before


def test_coco_files_load_and_register(generated):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from pycocotools.coco import COCO

    from spine_d2.data.datasets import register_spine_coco

    root = generated / "a"
    for split, n in (("train", 4), ("val", 2), ("test", 4)):
        coco = COCO(str(root / f"{split}.json"))
        assert len(coco.getImgIds()) == n and coco.getAnnIds()
        ann = coco.loadAnns(coco.getAnnIds())[0]
        assert ann["attributes"]["level"] in LEVELS and coco.annToMask(ann).sum() > 0
        name = f"_test_drr_{split}"
        register_spine_coco(name, root / f"{split}.json", root / "images")
        try:
            recs = DatasetCatalog.get(name)
            assert len(recs) == n and recs[0]["annotations"][0]["level"] in LEVELS
            assert MetadataCatalog.get(name).thing_classes == ["vertebra"]
        finally:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    pairs = json.loads((root / "pairs.json").read_text())["pairs"]
    assert len(pairs) == 2 and set(pairs[0]["transforms_A_to_B"]) == set(LEVELS)
    for key in ("high_dose", "low_dose", "ideal"):
        assert (root / "images" / pairs[0][key]).is_file()


def test_a_second_generator_into_the_same_folder_is_refused(phantom, tmp_path):
    from spine_d2.atomic import single_writer
    from spine_d2.errors import SpineError

    out = tmp_path / "gen"
    out.mkdir()
    with single_writer(out / ".generate.lock", "DRR dataset generation"):  # a first one, running
        with pytest.raises(SpineError, match="another DRR dataset generation is writing here"):
            D.generate_dataset(out, PARAMS, progress=False, cache_dir=tmp_path / "c", ct=phantom)
        assert [p.name for p in out.iterdir()] == [".generate.lock"]  # no staging folder made


def test_a_finished_dataset_is_reused_from_a_read_only_folder(generated, phantom, monkeypatch):
    import os

    from spine_d2.errors import SpineError

    root = generated / "a"
    monkeypatch.setattr(os, "access", lambda p, mode: not str(p).startswith(str(root)))
    meta = D.generate_dataset(root, PARAMS, progress=False, cache_dir=generated / "cache")
    assert meta["digest"] == PARAMS.digest()  # read, nothing written
    other = replace(PARAMS, seed=7)
    with pytest.raises(SpineError, match="a: folder is not writable"):
        D.generate_dataset(root, other, progress=False, cache_dir=generated / "cache", ct=phantom)


def test_a_torn_meta_json_is_regenerated_not_a_traceback(phantom, tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "meta.json").write_bytes(b'{"digest": "ab')  # a run killed mid-write, by hand
    meta = D.generate_dataset(out, PARAMS, progress=False, cache_dir=tmp_path / "c", ct=phantom)
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["digest"] == PARAMS.digest() and (out / "train.json").is_file()


def test_bench_align_runs_to_the_end_on_a_generated_dataset(generated, tmp_path):
    """The alignment benchmark the way `make demo` runs it, as a script: status 0 and its JSON
    (a finished run once exited 1, printing its result dict, and stopped the demo)."""
    import subprocess
    import sys

    out = tmp_path / "align.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/bench_align.py", "--root", str(generated / "a"),
         "--manifest", str(tmp_path / "no_export.jsonl"), "--weights", "", "--tune", "1",
         "--out", str(out), "--png", ""],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["bench"] == "align" and result["pairs_evaluated"] == 1
    tre = result["per_dose"]["20-100%"]["tre_gt"]  # the one pair's dose; GT masks only
    assert tre["n"] == 3 and tre["median"] < 1.0
    assert "NaN" not in out.read_text()  # figures of an empty dose bin read null


def test_dicom_output_holds_the_same_pixels_as_png(generated, phantom, tmp_path):
    from spine_d2.data.io import read_scan

    params = replace(PARAMS, image_format="dicom", num_train=2, num_val=1, num_test=2)
    root = tmp_path / "dcm"
    D.generate_dataset(root, params, progress=False, cache_dir=generated / "cache", ct=phantom)
    coco = json.loads((root / "train.json").read_text())
    first = coco["images"][0]
    assert first["file_name"].endswith(".dcm")
    scan = read_scan(root / "images" / first["file_name"])
    png = cv2.imread(str(generated / "a" / "images" / "train" / "00000.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(scan.pixels, png)  # same seed and scan index, other container
    assert scan.meta["photometric_interpretation"] == "MONOCHROME2"
    assert scan.meta["pixel_spacing"] == pytest.approx(
        [first["pixel_mm"]] * 2, abs=1e-4
    )  # json keeps 4 decimals


def test_unsupported_output_format_is_refused(tmp_path):
    from spine_d2.errors import DatasetError

    with pytest.raises(DatasetError, match="unsupported output jpeg 16-bit"):
        D.generate_dataset(tmp_path / "x", replace(PARAMS, image_format="jpeg"), progress=False)
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_real_ct_small_render(tmp_path):
    """The shipped CT end to end: prepared volume, one coarse lateral view, labels on bone."""
    params = replace(PARAMS, z_spacing_mm=2.5, base_pixel_mm=4.0, base_width_mm=300.0)
    ct = D.load_ct(params, tmp_path)
    assert ct.levels[0] == "C6" and ct.levels[-1] == "L3" and len(ct.channel_info) == 17
    spec = dict(SPEC, kind="LAT_L")
    b = D.render_base_view(ct, spec, params, tmp_path)
    assert sum(layer is not None for layer in b.layers) == 17
    assert 2.0 < float(np.median(b.background)) < 12.0  # realistic thorax line integrals
