"""SpineCheckpointer: detectron2's DetectionCheckpointer that verifies a weights file first.

A weights file may come with a manifest next to it (``<name>.json`` beside ``<name>.pth``, as
the shipped checkpoint in ``weights/`` does) holding its ``sha256``. The file's bytes are hashed
and compared *before* anything is unpickled, so a truncated download or a file swapped under
the same name fails with one line instead of loading silently (or running a pickle).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .atomic import atomic_open, sweep_temporaries, write_atomic
from .data.io import file_sha256
from .errors import CheckpointError, one_line, torch_load_reason

__all__ = [
    "SpineCheckpointer",
    "package_weights",
    "training_curve",
    "verify_weights",
    "weights_manifest",
]


def weights_manifest(path) -> dict | None:
    """The manifest beside a weights file (``<stem>.json``), or None when there is none."""
    side = Path(path).with_suffix(".json")
    if not side.is_file():
        return None
    try:
        manifest = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(side, f"unreadable weights manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str):
        raise CheckpointError(side, "weights manifest has no 'sha256' string")
    return manifest


def verify_weights(path) -> dict | None:
    """Check ``path`` against its manifest's sha256; return the manifest (None if absent)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such weights file")
    manifest = weights_manifest(path)
    if manifest is not None:
        got = file_sha256(path)
        if got != manifest["sha256"].lower():
            raise CheckpointError(
                path,
                f"sha256 {got[:12]}... does not match {manifest['sha256'][:12]}... in "
                f"{path.with_suffix('.json').name}: the file is corrupt or not the one described",
            )
    return manifest


# How a training run stopped by a full disk goes on: its files are whole (saved as below). The
# line names the checkpoint, or OUTPUT_DIR when detectron2's own writers (metrics.json) stopped.
_RESUME = (
    "whole and last_checkpoint names the newest; make room (or copy OUTPUT_DIR elsewhere) and "
    "run again with --resume"
)
RESUME_ADVICE = "the checkpoints written before it are " + _RESUME
RESUME_ADVICE_FOLDER = "its checkpoints are " + _RESUME


class SpineCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer + sha256 check against a sidecar manifest + one-line errors."""

    def resume_or_load(self, path, *, resume=True):
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if "://" not in last and not os.path.isfile(last):
                raise CheckpointError(
                    last,
                    f"named by {os.path.join(self.save_dir, 'last_checkpoint')} but not there: "
                    "restore it, or delete last_checkpoint to start from MODEL.WEIGHTS",
                )
        return super().resume_or_load(path, resume=resume)

    def load(self, path, *args, **kwargs):
        """fvcore asserts (a traceback) on a missing file and raises whatever the download
        does on a URL it cannot fetch: both are one line here."""
        if path and "://" not in path:
            if not os.path.isfile(path):
                raise CheckpointError(path, "no such weights file (MODEL.WEIGHTS)")
        elif path:
            try:
                path = self.path_manager.get_local_path(path)
            except (OSError, ValueError, RuntimeError) as e:
                reason = one_line(e)
                raise CheckpointError(
                    path, f"cannot fetch it ({reason}); offline, name a local file instead"
                ) from None
        return super().load(path, *args, **kwargs)

    def save(self, name, **kwargs):
        """fvcore writes a checkpoint in place, so a full disk or a kill mid-write left a
        truncated ``model_XXXX.pth`` under its final name. Here (a local ``save_dir``) it is
        written to a temporary name and renamed, and a full disk is one line naming it; the
        partial files of a run killed while saving are removed at the next save."""
        if not self.save_dir or not self.save_to_disk or "://" in self.save_dir:
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        stale = sweep_temporaries(self.save_dir, "*.pth")
        if stale:
            self.logger.warning(
                f"Removed {len(stale)} partial checkpoint(s) of a run killed while saving: "
                + ", ".join(p.name for p in stale)
            )
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        # to a file object: the zip's records are named "archive", not the temporary name
        with atomic_open(save_file, "wb", advice=RESUME_ADVICE) as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        last = os.path.join(self.save_dir, "last_checkpoint")
        with atomic_open(last, "w", advice=RESUME_ADVICE) as f:
            f.write(last_filename_basename)

    def _load_file(self, filename):
        if verify_weights(filename) is not None:  # fvcore has made ``filename`` local already
            self.logger.info(f"{filename}: sha256 matches its manifest")
        try:
            return super()._load_file(filename)
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:
            reason = torch_load_reason(e)
            raise CheckpointError(filename, f"not a readable checkpoint ({reason})") from None


def training_curve(metrics_rows: list) -> list:
    """The periodic evaluations logged in a detectron2 metrics.json: iteration (counted from
    1), segm AP / AP50 and the vertebra metrics."""
    curve = []
    for r in metrics_rows:
        if "segm/AP50" in r:
            curve.append(
                {
                    "iteration": r["iteration"] + 1,
                    "segm_AP50": r["segm/AP50"],
                    "segm_AP": r.get("segm/AP"),
                    "recall": r.get("vertebra/recall"),
                    "precision": r.get("vertebra/precision"),
                    "level_accuracy": r.get("vertebra/level_accuracy"),
                }
            )
    return curve


def package_weights(checkpoint, out_path, manifest_fields: dict) -> dict:
    """Write the model of a training checkpoint as fp16 weights plus the manifest beside it.

    Only the model's floating-point tensors are halved (loading casts them back to the model's
    dtype); optimizer and scheduler state are dropped. Both files are written to temporary
    names and renamed, the weights first, so a manifest never describes a half-written file.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = state.get("model", state)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in model.items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_path, "wb") as f:  # to a file object: the zip's records are named
        torch.save({"model": half, "__author__": "spine-d2"}, f)  # "archive", not the temp name
    manifest = {
        "file": out_path.name,
        "sha256": file_sha256(out_path),
        "size_bytes": out_path.stat().st_size,
        "dtype": "float16",
        "parameters": int(sum(v.numel() for v in half.values())),
        **manifest_fields,
    }
    write_atomic(out_path.with_suffix(".json"), json.dumps(manifest, indent=1) + "\n")
    return manifest
