"""Config setup shared by train_net, make eval and the tests: one path from YAML to a frozen cfg."""

from __future__ import annotations

import logging
import os

import torch
import yaml
from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..atomic import naming_write_errors
from ..config import add_spine_config
from ..data.datasets import register_from_config
from ..errors import SpineError, check_output_folder, one_line
from ..modeling.levels import LevelPrior
from ..modeling.rescorer import DetectionRescorer
from ..modeling.soft_nms import SOFT_NMS_METHODS

__all__ = ["build_config", "check_datasets_registered", "setup"]


def build_config(config_file: str, opts=()):
    """get_cfg -> add spine keys -> merge file -> merge KEY VALUE opts -> resolve device -> freeze.

    ``MODEL.DEVICE`` stays detectron2's "cuda" default in the YAMLs and falls back to the CPU
    here when no GPU is present, so one config runs on both without the user touching it.
    Datasets named in ``SPINE.COCO_DATASETS`` are registered before anything looks them up.
    """
    if not os.path.isfile(config_file):  # detectron2 asserts, with a traceback
        raise SpineError(f"{config_file}: no such config")
    cfg = get_cfg()
    add_spine_config(cfg)
    # detectron2 and yacs raise a traceback for each of these; a user gets one line instead
    try:
        cfg.merge_from_file(config_file)
    except (OSError, ValueError, KeyError, AssertionError, yaml.YAMLError) as e:
        raise SpineError(f"{config_file}: not a usable config ({one_line(e)})") from None
    try:
        cfg.merge_from_list(list(opts))
    except (ValueError, KeyError, AssertionError) as e:
        raise SpineError(f"config options {' '.join(map(str, opts))}: {one_line(e)}") from None
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).info("No CUDA device: MODEL.DEVICE %s -> cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if len(cfg.MODEL.PIXEL_MEAN) != cfg.INPUT.XRAY.CHANNELS:
        raise SpineError(
            f"{config_file}: MODEL.PIXEL_MEAN has {len(cfg.MODEL.PIXEL_MEAN)} values but "
            f"INPUT.XRAY.CHANNELS is {cfg.INPUT.XRAY.CHANNELS}; they must agree"
        )
    eq = cfg.INPUT.XRAY.EQUALIZE
    if eq.ENABLED and not (eq.CLIP_LIMIT > 0 and int(eq.TILE_GRID) >= 1):
        # caught here: in the loader workers a tile grid of 0 is a ZeroDivisionError mid-epoch
        raise SpineError(
            f"{config_file}: INPUT.XRAY.EQUALIZE needs CLIP_LIMIT > 0 and TILE_GRID >= 1, "
            f"got {eq.CLIP_LIMIT} and {eq.TILE_GRID}"
        )
    if cfg.SPINE.LEVEL_HEAD.SPACING_WEIGHT < 0:
        raise SpineError(
            f"{config_file}: SPINE.LEVEL_HEAD.SPACING_WEIGHT is "
            f"{cfg.SPINE.LEVEL_HEAD.SPACING_WEIGHT}; it must be >= 0 (0 turns it off)"
        )
    head = cfg.SPINE.LEVEL_HEAD
    if head.PRIOR_WEIGHT < 0:
        raise SpineError(
            f"{config_file}: SPINE.LEVEL_HEAD.PRIOR_WEIGHT is {head.PRIOR_WEIGHT}; "
            "it must be >= 0 (0 turns it off)"
        )
    if head.PRIOR_WEIGHT > 0:
        if not head.PRIOR_FILE:
            raise SpineError(
                f"{config_file}: SPINE.LEVEL_HEAD.PRIOR_WEIGHT is {head.PRIOR_WEIGHT} but "
                "SPINE.LEVEL_HEAD.PRIOR_FILE is empty"
            )
        LevelPrior.load(head.PRIOR_FILE)  # a bad prior fails here, before any model is built
    nms = cfg.SPINE.NMS
    if nms.METHOD not in SOFT_NMS_METHODS or not nms.SIGMA > 0:
        raise SpineError(
            f"{config_file}: SPINE.NMS.METHOD must be one of {', '.join(SOFT_NMS_METHODS)} and "
            f"SPINE.NMS.SIGMA > 0, got {nms.METHOD!r} and {nms.SIGMA}"
        )
    if cfg.SPINE.MASK_RESCORE and not cfg.MODEL.MASK_ON:
        raise SpineError(f"{config_file}: SPINE.MASK_RESCORE needs MODEL.MASK_ON True")
    if cfg.SPINE.RESCORER.FILE:
        if cfg.MODEL.ROI_HEADS.NAME != "LevelROIHeads" or not cfg.MODEL.MASK_ON:
            raise SpineError(
                f"{config_file}: SPINE.RESCORER.FILE needs MODEL.ROI_HEADS.NAME LevelROIHeads "
                f"and MODEL.MASK_ON True (got {cfg.MODEL.ROI_HEADS.NAME}, {cfg.MODEL.MASK_ON})"
            )
        DetectionRescorer.load(cfg.SPINE.RESCORER.FILE)  # a bad file fails here, not mid-run
    solver = cfg.SOLVER  # detectron2 asserts, divides by zero or trains at size 0 otherwise
    sizes = list(cfg.INPUT.MIN_SIZE_TRAIN)
    if (
        solver.IMS_PER_BATCH < 1
        or solver.MAX_ITER < 1
        or cfg.DATALOADER.NUM_WORKERS < 0
        or not sizes
        or min(sizes) <= 0
    ):
        raise SpineError(
            f"{config_file}: SOLVER.IMS_PER_BATCH and SOLVER.MAX_ITER must be >= 1, "
            "DATALOADER.NUM_WORKERS >= 0 and INPUT.MIN_SIZE_TRAIN > 0, got "
            f"{solver.IMS_PER_BATCH}, {solver.MAX_ITER}, {cfg.DATALOADER.NUM_WORKERS}, {sizes}"
        )
    zoi = cfg.ZOI  # caught here: PyTorch's DataLoader would raise them mid-export
    if zoi.BATCH_SIZE < 1 or zoi.NUM_WORKERS < 0 or not 0.0 <= zoi.SCORE_THRESH <= 1.0:
        raise SpineError(
            f"{config_file}: ZOI.BATCH_SIZE must be >= 1, ZOI.NUM_WORKERS >= 0 and "
            f"ZOI.SCORE_THRESH in [0, 1] (--batch-size, --workers, --min-score), got "
            f"{zoi.BATCH_SIZE}, {zoi.NUM_WORKERS} and {zoi.SCORE_THRESH}"
        )
    if not cfg.ZOI.LEVEL_MARGIN >= 0:
        raise SpineError(
            f"{config_file}: ZOI.LEVEL_MARGIN must be >= 0 nats (0: never flag), got "
            f"{cfg.ZOI.LEVEL_MARGIN}"
        )
    expected = list(cfg.ZOI.EXPECTED_LEVELS)
    if expected and not (
        len(expected) == 2
        and all(x in cfg.SPINE.LEVELS for x in expected)
        and cfg.SPINE.LEVELS.index(expected[0]) <= cfg.SPINE.LEVELS.index(expected[1])
    ):
        raise SpineError(
            f"{config_file}: ZOI.EXPECTED_LEVELS must be [] or [first, last], two of SPINE.LEVELS "
            f"top to bottom, got {expected}"
        )
    register_from_config(cfg)
    cfg.freeze()
    return cfg


def check_datasets_registered(cfg, config_file: str, eval_only: bool = False) -> None:
    """A one-line SpineError for the first dataset of DATASETS.TEST (and DATASETS.TRAIN when
    training) that is not registered, with the nearest registered name: detectron2's KeyError
    lists some 70 names, most of them COCO's. (The built-in spine splits are always registered,
    and say which make target writes them when they are not there yet.)"""
    import difflib

    from detectron2.data import DatasetCatalog

    known = DatasetCatalog.list()
    keys = ("DATASETS.TEST",) if eval_only else ("DATASETS.TRAIN", "DATASETS.TEST")
    for key in keys:
        for name in cfg.DATASETS.get(key.split(".")[1]):
            if name not in known:
                near = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean '{near[0]}'? " if near else ""
                raise SpineError(
                    f"{config_file}: {key} names '{name}', which is not a registered dataset "
                    f"({hint}register your own COCO files with SPINE.COCO_DATASETS "
                    "[[name, json, image_root]])"
                )


# A full disk under detectron2's own writers, whose OSError names no file (train.py too).
NO_ROOM_ADVICE = "make room (or set another OUTPUT_DIR) and run again"


def setup(args):
    """build_config plus detectron2's default_setup (output dir, logger, config dump, seed)."""
    cfg = build_config(args.config_file, args.opts)
    check_datasets_registered(cfg, args.config_file, getattr(args, "eval_only", False))
    check_output_folder(cfg.OUTPUT_DIR)
    with naming_write_errors(cfg.OUTPUT_DIR, NO_ROOM_ADVICE):  # it dumps config.yaml there
        default_setup(cfg, args)
    # default_setup configures detectron2's and fvcore's loggers only: ours log into the same
    # console and OUTPUT_DIR/log.txt.
    setup_logger(
        cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="spine_d2", abbrev_name="spine"
    )
    return cfg
