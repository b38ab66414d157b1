"""The PASS pipeline for large-scale unsupervised semantic segmentation (Gao et al., "Large-scale Unsupervised Semantic
Segmentation", the LUSS benchmark ImageNet-S).

represent (SwAV + P2P + D2S on unlabeled images) -> pixel-attention (frozen representation) -> generate-labels
(attention-pooled embeddings, k-means into K categories, 'other' below tau) -> finetune-segmentation (K+1-way head);
evaluated under the fully unsupervised protocol on val (the promotion rule) and eval (the report), with the k-means
baselines (random and pretrained features), the distance-matching and semi-supervised protocols and a sweep of K in
the same run. Choices the paper leaves open: docs/luss.md.
"""
from pipelines.luss.config import (  # noqa: F401  (importing registers the pipeline in PIPELINES)
    ATTENTION,
    BASELINES,
    REPRESENTATION,
    SEGMENTATION,
    LussConfig,
)
