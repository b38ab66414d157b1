"""The CaSP pipeline config: its typed section (the paper's symbols: delta, alpha) and the registered model names."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from contract.spec import StageSpec
from pipelines.config import PIPELINES, PipelineConfig, _Strict, stage_params

LABELING = "casp-labeling-detector"  # h_L (early pretraining)
PRETRAINED = "casp-pretrained"  # h_T (late pretraining)
FINETUNED = "casp-finetuned"  # h_F (finetuning)
BASELINES = "casp-baselines"  # every model of the baseline rows

Baseline = Literal["no_pretraining", "class_specific_pseudo_labels", "class_agnostic_gt", "joint_self_training"]


def delta_tag(delta: float) -> str:
    """A delta in stage names (Kubernetes-safe): 0.25 -> 'delta25'."""
    return f"delta{round(delta * 100):02d}"


class TrainSection(_Strict):
    """One training stage (an instance-teacher run): its trainer params."""

    params: dict[str, Any] = stage_params("instance-teacher", "Overrides of the instance-teacher trainer's params (steps, lr, model, ...).")


class PseudoLabelSection(_Strict):
    """Pseudo-labeling the unlabeled split (sec. 3.1, eq. 2-3)."""

    augment: Literal["none", "flip", "jitter"] = Field(default="none", description="Image augmentation before labeling (sec. 4: weak = flip, strong = jitter).")
    params: dict[str, Any] = stage_params("detect-pseudo-label", "Further detect-pseudo-label params passed through.")


class FinetuneSection(_Strict):
    """Class-specific finetuning on the labeled split (sec. 3.2)."""

    head_init: Literal["random", "agnostic"] = Field(default="random", description="The class head: random, or every class channel from the pretrained class-agnostic one (sec. 3.2: 'similar results').")
    params: dict[str, Any] = stage_params("instance-teacher", "Overrides of the instance-teacher trainer's params for finetuning.")


class EvaluationSection(_Strict):
    """Mask AP of every model; promotion on the val split only."""

    promotion_metric: str = Field(default="mask_AP_agnostic", description="Metric (on the val split) the teacher/champion aliases of casp-pretrained and casp-finetuned move on.")
    params: dict[str, Any] = stage_params("evaluate-instances", "Further evaluate-instances params passed through.")


class CaspSection(_Strict):
    """What CaSP runs on and with which hyper-parameters (paper values by default)."""

    labeled: str = Field(default="casp-demo/labeled", description="D^t: the labeled split (objects with classes; relative: to workspace.data).")
    unlabeled: str = Field(default="casp-demo/unlabeled", description="D^u: the unlabeled split (no labels; ground truth, if any, is never read).")
    unlabeled_gt: str | None = Field(default="casp-demo-gt/unlabeled", description="The unlabeled images with their ground truth (the same seeded split without --strip-labels): read only by the class_agnostic_gt baseline (an upper bound).")
    val: str = Field(default="partworld-demo/val", description="Selection split: promotion reads its metrics, never the reported split's.")
    eval: str = Field(default="partworld-demo/eval", description="The reported split (Table 2's figures).")
    delta: float = Field(default=0.2, ge=0, lt=1, description="delta: pseudo-labels are predictions with score > delta (Table 7: 0.2).")
    alpha: Literal["object", "identity"] = Field(default="object", description="alpha(.): 'object' maps every class to one class-free object (CaSP); 'identity' keeps the classes.")
    entities: bool = Field(default=False, description="Sec. 3.3, Table 2 'Entities(P,A)': the labeling detector learns things and stuff regions as one class-free entity, the pseudo-labels keep stuff as entities and the target detector pretrains on them (also the class_agnostic_gt baseline: Entities(G,A)); finetuning and every AP stay on things. Needs alpha 'object' and a labeled split with stuff categories (PartWorld stuff_classes > 0, or selftrain data import panoptic).")
    early_pretrain: TrainSection = Field(default_factory=TrainSection, description="The labeling detector h_L (eq. 1).")
    pseudo_label: PseudoLabelSection = Field(default_factory=PseudoLabelSection, description="D^p (eq. 2-3).")
    late_pretrain: TrainSection = Field(default_factory=TrainSection, description="The target detector h_T on D^p alone (eq. 4).")
    finetune: FinetuneSection = Field(default_factory=FinetuneSection, description="h_F: class-specific finetuning of h_T (eq. 5).")
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection, description="Mask AP and promotion.")
    delta_sweep: list[float] = Field(
        default_factory=list,
        description="Table 7: extra pseudo-label -> late-pretrain chains, one per delta (e.g. [0.1, 0.2, 0.3, 0.4, 0.5]), "
                    "each late-pretrained model scored by class-agnostic AP on the eval split; the report writes table7.md "
                    "and table7.png. The main chain's delta is reused, not run twice. Empty: no sweep.")
    baselines: list[Baseline] = Field(
        default_factory=lambda: ["no_pretraining", "class_specific_pseudo_labels", "class_agnostic_gt"],
        description="Rows of Table 2 run beside CaSP: no_pretraining (finetune from random init), class_specific_pseudo_labels "
                    "(Objects(P,S): the no-pretraining model labels, pretrain on its classes), class_agnostic_gt (Objects(G,A): "
                    "pretrain on the unlabeled split's ground truth under alpha; needs unlabeled_gt), joint_self_training (Table 6's "
                    "self-training: one class-specific model from random init on the labeled split joined with the "
                    "no-pretraining model's class-specific pseudo-labels, ground truth where a record has it).")

    @model_validator(mode="after")
    def _baselines_have_data(self) -> "CaspSection":
        if "class_agnostic_gt" in self.baselines and not self.unlabeled_gt:
            raise ValueError("baseline class_agnostic_gt needs casp.unlabeled_gt (the unlabeled images with their labels)")
        bad = [d for d in self.delta_sweep if not 0 <= d < 1]
        if bad:
            raise ValueError(f"delta_sweep: every delta must be in [0, 1), got {bad}")
        if len({delta_tag(d) for d in self.delta_sweep}) != len(self.delta_sweep):
            raise ValueError(f"delta_sweep: deltas must differ in the second decimal (stage names use delta x 100), got {self.delta_sweep}")
        if self.entities and self.alpha != "object":
            raise ValueError("entities: true needs alpha 'object' (an entity has no class, sec. 3.3)")
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"baselines named twice: {self.baselines}")
        return self


class CaspConfig(PipelineConfig):
    """Pipeline config with a ``casp`` section."""

    pipeline: str = Field(default="casp", description="Pipeline name: selects the typed section and the stage builder.")
    casp: CaspSection = Field(default_factory=CaspSection, description="The method's settings.")

    def reported_splits(self) -> list[str]:
        return [self.casp.eval]

    def stage_specs(self, run: str) -> list[StageSpec]:
        from pipelines.casp.graph import build_stages

        return build_stages(self, run)

    def report(self, result: Any, lineage: Any) -> str:
        """The Table 2-shaped table (printed, logged to the parent MLflow run) and its plot."""
        from pipelines.casp.report import write_report

        return write_report(self, result, lineage)


PIPELINES["casp"] = CaspConfig
