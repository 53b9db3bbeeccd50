"""ZOI export: each vertebra's zone of interest cut from the unprocessed scan, with a manifest.

``extract`` (one scan's predictions -> ZOIs), ``order`` (along the spine, levels, gaps),
``export`` (the batched predictor shared by the hook and tools/export_zoi.py), ``manifest``
(schema), ``sources`` (which scans, sharding, output checks).
"""

from .export import ZOIExporter, export_dataset, export_datasets, model_hash
from .extract import ScanPredictions, extract_zois, scale_to_original
from .manifest import SCHEMA_VERSION, check_manifest_line, load_manifest
from .order import assign_levels, find_gaps, order_along_spine
from .sources import ScanItem, check_output_dir, discover_scans, items_from_dataset, shard

__all__ = [
    "SCHEMA_VERSION",
    "ScanItem",
    "ScanPredictions",
    "ZOIExporter",
    "assign_levels",
    "check_manifest_line",
    "check_output_dir",
    "discover_scans",
    "export_dataset",
    "export_datasets",
    "extract_zois",
    "find_gaps",
    "items_from_dataset",
    "load_manifest",
    "model_hash",
    "order_along_spine",
    "scale_to_original",
    "shard",
]
