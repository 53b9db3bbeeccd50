"""The body of tools/train_net.py, importable so that tests run it in-process."""

from __future__ import annotations

import argparse

from ..atomic import naming_write_errors
from ..checkpoint import RESUME_ADVICE_FOLDER, SpineCheckpointer
from ..zoi.export import export_datasets
from .hooks import ZOIExportHook
from .setup import NO_ROOM_ADVICE, setup
from .trainer import SpineTrainer

__all__ = ["main", "train_args"]


def train_args(config_file, opts=(), *, eval_only=False, resume=False):
    """The arguments tools/train_net.py would parse, for one process on this machine (the demo
    and the tests call ``main`` in-process with them)."""
    return argparse.Namespace(
        config_file=str(config_file),
        eval_only=eval_only,
        resume=resume,
        num_gpus=1,
        num_machines=1,
        machine_rank=0,
        dist_url="auto",
        opts=list(opts),
    )


def main(args):
    """Train (optionally resuming) or, with ``--eval-only``, evaluate MODEL.WEIGHTS; with
    ZOI.EXPORT_AFTER_EVAL the evaluation is followed by the ZOI export in both cases."""
    cfg = setup(args)
    # A full disk under detectron2's writers (metrics.json, evaluation results) raises an
    # OSError that names no file: one line naming the output folder instead. The package's own
    # writers (checkpoints, exports) name their file first.
    if args.eval_only:
        with naming_write_errors(cfg.OUTPUT_DIR, NO_ROOM_ADVICE):
            model = SpineTrainer.build_model(cfg)
            SpineCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
                cfg.MODEL.WEIGHTS, resume=args.resume
            )
            results = SpineTrainer.test(cfg, model)
            if cfg.ZOI.EXPORT_AFTER_EVAL:
                ZOIExportHook(0, lambda: export_datasets(cfg, model)).export_now()
            return results
    with naming_write_errors(cfg.OUTPUT_DIR, RESUME_ADVICE_FOLDER):
        trainer = SpineTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()
