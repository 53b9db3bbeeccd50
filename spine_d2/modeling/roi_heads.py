"""LevelROIHeads: detectron2's StandardROIHeads plus a vertebral-level classifier.

The level branch is one linear layer on the box head's features (the same features that score
and regress each box, so it costs almost nothing). It is trained on foreground proposals whose
ground truth carries a level (``gt_level_ids`` from XrayDatasetMapper; -1 = unknown, ignored)
and at inference it labels each detection; ``decode_levels`` then makes the confident ones
agree along the spine. Detections gain ``pred_levels`` (indices into SPINE.LEVELS),
``level_scores`` (the probability of that level before decoding) and ``level_log_probs``
(N x len(SPINE.LEVELS), the level branch's evidence; the decoder adds the spacing term and,
when SPINE.LEVEL_HEAD.PRIOR_WEIGHT > 0, the framing prior: for calibration and
benchmarks/bench_levels.py) and ``pred_rescued`` (True for detections under the score cut that
the chain rescue accepted, SPINE.LEVEL_HEAD.RESCUE; all False when it is off).

Context (SPINE.LEVEL_HEAD.CONTEXT_SCALE > 1): a vertebral body alone does not say whether it is
T1 or C7, L5 or S1; the ribs, clavicles and pelvis around it do. Each proposal's box, enlarged
about its centre, is pooled and run through the same box head, and two linear layers add its
evidence to the class and level logits. They start at zero, so a checkpoint trained without
context loads and predicts exactly as before, and fine-tuning learns how much to use.

End classifier (SPINE.LEVEL_HEAD.END_CLASSIFIER.FILE, ``modeling/end_classifier.py``): at
inference the decoder also weighs what a separate classifier, looking at the ribs and the pelvis
in the input image around the chain's top and bottom detections, says they are.

Rescoring (SPINE.RESCORER.FILE): after the mask head a small learned model
(``modeling/rescorer.py``) gives every detection a new score from how it overlaps the others,
and the levels are decoded again on those scores.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import _log_classification_stats
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import Boxes, Instances
from fvcore.nn import smooth_l1_loss
from torch import nn

from .end_classifier import EndClassifier, add_end_evidence, end_rows
from .levels import LevelPrior, decode_levels, shift_margin
from .rescorer import DetectionRescorer, file_sha256, maskness, rescore_features
from .rescue import rescue_chain
from .soft_nms import SOFT_NMS_METHODS, soft_nms_inference

__all__ = ["LevelROIHeads", "weighted_mask_loss"]


def weighted_mask_loss(
    logits: torch.Tensor, instances: List[Instances], weights: Optional[torch.Tensor]
) -> torch.Tensor:
    """detectron2's mask_rcnn_loss (per-pixel BCE against the GT mask cropped to each proposal)
    with each proposal's mean BCE times its weight, averaged over proposals: weights of 1 (or
    None) give the same value. Unlike mask_rcnn_loss it logs no mask accuracy."""
    side = logits.size(2)
    gt_masks = [
        x.gt_masks.crop_and_resize(x.proposal_boxes.tensor, side).to(logits.device)
        for x in instances
        if len(x)
    ]
    if not gt_masks:
        return logits.sum() * 0
    gt_masks = torch.cat(gt_masks).float()
    if logits.size(1) == 1:
        logits = logits[:, 0]
    else:
        gt_classes = torch.cat([x.gt_classes for x in instances if len(x)]).long()
        logits = logits[torch.arange(len(logits), device=logits.device), gt_classes]
    per_mask = F.binary_cross_entropy_with_logits(logits.float(), gt_masks, reduction="none")
    per_mask = per_mask.flatten(1).mean(1)
    if weights is not None:
        per_mask = per_mask * weights
    return per_mask.mean()


def _load_rescorer(cfg) -> Optional[DetectionRescorer]:
    """SPINE.RESCORER.FILE, or None; warns when MODEL.WEIGHTS is not the checkpoint whose
    predictions it was fitted on (a fine-tuned model may rank its detections differently)."""
    path = cfg.SPINE.RESCORER.FILE
    if not path:
        return None
    rescorer = DetectionRescorer.load(path)
    fitted = rescorer.source.get("weights_sha256")
    weights = cfg.MODEL.WEIGHTS
    if fitted and weights and os.path.isfile(weights) and file_sha256(weights) != fitted:
        logging.getLogger(__name__).warning(
            "%s was fitted on the predictions of another checkpoint than %s (sha256 %s...); "
            "refit it (tools/fit_rescorer.py) for this model, or set SPINE.RESCORER.FILE ''",
            path,
            weights,
            fitted[:12],
        )
    return rescorer


def _field(proposals: Instances, name: str, fill) -> torch.Tensor:
    """A gt field of sampled proposals; ``fill`` for an image without vertebrae, whose
    proposals detectron2 leaves without gt fields (all background)."""
    if proposals.has(name):
        return getattr(proposals, name)
    dtype = torch.bool if isinstance(fill, bool) else torch.int64
    return torch.full((len(proposals),), fill, dtype=dtype, device=proposals.gt_classes.device)


@ROI_HEADS_REGISTRY.register()
class LevelROIHeads(StandardROIHeads):
    @configurable
    def __init__(
        self,
        *,
        num_levels: int,
        level_loss_weight: float = 1.0,
        level_score_thresh: float = 0.5,
        skip_cost: float = 2.0,
        repeat_cost: float = 4.0,
        spacing_weight: float = 0.0,
        level_prior: Optional[LevelPrior] = None,
        prior_weight: float = 0.0,
        level_names: Sequence[str] = (),
        context_scale: float = 0.0,
        rescue_expected: int = 0,
        rescue_min_score: float = 0.2,
        rescue_gap_factor: float = 1.6,
        rescue_max_overlap: float = 0.3,
        instance_weights: Sequence = (),
        truncated_weight: float = 1.0,
        nms_method: str = "hard",
        nms_sigma: float = 0.5,
        mask_rescore: bool = False,
        output_range: Sequence[str] = (),
        rescorer: Optional[DetectionRescorer] = None,
        branch_weight: float = 1.0,
        end_classifier: Optional[EndClassifier] = None,
        end_weight: float = 2.0,
        end_floor: float = -7.0,
        **kwargs,
    ):
        """
        Args:
            num_levels: number of level classes (len(SPINE.LEVELS)).
            level_loss_weight: weight of the level cross-entropy in the total loss.
            level_score_thresh: detections at or above this score take part in the decoding
                along the spine; the others keep their own most likely level.
            skip_cost, repeat_cost, spacing_weight: see :func:`decode_levels`.
            level_prior, prior_weight: a :class:`LevelPrior` whose log-likelihood, times
                ``prior_weight``, is added to the level log-probabilities of the decoded
                detections; ``level_names`` (SPINE.LEVELS) maps its levels to the classes.
            context_scale: > 1 adds the context branch (module docstring): boxes enlarged by
                this factor in width and height; 0 = off.
            rescue_expected, rescue_min_score, rescue_gap_factor, rescue_max_overlap: chain
                rescue (:func:`~spine_d2.modeling.rescue.rescue_chain`): detections scored
                ``rescue_min_score`` .. ``level_score_thresh`` that complete a chain of fewer than
                ``rescue_expected`` confident ones join the decoding and are flagged in
                ``pred_rescued``; ``rescue_expected`` 0 = off.
            instance_weights: (level name, weight) pairs: foreground proposals matched to a
                vertebra of that level weigh this much in the box classification, box regression
                and mask losses (1 for the others); empty = detectron2's losses unchanged.
            truncated_weight: the same for proposals matched to a vertebra cut by the border
                (``gt_truncated``), times its level's weight; 1 = unchanged.
            output_range: (first, last) level names: detections whose level (decoded, or the
                branch's own for those under the cut) lies outside are left out of the output,
                e.g. C7 and S1 on films annotated T1..L5; empty = every detection.
            rescorer: a :class:`~spine_d2.modeling.rescorer.DetectionRescorer` whose output
                replaces each detection's score after the mask head (mask rescoring then does
                not apply); levels are decoded again on the new scores. None = off.
            branch_weight: weight of the level branch's log-probabilities in the decoding.
            end_classifier, end_weight, end_floor: an
                :class:`~spine_d2.modeling.end_classifier.EndClassifier` whose log-probabilities
                of the topmost and lowest decoded detections, times ``end_weight``, join the
                evidence (``end_floor`` for names outside its groups). None = off.
            kwargs: StandardROIHeads' arguments.
        """
        super().__init__(**kwargs)
        if self.train_on_pred_boxes:
            raise ValueError(
                "LevelROIHeads does not support MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES"
            )
        self.level_predictor = nn.Linear(self.box_head.output_shape.channels, num_levels)
        nn.init.normal_(self.level_predictor.weight, std=0.01)
        nn.init.constant_(self.level_predictor.bias, 0.0)
        self.level_loss_weight = level_loss_weight
        self.level_score_thresh = level_score_thresh
        self.skip_cost = skip_cost
        self.repeat_cost = repeat_cost
        self.spacing_weight = spacing_weight
        if prior_weight > 0 and (level_prior is None or len(level_names) != num_levels):
            raise ValueError("prior_weight > 0 needs a level_prior and one name per level")
        self.level_prior = level_prior if prior_weight > 0 else None
        self.prior_weight = prior_weight
        self.level_names = list(level_names)
        if context_scale and context_scale <= 1:
            raise ValueError(
                f"SPINE.LEVEL_HEAD.CONTEXT_SCALE must be 0 (off) or > 1, not {context_scale}"
            )
        self.context_scale = float(context_scale)
        if rescue_expected < 0 or (
            rescue_expected and not 0 < rescue_min_score < level_score_thresh
        ):
            raise ValueError(
                "SPINE.LEVEL_HEAD.RESCUE: EXPECTED must be >= 0 and MIN_SCORE in (0, "
                f"SPINE.LEVEL_HEAD.SCORE_THRESH={level_score_thresh}), not {rescue_expected}, "
                f"{rescue_min_score}"
            )
        self.rescue_expected = int(rescue_expected)
        self.rescue_min_score = float(rescue_min_score)
        self.rescue_gap_factor = float(rescue_gap_factor)
        self.rescue_max_overlap = float(rescue_max_overlap)
        self.level_weights = self._parse_instance_weights(instance_weights, level_names, num_levels)
        try:
            self.truncated_weight = float(truncated_weight)
        except (TypeError, ValueError):
            self.truncated_weight = float("nan")
        if not self.truncated_weight > 0:
            raise ValueError(
                f"SPINE.LEVEL_HEAD.TRUNCATED_WEIGHT must be > 0, not {truncated_weight}"
            )
        if nms_method not in SOFT_NMS_METHODS:
            raise ValueError(
                f"SPINE.NMS.METHOD must be one of {', '.join(SOFT_NMS_METHODS)}, not {nms_method!r}"
            )
        if not float(nms_sigma) > 0:
            raise ValueError(f"SPINE.NMS.SIGMA must be > 0, not {nms_sigma}")
        self.nms_method = nms_method
        self.nms_sigma = float(nms_sigma)
        if mask_rescore and not self.mask_on:
            raise ValueError("SPINE.MASK_RESCORE needs a mask head (MODEL.MASK_ON True)")
        self.mask_rescore = bool(mask_rescore)
        self.output_range = self._parse_output_range(output_range, self.level_names)
        if rescorer is not None and not self.mask_on:
            raise ValueError("SPINE.RESCORER.FILE needs a mask head (MODEL.MASK_ON True)")
        self.rescorer = rescorer
        if not branch_weight >= 0 or not end_weight >= 0 or not end_floor <= 0:
            raise ValueError(
                "SPINE.LEVEL_HEAD: BRANCH_WEIGHT and END_CLASSIFIER.WEIGHT must be >= 0 and "
                f"END_CLASSIFIER.FLOOR <= 0, not {branch_weight}, {end_weight}, {end_floor}"
            )
        self.branch_weight = float(branch_weight)
        # not a submodule: its weights live in its own file, not in the detector's checkpoints
        self.__dict__["end_classifier"] = end_classifier
        self.end_weight = float(end_weight)
        self.end_floor = float(end_floor)
        self._input_images = None  # the normalised input batch, while an inference runs
        # tools/fit_rescorer.py sets this to have the inputs of the rescorer kept on the output
        # (``rescore_features``), computed exactly as the rescorer will see them.
        self.collect_rescore_features = False
        if self._weighted:
            loss_type = getattr(self.box_predictor, "box_reg_loss_type", "smooth_l1")
            if loss_type != "smooth_l1":
                raise ValueError(
                    "SPINE.LEVEL_HEAD.INSTANCE_WEIGHTS and TRUNCATED_WEIGHT need "
                    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE "
                    f"smooth_l1, not {loss_type}"
                )
        if self.context_scale:
            dim = self.box_head.output_shape.channels
            self.context_cls = nn.Linear(dim, self.num_classes + 1)
            self.context_level = nn.Linear(dim, num_levels)
            for layer in (self.context_cls, self.context_level):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        head = cfg.SPINE.LEVEL_HEAD
        ret.update(
            num_levels=len(cfg.SPINE.LEVELS),
            level_loss_weight=head.LOSS_WEIGHT,
            level_score_thresh=head.SCORE_THRESH,
            skip_cost=head.SKIP_COST,
            repeat_cost=head.REPEAT_COST,
            spacing_weight=head.SPACING_WEIGHT,
            level_prior=LevelPrior.load(head.PRIOR_FILE) if head.PRIOR_WEIGHT > 0 else None,
            prior_weight=head.PRIOR_WEIGHT,
            level_names=list(cfg.SPINE.LEVELS),
            context_scale=head.CONTEXT_SCALE,
            rescue_expected=head.RESCUE.EXPECTED,
            rescue_min_score=head.RESCUE.MIN_SCORE,
            rescue_gap_factor=head.RESCUE.GAP_FACTOR,
            rescue_max_overlap=head.RESCUE.MAX_OVERLAP,
            instance_weights=[tuple(pair) for pair in head.INSTANCE_WEIGHTS],
            truncated_weight=head.TRUNCATED_WEIGHT,
            nms_method=cfg.SPINE.NMS.METHOD,
            nms_sigma=cfg.SPINE.NMS.SIGMA,
            mask_rescore=cfg.SPINE.MASK_RESCORE,
            output_range=list(head.OUTPUT_RANGE),
            rescorer=_load_rescorer(cfg),
            branch_weight=head.BRANCH_WEIGHT,
            end_classifier=(
                EndClassifier.load(head.END_CLASSIFIER.FILE) if head.END_CLASSIFIER.FILE else None
            ),
            end_weight=head.END_CLASSIFIER.WEIGHT,
            end_floor=head.END_CLASSIFIER.FLOOR,
        )
        return ret

    def forward(self, images, features, proposals, targets=None):
        """StandardROIHeads.forward; at inference with an end classifier the input images are
        kept for the level decoding, which crops the chain's ends from them."""
        if self.training or self.end_classifier is None:
            return super().forward(images, features, proposals, targets)
        self._input_images = images
        try:
            return super().forward(images, features, proposals, targets)
        finally:
            self._input_images = None

    @staticmethod
    def _parse_output_range(output_range, level_names) -> Optional[tuple]:
        """(first, last) level indices of SPINE.LEVEL_HEAD.OUTPUT_RANGE, or None when empty."""
        if not output_range:
            return None
        names = list(level_names)
        bad = [n for n in output_range if n not in names]
        if len(output_range) != 2 or bad:
            raise ValueError(
                "SPINE.LEVEL_HEAD.OUTPUT_RANGE must be [] or [first, last], two of SPINE.LEVELS, "
                f"not {list(output_range)}"
            )
        first, last = names.index(output_range[0]), names.index(output_range[1])
        if first > last:
            raise ValueError(
                f"SPINE.LEVEL_HEAD.OUTPUT_RANGE: {output_range[0]} comes after {output_range[1]}"
            )
        return first, last

    @staticmethod
    def _parse_instance_weights(pairs, level_names, num_levels) -> Optional[torch.Tensor]:
        """A weight per level index from (name, weight) pairs; None when there are none."""
        if not pairs:
            return None
        names = list(level_names)
        if len(names) != num_levels:
            raise ValueError("SPINE.LEVEL_HEAD.INSTANCE_WEIGHTS needs one name per level")
        weights = torch.ones(num_levels)
        for pair in pairs:
            if len(pair) != 2 or pair[0] not in names:
                raise ValueError(
                    "SPINE.LEVEL_HEAD.INSTANCE_WEIGHTS: each entry is [level, weight] with a level "
                    f"of SPINE.LEVELS, not {list(pair)}"
                )
            try:
                weight = float(pair[1])
            except (TypeError, ValueError):
                weight = float("nan")
            if not weight > 0:
                raise ValueError(
                    f"SPINE.LEVEL_HEAD.INSTANCE_WEIGHTS: weight of {pair[0]} must be > 0, "
                    f"not {pair[1]}"
                )
            weights[names.index(pair[0])] = weight
        return weights

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        features = [features[f] for f in self.box_in_features]
        box_features = self.box_pooler(features, [x.proposal_boxes for x in proposals])
        box_features = self.box_head(box_features)
        predictions = self.box_predictor(box_features)
        level_logits = self.level_predictor(box_features).float()
        del box_features
        if self.context_scale:
            context = self.box_pooler(features, [self._context_boxes(x) for x in proposals])
            context = self.box_head(context)
            scores, deltas = predictions
            predictions = (scores + self.context_cls(context), deltas)
            level_logits = level_logits + self.context_level(context).float()
            del context
        if self.training:
            weights = self._proposal_weights(proposals)
            if weights is None:
                losses = self.box_predictor.losses(predictions, proposals)
            else:
                losses = self._weighted_box_losses(predictions, proposals, weights)
            losses["loss_level"] = self.level_loss_weight * self._level_loss(
                level_logits, proposals
            )
            return losses
        pred_instances, kept = self._inference(predictions, proposals)
        per_image = level_logits.split([len(p) for p in proposals])
        if self.rescorer is not None:  # levels and the output range follow its scores (_rescored)
            for inst, idx, logits in zip(pred_instances, kept, per_image):
                inst.level_log_probs = F.log_softmax(logits[idx], dim=1)
            return pred_instances
        for i, (inst, idx, logits) in enumerate(zip(pred_instances, kept, per_image)):
            self._label_levels(inst, logits[idx], i)
        return [self._in_output_range(inst) for inst in pred_instances]

    def _with_end_evidence(self, evidence, boxes: Boxes, centers, image_index: int):
        """``evidence`` plus the end classifier's at the topmost and lowest detections (as it
        was when there is no classifier or no input image to crop from)."""
        if self.end_classifier is None or self._input_images is None:
            return evidence
        image = self._input_images.tensor[image_index]
        xyxy = boxes.tensor.detach().float().cpu().numpy()
        first, last = end_rows(centers)
        classifier = self.end_classifier.to(image.device)
        top = classifier.log_probs(image, [xyxy[first]], group=0)[0]
        bottom = classifier.log_probs(image, [xyxy[last]], group=1)[0]
        return add_end_evidence(
            evidence, centers, top, bottom, self.level_names, self.end_weight, self.end_floor
        )

    def _in_output_range(self, inst: Instances) -> Instances:
        """The detections named within SPINE.LEVEL_HEAD.OUTPUT_RANGE (all when it is off)."""
        if self.output_range is None:
            return inst
        first, last = self.output_range
        return inst[(inst.pred_levels >= first) & (inst.pred_levels <= last)]

    def _inference(self, predictions, proposals: List[Instances]):
        """The box predictor's inference, with soft NMS when SPINE.NMS.METHOD asks for it."""
        predictor = self.box_predictor
        probs = None
        if self.nms_method != "hard" or self._wants_rescore_features:
            probs = predictor.predict_probs(predictions, proposals)
        if self.nms_method == "hard":
            results, kept = predictor.inference(predictions, proposals)
        else:
            results, kept = soft_nms_inference(
                predictor.predict_boxes(predictions, proposals),
                probs,
                [x.image_size for x in proposals],
                predictor.test_score_thresh,
                predictor.test_nms_thresh,
                predictor.test_topk_per_image,
                self.nms_method,
                self.nms_sigma,
            )
        if self._wants_rescore_features:  # the score before suppression is one of them
            for inst, idx, p in zip(results, kept, probs):
                inst.scores_before_nms = p[idx, inst.pred_classes]
        return results, kept

    @property
    def _wants_rescore_features(self) -> bool:
        return self.rescorer is not None or self.collect_rescore_features

    @property
    def _weighted(self) -> bool:
        return self.level_weights is not None or self.truncated_weight != 1.0

    def _proposal_weights(self, proposals: List[Instances]) -> Optional[torch.Tensor]:
        """Per-proposal loss weight: the level's weight (SPINE.LEVEL_HEAD.INSTANCE_WEIGHTS) for
        foreground proposals with a known level, times TRUNCATED_WEIGHT for foreground proposals
        of a truncated vertebra, 1 for the rest; None when weighting is off."""
        if not self._weighted or not proposals:
            return None
        gt_classes = torch.cat([p.gt_classes for p in proposals])
        weights = torch.ones(len(gt_classes), device=gt_classes.device)
        targets = None if self.level_weights is None else self._level_targets(proposals)
        if targets is not None:
            gt_levels, known = targets
            weights[known] = self.level_weights.to(weights.device)[gt_levels[known]]
        if self.truncated_weight != 1.0:
            fg = (gt_classes >= 0) & (gt_classes < self.num_classes)
            cut = torch.cat([_field(p, "gt_truncated", False) for p in proposals])
            weights[cut.to(weights.device) & fg] *= self.truncated_weight
        return weights

    def _weighted_box_losses(self, predictions, proposals, weights) -> Dict[str, torch.Tensor]:
        """detectron2's FastRCNNOutputLayers.losses (smooth L1) with a weight per proposal, the
        same normalisation (by all sampled proposals), so weights of 1 give the same losses."""
        scores, deltas = predictions
        predictor = self.box_predictor
        gt_classes = torch.cat([p.gt_classes for p in proposals])
        _log_classification_stats(scores, gt_classes)
        loss_cls = (F.cross_entropy(scores.float(), gt_classes, reduction="none") * weights).mean()
        fg = ((gt_classes >= 0) & (gt_classes < self.num_classes)).nonzero().flatten()
        proposal_boxes = torch.cat([p.proposal_boxes.tensor for p in proposals])[fg]
        # proposals of an image without vertebrae are all background: any box fills the slot
        gt_boxes = torch.cat(
            [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals]
        )[fg]
        box_dim = proposal_boxes.shape[1]
        if deltas.shape[1] == box_dim:  # class-agnostic regression
            fg_deltas = deltas[fg]
        else:
            fg_deltas = deltas.view(-1, self.num_classes, box_dim)[fg, gt_classes[fg]]
        targets = predictor.box2box_transform.get_deltas(proposal_boxes, gt_boxes)
        per_box = smooth_l1_loss(
            fg_deltas.float(), targets, predictor.smooth_l1_beta, reduction="none"
        ).sum(1)
        loss_box_reg = (per_box * weights[fg]).sum() / max(gt_classes.numel(), 1.0)
        losses = {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg}
        return {k: v * predictor.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def _forward_mask(self, features: Dict[str, torch.Tensor], instances: List[Instances]):
        """StandardROIHeads' mask branch; in training with SPINE.LEVEL_HEAD.INSTANCE_WEIGHTS the
        mask loss of each foreground proposal is weighted by its level (and TRUNCATED_WEIGHT);
        at inference with SPINE.MASK_RESCORE the scores are re-ranked by the masks."""
        if not self.training:
            instances = super()._forward_mask(features, instances)
            # boxes given from outside (forward_with_given_boxes) carry no NMS scores to rescore
            rescorable = all(inst.has("scores_before_nms") for inst in instances)
            if self.mask_on and self._wants_rescore_features and rescorable:
                for inst in instances:
                    inst.rescore_features = rescore_features(
                        inst.pred_boxes.tensor,
                        inst.scores_before_nms,
                        inst.scores,
                        inst.pred_masks,
                        inst.level_log_probs,
                        inst.image_size,
                    )
                    inst.remove("scores_before_nms")
                if self.rescorer is not None:
                    return [self._rescored(inst, i) for i, inst in enumerate(instances)]
            # detectron2's forward_with_given_boxes asks for boxes and classes only: instances
            # without scores have none to rescore (bench_masks' mirrored pass failed on them)
            if self.mask_on and self.mask_rescore and all(i.has("scores") for i in instances):
                self._rescore_by_masks(instances)
            return instances
        if not (self.mask_on and self._weighted):
            return super()._forward_mask(features, instances)
        instances, _ = select_foreground_proposals(instances, self.num_classes)
        if self.mask_pooler is not None:
            pooled = [features[f] for f in self.mask_in_features]
            features = self.mask_pooler(pooled, [x.proposal_boxes for x in instances])
        else:
            features = {f: features[f] for f in self.mask_in_features}
        logits = self.mask_head.layers(features)
        weights = self._proposal_weights(instances)
        loss = weighted_mask_loss(logits, instances, weights)
        return {"loss_mask": loss * self.mask_head.loss_weight}

    def _rescored(self, inst: Instances, image_index: int) -> Instances:
        """The rescorer's scores, levels decoded again on them, the output range applied."""
        inst.scores = self.rescorer(inst.rescore_features).to(inst.scores.dtype)
        # log_softmax leaves log-probs as is
        self._label_levels(inst, inst.level_log_probs, image_index)
        if not self.collect_rescore_features:
            inst.remove("rescore_features")
        return self._in_output_range(inst)

    def _rescore_by_masks(self, instances: List[Instances]) -> None:
        """Scale each detection's score by its mask's confidence (the mean mask probability
        inside the binarised mask: SOLOv2's maskness), so a confident box around a poor mask
        ranks lower. Scores are moved towards SCORE_THRESH, never across it: the detections
        that levels, the chain rescue, the evaluator and the ZOI export keep are the same ones."""
        cut = self.level_score_thresh
        for inst in instances:
            if len(inst) == 0:
                continue
            confidence = maskness(inst.pred_masks)
            scores = inst.scores.float()
            rescored = torch.where(
                scores >= cut, cut + (scores - cut) * confidence, scores * confidence
            )
            inst.scores = rescored.to(inst.scores.dtype)

    def _context_boxes(self, proposals: Instances) -> Boxes:
        """The proposal boxes enlarged ``context_scale`` times about their centres, clipped."""
        boxes = proposals.proposal_boxes
        centers = boxes.get_centers()
        half = (boxes.tensor[:, 2:] - boxes.tensor[:, :2]) * (self.context_scale / 2)
        enlarged = Boxes(torch.cat([centers - half, centers + half], dim=1))
        enlarged.clip(proposals.image_size)
        return enlarged

    def _level_targets(self, proposals: List[Instances]):
        """(level ids, mask of foreground proposals whose vertebra has a known level), one entry
        per proposal; None when the proposals carry no levels."""
        if not any(p.has("gt_level_ids") for p in proposals):
            return None
        gt_classes = torch.cat([p.gt_classes for p in proposals])
        gt_levels = torch.cat([_field(p, "gt_level_ids", -1) for p in proposals])
        valid = (gt_classes >= 0) & (gt_classes < self.num_classes) & (gt_levels >= 0)
        return gt_levels, valid

    def _level_loss(self, logits: torch.Tensor, proposals: List[Instances]) -> torch.Tensor:
        """Cross-entropy over foreground proposals whose matched vertebra has a known level."""
        targets = self._level_targets(proposals)
        if targets is None or not targets[1].any():
            return logits.sum() * 0.0
        gt_levels, valid = targets
        return F.cross_entropy(logits[valid], gt_levels[valid])

    @property
    def keep_score(self) -> float:
        """Lowest score a detection needs to be kept downstream (ZOI export's speed-up): the
        rescue's floor when it is on; 0 under a rescorer, which can raise a low box score and
        whose features see every detection the box predictor keeps."""
        if self.rescorer is not None:
            return 0.0
        return self.rescue_min_score if self.rescue_expected else self.level_score_thresh

    def _label_levels(self, inst: Instances, logits: torch.Tensor, image_index: int = 0) -> None:
        log_probs = F.log_softmax(logits, dim=1)
        levels = log_probs.argmax(dim=1)
        accepted = inst.scores >= self.level_score_thresh
        rescued = torch.zeros_like(accepted)
        if self.rescue_expected:
            picked = rescue_chain(
                inst.pred_boxes.tensor.detach().float().cpu().numpy(),
                inst.scores.detach().float().cpu().numpy(),
                accepted.cpu().numpy(),
                self.rescue_expected,
                self.rescue_min_score,
                self.rescue_gap_factor,
                self.rescue_max_overlap,
            )
            rescued[torch.as_tensor(picked, dtype=torch.long, device=rescued.device)] = True
        inst.pred_rescued = rescued
        confident = (accepted | rescued).nonzero().flatten()
        margin = float("nan")  # no chain to name
        if len(confident) >= 2:
            boxes = inst.pred_boxes[confident]
            centers = boxes.get_centers().cpu().numpy()
            evidence = self.branch_weight * log_probs[confident].cpu().numpy()
            if self.level_prior is not None:
                evidence = evidence + self.prior_weight * self.level_prior.log_likelihood(
                    boxes.tensor.cpu().numpy(), inst.image_size[0], self.level_names
                )
            evidence = self._with_end_evidence(evidence, boxes, centers, image_index)
            decoded = decode_levels(
                centers,
                evidence,
                self.skip_cost,
                self.repeat_cost,
                self.spacing_weight,
            )
            levels[confident] = torch.as_tensor(decoded, device=levels.device)
            margin = shift_margin(evidence, decoded)
        inst.pred_levels = levels
        # one value per image, kept on every instance (Instances hold per-instance fields)
        inst.level_margin = torch.full((len(inst),), margin, device=levels.device)
        inst.level_scores = log_probs.gather(1, levels[:, None])[:, 0].exp()
        inst.level_log_probs = log_probs
