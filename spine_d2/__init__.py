"""spine-d2: find every vertebra in an X-ray (Mask R-CNN on Detectron2) and export each as a ZOI.

Importing the package registers the built-in datasets (so multi-GPU workers see them too).
"""

import warnings

# detectron2 0.6 on current torch: two deprecations inside detectron2 that users cannot act on
# and that would otherwise open every log. Only these exact messages are silenced.
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
)
warnings.filterwarnings(
    "ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning
)

try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "spine-d2 needs detectron2 0.6: run `make install` or `python tools/install_detectron2.py`"
    ) from e

from . import data  # noqa: F401  (registers the built-in datasets)
from . import modeling  # noqa: F401  (registers LevelROIHeads)
from .config import VERTEBRA_LEVELS, add_spine_config
from .errors import DatasetError, ScanReadError, SpineError

__version__ = "0.1.0"
__all__ = [
    "VERTEBRA_LEVELS",
    "add_spine_config",
    "DatasetError",
    "ScanReadError",
    "SpineError",
]
