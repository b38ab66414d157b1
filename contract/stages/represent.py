"""``represent``: self-supervised representation learning of PASS (LUSS sec. 4.2): SwAV + P2P alignment + D2S supervision."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.stages import StageDefinition
from contract.stages.training import TrainParams


class RepresentParams(TrainParams):
    """The engine's params (AdamW in place of the paper's LARS) plus the method's; paper values noted where they differ."""

    steps: int = Field(default=400, ge=0, description="Optimizer steps in total. 0: no training, the seeded random initialisation "
                                                        "is written as the model (the 'randomly initialised' baseline).")
    lr: float = Field(default=2e-3, gt=0, description="Peak learning rate (AdamW; the paper: LARS at 0.6 for batch 256).")
    weight_decay: float = Field(default=1e-6, ge=0, description="Weight decay (sec. 5.1: 1e-6).")
    warmup_steps: int = Field(default=20, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = Field(default=0.01, ge=0, le=1, description="The cosine decays to lr x this (the paper: 0.6 -> 6e-4).")
    backbone: str = Field(default="convnext_atto", description="timm model name (sec. 5.1: ResNet-18 for ImageNet-S50, ResNet-50 beyond).")
    output_stride: Literal[8, 16, 32] = Field(default=16, description="Output stride of the backbone (dilated last stages below 32).")
    global_size: int = Field(default=96, ge=16, description="Side of the two global crops (sec. 5.1: 224 on ImageNet-S50).")
    global_scale: tuple[float, float] = Field(default=(0.14, 1.0), description="Area fraction of the global crops (SwAV/PASS: 0.14-1).")
    local_size: int = Field(default=48, ge=8, description="Side of the local crops (sec. 5.1: 96).")
    local_count: int = Field(default=6, ge=0, description="Local crops per image (sec. 5.1: 6 on ImageNet-S50; 0: two crops only).")
    local_scale: tuple[float, float] = Field(default=(0.05, 0.14), description="Area fraction of the local crops (0.05-0.14).")
    flip_prob: float = Field(default=0.5, ge=0, le=1, description="Horizontal flip probability of every crop.")
    jitter: float = Field(default=0.2, ge=0, lt=1, description="Brightness and contrast jitter of every crop (factors in 1 +- jitter); no hue change.")
    feat_dim: int = Field(default=128, ge=2, description="Embedding dimension of the projection head (SwAV: 128).")
    hidden_dim: int = Field(default=512, ge=2, description="Hidden width of the projection MLPs (PASS ImageNet-S50: 512).")
    num_prototypes: int = Field(default=500, ge=2, description="SwAV prototypes (PASS ImageNet-S50: 500).")
    temperature: float = Field(default=0.1, gt=0, description="Softmax temperature of the swapped prediction.")
    epsilon: float = Field(default=0.05, gt=0, description="Sinkhorn-Knopp entropy regularisation.")
    sinkhorn_iterations: int = Field(default=3, ge=1, description="Sinkhorn-Knopp iterations.")
    queue_length: int = Field(default=0, ge=0, description="Embeddings queued (over all ranks) for the codes when batches are small "
                                                            "(PASS ImageNet-S50: 2048); 0: no queue.")
    queue_start_step: int = Field(default=0, ge=0, description="Step from which the queue is filled and used once full.")
    freeze_prototypes_steps: int = Field(default=50, ge=0, description="Prototypes get no gradient before this step (PASS: 1001 iterations).")
    p2p_weight: float = Field(default=1.0, ge=0, description="Weight of the pixel-to-pixel alignment loss (eq. 5; 0 turns it off).")
    grid_size: int = Field(default=6, ge=1, description="Points per side sampled in the overlap of the two global views (eq. 2).")
    d2s_stages: tuple[int, ...] = Field(default=(3,), description="Shallow stages (1-3) supervised by the deep codes (sec. 5.3.1: stage 3 "
                                                                   "for SwAV); empty: no D2S.")
    d2s_weight: float = Field(default=1.0, ge=0, description="Weight of the deep-to-shallow loss (eq. 5).")


DEFINITION = StageDefinition(
    name="represent",
    summary="Self-supervised representation from unlabeled images: SwAV (multi-crop, Sinkhorn-Knopp codes) plus the "
            "non-contrastive pixel-to-pixel alignment and the deep-to-shallow supervision (PASS sec. 4.2).",
    kind="train",
    params=RepresentParams,
    entry="trainers.stages.represent:run",
    datasets={"train": "Image shards; only the images are read (records are dropped unread)."},
    optional=frozenset({"train"}),
    output_model=True,
)
