"""The CaSP pipeline (Qi et al., "CaSP: Class-agnostic Semi-Supervised Pretraining for Detection & Segmentation").

early-pretrain (the labeling detector on the labeled split under alpha(.)) -> pseudo-label (its predictions with
score > delta on the unlabeled split) -> late-pretrain (the target model on those pseudo-labels alone) -> finetune
(class-specific, on the labeled split); every model evaluated by class-agnostic and class-specific mask AP, the
target models promoted on the val split, the baselines of Table 2 in the same run. Choices: docs/casp.md.
"""
from pipelines.casp.config import (  # noqa: F401  (importing registers the pipeline in PIPELINES)
    BASELINES,
    FINETUNED,
    LABELING,
    PRETRAINED,
    CaspConfig,
)
