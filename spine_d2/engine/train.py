"""The body of tools/train_net.py, importable so that tests run it in-process."""

from __future__ import annotations

from ..checkpoint import SpineCheckpointer
from ..zoi.export import export_datasets
from .hooks import ZOIExportHook
from .setup import setup
from .trainer import SpineTrainer

__all__ = ["main"]


def main(args):
    """Train (optionally resuming) or, with ``--eval-only``, evaluate MODEL.WEIGHTS; with
    ZOI.EXPORT_AFTER_EVAL the evaluation is followed by the ZOI export in both cases."""
    cfg = setup(args)
    if args.eval_only:
        model = SpineTrainer.build_model(cfg)
        SpineCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = SpineTrainer.test(cfg, model)
        if cfg.ZOI.EXPORT_AFTER_EVAL:
            ZOIExportHook(0, lambda: export_datasets(cfg, model)).export_now()
        return results
    trainer = SpineTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
