"""``evaluate-representation``: unsupervised semantic segmentation, overclustering, community merging, linear probe
and visual concept discovery of a dense representation (SlotCon supplement A.3-A.4; Leopart)."""
from __future__ import annotations

from pydantic import Field

from contract.stages import Params, StageDefinition


class EvaluateRepresentationParams(Params):
    """The protocol of ``trainers.dense.segmentation``; without a candidate model, a randomly initialised backbone."""

    backbone: str | None = Field(default=None, description="Without inputs.models.candidate: the timm model evaluated at random init (seed) or with weights (the baseline row); ignored with a candidate.")
    output_stride: int | None = Field(default=None, description="With backbone: a CNN's timm output_stride (as the trained stage's).")
    weights: str | None = Field(default=None, description="With backbone: None (random init), 'timm' (hub weights), an http(s) URL or a local file.")
    seed: int = Field(default=0, description="Seeds the random init, the pixel samples, k-means, the probe and community detection.")
    batch_size: int = Field(default=16, ge=1, description="Images per inference batch.")
    eval_size: int | None = Field(default=None, ge=16, description="Images are resized to this side before the backbone (the supplement: 320); logits come back to the image size. None: as stored.")
    kmeans_k: int | None = Field(default=None, ge=2, description="K of the k-means segmentation (Hungarian matching); None: the number of ground-truth categories (classes + background).")
    overcluster_k: int = Field(default=50, ge=2, description="K of the overclustering (many-to-one matching) and of the clusters community detection merges.")
    fit_pixels: int = Field(default=20000, ge=100, description="Pixels sampled from the evaluated split to fit each k-means (no label read).")
    kmeans_iterations: int = Field(default=30, ge=1, description="Lloyd iterations of faiss k-means.")
    probe_pixels: int = Field(default=20000, ge=100, description="Labelled pixels sampled from inputs.datasets.probe to train the linear probe.")
    probe_images: int = Field(default=200, ge=1, description="Images of inputs.datasets.probe read for the probe (the first ones of each rank's share).")
    probe_epochs: int = Field(default=100, ge=1, description="Epochs of the linear probe over its pixels.")
    probe_lr: float = Field(default=1e-2, gt=0, description="AdamW learning rate of the linear probe.")
    community_resolution: float = Field(default=1.0, gt=0, description="Louvain resolution of the community detection (higher: more, smaller communities).")
    concepts_top_k: int = Field(default=8, ge=0, description="Segments shown per prototype on the concept page (concepts.html); 0: no page.")


DEFINITION = StageDefinition(
    name="evaluate-representation",
    summary="Dense representation quality: k-means / prototype segmentation with Hungarian mIoU and pixel accuracy, "
            "overclustering (many-to-one), community-merged parts, linear probe, and the visual-concept page "
            "(SlotCon supplement A.3-A.4; Leopart).",
    kind="evaluate",
    params=EvaluateRepresentationParams,
    entry="trainers.stages.evaluate_representation:run",
    datasets={"eval": "Shards with ground-truth objects: the split scored (a val split for promotion, an eval split for the report).",
              "probe": "Shards with ground-truth objects the linear probe trains on (absent: no probe metrics)."},
    models={"candidate": "The representation file evaluated (selftrain-representation/1); absent: params.backbone at random init."},
    optional=frozenset({"probe", "candidate"}),
)
