"""``generate-labels``: pixel labels from clustering at dataset scale (PASS sec. 4.3, eq. 7)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.stages import Params, StageDefinition


class GenerateLabelsParams(Params):
    """What is clustered, into how many categories, and the 'other' rule."""

    method: Literal["pixel_attention", "pixel_kmeans"] = Field(
        default="pixel_attention",
        description="pixel_attention: k-means over attention-pooled image embeddings, pixels below tau are 'other' (the "
                    "method); pixel_kmeans: k-means with k+1 clusters over sampled pixel features, the largest cluster "
                    "'other' (the k-means baseline on the raw features).")
    k: int = Field(default=50, ge=1, description="Generated categories K (sec. 3.2: the dataset's category count; 50 for ImageNet-S50).")
    threshold: float | Literal["otsu"] = Field(
        default=0.41, description="tau of eq. 7 on the mean pixel attention (the PASS ImageNet-S50 script: 0.41, read "
                                  "off a validation curve); otsu: Otsu's threshold of the attention histogram (label-free).")
    polarity: Literal["auto", "as_trained", "flipped"] = Field(
        default="auto",
        description="Which side of the pixel attention is the object (pixel_attention): auto decides without labels by "
                    "the border prior (mean attention inside minus on the border over polarity_images images; negative: "
                    "the rule uses 1 - a); as_trained: a as trained (the paper); flipped: 1 - a. docs/luss.md \"Choices\".")
    polarity_images: int = Field(default=256, ge=1, description="Images (over all ranks) the auto polarity check reads.")
    upsample: int = Field(default=4, ge=1, description="Output features = the last stage upsampled this many times (PASS: 4).")
    niter: int = Field(default=20, ge=1, description="k-means iterations.")
    max_points_per_centroid: int = Field(default=256, ge=1, description="k-means trains on a seeded sample of at most k x this many rows.")
    pixels_per_image: int = Field(default=16, ge=1, description="pixel_kmeans: pixel features of every image spilled for k-means.")
    write_labels: bool = Field(default=True, description="Label every image (the dataset fine-tuning reads); false: the "
                                                         "centroids and rule only (enough for an evaluation of the rule).")
    seed: int = Field(default=0, description="Sampling and k-means seed.")
    batch_size: int = Field(default=32, ge=1, description="Images per forward pass.")
    shard_size: int = Field(default=1000, ge=1, description="Samples per output shard.")
    use_gpu: bool | Literal["auto"] = Field(default="auto", description="faiss on GPU (training and assignment index): auto when one is visible.")


DEFINITION = StageDefinition(
    name="generate-labels",
    summary="Image embeddings (attention-pooled) or pixel features clustered by k-means into K categories (faiss, trained "
            "on a sample, assigned in blocks); every pixel gets its category or 'other' (PASS sec. 4.3, eq. 7).",
    kind="label",
    params=GenerateLabelsParams,
    entry="trainers.stages.generate_labels:run",
    datasets={"images": "Image shards to label (records' objects are never copied)."},
    models={"model": "A pixel-attention model file (method pixel_attention) or any representation file (pixel_kmeans)."},
    output_dataset=True,
)
