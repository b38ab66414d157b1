"""The PartDistillation pipeline (Cho et al., "Learning Parts from Instance Segmentation"): stages, config, report.

Stage 1 (sec. 4.2): instance teacher -> mine parts (k-means inside instance masks) -> R rounds of
[train part proposals -> evaluate -> promote -> pseudo-label]; the naive strip baseline and the mined
proposals are evaluated beside the rounds in the same run.
Stage 2 (sec. 4.3): rank parts (eq. 1 assignment, candidates, per-class k-means k=8, eq. 2) -> R' rounds of
[train the class-specific ranker -> evaluate (NMI/ARI/mIoU/AR@k) -> promote -> relabel]. Baselines through
the same machinery (sec. 5): dataset-level k-means of pixel features per class alone ("k-means", fitted on train,
applied to eval), and the one-stage self-training baseline (that clustering, then self-training). Promotion reads
the val split or a label-free criterion, never the reported eval split (graph.py).
"""
from pipelines.partdistillation.config import (  # noqa: F401  (importing registers the pipeline in PIPELINES)
    INSTANCE_TEACHER,
    ONE_STAGE,
    PART_PROPOSALS,
    PART_RANKER,
    PartDistillationConfig,
)
