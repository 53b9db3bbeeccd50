"""Model parts registered with detectron2 when spine_d2 is imported (ROI_HEADS.NAME etc.)."""

from .levels import LevelPrior, decode_levels
from .precision import inference_autocast
from .roi_heads import LevelROIHeads

__all__ = ["LevelPrior", "LevelROIHeads", "decode_levels", "inference_autocast"]
