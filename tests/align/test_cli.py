import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from spine_d2.align.cli import main, pairs_from_file, pairs_from_patterns
from spine_d2.data.io import file_sha256


def _write(path, image, dtype=np.uint16):
    top = np.iinfo(dtype).max
    cv2.imwrite(str(path), np.clip(np.rint(np.clip(image, 0, 1) * top), 0, top).astype(dtype))
    return path


def _manifest(path, scans):
    """A minimal export manifest: scan path -> list of full-size boolean masks."""
    with open(path, "w", encoding="utf-8") as f:
        for scan, masks in scans:
            zois = []
            for k, m in enumerate(masks):
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode()
                zois.append({"id": k, "level": None, "score": 0.9, "mask_rle": rle})
            f.write(
                json.dumps({"path": scan.name, "sha256": file_sha256(scan), "zois": zois}) + "\n"
            )
    return path


@pytest.fixture
def pair_files(tmp_path, make_pair):
    high, ma, low, mb, _ = make_pair(noise=0.03)
    h = _write(tmp_path / "case1_high.png", high)
    lo = _write(tmp_path / "case1_low.png", low)
    man = _manifest(tmp_path / "manifest.jsonl", [(h, [ma]), (lo, [mb])])
    return h, lo, man


def test_single_pair_with_manifests(pair_files, tmp_path, capsys):
    h, lo, man = pair_files
    out = tmp_path / "out"
    rc = _enhance_one(lo, h, out, man)
    assert rc == 0
    enhanced = cv2.imread(str(out / "enhanced.png"), cv2.IMREAD_UNCHANGED)
    assert enhanced.dtype == np.uint16 and enhanced.shape == (160, 160)
    record = json.loads((out / "transforms.json").read_text())["vertebrae"][0]
    assert record["used"] and {"matrix", "angle_deg", "scale", "tx", "ty", "quality"} <= set(record)
    assert (out / "side_by_side.png").is_file()


@pytest.mark.parametrize("dtype, suffix", [(np.uint16, ".tif"), (np.float32, ".tif")])
def test_tiff_scans_give_a_tiff_of_their_own_type(make_pair, tmp_path, dtype, suffix):
    """A .tif low-dose scan gives enhanced.tif (a float one could not go to PNG: OpenCV cut it
    to 8 bits); no temporary file is left behind."""
    import tifffile

    high, ma, low, mb, _ = make_pair(noise=0.03)
    top = 65535.0
    h, lo = tmp_path / f"c_high{suffix}", tmp_path / f"c_low{suffix}"
    tifffile.imwrite(h, (high * top).astype(dtype))
    tifffile.imwrite(lo, (low * top).astype(dtype))
    man = _manifest(tmp_path / "manifest.jsonl", [(h, [ma]), (lo, [mb])])
    out = tmp_path / "out"
    assert _enhance_one(lo, h, out, man) == 0
    enhanced = tifffile.imread(out / "enhanced.tif")
    original = tifffile.imread(lo)
    assert enhanced.dtype == dtype and enhanced.shape == original.shape
    assert not np.array_equal(enhanced[mb], original[mb])
    assert np.array_equal(enhanced[0], original[0])  # far from the vertebra: untouched
    assert sorted(p.name for p in out.iterdir()) == [
        "enhanced.tif", "side_by_side.png", "transforms.json"
    ]  # fmt: skip


def test_folder_mode_by_pattern(pair_files, tmp_path):
    h, lo, man = pair_files
    assert pairs_from_patterns(str(tmp_path), "*_low.png", "*_high.png") == [(str(h), str(lo))]
    rc = main(
        [
            "--input-dir",
            str(tmp_path),
            "--low-pattern",
            "*_low.png",
            "--high-pattern",
            "*_high.png",
            "--out",
            str(tmp_path / "o"),
            "--low-manifest",
            str(man),
            "--high-manifest",
            str(man),
        ]
    )
    assert rc == 0 and (tmp_path / "o" / "case1_low" / "enhanced.png").is_file()


def test_a_second_run_into_a_folder_being_written_is_refused(pair_files, tmp_path, capsys):
    from spine_d2.atomic import single_writer

    h, lo, man = pair_files
    out = tmp_path / "o"
    args = ["--input-dir", str(tmp_path), "--low-pattern", "*_low.png", "--high-pattern",
            "*_high.png", "--out", str(out), "--low-manifest", str(man), "--high-manifest",
            str(man)]  # fmt: skip
    out.mkdir()
    with single_writer(out / ".enhance.lock", "enhance_scan run"):  # a first run, still going
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"enhance_scan: error: {out}: another enhance_scan run is writing")
        assert sorted(p.name for p in out.iterdir()) == [".enhance.lock"]
    assert main(args) == 0 and (out / "case1_low" / "enhanced.png").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["case1_low", "errors.jsonl"]


def test_pairs_file_of_the_builtin_format(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "pairs.json").write_text(
        json.dumps({"pairs": [{"high_dose": "test/0_A_high.png", "low_dose": "test/0_B_low.png"}]})
    )
    got = pairs_from_file(str(tmp_path / "pairs.json"))
    assert got == [
        (
            str(tmp_path / "images" / "test/0_A_high.png"),
            str(tmp_path / "images" / "test/0_B_low.png"),
        )
    ]


