"""Shared fixtures: a randomly initialised instant-test model that detects *something*.

Random weights give boxes with scores near 0.5; with score thresholds at 0 every scan gets
DETECTIONS_PER_IMAGE instances, which is all the export plumbing needs (pixels under a mask
are the source pixels whatever the mask is)."""

import shutil

import pytest
import torch

from spine_d2.data.synthetic import make_synthetic_spine_dataset
from spine_d2.engine.setup import build_config

CONFIG = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"
OPTS = [
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "0.0",
    "TEST.DETECTIONS_PER_IMAGE",
    "5",
    "ZOI.SCORE_THRESH",
    "0.0",
    "ZOI.NUM_WORKERS",
    "0",
    "ZOI.BATCH_SIZE",
    "2",
]


def _export_cfg(*opts):
    return build_config(CONFIG, OPTS + list(opts))


@pytest.fixture(scope="session")
def export_cfg():
    """cfg(*KEY_VALUE) -> the instant-test config set up for exporting with a random model."""
    return _export_cfg


@pytest.fixture
def export_cli():
    """cli(*args) -> exit code of tools/export_zoi.py run in-process with the test config."""
    from spine_d2.zoi.cli import main

    return lambda *args: main(["--config-file", CONFIG, "--no-progress", *args, *OPTS])


@pytest.fixture(scope="session")
def random_model():
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(_export_cfg())
    return model.eval()


@pytest.fixture(scope="session")
def scan_folder_template(tmp_path_factory):
    """Four synthetic 128x128 scans: three 16-bit, one 8-bit."""
    root = tmp_path_factory.mktemp("scans")
    make_synthetic_spine_dataset(root / "a", num_images=3, size=128, seed=3, bit_depth=16)
    make_synthetic_spine_dataset(root / "b", num_images=1, size=128, seed=4, bit_depth=8)
    return root


@pytest.fixture
def scan_folder(scan_folder_template, tmp_path):
    """A private copy of the scans (tests may add corrupt files) in ``tmp_path/in``."""
    dst = tmp_path / "in"
    for sub in ("a", "b"):
        shutil.copytree(scan_folder_template / sub / "images", dst / sub)
    return dst
