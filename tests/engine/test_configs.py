"""Configs are code: every YAML under configs/ loads through the same setup path."""

import re
from pathlib import Path

import pytest

from spine_d2.engine import build_config

CONFIGS = sorted(str(p) for p in Path("configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 6


@pytest.mark.parametrize("config_file", CONFIGS)
def test_config_loads(config_file):
    cfg = build_config(config_file)
    assert cfg.MODEL.DEVICE in ("cpu", "cuda")
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES in (1, 4)
    assert len(cfg.MODEL.PIXEL_MEAN) == cfg.INPUT.XRAY.CHANNELS
    assert cfg.DATASETS.TRAIN and cfg.DATASETS.TEST
    if "scratch" in config_file:
        assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.RESNETS.NORM in ("GN", "SyncBN")


def test_overrides_and_user_datasets_from_command_line(synthetic_coco):
    from detectron2.data import DatasetCatalog

    json_file, image_root = synthetic_coco
    cfg = build_config(
        "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml",
        [
            "SPINE.COCO_DATASETS",
            f"[['spine_cli_ds', '{json_file}', '{image_root}']]",
            "SOLVER.MAX_ITER",
            "7",
        ],
    )
    assert cfg.SOLVER.MAX_ITER == 7
    assert len(DatasetCatalog.get("spine_cli_ds")) == 6
    DatasetCatalog.remove("spine_cli_ds")


def test_bad_user_dataset_entry_and_channel_mismatch_are_clear_errors():
    from spine_d2.errors import DatasetError, SpineError

    config = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"
    with pytest.raises(DatasetError, match=r"SPINE.COCO_DATASETS: entry \['only_a_name'\]"):
        build_config(config, ["SPINE.COCO_DATASETS", "[['only_a_name']]"])
    with pytest.raises(SpineError, match="PIXEL_MEAN has 3 values but INPUT.XRAY.CHANNELS is 1"):
        build_config(config, ["INPUT.XRAY.CHANNELS", "1"])
    with pytest.raises(
        SpineError, match=r"instant_test.yaml: SPINE.LEVEL_HEAD.SPACING_WEIGHT is -1"
    ):
        build_config(config, ["SPINE.LEVEL_HEAD.SPACING_WEIGHT", "-1.0"])
    for bad in ("['T1']", "['L5', 'T1']", "['T1', 'X9']"):
        with pytest.raises(SpineError, match=r"instant_test.yaml: ZOI.EXPECTED_LEVELS must be"):
            build_config(config, ["ZOI.EXPECTED_LEVELS", bad])
    assert build_config(config, ["ZOI.EXPECTED_LEVELS", "['T1', 'L5']"]).ZOI.EXPECTED_LEVELS == [
        "T1",
        "L5",
    ]


def test_an_unregistered_dataset_is_named_before_anything_is_written(tmp_path):
    from spine_d2.engine.train import main, train_args
    from spine_d2.errors import SpineError

    config = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"
    out = tmp_path / "run"
    unknown = ["DATASETS.TRAIN", "('no_such_split',)", "DATASETS.TEST", "('no_such_split',)"]
    for key, eval_only in (("DATASETS.TRAIN", False), ("DATASETS.TEST", True)):
        args = train_args(config, [*unknown, "OUTPUT_DIR", str(out)], eval_only=eval_only)
        with pytest.raises(SpineError, match=f"{key} names 'no_such_split', which is not a reg"):
            main(args)
    assert not out.exists()
    # evaluating needs only the test split: an unknown training split does not stop it early
    from spine_d2.engine.setup import check_datasets_registered

    known = "('coco_2017_val',)"  # registered by detectron2 (never read here)
    cfg = build_config(config, ["DATASETS.TRAIN", "('no_such_split',)", "DATASETS.TEST", known])
    check_datasets_registered(cfg, config, eval_only=True)
    with pytest.raises(SpineError, match="DATASETS.TRAIN names 'no_such_split'"):
        check_datasets_registered(cfg, config, eval_only=False)
    typo = build_config(config, ["DATASETS.TEST", "('coco_2017_vall',)"])
    with pytest.raises(SpineError, match="did you mean 'coco_2017_val'"):
        check_datasets_registered(typo, config, eval_only=True)


def test_missing_config_file_is_a_one_line_error(tmp_path):
    from spine_d2.errors import SpineError

    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(SpineError, match=f"^{re.escape(missing)}: no such config$"):
        build_config(missing)


@pytest.mark.parametrize(
    "text, reason",
    [
        (b"MODEL:\n  WEIGHTS: [oops\n", "expected ',' or ']'"),  # YAML syntax
        (b'_BASE_: "nope.yaml"\n', "No such file or directory"),
        (b"NO_SUCH_KEY: 1\n", "Non-existent config key: NO_SUCH_KEY"),
        (b"\x89PNG\r\n", "can't decode byte 0x89"),
        (b"SOLVER:\n  BASE_LR: fast\n", "Type mismatch"),
    ],
)
def test_a_broken_config_file_is_a_one_line_error(tmp_path, text, reason):
    from spine_d2.errors import SpineError

    path = tmp_path / "broken.yaml"
    path.write_bytes(text)
    with pytest.raises(SpineError, match=f"^{re.escape(str(path))}: not a usable config \\(") as e:
        build_config(str(path))
    assert reason in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "opts, reason",
    [
        (["SOLVER.BASE_LR"], "odd length"),
        (["SOLVER.BASE_LR", "fast"], "Type mismatch"),
        (["NO.SUCH_KEY", "1"], "Non-existent key: NO.SUCH_KEY"),
    ],
)
def test_bad_command_line_options_are_a_one_line_error(opts, reason):
    from spine_d2.errors import SpineError

    config = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"
    with pytest.raises(SpineError, match=f"^config options {re.escape(' '.join(opts))}: ") as e:
        build_config(config, opts)
    assert reason in str(e.value)


@pytest.mark.parametrize(
    "key, value", [("ZOI.BATCH_SIZE", "0"), ("ZOI.NUM_WORKERS", "-1"), ("ZOI.SCORE_THRESH", "1.5")]
)
def test_bad_export_settings_are_one_line(key, value):
    from spine_d2.errors import SpineError

    config = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"
    with pytest.raises(SpineError, match="ZOI.BATCH_SIZE must be >= 1, ZOI.NUM_WORKERS >= 0"):
        build_config(config, [key, value])


@pytest.mark.parametrize(
    "key, value",
    [
        ("SOLVER.IMS_PER_BATCH", "0"),
        ("SOLVER.MAX_ITER", "0"),
        ("DATALOADER.NUM_WORKERS", "-1"),
        ("INPUT.MIN_SIZE_TRAIN", "(0,)"),
    ],
)
def test_bad_training_settings_are_one_line(key, value):
    from spine_d2.errors import SpineError

    config = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"
    with pytest.raises(SpineError, match="SOLVER.IMS_PER_BATCH and SOLVER.MAX_ITER must be >= 1"):
        build_config(config, [key, value])


def test_shipped_config_counts_detections_from_one_cut():
    # The levels, the evaluator and the export must count from the same score, or they see
    # different vertebrae. 0.2 is the val-chosen point of the rescorer the config names, whose
    # file records the checkpoint it was fitted on.
    import json

    from spine_d2.modeling.rescorer import file_sha256

    cfg = build_config("configs/spine_mask_rcnn_R_18_FPN_drr_cpu.yaml")
    cuts = (cfg.SPINE.LEVEL_HEAD.SCORE_THRESH, cfg.SPINE.EVAL.SCORE_THRESH, cfg.ZOI.SCORE_THRESH)
    source = json.loads(open(cfg.SPINE.RESCORER.FILE).read())["source"]
    assert cuts == (source["cut"],) * 3 == (0.2,) * 3
    assert source["weights_sha256"] == file_sha256(cfg.MODEL.WEIGHTS)
    demo = build_config("configs/demo/spine_mask_rcnn_R_18_FPN_demo_finetune.yaml")
    assert demo.SPINE.EVAL.SCORE_THRESH == demo.SPINE.LEVEL_HEAD.SCORE_THRESH == 0.2


def test_bad_nms_and_rescore_settings_are_clear_errors():
    from spine_d2.errors import SpineError

    config = "configs/spine_mask_rcnn_R_18_FPN_drr_cpu.yaml"
    cfg = build_config(config)
    assert cfg.SPINE.NMS.METHOD == "linear" and cfg.SPINE.MASK_RESCORE
    for opts, got in (
        (["SPINE.NMS.METHOD", "soft"], "'soft' and 0.5"),
        (["SPINE.NMS.METHOD", "gaussian", "SPINE.NMS.SIGMA", "0.0"], "'gaussian' and 0.0"),
    ):
        with pytest.raises(
            SpineError,
            match=f"drr_cpu.yaml: SPINE.NMS.METHOD must be one of hard, linear, "
            f"gaussian and SPINE.NMS.SIGMA > 0, got {got}",
        ):
            build_config(config, opts)
    with pytest.raises(SpineError, match="drr_cpu.yaml: SPINE.MASK_RESCORE needs MODEL.MASK_ON"):
        build_config(config, ["MODEL.MASK_ON", "False"])


def test_bad_equalize_settings_are_clear_errors():
    from spine_d2.errors import SpineError

    config = "configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_drr_stage1_equalize_cpu.yaml"
    assert build_config(config).INPUT.XRAY.EQUALIZE.ENABLED
    for key, value, got in (("TILE_GRID", "0", "2.0 and 0"), ("CLIP_LIMIT", "0.0", "0.0 and 8")):
        with pytest.raises(
            SpineError, match=f"equalize_cpu.yaml: INPUT.XRAY.EQUALIZE needs .* got {got}"
        ):
            build_config(config, [f"INPUT.XRAY.EQUALIZE.{key}", value])
    off = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"
    build_config(off, ["INPUT.XRAY.EQUALIZE.TILE_GRID", "0"])  # not checked while it is off


def test_tools_print_one_line_for_a_broken_config(tmp_path):
    """The demo and the benchmarks go through run_cli: a SpineError is one line, status 1."""
    import subprocess
    import sys

    from spine_d2.errors import SpineError, run_cli

    broken = tmp_path / "broken.yaml"
    broken.write_text("NO_SUCH_KEY: 1\n")
    demo_out = tmp_path / "demo"
    for script, prog in (("tools/demo.py", "demo"), ("benchmarks/bench_levels.py", "bench_levels")):
        run = subprocess.run(
            [sys.executable, script, "--config-file", str(broken), "--out", str(demo_out)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert run.returncode == 1
        assert run.stderr.strip().splitlines()[-1] == (
            f"{prog}: error: {broken}: not a usable config (Non-existent config key: NO_SUCH_KEY)"
        )
        assert "Traceback" not in run.stderr
    assert not demo_out.exists()  # the demo checks its config before it generates anything

    def fails():
        raise SpineError("x.png: not an image")

    with pytest.raises(SystemExit) as e:
        run_cli(fails, "tool")
    assert e.value.code == 1
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: 3, "tool")
    assert e.value.code == 3
    # the benchmarks' main returns its result: that is success (sys.exit(dict) exits 1, which
    # stopped `make demo` at bench_align and `make bench` at its first benchmark)
    for result in ({"bench": "align", "tre_px_median": 0.13}, None, 0):
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: result, "bench_align")
        assert e.value.code == 0


def test_a_negative_level_margin_is_a_one_line_error():
    from spine_d2.errors import SpineError

    config = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"
    with pytest.raises(SpineError, match=r"ZOI.LEVEL_MARGIN must be >= 0 nats .*got -1.0"):
        build_config(config, ["ZOI.LEVEL_MARGIN", "-1.0"])
