"""Query-based segmentation models (Mask2Former manner) for PartDistillation.

``Segmenter`` = ``Encoder`` (timm backbone + FPN pixel decoder) + ``MaskedTransformerDecoder`` +
``SetCriterion`` (Hungarian matching, CE / BCE / dice on every layer) + ``postprocess``.
"""
from trainers.models.config import DecoderConfig, EncoderConfig, LossConfig, SegmenterConfig
from trainers.models.decoder import MaskedTransformerDecoder
from trainers.models.encoder import Encoder, PretrainedWeightsError
from trainers.models.losses import SetCriterion
from trainers.models.matcher import HungarianMatcher
from trainers.models.segmenter import InstancePredictions, Segmenter, postprocess

__all__ = [
    "DecoderConfig", "EncoderConfig", "LossConfig", "SegmenterConfig", "Encoder", "PretrainedWeightsError",
    "MaskedTransformerDecoder", "SetCriterion", "HungarianMatcher", "InstancePredictions", "Segmenter", "postprocess",
]
