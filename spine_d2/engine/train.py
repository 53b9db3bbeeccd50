"""The body of tools/train_net.py, importable so that tests run it in-process."""
from __future__ import annotations

from detectron2.checkpoint import DetectionCheckpointer

from .setup import setup
from .trainer import SpineTrainer

__all__ = ["main"]


def main(args):
    """Train (optionally resuming) or, with ``--eval-only``, evaluate MODEL.WEIGHTS."""
    cfg = setup(args)
    if args.eval_only:
        model = SpineTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return SpineTrainer.test(cfg, model)
    trainer = SpineTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
