"""One spelling of "run inference at lower precision" for evaluation and export."""

from __future__ import annotations

import contextlib

import torch

from ..errors import SpineError

__all__ = ["inference_autocast"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def inference_autocast(device_type: str, amp: str, key: str = "AMP"):
    """autocast for ``amp`` in ("", "fp16", "bf16") on ``device_type``; "" = fp32 (no-op).

    ``key`` names the config key in the error (e.g. "ZOI.AMP")."""
    if not amp:
        return contextlib.nullcontext()
    if amp not in _DTYPES:
        raise SpineError(f"{key} {amp!r}: expected '', 'fp16' or 'bf16'")
    return torch.autocast(device_type, dtype=_DTYPES[amp])
