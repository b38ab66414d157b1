"""Evaluation metrics of the data plane (PartDistillation sec. 5): part proposal AR@k, cluster NMI/ARI/mIoU,
and the naive strip baseline. Evaluators share detectron2's interface: ``reset()``, ``process(record_gt, ...)``,
``evaluate() -> dict[str, float]``, plus ``merge(other)`` to sum per-rank counts."""
from trainers.evaluation.baselines import strip_baseline, strip_proposals, strip_record
from trainers.evaluation.clustering import (
    PartClusteringEvaluator,
    ari_from_contingency,
    gt_label_maps,
    nmi_from_contingency,
    paint_label_map,
)
from trainers.evaluation.proposals import PartProposalRecall, coco_proposal_ar, greedy_covered_overlaps

__all__ = [
    "PartClusteringEvaluator",
    "PartProposalRecall",
    "ari_from_contingency",
    "coco_proposal_ar",
    "greedy_covered_overlaps",
    "gt_label_maps",
    "nmi_from_contingency",
    "paint_label_map",
    "strip_baseline",
    "strip_proposals",
    "strip_record",
]
