"""Data: one scan reader, dataset registration (done at import), X-ray mapper and augmentations."""

from .datasets import (
    BUILTIN_SPLITS,
    load_spine_coco,
    register_builtin,
    register_from_config,
    register_spine_coco,
)
from .io import Scan, file_sha256, read_scan

__all__ = [
    "BUILTIN_SPLITS",
    "Scan",
    "file_sha256",
    "load_spine_coco",
    "read_scan",
    "register_builtin",
    "register_from_config",
    "register_spine_coco",
]

register_builtin()
