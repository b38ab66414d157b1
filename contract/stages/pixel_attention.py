"""``pixel-attention``: the pixel-attention module trained on a frozen representation (PASS sec. 4.3, eq. 6)."""
from __future__ import annotations

from pydantic import Field

from contract.stages import StageDefinition
from contract.stages.training import TrainParams


class PixelAttentionParams(TrainParams):
    """The engine's params plus the clustering loss on attention-pooled embeddings (two crops, SwAV codes)."""

    steps: int = Field(default=200, ge=1, description="Optimizer steps (sec. 5.1: 20 epochs on ImageNet-S50).")
    lr: float = Field(default=2e-3, gt=0, description="Peak learning rate (AdamW; the paper: LARS at 6.0).")
    weight_decay: float = Field(default=1e-6, ge=0, description="Weight decay (1e-6).")
    min_lr_ratio: float = Field(default=0.01, ge=0, le=1, description="The cosine decays to lr x this.")
    upsample: int = Field(default=4, ge=1, description="Output features = the last stage upsampled this many times (PASS: 4).")
    global_size: int = Field(default=96, ge=16, description="Side of the two crops (sec. 5.1: 224).")
    global_scale: tuple[float, float] = Field(default=(0.08, 1.0), description="Area fraction of the crops (PASS: 0.08-1).")
    flip_prob: float = Field(default=0.5, ge=0, le=1, description="Horizontal flip probability.")
    jitter: float = Field(default=0.2, ge=0, lt=1, description="Brightness and contrast jitter (factors in 1 +- jitter).")
    temperature: float = Field(default=0.1, gt=0, description="Softmax temperature of the swapped prediction.")
    epsilon: float = Field(default=0.05, gt=0, description="Sinkhorn-Knopp entropy regularisation.")
    sinkhorn_iterations: int = Field(default=3, ge=1, description="Sinkhorn-Knopp iterations.")
    queue_length: int = Field(default=0, ge=0, description="Embeddings queued (over all ranks) for the codes (PASS: 3840); 0: none.")
    queue_start_step: int = Field(default=0, ge=0, description="Step from which the queue is filled (PASS: from the start).")


DEFINITION = StageDefinition(
    name="pixel-attention",
    summary="The pixel-attention module a = sigmoid(MLP(norm(F)) + beta) trained with SwAV's clustering loss on "
            "attention-pooled embeddings, the representation frozen (PASS sec. 4.3, eq. 6).",
    kind="train",
    params=PixelAttentionParams,
    entry="trainers.stages.pixel_attention:run",
    datasets={"train": "Image shards; only the images are read."},
    models={"representation": "A represent model file (backbone, projection head and prototypes: all frozen)."},
    output_model=True,
)
