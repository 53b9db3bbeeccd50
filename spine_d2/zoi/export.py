"""The one batched predictor behind the export hook and tools/export_zoi.py.

Why it looks like this:
- decoding and resizing run in DataLoader workers, so the model never waits on disk;
- several scans per forward pass, under ``torch.inference_mode`` (and AMP when asked);
- the model's raw outputs are mapped back to the original resolution here (``extract``), not by
  detectron2's postprocess, so no full-size mask stack is ever built;
- pasting, cropping and writing of a batch run in one background thread while the next batch
  is in the model, and results go to disk as they come: memory is flat in the number of scans;
- a scan's ZOI folder is written under a temporary name and renamed, and its manifest line is
  appended last, so a killed run leaves nothing half-written that a rerun would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..atomic import atomic_open, naming_write_errors, single_writer, write_atomic, write_json
from ..checkpoint import SpineCheckpointer
from ..data.augment import build_xray_augmentations
from ..data.io import file_sha256, read_scan
from ..errors import SpineError
from ..modeling.precision import inference_autocast
from .extract import extract_zois, level_conflicts, scale_to_original, uncertain_levels
from .manifest import SCHEMA_VERSION, append_line, compact_manifest, load_manifest, open_for_append
from .sources import ScanItem, check_output_dir, items_from_dataset, shard

__all__ = ["ZOIExporter", "export_dataset", "export_datasets", "model_hash"]

logger = logging.getLogger(__name__)

# Config that changes what an export contains; anything else (workers, batch size) does not.
_HASHED_ZOI_KEYS = (
    "MARGIN",
    "FORMAT",
    "SCORE_THRESH",
    "AMP",
    "AMP_SCOPE",
    "ANCHOR_LEVEL",
    "ANCHOR_AT",
    "GAP_FACTOR",
    "EXPECTED_LEVELS",
    "LEVEL_MARGIN",
)


# SPINE nodes that change what the model outputs at inference (decoding of levels, ranking,
# rescue, rescorer); the rest of SPINE (datasets, optimizer, evaluation) does not.
_HASHED_SPINE_KEYS = ("LEVELS", "LEVEL_HEAD", "NMS", "MASK_RESCORE", "RESCORER")


def _side_file_sha256(path: str) -> str:
    """Content hash of a side file the config names (a refitted rescorer or level prior at the
    same path changes the export); "" when unset, "missing" when it cannot be read (the model
    build reports that)."""
    if not path:
        return ""
    try:
        return file_sha256(path)
    except OSError:
        return "missing"


def model_hash(cfg, model, config_file: str = "") -> dict:
    """The manifest's ``model`` field: hashes of the export-relevant config and of the weights
    as loaded (the state dict, so a random init or an in-memory model is hashed too). Relevant is
    everything that changes an export's content: the model, the test-time input (size, channels,
    the fixed equalization), the level decoding and scoring (``SPINE``: including the contents
    of the rescorer and level-prior files) and the ZOI settings. A resumed export skips a scan
    only when this is unchanged; leaving one out would keep stale ZOIs after a change."""
    relevant = {
        "MODEL": {k: v for k, v in cfg.MODEL.items() if k not in ("DEVICE", "WEIGHTS")},
        "INPUT": [
            cfg.INPUT.MIN_SIZE_TEST,
            cfg.INPUT.MAX_SIZE_TEST,
            cfg.INPUT.XRAY.CHANNELS,
            dict(cfg.INPUT.XRAY.EQUALIZE),
        ],
        "ZOI": {k: cfg.ZOI[k] for k in _HASHED_ZOI_KEYS},
        "SPINE": {k: cfg.SPINE[k] for k in _HASHED_SPINE_KEYS},
        "FILES": [
            _side_file_sha256(cfg.SPINE.RESCORER.FILE),
            _side_file_sha256(cfg.SPINE.LEVEL_HEAD.PRIOR_FILE),
        ],
    }
    config_sha = hashlib.sha256(
        json.dumps(relevant, sort_keys=True, default=str).encode()
    ).hexdigest()
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    weights_sha = h.hexdigest()
    return {
        "config": os.path.basename(config_file),
        "config_sha256": config_sha,
        "weights": str(cfg.MODEL.WEIGHTS),
        "weights_sha256": weights_sha,
        "hash": hashlib.sha256((config_sha + weights_sha).encode()).hexdigest(),
    }


class _ScanDataset(Dataset):
    """Worker side: hash, skip what is already exported, decode and resize."""

    def __init__(self, items, augmentations, channels, done, model_key, out):
        self.items, self.augmentations, self.channels = items, augmentations, channels
        self.done, self.model_key, self.out = done, model_key, out

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        t0 = time.perf_counter()
        try:
            # hash first: skipping costs one read, not a decode. A line whose ZOI folder is gone
            # (a rewrite killed between its renames, a folder deleted by hand) is not trusted.
            if item.rel in self.done and (self.out / item.zoi_dir).is_dir():
                if self.done[item.rel] == (file_sha256(item.path), self.model_key):
                    return {"item": item, "skip": True}
            scan = read_scan(item.path)
        except SpineError as e:
            return {"item": item, "error": getattr(e, "reason", str(e))}
        except OSError as e:
            return {"item": item, "error": f"cannot read ({e.strerror or e})"}
        from detectron2.data import transforms as T

        aug_input = T.AugInput(scan.image)
        T.AugmentationList(self.augmentations)(aug_input)
        image = torch.from_numpy(np.ascontiguousarray(aug_input.image, dtype=np.float32) * 255.0)
        return {
            "item": item,
            "image": image[None].repeat(self.channels, 1, 1),
            "pixels": scan.pixels,
            "bit_depth": scan.bit_depth,
            "sha256": scan.meta["sha256"],
            "decode_s": time.perf_counter() - t0,
        }


def _as_list(batch):
    return batch


def _class_names(cfg, dataset_name=None) -> list:
    n = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name in (
        ([dataset_name] if dataset_name else [])
        + list(cfg.DATASETS.TEST)
        + list(cfg.DATASETS.TRAIN)
    ):
        names = MetadataCatalog.get(name).get("thing_classes", None)
        if names and len(names) == n:
            return list(names)
    return ["vertebra"] if n == 1 else [f"class_{i}" for i in range(n)]


class ZOIExporter:
    """Build (or take) the model once; ``export(items, output_dir)`` streams ZOIs to disk.

    Args:
        cfg: frozen config with ZOI.* keys.
        model: a model already built and loaded (the hook passes the trainer's); None builds
            ``cfg``'s model and loads MODEL.WEIGHTS (random init when empty, with a warning).
        class_names: names of the model's classes (default: from the datasets' metadata).
        overlays: also write ``overlays/<scan>.png`` with masks, levels and scores drawn.
        config_file: recorded in the manifest (its name; the hash covers the content).
    """

    def __init__(
        self,
        cfg,
        model=None,
        *,
        class_names=None,
        overlays=False,
        dataset_name=None,
        config_file="",
    ):
        self.cfg = cfg
        if model is None:
            model = build_model(cfg)
            if cfg.MODEL.WEIGHTS:
                try:
                    SpineCheckpointer(model).load(cfg.MODEL.WEIGHTS)
                except (AssertionError, OSError) as e:  # fvcore asserts the file exists
                    raise SpineError(f"{cfg.MODEL.WEIGHTS}: cannot load weights ({e})") from e
            else:
                logger.warning(
                    "MODEL.WEIGHTS is empty: exporting with a randomly initialised model"
                )
        self.model = model
        self.model_info = model_hash(cfg, model, config_file)
        self.class_names = list(class_names or _class_names(cfg, dataset_name))
        self.overlays = overlays
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.timings = {}

    # ------------------------------------------------------------------ model
    @contextlib.contextmanager
    def inference_context(self):
        """What every forward pass of the export runs under (also used by bench_export's bare
        forward, so that its floor is the same computation)."""
        with torch.inference_mode(), self._autocast(), self._export_score_thresh():
            yield

    def _autocast(self):
        return inference_autocast(
            self.device.type,
            self.cfg.ZOI.AMP,
            "ZOI.AMP",
            model=self.model,
            scope=self.cfg.ZOI.AMP_SCOPE,
        )

    @contextlib.contextmanager
    def _export_score_thresh(self):
        """Raise the box predictor's test score threshold to ZOI.SCORE_THRESH while exporting.

        Lossless for the export: detections below it are dropped anyway, NMS only lets a box be
        suppressed by a higher-scoring one, the per-scan cap keeps the top scores either way and
        the level decoder sees the same detections as long as the threshold stays at or below
        its own (SPINE.LEVEL_HEAD.SCORE_THRESH). What it saves is the mask head (and its ROI
        pooling) on the low-score detections, ~12 % of the forward pass at 512 px."""
        heads = getattr(self.model, "roi_heads", None)
        predictor = getattr(heads, "box_predictor", None)
        old = getattr(predictor, "test_score_thresh", None)
        if old is None:
            yield
            return
        keep_from = min(
            float(self.cfg.ZOI.SCORE_THRESH),
            getattr(heads, "keep_score", getattr(heads, "level_score_thresh", float("inf"))),
        )
        # detectron2 keeps scores > thresh; ZOIs and the level decoder take scores >= theirs
        predictor.test_score_thresh = max(old, keep_from - 1e-6)
        try:
            yield
        finally:
            predictor.test_score_thresh = old

    @property
    def _keep_rescued(self) -> bool:
        """Rescued bodies fill a chain of detections at the level decoder's cut; an export cut
        stricter than that drops detections above them, so it drops them too."""
        heads = getattr(self.model, "roi_heads", None)
        chain_cut = getattr(heads, "level_score_thresh", float("inf"))
        return float(self.cfg.ZOI.SCORE_THRESH) <= chain_cut

    def _predict(self, ready):
        inputs = [
            {"image": r["image"], "height": r["pixels"].shape[0], "width": r["pixels"].shape[1]}
            for r in ready
        ]
        t0 = time.perf_counter()
        # Only scans of one (resized) shape share a forward pass. A scan padded to a larger
        # neighbour's size is normalised (GroupNorm) over that padding too, so its detections,
        # levels and margin would depend on which scans share its batch: on the 91 real val
        # films, 7 got another number of ZOIs and 8 other names at batch 4 than at batch 1.
        shapes = {}
        for k, r in enumerate(ready):
            shapes.setdefault(tuple(r["image"].shape), []).append(k)
        raw = [None] * len(ready)
        with self.inference_context():
            for group in shapes.values():
                outputs = self.model.inference([inputs[k] for k in group], do_postprocess=False)
                for k, inst in zip(group, outputs):
                    raw[k] = inst
        levels = list(self.cfg.SPINE.LEVELS)
        preds = []
        for r, inst in zip(ready, raw):
            lv = None
            if inst.has("pred_levels"):  # a level head: indices into SPINE.LEVELS
                lv = [
                    levels[i] if 0 <= i < len(levels) else None for i in inst.pred_levels.tolist()
                ]
            h, w = r["pixels"].shape[:2]
            preds.append(
                scale_to_original(inst, h, w, self.cfg.ZOI.SCORE_THRESH, lv, self._keep_rescued)
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._add("model", time.perf_counter() - t0)
        return preds

    def _add(self, key, seconds):
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    # ------------------------------------------------------------------ writing
    def _write_scan(self, out: Path, r: dict, pred, manifest_f) -> dict:
        item: ScanItem = r["item"]
        fmt = self.cfg.ZOI.FORMAT if r["pixels"].dtype.kind == "u" else "npz"  # float: no PNG
        entries, files, missing = extract_zois(
            r["pixels"],
            pred,
            zoi_dir=item.zoi_dir,
            class_names=self.class_names,
            margin=self.cfg.ZOI.MARGIN,
            fmt=fmt,
            levels=list(self.cfg.SPINE.LEVELS),
            anchor_level=self.cfg.ZOI.ANCHOR_LEVEL,
            anchor_at=self.cfg.ZOI.ANCHOR_AT,
            gap_factor=self.cfg.ZOI.GAP_FACTOR,
            expected_levels=list(self.cfg.ZOI.EXPECTED_LEVELS),
            png_compression=self.cfg.ZOI.PNG_COMPRESSION,
            timings=self.timings,
        )
        t0 = time.perf_counter()
        final = out / item.zoi_dir
        partial = final.with_name(final.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)  # left by a killed run
        partial.mkdir(parents=True)
        with naming_write_errors(final):
            for rel, data in files.items():
                (partial / os.path.basename(rel)).write_bytes(data)
        # a run killed between the two renames left the scan's previous folder set aside as
        # ``.old`` (and no ``final``): it is superseded by this one either way
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
        line = {
            "schema_version": SCHEMA_VERSION,
            "path": item.rel,
            "sha256": r["sha256"],
            "width": int(r["pixels"].shape[1]),
            "height": int(r["pixels"].shape[0]),
            "bit_depth": int(r["bit_depth"]),
            "model": self.model_info,
            "zois": entries,
            "suspected_missing": missing,
            "level_conflicts": level_conflicts(entries)
            + uncertain_levels(entries, pred.level_margin, self.cfg.ZOI.LEVEL_MARGIN),
            "level_margin": None if pred.level_margin is None else round(pred.level_margin, 3),
        }
        if self.overlays:
            self._write_overlay(out, item, r, entries)
        append_line(manifest_f, line)  # last: a line exists only for a complete ZOI set
        self._add("write", time.perf_counter() - t0)
        return line

    def _write_overlay(self, out: Path, item: ScanItem, r: dict, entries):
        import cv2
        import pycocotools.mask as mask_util
        from detectron2.utils.visualizer import Visualizer

        gray = read_scan(item.path).image  # the normalized view a person expects to see
        rgb = np.repeat((gray * 255).astype(np.uint8)[:, :, None], 3, axis=2)
        vis = Visualizer(rgb, scale=1.0)
        if entries:
            vis.overlay_instances(
                masks=[mask_util.decode(e["mask_rle"]) for e in entries],
                boxes=[e["bbox_xyxy"] for e in entries],
                labels=[f"{e['id']} {e['level'] or e['class']} {e['score']:.2f}" for e in entries],
            )
        path = out / "overlays" / (os.path.splitext(item.rel)[0] + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(".png", vis.get_output().get_image()[:, :, ::-1])
        write_atomic(path, buf.tobytes())

    def _write_batch(self, out, batch, preds, manifest_f, errors_f, stats):
        preds = iter(preds)
        for r in batch:
            if r.get("skip"):
                stats["skipped"] += 1
            elif "error" in r:
                append_line(errors_f, {"path": r["item"].rel, "reason": r["error"]})
                logger.warning("%s: %s", r["item"].path, r["error"])
                stats["failed"] += 1
            else:
                self._add("decode", r["decode_s"])
                line = self._write_scan(out, r, next(preds), manifest_f)
                stats["ok"] += 1
                stats["zois"] += len(line["zois"])
                stats["suspected_missing"] += sum(
                    m["count"] or 1 for m in line["suspected_missing"]
                )
                stats["level_conflicts"] += bool(line["level_conflicts"])

    # ------------------------------------------------------------------ run
    def export(self, items, output_dir, *, roots=(), suffix="", progress=True) -> dict:
        """Export ``items`` under ``output_dir``; returns the summary (also ``summary.json``).

        ``suffix`` names per-shard files (``manifest{suffix}.jsonl``) when several processes
        write one folder; ``roots`` are the input folders the output must stay out of.
        """
        out = check_output_dir(output_dir, roots)
        out.mkdir(parents=True, exist_ok=True)
        # one export at a time per manifest: two would append to one manifest, truncate each
        # other's errors file and swap the same ZOI folders
        with single_writer(out / f".export{suffix}.lock", "ZOI export"):
            return self._export(items, out, suffix, progress)

    def _export(self, items, out: Path, suffix: str, progress: bool) -> dict:
        manifest_path = out / f"manifest{suffix}.jsonl"
        done = {
            p: (line["sha256"], line["model"]["hash"])
            for p, line in load_manifest(str(manifest_path)).items()
        }
        cfg = self.cfg
        dataset = _ScanDataset(
            list(items),
            build_xray_augmentations(cfg, is_train=False),
            cfg.INPUT.XRAY.CHANNELS,
            done,
            self.model_info["hash"],
            out,
        )
        workers = cfg.ZOI.NUM_WORKERS
        loader = DataLoader(
            dataset,
            batch_size=cfg.ZOI.BATCH_SIZE,
            num_workers=workers,
            collate_fn=_as_list,
            prefetch_factor=2 if workers else None,
        )
        stats = dict(ok=0, failed=0, skipped=0, zois=0, suspected_missing=0, level_conflicts=0)
        self.timings = {}
        was_training = self.model.training
        self.model.eval()
        start = time.perf_counter()
        try:
            with open_for_append(str(manifest_path)) as manifest_f, open(
                out / f"errors{suffix}.jsonl", "w", encoding="utf-8"
            ) as errors_f, ThreadPoolExecutor(1, thread_name_prefix="zoi-writer") as writer:
                pending = deque()
                bar = tqdm(total=len(dataset), unit="scan", disable=not progress, desc="ZOI export")
                for batch in loader:
                    ready = [r for r in batch if "image" in r]
                    preds = self._predict(ready) if ready else []
                    pending.append(
                        writer.submit(
                            self._write_batch, out, batch, preds, manifest_f, errors_f, stats
                        )
                    )
                    while len(pending) > 1:  # one batch written while the next is predicted
                        pending.popleft().result()
                    bar.update(len(batch))
                while pending:
                    pending.popleft().result()
                bar.close()
        finally:
            self.model.train(was_training)
        if not suffix:
            compact_manifest(str(manifest_path))
        elapsed = time.perf_counter() - start
        processed = stats["ok"] + stats["failed"]
        summary = {
            "scans_ok": stats["ok"],
            "scans_failed": stats["failed"],
            "scans_skipped": stats["skipped"],
            "zois": stats["zois"],
            "suspected_missing": stats["suspected_missing"],
            "scans_with_level_conflicts": stats["level_conflicts"],
            "seconds": round(elapsed, 3),
            "scans_per_s": round(processed / elapsed, 4) if elapsed > 0 else None,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "output_dir": str(out),
        }
        write_json(out / f"summary{suffix}.json", summary)
        logger.info("ZOI export summary: %s", json.dumps(summary))
        return summary


def export_dataset(cfg, model, dataset_name, output_dir, *, rank=0, world_size=1) -> dict:
    """Export one registered split; under multi-GPU rank r takes shard r of world_size."""
    records = DatasetCatalog.get(dataset_name)
    image_root = MetadataCatalog.get(dataset_name).get("image_root", None)
    items = shard(items_from_dataset(records, image_root), world_size, rank)
    exporter = ZOIExporter(cfg, model, dataset_name=dataset_name)
    suffix = f"-{rank:05d}-of-{world_size:05d}" if world_size > 1 else ""
    roots = [image_root] if image_root else []
    return exporter.export(items, output_dir, roots=roots, suffix=suffix, progress=rank == 0)


def export_datasets(cfg, model) -> dict:
    """Export ZOI.DATASETS (default DATASETS.TEST) under OUTPUT_DIR/zoi/<dataset>/."""
    from detectron2.utils import comm

    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    results = {}
    for name in list(cfg.ZOI.DATASETS) or list(cfg.DATASETS.TEST):
        out = os.path.join(cfg.OUTPUT_DIR, "zoi", name)
        results[name] = export_dataset(
            cfg, model, name, out, rank=comm.get_rank(), world_size=comm.get_world_size()
        )
        if comm.get_world_size() > 1:
            comm.synchronize()
            if comm.is_main_process():
                _merge_shards(out)
    return results


def _merge_shards(out: str) -> None:
    """Concatenate the ranks' manifest and error files into manifest.jsonl / errors.jsonl."""
    for stem in ("manifest", "errors"):
        parts = sorted(Path(out).glob(f"{stem}-*-of-*.jsonl"))
        with atomic_open(Path(out, f"{stem}.jsonl")) as f:
            for part in parts:
                f.write(part.read_text(encoding="utf-8"))
    compact_manifest(os.path.join(out, "manifest.jsonl"))
