"""manifest.jsonl: one line per exported scan, the contract with downstream software.

Lines are appended only after the scan's ZOI files are in place, so a line that exists points to
a complete ZOI set. Readers take the last line per ``path`` (a scan redone with another model
appends a newer line; the exporter compacts the file at the end of each run). The schema is
documented in README ("ZOI export") and versioned by ``schema_version``.
"""

from __future__ import annotations

import json
import logging
import os

from ..atomic import atomic_open, naming_write_errors
from ..errors import SpineError

__all__ = [
    "SCHEMA_VERSION",
    "load_manifest",
    "append_line",
    "open_for_append",
    "compact_manifest",
    "check_manifest_line",
]

SCHEMA_VERSION = 1

logger = logging.getLogger(__name__)

_SCAN_KEYS = {
    "schema_version": int,
    "path": str,
    "sha256": str,
    "width": int,
    "height": int,
    "bit_depth": int,
    "model": dict,
    "zois": list,
    "suspected_missing": list,
}
_MODEL_KEYS = {
    "config": str,
    "config_sha256": str,
    "weights": str,
    "weights_sha256": str,
    "hash": str,
}
_ZOI_KEYS = {
    "id": int,
    "class": str,
    "class_id": int,
    "level": (str, type(None)),
    "level_source": (str, type(None)),
    "score": float,
    "bbox_xyxy": list,
    "crop_xyxy": list,
    "mask_rle": dict,
    "centroid": list,
    "angle_deg": (float, int, type(None)),
    "area": int,
    "file": str,
}
_MISSING_KEYS = {
    "reason": str,
    "after": (int, type(None)),
    "before": (int, type(None)),
    "count": (int, type(None)),
    "levels": list,
}

_CONFLICT_KEYS = {"reason": str, "ids": list, "level": str}


def _check_keys(obj, spec, where):
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    missing = sorted(set(spec) - set(obj))
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    for key, typ in spec.items():
        if isinstance(obj[key], bool) or not isinstance(obj[key], typ):
            raise ValueError(f"{where}: '{key}' has type {type(obj[key]).__name__}")


def check_manifest_line(line: dict) -> None:
    """Raise ValueError naming the first field that breaks schema version 1."""
    _check_keys(line, _SCAN_KEYS, "scan")
    if line["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"scan: schema_version {line['schema_version']} != {SCHEMA_VERSION}")
    if len(line["sha256"]) != 64:
        raise ValueError("scan: sha256 is not 64 hex digits")
    _check_keys(line["model"], _MODEL_KEYS, "model")
    w, h = line["width"], line["height"]
    for z in line["zois"]:
        where = f"zoi {z.get('id') if isinstance(z, dict) else '?'}"
        _check_keys(z, _ZOI_KEYS, where)
        x0, y0, x1, y1 = z["bbox_xyxy"]
        if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
            raise ValueError(f"{where}: bbox_xyxy {z['bbox_xyxy']} outside {w}x{h}")
        if list(z["mask_rle"].get("size", [])) != [h, w] or not isinstance(
            z["mask_rle"].get("counts"), str
        ):
            raise ValueError(f"{where}: mask_rle must be a compressed RLE of size [{h}, {w}]")
        if len(z["centroid"]) != 2 or len(z["crop_xyxy"]) != 4:
            raise ValueError(f"{where}: centroid is [x, y] and crop_xyxy [x0, y0, x1, y1]")
    for m in line["suspected_missing"]:
        _check_keys(m, _MISSING_KEYS, "suspected_missing")
        if m["reason"] not in ("gap", "no_detections"):
            raise ValueError(f"suspected_missing: unknown reason {m['reason']!r}")
    # Optional: manifests written before it existed lack it.
    for c in line.get("level_conflicts", []):
        _check_keys(c, _CONFLICT_KEYS, "level_conflicts")
        if not (
            (c["reason"] == "repeat" and len(c["ids"]) == 2)
            or (c["reason"] == "uncertain" and c["ids"])
        ):
            raise ValueError(
                f"level_conflicts: expected a repeat of two ids or an uncertain chain, got {c}"
            )
    margin = line.get("level_margin")  # optional too: infinite (no shift fits) is null
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise ValueError(f"scan: 'level_margin' has type {type(margin).__name__}")
    if not line["zois"] and not line["suspected_missing"]:
        raise ValueError("scan: no ZOIs and nothing suspected missing")


def load_manifest(path: str) -> dict:
    """path -> last complete line for it. A torn line (killed process; it starts as a JSON
    object does) is ignored. A file of which no line reads and some line is not even the start
    of one, or a JSON line that is not a scan's, is a one-line SpineError: the exporter would
    otherwise append to some other file, and enhance_scan match nothing."""
    lines = {}
    if not os.path.isfile(path):
        return lines
    torn, foreign = [], 0
    with open(path, "rb") as f:  # bytes: a torn line may end inside a UTF-8 character
        for n, raw in enumerate(f, 1):
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                torn.append(n)
                foreign += not raw.lstrip().startswith(b"{")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("path"), str):
                raise SpineError(f"{path}:{n}: not a ZOI manifest line (no 'path' of a scan)")
            lines[obj["path"]] = obj
    if foreign and not lines:
        raise SpineError(f"{path}: not a ZOI manifest (none of its {len(torn)} lines is JSON)")
    for n in torn:
        logger.warning("%s:%d: incomplete line ignored (interrupted run)", path, n)
    return lines


def append_line(f, obj: dict) -> None:
    """Append one JSON line and flush: a killed process leaves whole lines behind (and a full
    disk a torn last line, which the next run ends and skips: see open_for_append)."""
    with naming_write_errors(f.name):
        f.write(json.dumps(obj, separators=(",", ":")) + "\n")
        f.flush()


def open_for_append(path: str):
    """Open for appending, first ending a torn last line so the next line stays parseable."""
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
    return open(path, "a", encoding="utf-8")


def compact_manifest(path: str) -> int:
    """Rewrite with one line per path (the last), sorted by path; temp name + rename."""
    lines = load_manifest(path)
    with atomic_open(path) as f:
        for key in sorted(lines):
            f.write(json.dumps(lines[key], separators=(",", ":")) + "\n")
    return len(lines)
