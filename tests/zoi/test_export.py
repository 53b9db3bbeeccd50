"""The exporter and its CLI on folders of synthetic scans (random-init model, CPU)."""

import errno
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest

from spine_d2.data.dicom import write_dicom
from spine_d2.data.io import read_scan
from spine_d2.errors import SpineError
from spine_d2.zoi import ZOIExporter, check_manifest_line, discover_scans, shard
from spine_d2.zoi.cli import main as cli_main

try:
    import pydicom
except ImportError:
    pydicom = None


def _lines(path):
    return [json.loads(l) for l in open(path).read().splitlines()]


def _check_zoi_pixels(out, line, scan):
    for z in line["zois"]:
        x0, y0, x1, y1 = z["crop_xyxy"]
        data = cv2.imdecode(np.fromfile(str(out / z["file"]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert data.dtype == scan.pixels.dtype
        mask = mask_util.decode(z["mask_rle"]).astype(bool)
        assert mask.sum() == z["area"]
        assert not mask[:y0].any() and not mask[y1:].any() and not mask[:, :x0].any()
        alpha = data[..., 3] > 0
        assert np.array_equal(alpha, mask[y0:y1, x0:x1])
        # the unprocessed pixels, in their own bit depth, under (and around) the mask
        assert np.array_equal(data[..., 0], scan.pixels[y0:y1, x0:x1])
        assert np.array_equal(data[..., 0][alpha], scan.pixels[mask])


def test_zoi_pixels_are_the_source_pixels_8_16_bit_and_dicom(
    random_model, export_cfg, scan_folder, tmp_path
):
    if pydicom is not None:  # a 12-bit DICOM beside the PNGs
        arr = (read_scan(scan_folder / "a" / "train_000.png").pixels >> 4).astype(np.uint16)
        write_dicom(scan_folder / "c.dcm", arr, bits_stored=12)
    out = tmp_path / "out"
    items, roots = discover_scans([str(scan_folder)])
    summary = ZOIExporter(export_cfg(), random_model).export(
        items, out, roots=roots, progress=False
    )
    assert summary["scans_ok"] == len(items) == (5 if pydicom else 4)
    lines = _lines(out / "manifest.jsonl")
    assert [l["path"] for l in lines] == sorted(i.rel for i in items)
    depths = set()
    for line in lines:
        check_manifest_line(line)
        scan = read_scan(scan_folder / line["path"])
        depths.add(line["bit_depth"])
        assert (line["width"], line["height"], line["sha256"]) == (
            scan.width,
            scan.height,
            scan.meta["sha256"],
        )
        assert len(line["zois"]) == 5
        _check_zoi_pixels(out, line, scan)
    assert depths == {8, 16}
    assert (out / "errors.jsonl").read_text() == ""
    assert summary["timings_s"].keys() >= {"decode", "model", "paste", "crop", "write"}
    # every line carries the key; the random model's decoded levels repeat nowhere here
    assert [l["level_conflicts"] for l in lines] == [[]] * len(lines)
    assert summary["scans_with_level_conflicts"] == 0


def test_manifest_level_conflicts_are_checked_and_optional(
    random_model, export_cfg, scan_folder, tmp_path
):
    items, roots = discover_scans([str(scan_folder / "a")])
    ZOIExporter(export_cfg(), random_model).export(items[:1], tmp_path, roots=roots, progress=False)
    line = _lines(tmp_path / "manifest.jsonl")[0]
    del line["level_conflicts"]  # written before the key existed
    check_manifest_line(line)
    line["level_conflicts"] = [{"reason": "repeat", "ids": [3, 4], "level": "L5"}]
    check_manifest_line(line)
    line["level_conflicts"] = [{"reason": "uncertain", "ids": [0, 1, 2], "level": "T1"}]
    check_manifest_line(line)
    for bad in (
        {"reason": "repeat", "ids": [3], "level": "L5"},
        {"reason": "repeat", "ids": [3, 4]},
        {"reason": "uncertain", "ids": [], "level": "T1"},
        {"reason": "unsure", "ids": [3, 4], "level": "L5"},
    ):
        line["level_conflicts"] = [bad]
        with pytest.raises(ValueError, match="level_conflicts"):
            check_manifest_line(line)
    line["level_conflicts"] = []
    for margin in (None, 3, 12.5):
        line["level_margin"] = margin
        check_manifest_line(line)
    del line["level_margin"]  # written before the key existed
    check_manifest_line(line)
    line["level_margin"] = "12.5"
    with pytest.raises(ValueError, match="'level_margin' has type str"):
        check_manifest_line(line)


def test_a_scan_named_by_a_thin_margin_is_listed_uncertain(
    random_model, export_cfg, scan_folder, tmp_path
):
    """The manifest carries the level decoder's margin per scan; under ZOI.LEVEL_MARGIN the
    scan's named ZOIs are listed as an "uncertain" level conflict, counted in the summary."""
    items, roots = discover_scans([str(scan_folder / "a")])
    runs = {}
    for threshold in ("0.0", "1e9"):
        out = tmp_path / threshold
        summary = ZOIExporter(export_cfg("ZOI.LEVEL_MARGIN", threshold), random_model).export(
            items, out, roots=roots, progress=False
        )
        runs[threshold] = (summary, _lines(out / "manifest.jsonl"))
    named = [l for l in runs["0.0"][1] if any(z["level"] for z in l["zois"])]
    assert named and all(isinstance(l["level_margin"], float) for l in named)
    assert all(l["level_conflicts"] == [] for l in runs["0.0"][1])
    for line in runs["1e9"][1]:
        check_manifest_line(line)
        ids = [z["id"] for z in line["zois"] if z["level"] is not None]
        assert line["level_conflicts"] == (
            [{"reason": "uncertain", "ids": ids, "level": line["zois"][0]["level"]}] if ids else []
        )
    assert runs["1e9"][0]["scans_with_level_conflicts"] == len(named)


def test_a_scans_zois_do_not_depend_on_the_scans_batched_with_it(
    random_model, export_cfg, scan_folder, tmp_path
):
    """Scans of other shapes in one batch were padded to the largest, and the GroupNorm layers
    saw that padding: a scan's detections changed with its neighbours. Now only scans of one
    shape share a forward pass, and batch 4 writes what batch 1 writes."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    scan = cv2.imread(str(next((scan_folder / "a").glob("*.png"))), -1)
    for name, crop in (
        ("tall.png", scan[:, 16:112]),
        ("square.png", scan),
        ("wide.png", scan[16:112]),
    ):
        cv2.imwrite(str(folder / name), np.ascontiguousarray(crop))
    items, roots = discover_scans([str(folder)])
    zois = {}
    for batch in ("1", "4"):
        out = tmp_path / f"batch{batch}"
        cfg = export_cfg("ZOI.BATCH_SIZE", batch)
        ZOIExporter(cfg, random_model).export(items, out, roots=roots, progress=False)
        zois[batch] = {
            l["path"]: (l["zois"], l["level_margin"]) for l in _lines(out / "manifest.jsonl")
        }
    assert len(zois["1"]) == 3 and any(z for z, _ in zois["1"].values())
    assert zois["4"] == zois["1"]


def test_npz_format(random_model, export_cfg, scan_folder, tmp_path):
    items, roots = discover_scans([str(scan_folder / "b")])
    out = tmp_path / "out"
    ZOIExporter(export_cfg("ZOI.FORMAT", "npz"), random_model).export(items, out, progress=False)
    line = _lines(out / "manifest.jsonl")[0]
    scan = read_scan(scan_folder / "b" / line["path"])
    z = line["zois"][0]
    with np.load(out / z["file"]) as npz:
        x0, y0, x1, y1 = npz["crop_xyxy"]
        assert np.array_equal(npz["pixels"], scan.pixels[y0:y1, x0:x1])
        assert npz["mask"].sum() == z["area"]


def test_resume_after_a_kill_redoes_only_the_unfinished_scan(
    random_model, export_cfg, scan_folder, tmp_path
):
    out = tmp_path / "out"
    items, roots = discover_scans([str(scan_folder / "a")])
    exporter = ZOIExporter(export_cfg(), random_model)
    exporter.export(items, out, progress=False)
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    # simulate a kill while the last scan was written: half a ZOI folder, a torn manifest line
    victim = json.loads(lines[-1])
    zoi_dir = out / os.path.dirname(victim["zois"][0]["file"])
    shutil.move(zoi_dir, str(zoi_dir) + ".partial")
    os.remove(str(zoi_dir) + ".partial/" + os.path.basename(victim["zois"][0]["file"]))
    manifest.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    before = {
        l["path"]: os.path.getmtime(out / l["zois"][0]["file"]) for l in map(json.loads, lines[:-1])
    }

    summary = exporter.export(items, out, progress=False)
    assert (summary["scans_ok"], summary["scans_skipped"]) == (1, len(items) - 1)
    final = _lines(manifest)
    assert [l["path"] for l in final] == sorted(i.rel for i in items)
    assert not list(out.rglob("*.partial"))
    assert len(os.listdir(zoi_dir)) == len(victim["zois"])
    for path, mtime in before.items():  # finished scans were not rewritten
        line = next(l for l in final if l["path"] == path)
        assert os.path.getmtime(out / line["zois"][0]["file"]) == mtime
    # a scan whose ZOI folder is gone (a rewrite killed between its two renames, below, then
    # a rerun with the manifest's own model) is redone, not skipped on its manifest line
    os.replace(zoi_dir, str(zoi_dir) + ".old")
    summary = exporter.export(items, out, progress=False)
    assert (summary["scans_ok"], summary["scans_skipped"]) == (1, len(items) - 1)
    assert len(os.listdir(zoi_dir)) == len(victim["zois"])
    assert not list(out.rglob("*.old"))
    # another model (here: another margin, part of the hash) redoes everything; one scan's
    # rewrite was killed between its two renames (its old ZOI folder moved aside, the new one
    # not yet in place): the folder set aside goes, the new one is whole
    os.replace(zoi_dir, str(zoi_dir) + ".old")
    summary = ZOIExporter(export_cfg("ZOI.MARGIN", "0"), random_model).export(
        items, out, progress=False
    )
    assert summary["scans_ok"] == len(items) and len(_lines(manifest)) == len(items)
    assert not list(out.rglob("*.old")) and not list(out.rglob("*.partial"))
    assert len(os.listdir(zoi_dir)) == len(victim["zois"])


def test_a_full_disk_stops_the_export_with_one_line_and_a_rerun_completes_it(
    random_model, export_cfg, scan_folder, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    items, roots = discover_scans([str(scan_folder / "a")])
    exporter = ZOIExporter(export_cfg(), random_model)
    write_bytes, calls = Path.write_bytes, []

    def disk_fills(self, data):  # the seventh ZOI file finds the disk full
        calls.append(self)
        if len(calls) == 7:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write() names no file
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_fills)
    with pytest.raises(SpineError) as e:  # export_zoi prints it as its one line, exit code 2
        exporter.export(items, out, roots=roots, progress=False)
    scan_dir = calls[6].parent.with_suffix("")  # "<scan>.partial" -> the scan's ZOI folder
    assert str(e.value) == (
        f"{scan_dir}: cannot write it (No space left on device): the files written before it "
        "are whole; make room (or write elsewhere) and run again"
    )
    written = [l["path"] for l in _lines(out / "manifest.jsonl")]  # the batch in flight went on
    assert scan_dir.name + ".png" not in written and len(written) == len(items) - 1
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    summary = exporter.export(items, out, roots=roots, progress=False)
    assert (summary["scans_ok"], summary["scans_skipped"]) == (1, len(items) - 1)
    assert not list(out.rglob("*.partial"))


def test_cli_corrupt_files_go_to_errors_with_exit_code_3(export_cli, scan_folder, tmp_path, capsys):
    (scan_folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    (scan_folder / "a" / "empty.tif").write_bytes(b"")
    out = tmp_path / "out"
    rc = export_cli(
        "--input", str(scan_folder), "--output", str(out), "--overlays", "--workers", "1"
    )
    assert rc == 3
    errors = _lines(out / "errors.jsonl")
    assert sorted(e["path"] for e in errors) == ["a/broken.png", "a/empty.tif"]
    assert all(e["reason"] for e in errors)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["scans_ok"], summary["scans_failed"]) == (4, 2)
    assert len(_lines(out / "manifest.jsonl")) == 4
    assert len(list((out / "overlays").rglob("*.png"))) == 4
    assert not any(
        p.name.startswith(("zoi", "overlays", "manifest")) for p in scan_folder.rglob("*")
    )


def test_cli_refuses_output_inside_input_and_bad_usage(export_cli, scan_folder, tmp_path):
    assert export_cli("--input", str(scan_folder), "--output", str(scan_folder / "a" / "out")) == 2
    assert not (scan_folder / "a" / "out").exists()
    assert export_cli("--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")) == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["--input", "x"])
    assert e.value.code == 2


def test_shards_partition_the_sorted_scan_list(export_cli, scan_folder, tmp_path):
    items, _ = discover_scans([str(scan_folder / "**" / "*.png")])
    assert [i.rel for i in items] == sorted(i.rel for i in items) and len(items) == 4
    for k in (1, 2, 3, 5):
        parts = [shard(items, k, i) for i in range(k)]
        flat = [it for p in parts for it in p]
        assert sorted(flat, key=lambda i: i.rel) == items and len(set(flat)) == len(items)
    out = tmp_path / "out"
    for i in range(2):
        assert (
            export_cli(
                "--input",
                str(scan_folder),
                "--output",
                str(out),
                "--num-shards",
                "2",
                "--shard-index",
                str(i),
            )
            == 0
        )
    paths = [l["path"] for i in range(2) for l in _lines(out / f"manifest-{i:05d}-of-00002.jsonl")]
    assert sorted(paths) == [i.rel for i in items]


def test_export_score_threshold_lever_is_lossless(
    random_model, export_cfg, scan_folder, tmp_path, monkeypatch
):
    """Raising the model's test threshold to ZOI.SCORE_THRESH skips masks nobody exports,
    and changes nothing that is exported (boxes, scores, masks, levels, suspected misses)."""
    import contextlib

    items, _ = discover_scans([str(scan_folder / "a")])
    # random heads score 0.525-0.545: 0.529 splits the 5 detections of each scan
    cfg = export_cfg("ZOI.SCORE_THRESH", "0.529")
    if hasattr(random_model.roi_heads, "level_score_thresh"):  # as if built with this config
        monkeypatch.setattr(random_model.roi_heads, "level_score_thresh", 0.529)
    masked = []
    hook = random_model.roi_heads.mask_head.register_forward_pre_hook(
        lambda m, args: masked.append(len(args[0]))  # ROI features: one row per mask computed
    )
    try:
        ZOIExporter(cfg, random_model).export(items, tmp_path / "lever", progress=False)
        with_lever = sum(masked)
        masked.clear()
        monkeypatch.setattr(
            ZOIExporter, "_export_score_thresh", lambda self: contextlib.nullcontext()
        )
        ZOIExporter(cfg, random_model).export(items, tmp_path / "plain", progress=False)
        without = sum(masked)
    finally:
        hook.remove()
    lever, plain = _lines(tmp_path / "lever/manifest.jsonl"), _lines(
        tmp_path / "plain/manifest.jsonl"
    )
    assert without == 5 * len(items) and 0 < with_lever < without  # fewer masks computed
    assert 0 < sum(len(l["zois"]) for l in lever) < without
    assert [(l["zois"], l["suspected_missing"]) for l in lever] == [
        (l["zois"], l["suspected_missing"]) for l in plain
    ]
    assert random_model.roi_heads.box_predictor.test_score_thresh == 0.0  # restored


def test_rescued_bodies_are_exported_unless_the_export_cut_is_the_stricter(export_cfg):
    from detectron2.modeling import build_model

    def exporter(*opts):
        cfg = export_cfg("MODEL.ROI_HEADS.NAME", "LevelROIHeads", *opts)
        return ZOIExporter(cfg, build_model(cfg).eval())

    assert exporter()._keep_rescued  # 0.5 and the level decoder's 0.5
    assert not exporter("ZOI.SCORE_THRESH", "0.7")._keep_rescued
    assert exporter("ZOI.SCORE_THRESH", "0.3")._keep_rescued


def test_the_resume_key_changes_with_whatever_changes_the_export(
    random_model, export_cfg, tmp_path
):
    """A rerun skips scans whose manifest line carries the same model hash, so every setting
    that changes the ZOIs or their levels must change it (else stale ZOIs survive a change), and
    settings that only change speed or evaluation must not (else a rerun redoes everything)."""
    from spine_d2.zoi.export import model_hash

    def key(*opts):
        return model_hash(export_cfg(*opts), random_model)["hash"]

    base = key()
    assert key("ZOI.BATCH_SIZE", "1") == base
    assert key("ZOI.NUM_WORKERS", "1") == base
    assert key("SPINE.EVAL.BOOTSTRAP", "0") == base
    assert key("SPINE.EVAL.SCORE_THRESH", "0.3") == base
    changed = [
        ("SPINE.LEVEL_HEAD.SCORE_THRESH", "0.3"),
        ("SPINE.LEVEL_HEAD.SPACING_WEIGHT", "8.0"),
        ("SPINE.LEVEL_HEAD.RESCUE.EXPECTED", "17"),
        ("SPINE.NMS.METHOD", "linear"),
        ("SPINE.MASK_RESCORE", "True"),
        ("INPUT.XRAY.EQUALIZE.ENABLED", "True"),
        ("ZOI.MARGIN", "0"),
    ]
    keys = [key(k, v) for k, v in changed]
    assert base not in keys and len(set(keys)) == len(keys), dict(zip(changed, keys))

    # a side file refitted at the same path changes the key through its contents
    prior = tmp_path / "prior.json"
    prior.write_text('{"a": 1}')
    first = key("SPINE.LEVEL_HEAD.PRIOR_FILE", str(prior))
    assert first != base
    prior.write_text('{"a": 2}')
    assert key("SPINE.LEVEL_HEAD.PRIOR_FILE", str(prior)) != first


def test_a_folder_of_symlinked_scans_keeps_the_links_names(scan_folder, tmp_path):
    """Archives are often folders of links to files kept elsewhere: each scan is named by its
    link, relative to the folder given, not by where the link points."""
    links = tmp_path / "links"
    links.mkdir()
    for i, target in enumerate(sorted((scan_folder / "a").glob("*.png"))):
        (links / f"scan_{i}.png").symlink_to(target.resolve())
    items, roots = discover_scans([str(links)])
    assert [i.rel for i in items] == [f"scan_{i}.png" for i in range(len(items))]
    assert len(items) >= 2 and all(Path(i.path).parent == links.resolve() for i in items)
    assert [i.zoi_dir for i in items] == [f"zoi/scan_{i}" for i in range(len(items))]


def test_a_glob_through_a_symlinked_folder_elsewhere_is_one_line(scan_folder, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "elsewhere").symlink_to((scan_folder / "a").resolve(), target_is_directory=True)
    with pytest.raises(SpineError, match="outside the input folder"):
        discover_scans([str(root / "*" / "*.png")])


def test_manifest_reading_skips_torn_lines_and_refuses_other_files(tmp_path):
    from spine_d2.zoi import load_manifest

    good = {"path": "a/é.png", "zois": []}
    line = json.dumps(good, ensure_ascii=False).encode("utf-8")
    m = tmp_path / "manifest.jsonl"
    m.write_bytes(line + b"\n" + line[: line.index(b"\xc3") + 1])  # torn inside the "é"
    assert load_manifest(str(m)) == {"a/é.png": good}
    m.write_bytes(line[:10])  # killed during the first line: nothing done yet
    assert load_manifest(str(m)) == {}
    m.write_bytes(line[:10] + b"\n" + line[:20])  # ... and again in the next run
    assert load_manifest(str(m)) == {}
    m.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(SpineError, match=r"manifest.jsonl: not a ZOI manifest \(none of its"):
        load_manifest(str(m))
    m.write_text(json.dumps(good) + "\n" + json.dumps({"id": 3}) + "\n")
    with pytest.raises(SpineError, match=r"manifest.jsonl:2: not a ZOI manifest line"):
        load_manifest(str(m))


def test_cli_refuses_an_output_folder_whose_manifest_is_another_file(
    export_cli, scan_folder, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    picture = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    (out / "manifest.jsonl").write_bytes(picture)
    rc = export_cli("--input", str(scan_folder), "--output", str(out), "--workers", "1")
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("manifest.jsonl: not a ZOI manifest (none of its 7 lines is JSON)")
    assert (out / "manifest.jsonl").read_bytes() == picture  # never touched
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]


def test_a_second_export_into_a_folder_being_written_is_refused(
    export_cli, scan_folder, tmp_path, capsys
):
    from spine_d2.atomic import single_writer

    out = tmp_path / "out"
    out.mkdir()
    with single_writer(out / ".export.lock", "ZOI export"):  # a first export, still running
        rc = export_cli("--input", str(scan_folder), "--output", str(out), "--workers", "1")
        assert rc == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"export_zoi: error: {out}: another ZOI export is writing here "
            f"(pid {os.getpid()} on {os.uname().nodename}; .export.lock): wait for it to end"
        )
        assert sorted(p.name for p in out.iterdir()) == [".export.lock"]
        # another shard has its own manifest, so its own lock
        shard_args = ("--num-shards", "2", "--shard-index", "1", "--workers", "1")
        assert export_cli("--input", str(scan_folder), "--output", str(out), *shard_args) == 0
    assert export_cli("--input", str(scan_folder), "--output", str(out), "--workers", "1") == 0
    assert len(_lines(out / "manifest.jsonl")) == 4
    assert not any(p.name.startswith(".") for p in out.iterdir())  # the locks are gone
