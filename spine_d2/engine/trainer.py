"""SpineTrainer: detectron2's DefaultTrainer with the X-ray mapper and spine evaluators."""

from __future__ import annotations

import logging
import os
import time
import weakref

import torch
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, SimpleTrainer, hooks
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm

from ..atomic import full_disk_errno, write_json
from ..checkpoint import SpineCheckpointer
from ..data.mapper import XrayDatasetMapper
from ..data.sampler import MixedDatasetSampler, dataset_mix
from ..errors import OutputError
from ..evaluation.vertebra import VertebraEvaluator
from ..modeling.precision import inference_autocast
from ..zoi.export import export_datasets
from .hooks import ZOIExportHook

__all__ = ["CPUAutocastTrainer", "SpineTrainer", "write_eval_results"]

logger = logging.getLogger(__name__)


def write_eval_results(results: dict, path: str) -> None:
    """Write results as strict JSON (NaN as null) atomically (temp name + rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, results, indent=2)


class CPUAutocastTrainer(SimpleTrainer):
    """SimpleTrainer with the forward pass under CPU bfloat16 autocast.

    detectron2's AMPTrainer is CUDA-only (fp16 + GradScaler). On CPUs with bf16 units the
    training step is ~1.4-1.5x faster (measured: bench_train.py, README); bf16 keeps fp32's exponent
    range, so no loss scaling is needed. Weights, gradients and the optimizer stay fp32.
    """

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_dict = self.model(data)
        loss_dict = {k: v.float() for k, v in loss_dict.items()}
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


class _NoTracebackForAFullDisk(logging.Filter):
    """detectron2's train loop logs a traceback for whatever stops training; a full disk is
    reported in one line (``errors.OutputError``) by the tool, and its traceback is noise."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or (not isinstance(exc, OutputError) and full_disk_errno(exc) is None)


class SpineTrainer(DefaultTrainer):
    """Overrides only the builders that differ from detectron2's: loaders (X-ray mapper),
    evaluators (COCO AP + per-vertebra metrics), the optimizer (SPINE.OPTIMIZER), the CPU
    training loop under SOLVER.AMP and the hook list (export slot)."""

    def __init__(self, cfg):
        cpu_amp = cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu"
        if cpu_amp:  # DefaultTrainer would build the CUDA-only AMPTrainer (and its GradScaler)
            cfg, amp_cfg = cfg.clone(), cfg
            cfg.defrost()
            cfg.SOLVER.AMP.ENABLED = False
            cfg.freeze()
        super().__init__(cfg)  # its checkpointer is replaced in build_hooks
        if cpu_amp:
            t = self._trainer
            self._trainer = CPUAutocastTrainer(t.model, t.data_loader, t.optimizer)
            self.cfg = amp_cfg

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's SGD, or AdamW (decoupled weight decay; none on norms and biases)."""
        name = cfg.SPINE.OPTIMIZER.upper()
        if name == "SGD":
            return super().build_optimizer(cfg, model)
        if name != "ADAMW":
            raise ValueError(f"SPINE.OPTIMIZER must be SGD or ADAMW, got {cfg.SPINE.OPTIMIZER!r}")
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            weight_decay_norm=0.0,
            weight_decay_bias=0.0,
        )
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
            params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SPINE.ADAMW_BETAS)
        )

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = XrayDatasetMapper(cfg, is_train=True)
        if not cfg.SPINE.TRAIN_DATASET_WEIGHTS:
            return build_detection_train_loader(cfg, mapper=mapper)
        names = list(cfg.DATASETS.TRAIN)
        shares = dataset_mix(names, cfg.SPINE.TRAIN_DATASET_WEIGHTS)
        # one list per dataset, for the sizes; a name with share 0 is still loaded, so the
        # config fails on a missing dataset whatever its weight
        parts = [
            get_detection_dataset_dicts(
                [name], filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
            )
            for name in names
        ]
        # detectron2 checks this for a concatenation; a mix must not mix up class ids either
        classes = {name: list(MetadataCatalog.get(name).get("thing_classes", [])) for name in names}
        if any(c != classes[names[0]] for c in classes.values()):
            raise ValueError(
                "SPINE.TRAIN_DATASET_WEIGHTS: the DATASETS.TRAIN entries have different class "
                f"names, which would mix up class ids: {classes}"
            )
        for name, part, share in zip(names, parts, shares):
            logger.info("Training mix: %s, %d images, share %.3f", name, len(part), share)
        sampler = MixedDatasetSampler([len(p) for p in parts], shares)
        dataset = [d for part in parts for d in part]
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset, sampler=sampler)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name, records=None):
        """The scans of ``dataset_name`` in order; ``records``: only these dataset dicts of it
        (the others are never read)."""
        mapper = XrayDatasetMapper(cfg, is_train=False)
        if records is None:
            return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
        return build_detection_test_loader(
            records, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return DatasetEvaluators(
            [
                COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder),
                VertebraEvaluator.from_config(cfg, dataset_name, output_dir=output_folder),
            ]
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate on DATASETS.TEST and save ``OUTPUT_DIR/inference/eval_results.json``:
        {"bbox": {...}, "segm": {...}, "vertebra": {...}} for one test set, keyed by dataset
        name for several."""
        with inference_autocast(
            cfg.MODEL.DEVICE.split(":")[0],
            cfg.SPINE.EVAL.AMP,
            "SPINE.EVAL.AMP",
            model=model,
            scope=cfg.SPINE.EVAL.AMP_SCOPE,
        ):
            results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            path = os.path.join(cfg.OUTPUT_DIR, "inference", "eval_results.json")
            write_eval_results(results, path)
            logger.info("Evaluation results written to %s", path)
        return results

    def build_export_hooks(self):
        """ZOIExportHook when ZOI.EXPORT_AFTER_EVAL: after the final evaluation and, with
        ZOI.EXPORT_EVERY_EVAL, after each periodic one; on the trainer's model."""
        cfg = self.cfg
        if not cfg.ZOI.EXPORT_AFTER_EVAL:
            return []
        period = cfg.TEST.EVAL_PERIOD if cfg.ZOI.EXPORT_EVERY_EVAL else 0
        return [ZOIExportHook(period, lambda: export_datasets(cfg, self.model))]

    def train(self):
        loop_logger = logging.getLogger("detectron2.engine.train_loop")
        quiet = _NoTracebackForAFullDisk()
        loop_logger.addFilter(quiet)
        try:
            return super().train()
        finally:
            loop_logger.removeFilter(quiet)

    def build_hooks(self):
        # DefaultTrainer builds its checkpointer just before it calls this: ours replaces it
        # here, not after __init__, because the periodic checkpointer hook keeps the one it is
        # given. Ours verifies weights before loading and saves through a temporary name.
        self.checkpointer = SpineCheckpointer(
            self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        ret = super().build_hooks()
        # Before the writer, so that what the export hooks log is written in the same step.
        writer_at = next(
            (i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)), len(ret)
        )
        ret[writer_at:writer_at] = self.build_export_hooks()
        return ret
