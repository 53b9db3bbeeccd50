"""A learned rescorer: each detection's score from how it sits among the others.

Neighbouring vertebrae in oblique views overlap as much as a duplicate overlaps its original (box
IoU 0.6-0.8), so no NMS rule on one overlap measure keeps the one and drops the other
(docs/results-drr.md, "The misses by kind"). What tells them apart is several cues at once: a
duplicate covers the same pixels (mask IoU ~0.87 with the detection above it) and the level branch
names the same level for both; a neighbour's own detection overlaps less (mask IoU ~0.57), is
shifted along the spine and is named another level. :class:`DetectionRescorer` is a small MLP over
such features (``FEATURES``), fitted by ``tools/fit_rescorer.py`` on a model's predictions on its
training split to predict the mask IoU of the vertebra each detection would be matched to (0 for a
duplicate or a false detection), Mask Scoring R-CNN's target from the outside of the model. The
features come from the model's own outputs at inference, in the model's input frame, by
:func:`rescore_features`: the same code path in fitting and use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.structures import Boxes, pairwise_iou

from ..data.io import file_sha256  # noqa: F401  (re-exported: callers import it from here)
from ..errors import SpineError
from .jsonfile import read_model_json, write_model_json

__all__ = [
    "FEATURES",
    "RESCORER_FORMAT",
    "DetectionRescorer",
    "choose_cut",
    "fit_rescorer",
    "maskness",
    "match_targets",
    "recall_precision",
    "rescore_features",
]

RESCORER_FORMAT = "spine_d2.rescorer/1"

#: What the MLP sees, per detection. "Above" = the detections whose class score before any
#: suppression is higher; "its overlapper" = the one above of highest box IoU (``*_hi``) or of
#: highest mask IoU (``*_j``).
FEATURES = (
    "score_logit",  # class score before NMS, as a logit
    "nms_score_logit",  # after (soft) NMS
    "maskness",  # mean mask probability inside the binary mask
    "max_box_iou_above",
    "max_mask_iou_above",
    "box_overlapper_score_logit",  # -14 when nothing above overlaps
    "box_overlapper_same_level",  # sum over levels of p_i * p_j from the level branch
    "at_border",  # box within 2 px of the image edge
    "log_area_rel",  # mask area over the median of the confident detections' (score >= 0.5)
    "level_confidence",  # the level branch's top probability
    "n_box_overlaps_above",  # detections above at box IoU > 0.3
    "box_iou_x_same_level",
    "n_mask_overlaps_above",  # detections above at mask IoU > 0.3
    "dy_mask_overlapper",  # |centre offset| / own box height
    "dx_mask_overlapper",  # |centre offset| / own box width
    "own_covered",  # intersection with the mask overlapper / own area
    "other_covered",  # intersection / the overlapper's area
    "log_area_ratio",  # log(own area / the overlapper's)
    "mask_overlapper_maskness",
    "mask_iou_x_same_level",
)

_LOGIT_EPS = 1e-6
_NONE_LOGIT = -14.0


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(_LOGIT_EPS, 1 - _LOGIT_EPS)
    return torch.log(p / (1 - p))


def maskness(mask_probs: torch.Tensor) -> torch.Tensor:
    """N x 1 x M x M mask probabilities -> N: mean probability inside the binarised mask."""
    probs = mask_probs.flatten(1).float()
    inside = probs > 0.5
    return (probs * inside).sum(1) / inside.sum(1).clamp(min=1)


def rescore_features(
    boxes: torch.Tensor,
    scores_before_nms: torch.Tensor,
    scores_after_nms: torch.Tensor,
    mask_probs: torch.Tensor,
    level_log_probs: torch.Tensor,
    image_size: tuple,
) -> torch.Tensor:
    """N x len(FEATURES) for the detections of one image (``FEATURES`` says what each is).

    ``boxes`` XYXY in the frame of ``image_size`` (h, w); ``mask_probs`` N x 1 x M x M, the mask
    head's output before pasting (pasted here at ``image_size``, threshold 0.5);
    ``level_log_probs`` N x L.
    """
    n = len(boxes)
    device = boxes.device
    if n == 0:
        return torch.zeros(0, len(FEATURES), device=device)
    # under AMP the pixel counts below would be rounded in bf16/fp16: they stay fp32
    with torch.autocast(device_type=device.type, enabled=False):
        return _features(
            boxes, scores_before_nms, scores_after_nms, mask_probs, level_log_probs, image_size
        )


def _features(boxes, scores_before_nms, scores_after_nms, mask_probs, level_log_probs, image_size):
    n = len(boxes)
    device = boxes.device
    boxes = boxes.float()
    orig = scores_before_nms.float()
    h, w = int(image_size[0]), int(image_size[1])
    masks = paste_masks_in_image(mask_probs[:, 0].float(), Boxes(boxes), (h, w), threshold=0.5)
    flat = masks.flatten(1).float()
    area = flat.sum(1) + 1  # +1: an empty mask stays finite in the logs
    inter = flat @ flat.T
    mask_iou = inter / (area[:, None] + area[None, :] - 2 - inter).clamp(min=1)
    box_iou = pairwise_iou(Boxes(boxes), Boxes(boxes))
    above = orig[None, :] > orig[:, None]
    above.fill_diagonal_(False)
    box_above = torch.where(above, box_iou, torch.zeros_like(box_iou))
    mask_above = torch.where(above, mask_iou, torch.zeros_like(mask_iou))
    idx = torch.arange(n, device=device)
    probs = level_log_probs.float().exp()
    same = probs @ probs.T

    max_box, j_box = box_above.max(1)
    has_box = max_box > 0
    max_mask, j_mask = mask_above.max(1)
    has_mask = max_mask > 0
    zero = torch.zeros(n, device=device)
    same_box = torch.where(has_box, same[idx, j_box], zero)
    confident = orig >= 0.5
    median_area = (area[confident] if confident.any() else area).median()
    border = (
        (boxes[:, 0] < 2) | (boxes[:, 1] < 2) | (boxes[:, 2] > w - 2) | (boxes[:, 3] > h - 2)
    ).float()
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    sizes = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1)
    offset = (centres - centres[j_mask]).abs() / sizes
    inter_j = inter[idx, j_mask]
    mness = maskness(mask_probs)
    same_mask = same[idx, j_mask]
    columns = [
        _logit(orig),
        _logit(scores_after_nms.float()),
        mness,
        max_box,
        max_mask,
        torch.where(has_box, _logit(orig[j_box]), torch.full_like(orig, _NONE_LOGIT)),
        same_box,
        border,
        torch.log(area / median_area),
        probs.max(1).values,
        (box_above > 0.3).sum(1).float(),
        max_box * same_box,
        (mask_above > 0.3).sum(1).float(),
        torch.where(has_mask, offset[:, 1], torch.ones_like(orig)),
        torch.where(has_mask, offset[:, 0], torch.ones_like(orig)),
        torch.where(has_mask, inter_j / area, zero),
        torch.where(has_mask, inter_j / area[j_mask], zero),
        torch.where(has_mask, torch.log(area / area[j_mask]), zero),
        torch.where(has_mask, mness[j_mask], zero),
        torch.where(has_mask, max_mask * same_mask, zero),
    ]
    return torch.stack(columns, dim=1)


class DetectionRescorer:
    """Standardise the features, then Linear -> ReLU -> ... -> Linear -> sigmoid.

    Loaded from the JSON that ``tools/fit_rescorer.py`` writes; holds no trainable state of the
    model, so checkpoints are unchanged by it.
    """

    def __init__(self, mean, std, layers, source: Optional[dict] = None, path: str = ""):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.layers = [
            (torch.as_tensor(w, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32))
            for w, b in layers
        ]
        self.source = dict(source or {})
        self.path = path

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.float() - self.mean.to(features.device)) / self.std.to(features.device)
        for k, (weight, bias) in enumerate(self.layers):
            x = x @ weight.to(x.device).T + bias.to(x.device)
            if k < len(self.layers) - 1:
                x = torch.relu(x)
        return torch.sigmoid(x[:, 0])

    def to_json(self) -> dict:
        return {
            "format": RESCORER_FORMAT,
            "features": list(FEATURES),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "layers": [{"weight": w.tolist(), "bias": b.tolist()} for w, b in self.layers],
            "source": self.source,
        }

    def save(self, path) -> None:
        """JSON, one weight row per line (reviewable in a diff), written to a temporary name
        and renamed: a crash never leaves half a file."""
        d = self.to_json()

        def rows(matrix):
            return "[\n" + ",\n".join("    " + json.dumps(r) for r in matrix) + "\n   ]"

        layers = ",\n".join(
            f'  {{"weight": {rows(layer["weight"])},\n   "bias": {json.dumps(layer["bias"])}}}'
            for layer in d.pop("layers")
        )
        write_model_json(path, d, "layers", f"[\n{layers}\n ]")

    @classmethod
    def load(cls, path) -> "DetectionRescorer":
        """One-line SpineError naming the file for anything that is not a rescorer."""
        path = Path(path)
        data = read_model_json(path, "rescorer", RESCORER_FORMAT, "tools/fit_rescorer.py")
        if data.get("features") != list(FEATURES):
            raise SpineError(
                f"{path}: fitted on features {data.get('features')}, this version computes "
                f"{list(FEATURES)}; refit it with tools/fit_rescorer.py"
            )
        try:
            mean = torch.tensor(data["mean"], dtype=torch.float32)
            std = torch.tensor(data["std"], dtype=torch.float32)
            layers = [
                (
                    torch.tensor(layer["weight"], dtype=torch.float32),
                    torch.tensor(layer["bias"], dtype=torch.float32),
                )
                for layer in data["layers"]
            ]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise SpineError(f"{path}: malformed rescorer ({e!r})") from None
        width = len(FEATURES)
        ok = mean.shape == (width,) and std.shape == (width,) and bool((std > 0).all())
        for weight, bias in layers:
            ok = (
                ok
                and weight.dim() == 2
                and weight.shape[1] == width
                and bias.shape == (weight.shape[0],)
            )
            width = weight.shape[0] if weight.dim() == 2 else -1
        ok = ok and bool(layers) and width == 1
        tensors = [mean, std] + [t for pair in layers for t in pair]
        if not ok or not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise SpineError(
                f"{path}: malformed rescorer (layer shapes must chain from {len(FEATURES)} "
                "features to 1 output, stds > 0, all values finite)"
            )
        return cls(mean, std, layers, data.get("source"), str(path))


def match_targets(iou: np.ndarray, scores: np.ndarray, thresh: float = 0.5) -> np.ndarray:
    """What the rescorer learns: per detection, the mask IoU of the vertebra it is matched to, 0
    for none. COCO's matching: by descending score, each detection takes the still unmatched
    vertebra it overlaps most, if by ``thresh`` or more; so of a duplicate pair the higher one
    gets the vertebra, and a neighbour's demoted detection still gets its own.
    ``iou``: detections x vertebrae (0 across classes)."""
    iou = np.asarray(iou, dtype=np.float64).reshape(len(scores), -1)
    targets = np.zeros(len(scores))
    free = np.ones(iou.shape[1], dtype=bool)
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        if not free.any():
            break
        candidates = np.where(free, iou[i], 0.0)
        g = int(candidates.argmax())
        if candidates[g] >= thresh:
            targets[i] = candidates[g]
            free[g] = False
    return targets


def fit_rescorer(
    features: np.ndarray,
    targets: np.ndarray,
    hidden: int = 32,
    epochs: int = 600,
    seed: int = 0,
    lr: float = 1e-2,
    weight_decay: float = 1e-3,
    source: Optional[dict] = None,
):
    """(DetectionRescorer, final loss): full-batch Adam on binary cross-entropy against the
    soft ``targets`` in [0, 1]; ``hidden`` 0 = logistic regression. Same inputs and seed, same
    weights: it runs in float64 on one thread, since a multi-threaded float32 sum orders its
    terms as the threads fall and 600 steps carry the difference into the weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(features, targets, hidden, epochs, seed, lr, weight_decay, source)
    finally:
        torch.set_num_threads(threads)


