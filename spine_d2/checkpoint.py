"""SpineCheckpointer: detectron2's DetectionCheckpointer that verifies a weights file first.

A weights file may come with a manifest next to it (``<name>.json`` beside ``<name>.pth``, as
the shipped checkpoint in ``weights/`` does) holding its ``sha256``. The file's bytes are hashed
and compared *before* anything is unpickled, so a truncated download or a file swapped under
the same name fails with one line instead of loading silently (or running a pickle).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

from detectron2.checkpoint import DetectionCheckpointer

from .errors import CheckpointError

__all__ = ["SpineCheckpointer", "weights_manifest", "verify_weights"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        got = _sha256(path)
        if got != manifest["sha256"].lower():
            raise CheckpointError(
                path,
                f"sha256 {got[:12]}... does not match {manifest['sha256'][:12]}... in "
                f"{path.with_suffix('.json').name}: the file is corrupt or not the one described",
            )
    return manifest


class SpineCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer + sha256 check against a sidecar manifest + one-line errors."""

    def _load_file(self, filename):
        if Path(filename).suffix == ".pth" or Path(filename).with_suffix(".json").is_file():
            manifest = verify_weights(filename)
            if manifest is not None:
                self.logger.info(f"{filename}: sha256 matches its manifest")
        try:
            return super()._load_file(filename)
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(filename, f"not a readable checkpoint ({reason})") from None
