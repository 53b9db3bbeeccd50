"""Soft non-maximum suppression (Bodla et al., ICCV 2017) for the box predictor's inference.

Neighbouring vertebrae in oblique views overlap as much as a duplicate overlaps its original (box
IoU 0.5-0.7), so no hard NMS threshold keeps the one and drops the other (docs/results-drr.md, "The
misses by kind"). Soft NMS does not delete an overlapping detection: it lowers its score, so the
vertebrae that hard NMS deleted come back ranked below every clean detection. With the linear rule
at NMS_THRESH_TEST 0.5 a demoted detection keeps at most (1 - IoU) < 0.5 of its score, so the
operating point at score 0.5 (VertebraEvaluator, ZOI export) is hard NMS's, while COCO AP, which
ranks every detection, gains from the neighbours that were deleted before.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances, pairwise_iou

__all__ = ["SOFT_NMS_METHODS", "soft_nms", "soft_nms_inference"]

SOFT_NMS_METHODS = ("hard", "linear", "gaussian")


def soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    method: str,
    iou_thresh: float,
    sigma: float,
    score_thresh: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy soft NMS within each class.

    ``linear``: a detection overlapping a picked one by IoU > ``iou_thresh`` keeps (1 - IoU) of
    its score; ``gaussian``: every overlapping detection keeps exp(-IoU^2 / sigma); ``hard``:
    one overlapping by more than ``iou_thresh`` is dropped (detectron2's NMS). Detections whose
    score falls below ``score_thresh`` are dropped.
    Returns the indices kept, in the order picked (decreasing new score), and their new scores.
    """
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"SPINE.NMS.METHOD must be one of {SOFT_NMS_METHODS}, not {method!r}")
    n = len(scores)
    none = torch.zeros(0, dtype=torch.long, device=scores.device), scores.new_zeros(0)
    if n == 0:
        return none
    if method == "hard":  # detectron2's own NMS, not a copy of it
        keep = batched_nms(boxes, scores, classes, iou_thresh)
        keep = keep[scores[keep] >= score_thresh]
        return (keep, scores[keep]) if len(keep) else none
    iou = pairwise_iou(Boxes(boxes), Boxes(boxes))
    iou = iou * (classes[:, None] == classes[None, :])  # other classes never suppress
    current = scores.clone().float()
    alive = torch.ones(n, dtype=torch.bool, device=scores.device)
    picked, picked_scores = [], []
    neg_inf = torch.tensor(float("-inf"), device=scores.device)
    for _ in range(n):
        i = int(torch.where(alive, current, neg_inf).argmax())
        if not alive[i] or current[i] < score_thresh:
            break
        picked.append(i)
        picked_scores.append(current[i].clone())
        alive[i] = False
        overlap = iou[i]
        if method == "linear":
            current = torch.where(overlap > iou_thresh, current * (1 - overlap), current)
        else:
            current = current * torch.exp(-(overlap**2) / sigma)
    if not picked:
        return none
    keep = torch.as_tensor(picked, dtype=torch.long, device=scores.device)
    new_scores = torch.stack(picked_scores).to(scores.dtype)
    return keep, new_scores


def soft_nms_inference(
    boxes: List[torch.Tensor],
    scores: List[torch.Tensor],
    image_shapes: List[Tuple[int, int]],
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
    method: str,
    sigma: float,
) -> Tuple[List[Instances], List[torch.Tensor]]:
    """detectron2's ``fast_rcnn_inference`` with :func:`soft_nms` in place of ``batched_nms``:
    the same inputs (per image: R x (K*4 or 4) boxes, R x (K+1) scores) and outputs (Instances
    with pred_boxes / scores / pred_classes, and the index of each detection's proposal)."""
    results, kept = [], []
    for img_boxes, img_scores, shape in zip(boxes, scores, image_shapes):
        valid = torch.isfinite(img_boxes).all(dim=1) & torch.isfinite(img_scores).all(dim=1)
        proposal_ids = valid.nonzero().flatten()
        img_boxes, img_scores = img_boxes[valid], img_scores[valid][:, :-1]
        num_reg = img_boxes.shape[1] // 4
        clipped = Boxes(img_boxes.reshape(-1, 4))
        clipped.clip(shape)
        img_boxes = clipped.tensor.view(-1, num_reg, 4)
        above = img_scores > score_thresh
        inds = above.nonzero()  # (proposal, class)
        cand_boxes = img_boxes[inds[:, 0], 0] if num_reg == 1 else img_boxes[above]
        keep, new_scores = soft_nms(
            cand_boxes, img_scores[above], inds[:, 1], method, nms_thresh, sigma, score_thresh
        )
        if topk_per_image >= 0:
            keep, new_scores = keep[:topk_per_image], new_scores[:topk_per_image]
        result = Instances(shape)
        result.pred_boxes = Boxes(cand_boxes[keep])
        result.scores = new_scores
        result.pred_classes = inds[keep, 1]
        results.append(result)
        kept.append(proposal_ids[inds[keep, 0]])
    return results, kept
