"""Per-vertebra alignment of a high-dose reference onto a low-dose scan, and compositing.

``match`` (pair vertebrae by level or spine position), ``register`` (similarity per vertebra:
mask geometry, outline refinement, optional intensity refinement), ``composite`` (warp, match
intensities, feathered blend), ``pipeline`` (one pair end to end), ``cli`` (tools/enhance_scan.py).
"""

from .composite import composite, side_by_side
from .match import Match, Vertebra, match_vertebrae
from .pipeline import (
    EnhanceResult,
    enhance_pair,
    vertebrae_from_coco,
    vertebrae_from_manifest,
    write_outputs,
)
from .register import Registration, decompose, init_from_masks, register_vertebra, similarity_matrix

__all__ = [
    "EnhanceResult",
    "Match",
    "Registration",
    "Vertebra",
    "composite",
    "decompose",
    "enhance_pair",
    "init_from_masks",
    "match_vertebrae",
    "register_vertebra",
    "side_by_side",
    "similarity_matrix",
    "vertebrae_from_coco",
    "vertebrae_from_manifest",
    "write_outputs",
]