def _fit(features, targets, hidden, epochs, seed, lr, weight_decay, source):
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.float64)
    if x.dim() != 2 or x.shape[1] != len(FEATURES) or len(x) != len(y) or len(x) < 2:
        raise ValueError(
            f"fit_rescorer needs N x {len(FEATURES)} features and N targets, N >= 2; got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    mean, std = x.mean(0), x.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # a constant feature stays 0
    xn = (x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    sizes = [len(FEATURES)] + ([hidden] if hidden else []) + [1]
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = 1 / fan_in**0.5  # nn.Linear's initialisation, from our own generator
        uniform = dict(generator=generator, dtype=torch.float64)
        weight = (torch.rand(fan_out, fan_in, **uniform) * 2 - 1) * bound
        bias = (torch.rand(fan_out, **uniform) * 2 - 1) * bound
        layers.append((weight.requires_grad_(), bias.requires_grad_()))
    params = [t for pair in layers for t in pair]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    loss = torch.tensor(float("nan"))
    with torch.enable_grad():
        for _ in range(epochs):
            optimizer.zero_grad()
            h = xn
            for k, (weight, bias) in enumerate(layers):
                h = h @ weight.T + bias
                if k < len(layers) - 1:
                    h = torch.relu(h)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(h[:, 0], y)
            loss.backward()
            optimizer.step()
    rescorer = DetectionRescorer(
        mean.float(), std.float(), [(w.detach(), b.detach()) for w, b in layers], source
    )
    return rescorer, float(loss.detach())


def recall_precision(
    ious: Sequence[np.ndarray], scores: Sequence[np.ndarray], cut: float, thresh: float = 0.5
):
    """(recall, precision, F1) over images at a score cut, matched as VertebraEvaluator matches
    (one-to-one, greedily by IoU, found at IoU >= ``thresh``; no crowd regions). Per image:
    ``ious`` detections x vertebrae, ``scores`` per detection."""
    from ..evaluation.vertebra import greedy_pairs

    found = predicted = truths = 0
    for iou, score in zip(ious, scores):
        iou = np.asarray(iou, dtype=np.float64).reshape(len(score), -1)
        keep = np.nonzero(np.asarray(score) >= cut)[0]
        truths += iou.shape[1]
        predicted += len(keep)
        if len(keep) and iou.shape[1]:
            found += sum(v >= thresh for _, _, v in greedy_pairs(iou[keep]))
    recall = found / truths if truths else 0.0
    precision = found / predicted if predicted else 0.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return recall, precision, f1


def choose_cut(table: Sequence[dict]) -> float:
    """The cut whose smaller of recall and precision is largest (F1 breaks ties): targets that
    ask for both alike (issue 7: >= 0.97 each) are met first where the weaker one is best.
    ``table``: rows with "cut", "recall", "precision", "f1"."""
    if not table:
        raise ValueError("choose_cut needs at least one row")
    best = max(table, key=lambda r: (min(r["recall"], r["precision"]), r["f1"]))
    return float(best["cut"])
