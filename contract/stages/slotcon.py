"""``slotcon``: dense representation learning by semantic grouping and slot-level contrast (SlotCon, supplement A.1, C)."""
from __future__ import annotations

from pydantic import Field, model_validator

from contract.stages import StageDefinition
from contract.stages.training import TrainParams


class DenseTrainParams(TrainParams):
    """What every dense representation learner shares: the timm backbone, its weights, the views' augmentation."""

    backbone: str = Field(default="convnext_atto", description="timm model name of the backbone (a tag is allowed, e.g. 'convnext_atto.d2_in1k').")
    output_stride: int | None = Field(default=8, description="CNN backbones: timm's output_stride (8 or 16: the last stages dilated, no weight renamed); None for ViTs and for the backbone's own stride.")
    weights: str | None = Field(default=None, description="Backbone init: None (random), 'timm' (timm's weights for the name, from the HF hub or its URL), an http(s) URL or a local file (timm-format state_dict or representation file).")
    flip_prob: float = Field(default=0.5, ge=0, le=1, description="Horizontal flip probability of every view (inverted before the loss).")
    jitter: float = Field(default=0.4, ge=0, le=1, description="Strength of the brightness, contrast and saturation jitter of every view.")
    gray_prob: float = Field(default=0.2, ge=0, le=1, description="Probability that a view is turned to grayscale.")
    align_size: int = Field(default=7, ge=1, description="Side of the RoIAlign output the two views' maps are aligned to (supplement A.1: 7x7 for 224 px).")
    num_prototypes: int = Field(default=256, ge=2, description="K learnable prototypes (SlotCon: 256 on COCO, 27 for COCO-Stuff-27 segmentation).")
    dim: int = Field(default=128, ge=8, description="Width of the projected pixel embeddings and the prototypes (paper: 256).")
    hidden_dim: int = Field(default=512, ge=8, description="Hidden width of the projector MLP (paper: 4096).")

    def model_kwargs(self) -> dict:
        """``timm.create_model`` kwargs beyond the name (written to the representation file)."""
        return {} if self.output_stride is None else {"output_stride": self.output_stride}


class SlotconParams(DenseTrainParams):
    """SlotCon's losses and views (supplement Table 3 defaults: contrastive group loss, invaug on the assignments)."""

    steps: int = Field(default=400, ge=1, description="Optimizer steps to train in total.")
    warmup_steps: int = Field(default=20, ge=0, description="Linear warm-up steps before the cosine decay.")
    crop_size: int = Field(default=64, ge=16, description="Side of each of the two views, in pixels (paper: 224).")
    crop_scale: tuple[float, float] = Field(default=(0.25, 1.0), description="Random resized crop: range of the view's share of the image area.")
    student_temp: float = Field(default=0.1, gt=0, description="Temperature of the student's assignment.")
    teacher_temp: float = Field(default=0.07, gt=0, description="Temperature of the teacher's assignment (and of the grouping attention).")
    center_momentum: float = Field(default=0.9, ge=0, lt=1, description="EMA of the centre subtracted from the teacher's scores.")
    contrast_temp: float = Field(default=0.2, gt=0, description="Temperature tau of the slot-level contrastive loss.")
    group_loss_weight: float = Field(default=0.5, ge=0, le=1, description="Weight of the grouping loss; the contrastive loss gets 1 - this.")
    teacher_momentum: float = Field(default=0.99, ge=0, le=1, description="Base EMA momentum of the teacher (cosine-increased to 1).")

    @model_validator(mode="after")
    def _scale(self) -> "SlotconParams":
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        return self


DEFINITION = StageDefinition(
    name="slotcon",
    summary="SlotCon dense representation: pixels grouped into slots by learnable prototypes, per-pixel distillation of "
            "the inverse-augmented assignments and slot-level contrast across two views (SlotCon sec. 3, supplement A.1, C).",
    kind="train",
    params=SlotconParams,
    entry="trainers.stages.slotcon:run",
    datasets={"train": "Shards whose images it learns from (labels are never read)."},
    output_model=True,
)
