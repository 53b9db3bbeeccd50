"""Which scans an export covers: folders, globs or a dataset split -> a sorted list of
(path, relative path), sharded deterministically, and an output folder that is safe to write."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from ..data.io import is_scan_file
from ..errors import SpineError, check_output_folder

__all__ = ["ScanItem", "discover_scans", "items_from_dataset", "shard", "check_output_dir"]

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class ScanItem:
    path: str  # absolute path of the scan file
    rel: str  # posix path relative to the input root: the scan's name in the manifest
    zoi_dir: str  # "zoi/<rel without extension>": where its ZOI files go


def _root_of(pattern: str) -> Path:
    """The folder a glob or a path is relative to: everything before the first wildcard."""
    if any(c in pattern for c in _GLOB_CHARS):
        head = pattern[: min(pattern.index(c) for c in _GLOB_CHARS if c in pattern)]
        return Path(os.path.dirname(head) or ".").resolve()
    p = Path(pattern).resolve()
    return p if p.is_dir() else p.parent


def _walk(folder: Path):
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath, name)


def _with_zoi_dirs(pairs) -> list:
    """ScanItems sorted by relative path; scans whose names differ only by extension
    (a.png, a.dcm) keep the extension in their ZOI folder so they never share one."""
    pairs = sorted(pairs, key=lambda pr: pr[1])
    stems = {}
    for _, rel in pairs:
        stem = os.path.splitext(rel)[0]
        stems[stem] = stems.get(stem, 0) + 1
    items = []
    for path, rel in pairs:
        stem, ext = os.path.splitext(rel)
        name = stem if stems[stem] == 1 else stem + ext.replace(".", "_")
        items.append(ScanItem(path, rel, f"zoi/{name}"))
    return items


def discover_scans(inputs) -> tuple[list, list]:
    """(sorted ScanItems, input roots) for folders (recursive), globs and files.

    A file counts as a scan when ``read_scan`` would try it (known suffix, or DICOM by its
    'DICM' preamble whatever its name). Paths are relative to the common root of all inputs.
    """
    found, roots = set(), []
    for spec in inputs:
        root = _root_of(spec)
        roots.append(root)
        if any(c in spec for c in _GLOB_CHARS):
            candidates = (Path(p) for p in glob.glob(spec, recursive=True))
        elif Path(spec).is_dir():
            candidates = _walk(Path(spec))
        elif Path(spec).is_file():
            candidates = [Path(spec)]
        else:
            raise SpineError(f"{spec}: no such file or folder")
        for p in candidates:
            if p.is_dir():
                found.update(_located(q) for q in _walk(p) if is_scan_file(q))
            elif is_scan_file(p):
                found.add(_located(p))
    common = Path(os.path.commonpath([str(r) for r in roots])) if roots else Path(".")
    pairs = []
    for p in found:
        try:
            pairs.append((str(p), p.relative_to(common).as_posix()))
        except ValueError:  # a glob through a symlinked folder, e.g. "scans/*/a.png"
            raise SpineError(f"{p}: outside the input folder {common}") from None
    return _with_zoi_dirs(pairs), roots


def _located(path: Path) -> Path:
    """The scan's absolute path with its folders resolved like the roots are, but not the file:
    a folder of symlinks to scans kept elsewhere keeps the links' names (and places)."""
    return path.absolute().parent.resolve() / path.name


def items_from_dataset(records, image_root=None) -> list:
    """ScanItems of a dataset split (detectron2 dicts), relative to its image root when known."""
    paths = [str(Path(r["file_name"]).resolve()) for r in records]
    if not paths:
        return []
    root = Path(image_root).resolve() if image_root else Path(os.path.commonpath(paths))
    if len(paths) == 1 and not image_root:
        root = Path(paths[0]).parent
    pairs = []
    for p in paths:
        try:
            rel = Path(p).relative_to(root).as_posix()
        except ValueError:
            rel = Path(p).name
        pairs.append((p, rel))
    return _with_zoi_dirs(dict(pairs).items())


def shard(items: list, num_shards: int, shard_index: int) -> list:
    """Every K-th scan of the sorted list from I: shards partition the list, whatever K."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise SpineError(
            f"--num-shards {num_shards} --shard-index {shard_index}: need 0 <= index < shards"
        )
    return items[shard_index::num_shards]


def check_output_dir(output_dir, roots) -> Path:
    """Refuse an output folder inside (or equal to) an input folder: inputs are never written;
    and one that is a file."""
    check_output_folder(output_dir)
    out = Path(output_dir).resolve()
    for root in roots:
        root = Path(root).resolve()
        if out == root or root in out.parents:
            raise SpineError(f"{output_dir}: output folder is inside the input folder {root}")
    return out