def test_a_pairs_file_that_is_not_json_is_one_line(tmp_path, capsys):
    for name, content in (("png.json", b"\x89PNG\r\n"), ("cut.json", b'{"pairs": [')):
        (tmp_path / name).write_bytes(content)
        assert main(["--pairs", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2
        assert f"{tmp_path / name}: cannot read pairs file (" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def _enhance_one(low, high, out, manifest):
    """enhance_scan on one pair, both scans' vertebrae taken from ``manifest``."""
    return main(
        ["--low", str(low), "--high", str(high), "--out", str(out)]
        + ["--low-manifest", str(manifest), "--high-manifest", str(manifest)]
    )


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("enhance_scan: error:")
    return err[0]


def test_missing_file(pair_files, tmp_path, capsys):
    h, _, man = pair_files
    rc = _enhance_one(tmp_path / "nope.png", h, tmp_path / "o", man)
    assert rc == 2 and "nope.png: no such file" in _error_line(capsys)


def test_different_size_classes(pair_files, tmp_path, capsys):
    h, _, _ = pair_files
    small = _write(tmp_path / "small_low.png", np.full((40, 40), 0.3))
    m = np.zeros((40, 40), bool)
    m[10:20, 10:20] = True
    big = np.zeros((160, 160), bool)
    big[40:100, 40:100] = True
    man = _manifest(tmp_path / "m2.jsonl", [(h, [big]), (small, [m])])
    rc = _enhance_one(small, h, tmp_path / "o", man)
    assert rc == 2 and "different size classes" in _error_line(capsys)


def test_no_vertebra_found(pair_files, tmp_path, capsys):
    h, lo, _ = pair_files
    big = np.zeros((160, 160), bool)
    big[40:100, 40:100] = True
    man = _manifest(tmp_path / "m3.jsonl", [(h, [big]), (lo, [])])
    rc = _enhance_one(lo, h, tmp_path / "o", man)
    assert rc == 2 and "no vertebra found" in _error_line(capsys)


def test_usage_errors(tmp_path, capsys):
    assert main(["--out", str(tmp_path)]) == 2
    assert "one of" in _error_line(capsys)
    assert main(["--low", "a.png", "--high", "b.png", "--out", str(tmp_path)]) == 2
    assert "no such file" in _error_line(capsys)


def test_a_full_disk_stops_the_batch_with_one_line(make_pair, tmp_path, monkeypatch, capsys):
    """A pair that cannot be written for want of room is not a failure of that pair (exit 3,
    go on): every later pair would fail alike, so the run stops with one line, exit 2."""
    import errno

    import spine_d2.align.pipeline as pipeline
    from spine_d2.atomic import atomic_path

    high, ma, low, mb, _ = make_pair(noise=0.03)
    scans = []
    for case in ("case1", "case2"):
        h = _write(tmp_path / f"{case}_high.png", high)
        lo = _write(tmp_path / f"{case}_low.png", low)
        scans += [(h, [ma]), (lo, [mb])]
    man = _manifest(tmp_path / "manifest.jsonl", scans)
    written = []

    def disk_full(path, data):
        written.append(path)
        with atomic_path(path):
            raise OSError(errno.ENOSPC, "No space left on device")  # a write() names no file

    monkeypatch.setattr(pipeline, "write_atomic", disk_full)
    out = tmp_path / "o"
    rc = main(
        ["--input-dir", str(tmp_path), "--low-pattern", "*_low.png", "--high-pattern",
         "*_high.png", "--out", str(out), "--low-manifest", str(man), "--high-manifest", str(man)]
    )  # fmt: skip
    assert rc == 2 and len(written) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"enhance_scan: error: {written[0]}: cannot write it (No space left on device): the "
        "files written before it are whole; make room (or write elsewhere) and run again"
    )
    assert (out / "errors.jsonl").read_text() == ""


def test_a_missing_scan_fails_its_pair_only(tmp_path, capsys):
    """Folder mode with the model (a random one here): the pair whose scan is gone is recorded
    in errors.jsonl and the others are still run (exit 3, not a usage error)."""
    rng = np.random.default_rng(0)
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a_high.png", "a_low.png"):
        cv2.imwrite(str(scans / name), (rng.random((96, 96)) * 255).astype(np.uint8))
    pairs = {"pairs": [{"high_dose": "a_high.png", "low_dose": "a_low.png"},
                       {"high_dose": "b_high.png", "low_dose": "b_low.png"}]}  # fmt: skip
    (scans / "pairs.json").write_text(json.dumps(pairs))
    out = tmp_path / "out"
    config = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"
    rc = main(
        ["--config-file", config, "--pairs", str(scans / "pairs.json"), "--image-root",
         str(scans), "--out", str(out), "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
    )  # fmt: skip
    assert rc == 3
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    missing = [e for e in errors if e["low"].endswith("b_low.png")]
    assert len(missing) == 1 and "b_high.png: no such file" in missing[0]["error"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"] == 2
