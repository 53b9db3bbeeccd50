"""One high-dose / low-dose pair end to end: vertebrae -> match -> register -> composite.

Vertebrae come from an export manifest line (``vertebrae_from_manifest``), from COCO polygons
(``vertebrae_from_coco``, ground truth in the benchmark) or from any masks the caller has.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from ..atomic import write_atomic
from ..errors import SpineError
from .composite import composite, side_by_side
from .match import Match, Vertebra, match_vertebrae
from .register import Registration, decompose, register_vertebra

__all__ = [
    "EnhanceResult",
    "enhance_pair",
    "vertebrae_from_manifest",
    "vertebrae_from_coco",
    "check_compatible",
    "write_outputs",
]

logger = logging.getLogger(__name__)


@dataclass
class EnhanceResult:
    pixels: np.ndarray  # enhanced scan, low-dose dtype
    match: Match
    registrations: list  # one Registration per match pair (same order)
    records: list = field(default_factory=list)  # transforms.json entries
    seconds: float = 0.0


def vertebrae_from_manifest(line: dict) -> list:
    """Vertebrae of one manifest.jsonl line (masks decoded from its RLE)."""
    out = []
    for z in line["zois"]:
        full = mask_utils.decode(z["mask_rle"]).astype(bool)
        if full.any():
            out.append(
                Vertebra.from_full_mask(full, level=z["level"], score=z["score"], id=z["id"])
            )
    return out


def vertebrae_from_coco(annotations: list, height: int, width: int) -> list:
    """Vertebrae from COCO annotations with polygon or RLE segmentation (level from attributes)."""
    out = []
    for k, a in enumerate(annotations):
        seg = a["segmentation"]
        rles = mask_utils.frPyObjects(seg, height, width) if isinstance(seg, list) else seg
        full = mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)
        if full.any():
            level = (a.get("attributes") or {}).get("level")
            out.append(Vertebra.from_full_mask(full.astype(bool), level=level, id=a.get("id", k)))
    return out


def check_compatible(high, low) -> None:
    """Refuse pairs that cannot be the same region at a comparable resolution."""
    if high.pixels.ndim != 2 or low.pixels.ndim != 2:
        raise SpineError(
            f"{high.path if high.pixels.ndim != 2 else low.path}: colour scan; "
            "alignment needs single-channel X-rays"
        )
    ha, la = high.height * high.width, low.height * low.width
    if max(ha, la) > 4 * min(ha, la):
        raise SpineError(
            f"{low.path}: {low.width}x{low.height} px and {high.path}: {high.width}x{high.height} "
            "px are of different size classes (more than 2x per side): resample one first"
        )


def enhance_pair(
    high,
    low,
    high_vertebrae: list,
    low_vertebrae: list,
    *,
    feather_px: float = 3.0,
    local_sigma_px: float = 6.0,
    smooth_sigmas=(),
    adaptive: bool = True,
    guided_radius: int = 2,
    guided_eps: float = 1e-3,
) -> EnhanceResult:
    """Register every matched vertebra of ``high`` (Scan) onto ``low`` (Scan) and composite."""
    t0 = time.perf_counter()
    check_compatible(high, low)
    if not low_vertebrae:
        raise SpineError(f"{low.path}: no vertebra found")
    if not high_vertebrae:
        raise SpineError(f"{high.path}: no vertebra found")
    match = match_vertebrae(high_vertebrae, low_vertebrae)
    if not match.pairs:
        raise SpineError(f"{low.path}: no vertebra could be paired with {high.path}")
    cache_a, cache_b = {}, {}
    regs, records, items = [], [], []
    for ih, il in match.pairs:
        va, vb = high_vertebrae[ih], low_vertebrae[il]
        reg = register_vertebra(
            high.image,
            va.mask,
            va.origin,
            low.image,
            vb.mask,
            vb.origin,
            smooth_sigmas=smooth_sigmas,
            smoothed_a=cache_a,
            smoothed_b=cache_b,
        )
        regs.append(reg)
        if reg.reliable:
            items.append((va.mask, va.origin, reg.matrix))
        records.append(_record(va, vb, reg))
    for side, idx, vs in (
        ("high", match.unmatched_high, high_vertebrae),
        ("low", match.unmatched_low, low_vertebrae),
    ):
        for i in idx:
            records.append(
                {
                    "level": vs[i].level,
                    f"{side}_id": vs[i].id,
                    "used": False,
                    "reason": f"no partner in the {'low' if side == 'high' else 'high'}"
                    "-dose scan",
                }
            )
    pixels = composite(
        low.pixels,
        high.pixels,
        items,
        feather_px=feather_px,
        local_sigma_px=local_sigma_px,
        adaptive=adaptive,
        guided_radius=guided_radius,
        guided_eps=guided_eps,
    )
    return EnhanceResult(pixels, match, regs, records, time.perf_counter() - t0)


def _record(va, vb, reg: Registration) -> dict:
    return {
        "level": va.level or vb.level,
        "high_id": va.id,
        "low_id": vb.id,
        "matrix": np.round(reg.matrix, 6).tolist(),
        **{k: round(v, 6) for k, v in decompose(reg.matrix).items()},
        "quality": round(reg.quality, 4),
        "mask_iou": round(reg.mask_iou, 4),
        "used": reg.reliable,
        "reason": reg.reason,
        "iterations": reg.iterations,
        "ms": round(reg.ms, 2),
    }


def write_outputs(result: EnhanceResult, high, low, out_dir: str, *, side_by_side_png=True) -> dict:
    """enhanced.<ext> (low-dose bit depth), transforms.json and optionally side_by_side.png, each
    written to a temporary name and renamed. TIFF for TIFF and DICOM scans and for any float scan
    (PNG holds 8- and 16-bit integers only: OpenCV would cut a float scan to 8 bits); PNG else."""
    os.makedirs(out_dir, exist_ok=True)
    tiff = low.meta.get("format") in ("dicom", "tif", "tiff") or result.pixels.dtype.kind == "f"
    enhanced_path = os.path.join(out_dir, "enhanced" + (".tif" if tiff else ".png"))
    if tiff:
        import tifffile

        buf = io.BytesIO()
        tifffile.imwrite(buf, result.pixels)
        data = buf.getvalue()
    else:
        ok, encoded = cv2.imencode(".png", result.pixels)
        if not ok:
            raise SpineError(f"{enhanced_path}: cannot encode the enhanced scan")
        data = encoded.tobytes()
    write_atomic(enhanced_path, data)
    summary = {
        "low_dose": low.path,
        "high_dose": high.path,
        "enhanced": enhanced_path,
        "bit_depth": low.bit_depth,
        "match_method": result.match.method,
        "vertebrae_used": sum(r["used"] for r in result.records),
        "vertebrae": result.records,
        "seconds": round(result.seconds, 3),
    }
    write_atomic(os.path.join(out_dir, "transforms.json"), json.dumps(summary, indent=1))
    if side_by_side_png:
        png = side_by_side(low.pixels, result.pixels)
        write_atomic(
            os.path.join(out_dir, "side_by_side.png"), cv2.imencode(".png", png)[1].tobytes()
        )
    return summary
