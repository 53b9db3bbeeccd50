"""Evaluators that plug into detectron2's inference_on_dataset."""

from .vertebra import VertebraEvaluator

__all__ = ["VertebraEvaluator"]
