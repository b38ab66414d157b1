"""``leopart``: a ViT fine-tuned with a spatially dense clustering task over its patch tokens (Leopart)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from contract.stages import StageDefinition
from contract.stages.slotcon import DenseTrainParams


class LeopartParams(DenseTrainParams):
    """Leopart's views, clustering and foreground; the backbone is a ViT (its CLS attention gives the foreground)."""

    backbone: str = Field(default="vit_tiny_patch16_224", description="timm ViT name (the paper fine-tunes a DINO ViT-S/16 or ViT-B/8).")
    output_stride: int | None = Field(default=None, description="Not used by a ViT (its stride is the patch size).")
    steps: int = Field(default=400, ge=1, description="Optimizer steps to train in total.")
    warmup_steps: int = Field(default=20, ge=0, description="Linear warm-up steps before the cosine decay.")
    num_prototypes: int = Field(default=300, ge=2, description="K prototypes of the dense clustering (the official code's 300).")
    dim: int = Field(default=128, ge=8, description="Width of the MLP head's output and the prototypes (official code: 256).")
    global_size: int = Field(default=96, ge=16, description="Side of the two global crops, in pixels (paper: 224).")
    local_size: int = Field(default=48, ge=16, description="Side of the local crops, in pixels (paper: 96).")
    num_local: int = Field(default=2, ge=0, description="Local crops per image; each predicts both global crops' assignments in their common region.")
    global_scale: tuple[float, float] = Field(default=(0.25, 1.0), description="Share of the image area a global crop covers.")
    local_scale: tuple[float, float] = Field(default=(0.05, 0.25), description="Share of the image area a local crop covers.")
    temperature: float = Field(default=0.1, gt=0, description="Softmax temperature of the predicted assignments.")
    sinkhorn_eps: float = Field(default=0.05, gt=0, description="Entropy regulariser of the Sinkhorn-Knopp targets (SwAV).")
    sinkhorn_iterations: int = Field(default=3, ge=1, description="Sinkhorn-Knopp iterations.")
    freeze_prototypes_steps: int = Field(default=0, ge=0, description="The prototypes stay fixed for the first steps (SwAV's freeze_prototypes_niters): the head learns to spread tokens over them before they move.")
    foreground: Literal["attention", "all"] = Field(
        default="attention",
        description="Tokens the loss covers: attention (where the global crop's CLS attention holds fg_mass of its mass, the "
                    "paper's foreground clustering) or all tokens.")
    fg_mass: float = Field(default=0.6, gt=0, le=1, description="Share of the CLS attention mass the foreground tokens hold.")
    teacher_momentum: float | None = Field(default=None, ge=0, le=1, description="EMA teacher (the official code's use_teacher, momentum 0.9995, cosine-increased to 1): the Sinkhorn targets come from it; None: from the student.")
    backbone_lr_scale: float = Field(default=0.1, gt=0, le=1, description="The ViT's lr as a share of lr, which the head and prototypes get (the official code: lr_backbone 1e-5 against lr_heads 1e-4).")

    @model_validator(mode="after")
    def _scales(self) -> "LeopartParams":
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
        return self


DEFINITION = StageDefinition(
    name="leopart",
    summary="Leopart dense representation: a ViT's patch tokens fine-tuned by predicting Sinkhorn cluster assignments of "
            "aligned crops on the foreground of its attention maps (Ziegler & Asano, 'Self-Supervised Learning of Object Parts').",
    kind="train",
    params=LeopartParams,
    entry="trainers.stages.leopart:run",
    datasets={"train": "Shards whose images it learns from (labels are never read)."},
    output_model=True,
)
