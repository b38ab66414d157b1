"""Typed configuration of the query-based segmentation models (Mask2Former manner).

Defaults are small enough to train on 2 CPU cores at 112x112 in minutes; a stage reads them from
``spec.params["model"]`` with ``SegmenterConfig.model_validate(...)``.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EncoderConfig(_Strict):
    """Encoder E: a timm backbone (features_only) plus a light FPN pixel decoder (PartDistillation sec. 4.1)."""

    backbone: str = Field(default="convnext_atto", description="timm model name (a tag is allowed: 'convnext_atto.d2_in1k').")
    pretrained: str | None = Field(
        default=None,
        description="None: random init; 'timm': timm's weights for the name; an http(s) URL or a local path to a state_dict.",
    )
    strides: tuple[int, ...] = Field(default=(4, 8, 16, 32), description="Backbone output strides used; must include 4.")
    pixel_dim: int = Field(default=128, ge=8, description="Channels of the FPN levels fed to the transformer decoder.")
    mask_dim: int = Field(default=128, ge=8, description="Channels of the per-pixel embeddings (mask features) at stride 4.")
    norm_groups: int = Field(default=16, ge=1, description="GroupNorm groups in the pixel decoder convs.")

    @field_validator("strides")
    @classmethod
    def _has_stride_4(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        v = tuple(sorted(set(v)))
        if 4 not in v or len(v) < 2:
            raise ValueError("strides must include 4 (mask features) and at least one coarser level")
        return v

    @model_validator(mode="after")
    def _groups_divide(self) -> "EncoderConfig":
        if self.pixel_dim % self.norm_groups or self.mask_dim % self.norm_groups:
            raise ValueError("norm_groups must divide pixel_dim and mask_dim")
        return self


class DecoderConfig(_Strict):
    """Masked-attention transformer decoder D (Mask2Former sec. 3.2); object decoder D^o or part decoder D^p."""

    num_classes: int = Field(default=1, ge=1, description="Foreground classes; a no-object logit is added (1 = class-agnostic parts).")
    num_queries: int = Field(default=20, ge=1, description="Learned queries N (one prediction each).")
    hidden_dim: int = Field(default=128, ge=8, description="Query / attention width D.")
    num_layers: int = Field(default=3, ge=1, description="Decoder layers; feature levels are visited round-robin.")
    num_heads: int = Field(default=4, ge=1, description="Attention heads (must divide hidden_dim).")
    dim_feedforward: int = Field(default=512, ge=8, description="Hidden width of each layer's FFN.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout in attention and FFN (Mask2Former uses 0).")
    mask_threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="Sigmoid threshold of the previous mask for masked attention.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "DecoderConfig":
        if self.hidden_dim % self.num_heads:
            raise ValueError("num_heads must divide hidden_dim")
        return self


class LossConfig(_Strict):
    """Set-prediction loss: Hungarian matching + CE / BCE / dice on every layer (Mask2Former sec. 3.3, 4.1)."""

    class_weight: float = Field(default=1.0, ge=0.0, description="Weight of the classification CE (and its matching cost).")
    mask_weight: float = Field(default=20.0, ge=0.0, description="Weight of the mask sigmoid-BCE (and its matching cost).")
    dice_weight: float = Field(default=1.0, ge=0.0, description="Weight of the mask dice loss (and its matching cost).")
    eos_coef: float = Field(default=0.1, ge=0.0, description="CE weight of the no-object class.")
    deep_supervision: bool = Field(default=True, description="Add the same losses on every intermediate prediction.")
    num_points: int = Field(default=0, ge=0, description="0: dense losses at image size (fine to ~256 px); >0: point-sampled (Mask2Former: 12544).")
    oversample_ratio: float = Field(default=3.0, ge=1.0, description="Importance sampling: candidate points per kept point.")
    importance_sample_ratio: float = Field(default=0.75, ge=0.0, le=1.0, description="Share of points taken where the mask is most uncertain.")


class SegmenterConfig(_Strict):
    """Encoder + decoder + loss: one query-based segmentation model."""

    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    freeze_encoder: bool = Field(default=False, description="Keep E fixed (no grads, eval mode): the part decoder's setting.")
    top_k: int = Field(default=20, ge=1, description="Predictions kept per image at inference.")
