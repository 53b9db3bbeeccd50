"""One spelling of "run inference at lower precision" for evaluation and export."""

from __future__ import annotations

import contextlib

import torch

from ..errors import SpineError

__all__ = ["AMP_SCOPES", "inference_autocast"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
AMP_SCOPES = ("model", "features")


def _float_outputs(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _float_outputs(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_float_outputs(v) for v in out)
    return out


def _feature_modules(model):
    """The convolutional stages that dominate inference time: the backbone (ResNet + FPN) and
    the RPN head's convolutions. Proposal decoding and the ROI heads (scores, box regression,
    masks, levels) stay in fp32 on fp32 copies of the features."""
    model = getattr(model, "module", model)
    mods = [getattr(model, "backbone", None)]
    rpn = getattr(model, "proposal_generator", None)
    mods.append(getattr(rpn, "rpn_head", None))
    found = [m for m in mods if m is not None]
    if not found:
        raise SpineError(f"AMP scope 'features': {type(model).__name__} has no backbone/RPN head")
    return found


@contextlib.contextmanager
def _autocast_modules(modules, device_type, dtype):
    handles, stack = [], []

    def enter(_module, _args):
        ctx = torch.autocast(device_type, dtype=dtype)
        ctx.__enter__()
        stack.append(ctx)

    def leave(_module, _args, out):
        stack.pop().__exit__(None, None, None)
        return _float_outputs(out)

    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(enter))
            handles.append(m.register_forward_hook(leave, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()
        while stack:  # a forward that raised before its hook ran
            stack.pop().__exit__(None, None, None)


def inference_autocast(
    device_type: str, amp: str, key: str = "AMP", *, model=None, scope: str = "model"
):
    """autocast for ``amp`` in ("", "fp16", "bf16") on ``device_type``; "" = fp32 (no-op).

    ``scope`` "model" autocasts the whole forward; "features" only the backbone and RPN head
    of ``model`` (most of the time, least of the numerics: scores, boxes and masks are computed
    in fp32). ``key`` names the config key in errors (e.g. "ZOI.AMP")."""
    if scope not in AMP_SCOPES:  # checked in fp32 too: a typo should not wait for AMP to surface
        raise SpineError(f"{key}_SCOPE {scope!r}: expected one of {', '.join(AMP_SCOPES)}")
    if not amp:
        return contextlib.nullcontext()
    if amp not in _DTYPES:
        raise SpineError(f"{key} {amp!r}: expected '', 'fp16' or 'bf16'")
    if scope == "features":
        if model is None:
            raise SpineError(f"{key}_SCOPE 'features' needs the model")
        return _autocast_modules(_feature_modules(model), device_type, _DTYPES[amp])
    return torch.autocast(device_type, dtype=_DTYPES[amp])
