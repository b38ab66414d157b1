"""The dense pipeline config: which representation learners run, on which splits, and how they are compared."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from contract.spec import StageSpec
from pipelines.config import PIPELINES, PipelineConfig, _Strict, stage_params

SLOTCON_MODEL = "dense-slotcon"
LEOPART_MODEL = "dense-leopart"
Method = Literal["slotcon", "leopart"]


class SlotconSection(_Strict):
    """The slotcon stage and how its representation is evaluated."""

    params: dict[str, Any] = stage_params("slotcon", "Overrides of the slotcon trainer's params (backbone, steps, num_prototypes, ...).")
    evaluation: dict[str, Any] = stage_params("evaluate-representation", "Evaluation params of this method's rows (its random-init row included), over dense.evaluation.params.")
    resources: dict[str, Any] = Field(default_factory=dict, description="Overrides of the training stage's resources (e.g. deepspeed.train_micro_batch_size_per_gpu).")


class LeopartSection(_Strict):
    """The leopart stage and how its representation is evaluated."""

    params: dict[str, Any] = stage_params("leopart", "Overrides of the leopart trainer's params (backbone, steps, foreground, ...).")
    evaluation: dict[str, Any] = stage_params("evaluate-representation", "Evaluation params of this method's rows (its random-init row included), over dense.evaluation.params.")
    resources: dict[str, Any] = Field(default_factory=dict, description="Overrides of the training stage's resources (e.g. deepspeed.train_micro_batch_size_per_gpu).")


class EvaluationSection(_Strict):
    """One evaluation for every representation; promotion on the val split only."""

    promotion_metric: str = Field(default="kmeans/miou", description="Metric (on the val split) the teacher/champion aliases of dense-slotcon and dense-leopart move on.")
    params: dict[str, Any] = stage_params("evaluate-representation", "evaluate-representation params of every row.")


class DenseSection(_Strict):
    """What the dense representation learners train on and how they are compared."""

    train: str = Field(default="partworld-demo/train", description="Images the representations learn from (relative: to workspace.data); labels are never read.")
    val: str = Field(default="partworld-demo/val", description="Selection split: promotion reads its metrics, never the reported split's.")
    eval: str = Field(default="partworld-demo/eval", description="The reported split (the comparison table).")
    probe: str | None = Field(default="partworld-demo/train", description="Labelled split the linear probe trains on (None: no probe column).")
    methods: list[Method] = Field(default_factory=lambda: ["slotcon", "leopart"], description="Representation learners trained in this run.")
    random_init: bool = Field(default=True, description="Evaluate each method's backbone at random initialisation too (the row a learned representation must beat).")
    representations: dict[str, str] = Field(
        default_factory=dict,
        description="Further representations evaluated on the same protocol: row label -> model (models:/<name>@<alias>, "
                    "e.g. a PASS run's representation models:/luss-representation/<version>, or a representation file).")
    slotcon: SlotconSection = Field(default_factory=SlotconSection, description="SlotCon.")
    leopart: LeopartSection = Field(default_factory=LeopartSection, description="Leopart.")
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection, description="The evaluation every row shares.")

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"methods named twice: {v}")
        return v

    @field_validator("representations")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not k.replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"representation labels become stage names: use letters, digits, - and _ (got {bad})")
        return v


class DenseConfig(PipelineConfig):
    """Pipeline config with a ``dense`` section."""

    pipeline: str = Field(default="dense", description="Pipeline name: selects the typed section and the stage builder.")
    dense: DenseSection = Field(default_factory=DenseSection, description="The representation learners and their comparison.")

    def reported_splits(self) -> list[str]:
        return [self.dense.eval]

    def stage_specs(self, run: str) -> list[StageSpec]:
        from pipelines.dense.graph import build_stages

        return build_stages(self, run)

    def report(self, result: Any, lineage: Any) -> str:
        """The comparison table (printed, logged to the parent MLflow run)."""
        from pipelines.dense.report import write_report

        return write_report(self, result, lineage)


PIPELINES["dense"] = DenseConfig
