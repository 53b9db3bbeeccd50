"""XrayDatasetMapper: detectron2's DatasetMapper for scans read by ``read_scan``.

Differences from detectron2's DatasetMapper, and why:
- the scan is read with ``read_scan`` (8/16-bit, TIFF, ...) and augmented as a float32 HxW
  image in [0, 1], so the X-ray augmentations work at full precision;
- the model gets ``image`` as float32 CxHxW in 0..255 with C = INPUT.XRAY.CHANNELS (3 = gray
  repeated for ImageNet-style backbones, 1 = single channel);
- boxes are recomputed from masks after the geometric augmentations (a rotated box is loose);
- ``gt_levels``: the ``level`` of each kept instance (e.g. "T12", None when unknown), aligned
  with ``instances``; strings cannot live in ``Instances``, so they sit beside it, and
  ``instances.gt_level_ids`` holds their indices into ``levels`` (SPINE.LEVELS; -1 unknown)
  for a level head;
- ``instances.gt_truncated``: True for a vertebra cut by the border, by its annotation's
  ``truncated`` flag (the DRRs also flag C6 and L3, which the CT cuts) or because its
  augmented mask touches the border of the augmented scan (a crop or rotation cut it), so
  SPINE.LEVEL_HEAD.TRUNCATED_WEIGHT weighs the fragments the scan really shows cut.
"""

from __future__ import annotations

import copy
import logging
from typing import List, Sequence, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .augment import build_xray_augmentations
from .io import read_scan

__all__ = ["XrayDatasetMapper"]


def _touches_border(boxes: torch.Tensor, image_shape, margin: float = 1.0) -> torch.Tensor:
    """True for boxes within ``margin`` px of the image border (the vertebra is cut there)."""
    h, w = image_shape
    if not len(boxes):
        return torch.zeros(0, dtype=torch.bool)
    return (
        (boxes[:, 0] <= margin)
        | (boxes[:, 1] <= margin)
        | (boxes[:, 2] >= w - margin)
        | (boxes[:, 3] >= h - margin)
    )


class XrayDatasetMapper:
    """Dataset dict -> model input: read scan, augment, build tensors and ``Instances``.

    The input dict is never modified. In inference (``is_train=False``) annotations are dropped,
    as detectron2's DatasetMapper does; evaluators read ground truth from the dataset catalog.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        channels: int = 3,
        use_instance_mask: bool = False,
        instance_mask_format: str = "polygon",
        recompute_boxes: bool = False,
        levels: Sequence[str] = (),
    ):
        """
        Args:
            is_train: training (keep and transform annotations) or inference.
            augmentations: augmentations or deterministic transforms, applied in order to the
                float32 HxW [0, 1] image.
            channels: 3 (gray repeated) or 1.
            use_instance_mask: keep segmentations and build ``gt_masks``.
            instance_mask_format: "polygon" or "bitmask".
            recompute_boxes: replace boxes by the tight boxes of the transformed masks.
            levels: level names whose indices ``gt_level_ids`` holds (SPINE.LEVELS).
        """
        if channels not in (1, 3):
            raise ValueError(f"INPUT.XRAY.CHANNELS must be 1 or 3, got {channels}")
        if recompute_boxes and not use_instance_mask:
            raise ValueError("recompute_boxes requires instance masks")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.channels = channels
        self.use_instance_mask = use_instance_mask
        self.instance_mask_format = instance_mask_format
        self.recompute_boxes = recompute_boxes
        self.level_index = {name: i for i, name in enumerate(levels)}
        mode = "training" if is_train else "inference"
        logging.getLogger(__name__).info(
            f"[XrayDatasetMapper] Augmentations used in {mode}: {augmentations}"
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "augmentations": build_xray_augmentations(cfg, is_train),
            "channels": cfg.INPUT.XRAY.CHANNELS,
            "use_instance_mask": cfg.MODEL.MASK_ON,
            "instance_mask_format": cfg.INPUT.MASK_FORMAT,
            # Rotation makes boxes transformed corner-wise loose; masks give the tight box.
            "recompute_boxes": cfg.MODEL.MASK_ON and is_train,
            "levels": list(cfg.SPINE.LEVELS),
        }

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        annos = []
        for obj in dataset_dict.pop("annotations"):
            if obj.get("iscrowd", 0) != 0:
                continue
            if not self.use_instance_mask:
                obj.pop("segmentation", None)
            obj.pop("keypoints", None)
            annos.append(utils.transform_instance_annotations(obj, transforms, image_shape))
        instances = utils.annotations_to_instances(
            annos, image_shape, mask_format=self.instance_mask_format
        )
        if self.recompute_boxes and instances.has("gt_masks"):
            boxes = instances.gt_masks.get_bounding_boxes()
            # a mask cropped away has no polygon left: its box is (inf, inf, 0, 0); make it
            # empty so that filter_empty_instances drops the instance
            boxes.tensor[~torch.isfinite(boxes.tensor).all(dim=1)] = 0.0
            boxes.clip(image_shape)  # polygons may reach past the border
            instances.gt_boxes = boxes
        instances, keep = utils.filter_empty_instances(instances, return_mask=True)
        levels = [anno.get("level") for anno in annos]
        kept_levels = [lv for lv, k in zip(levels, keep.tolist()) if k]
        instances.gt_level_ids = torch.tensor(
            [self.level_index.get(lv, -1) for lv in kept_levels], dtype=torch.int64
        )
        flagged = [bool(a.get("truncated")) for a, k in zip(annos, keep.tolist()) if k]
        instances.gt_truncated = torch.tensor(flagged, dtype=torch.bool) | _touches_border(
            instances.gt_boxes.tensor, image_shape
        )
        dataset_dict["instances"] = instances
        dataset_dict["gt_levels"] = kept_levels

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict: one record in detectron2's dataset format (``file_name``,
                ``height``, ``width``, ``annotations`` with optional ``level``).

        Returns:
            a new dict with ``image`` (float32 CxHxW, 0..255) and, in training, ``instances``
            and ``gt_levels``.
        """
        dataset_dict = copy.deepcopy(dataset_dict)  # the caller's record stays as it was
        image = read_scan(dataset_dict["file_name"]).image
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image, sem_seg=None)
        transforms = self.augmentations(aug_input)
        image = np.ascontiguousarray(aug_input.image, dtype=np.float32)
        image_shape = image.shape[:2]

        tensor = torch.from_numpy(image * 255.0)[None]
        dataset_dict["image"] = tensor.repeat(self.channels, 1, 1)

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
