"""The PartDistillation pipeline config: its typed section (paper values by default) and the registered model names."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from contract.spec import StageSpec
from contract.stages.input_size import InputSizeParams
from pipelines.config import PIPELINES, PipelineConfig, _Strict, stage_params

INSTANCE_TEACHER = "partdistillation-instance-teacher"
PART_PROPOSALS = "partdistillation-part-proposals"
PART_RANKER = "partdistillation-part-ranker"
ONE_STAGE = "partdistillation-one-stage-baseline"


class TeacherParams(_Strict):
    """The instance segmentation teacher (encoder + object decoder), trained on object labels."""

    import_from: str | None = Field(default=None, description="Use this segmenter instead of training a teacher: a file or a models:/<name>@<alias> or models:/<name>/<version> URI (a pinned model input of the instance-teacher stage, recorded in lineage).")
    params: dict[str, Any] = stage_params("instance-teacher", "Overrides of the instance-teacher trainer's params (steps, lr, model, ...).")


class MiningParams(_Strict):
    """Part mining by k-means inside instance masks (PartDistillation sec. 4.2)."""

    k: int = Field(default=4, ge=1, description="Clusters (part proposals) per instance.")
    objects: str = Field(default="detected", pattern="^(detected|gt)$", description="Instance masks to mine in: the teacher's detections or the dataset's object labels.")
    score_threshold: float = Field(default=0.5, ge=0, le=1, description="Detections below this score are not mined.")
    min_part_area: float = Field(default=0.05, ge=0, le=1, description="Proposals below this fraction of their object are dropped.")
    min_object_area: float = Field(default=0.01, ge=0, le=1, description="Objects below this fraction of the image are skipped.")
    refine: bool = Field(default=False, description="Smooth each instance's assignment with a colour-affinity (CRF-like) step.")
    params: dict[str, Any] = stage_params("mine-parts", "Further mine-parts params passed through.")


class RoundParams(_Strict):
    """Self-training rounds of the class-agnostic part decoder."""

    rounds: int = Field(default=2, ge=1, description="R: rounds of train -> evaluate -> promote -> pseudo-label.")
    train: dict[str, Any] = stage_params("train-proposals", "Overrides of the train-proposals trainer's params (steps, lr, queries, ...).")
    pseudo_label_score_threshold: float = Field(default=0.5, ge=0, le=1, description="Predicted parts below this score are not kept as pseudo-labels.")
    objects: Literal["detected", "gt"] | None = Field(default=None, description="Instances the pseudo-labels are kept in and clipped to (sec. 4.2's filter): the train split's object labels (gt; the method reads object labels, never part labels, and stage 2 assigns parts to them by default) or the instance teacher's detections (detected). None: as mining.objects.")
    pseudo_label: dict[str, Any] = stage_params("pseudo-label", "Further pseudo-label params passed through.")
    promotion_metric: str = Field(default="AR_10", description="Metric (measured on the val split) the part-proposal teacher alias moves on (selection.criterion: val).")
    init_from_previous: bool = Field(default=True, description="Rounds after the first start from the previous round's part decoder.")
    later_rounds_lr: float | None = Field(default=5e-4, gt=0, description="Learning rate of rounds after the first (None: the train params' lr).")
    later_rounds_augment: Literal["flip", "strong"] | None = Field(default=None, description="Augmentation of the rounds after the first, the self-training students (sec. 2: the student predicts the teacher's output from a strongly augmented input); round 1 learns the mined proposals with the train params' augment. None: the train params' augment in every round.")
    measure_labels: bool = Field(default=True, description="Also score each round's pseudo-labels (the next round's targets) on the eval split, like the mined proposals: the pseudo-label stage on the eval images (part labels never copied), then evaluate-proposals. A round that does not beat the labels it learnt from shows up as such.")


class EvaluationParams(_Strict):
    """Class-agnostic part proposal recall on the held-out part masks."""

    max_dets: list[int] = Field(default_factory=lambda: [1, 10, 50, 100, 200], description="AR@k for these k.")
    params: dict[str, Any] = stage_params("evaluate-proposals", "Further evaluate-proposals params passed through.")


class RankingParams(_Strict):
    """Class-specific part ranking and the final self-training (sec. 4.3)."""

    enabled: bool = Field(default=True, description="Run stage 2 (ranking, final self-training, part evaluation, baselines).")
    k: int = Field(default=8, ge=1, description="Part clusters per object class.")
    score_threshold: float = Field(default=0.3, ge=0, le=1, description="Candidates: part score above this.")
    min_part_area: float = Field(default=0.05, ge=0, le=1, description="Candidates: at least this fraction of their object.")
    objects: str = Field(default="gt", pattern="^(detected|gt)$", description="Objects parts are assigned to while training: the train split's object labels or the teacher's detections.")
    rounds: int = Field(default=1, ge=1, description="R': rounds of train-ranker -> evaluate -> promote -> relabel.")
    train: dict[str, Any] = stage_params("train-ranker", "Overrides of the train-ranker trainer's params (steps, lr, ...).")
    one_stage_rounds: int | None = Field(default=None, ge=0, description="Self-training rounds of the one-stage baseline (0: skip that baseline; None: as many as PartDistillation's, proposals.rounds + ranking.rounds; the paper runs two).")
    kmeans_baseline: bool = Field(default=True, description="Evaluate dataset-level k-means of pixel features per class alone: fitted on the train split, applied to the eval split.")
    kmeans_transductive: bool = Field(default=False, description="Also evaluate k-means fitted on the eval images themselves (labelled transductive in the table).")
    object_nms_iou: float | None = Field(default=0.5, gt=0, le=1, description="Without GT objects (Table 3's 'no' rows), the instance teacher's detections are deduplicated: one whose mask overlaps a better-scored one with IoU above this is dropped, whatever its class, for every model and the k-means baseline alike. The teacher's duplicates otherwise split a ranker's parts between copies of one object (BENCHMARKS.md). None: every detection above the score threshold.")
    promotion_metric: str = Field(default="gt/miou", description="Metric (measured on the val split) the ranker's teacher alias moves on (selection.criterion: val).")
    evaluation: dict[str, Any] = stage_params("evaluate-parts", "Further evaluate-parts params passed through.")
    purity_grids: bool = Field(default=True, description="Write 3x3 purity grids per (object class, part cluster) with an HTML index.")


class SelectionParams(_Strict):
    """Model selection (promotion of the teacher aliases): never on the reported eval split (docs/architecture.md "Tracking and promotion")."""

    criterion: Literal["val", "label_free"] = Field(default="val", description="val: the promotion metrics measured on the val split's part masks; label_free: agreement of the candidate with the teacher's pseudo-labels on held-out images without part labels (holdout).")
    holdout: str | None = Field(default=None, description="Held-out images with object labels and no part labels (never trained on; relative: to workspace.data), e.g. the val images with their parts stripped by selftrain data split; read by the label-free criterion.")
    compare: bool = Field(default=False, description="Also measure the criterion not selected (no promotion), so the report shows which round each would pick.")
    label_free_proposals_metric: str = Field(default="AR_10", description="Label-free metric of part-proposal models: AR@10 against the mined proposals (the first teacher's pseudo-labels) on the holdout images.")
    label_free_ranker_metric: str = Field(default="gt/nmi", description="Label-free metric of rankers: NMI of their part clusters against the pseudo-labeller's (rank-parts, cluster-pixels) clusters on the holdout images.")


class PartDistillationSection(_Strict):
    """What PartDistillation runs on and with which hyper-parameters (paper values by default)."""

    train: str = Field(default="partworld-demo/train", description="Training images with object labels (relative: to workspace.data).")
    val: str = Field(default="partworld-demo/val", description="Selection split with part masks (relative: to workspace.data): promotion reads its metrics (selection.criterion: val), never the reported split's.")
    eval: str = Field(default="partworld-demo/eval", description="The reported split with part masks (relative: to workspace.data); only the reporting evaluations read it.")
    selection: SelectionParams = Field(default_factory=SelectionParams, description="Model selection: the val split or a label-free criterion.")
    input_size: InputSizeParams = Field(default_factory=InputSizeParams, description="The size images enter the instance and part models at, in training and inference, in every stage that runs them (min_size: shortest edge, max_size: longest edge at most; detectron2's convention; default: as stored). Predictions are scored and written at the datasets' resolution; a stage's own params override it.")
    teacher: TeacherParams = Field(default_factory=TeacherParams, description="Instance teacher.")
    mining: MiningParams = Field(default_factory=MiningParams, description="Part mining (sec. 4.2).")
    proposals: RoundParams = Field(default_factory=RoundParams, description="Self-training rounds of part proposals.")
    evaluation: EvaluationParams = Field(default_factory=EvaluationParams, description="Proposal evaluation.")
    ranking: RankingParams = Field(default_factory=RankingParams, description="Class-specific part ranking, final self-training, baselines (sec. 4.3, 5).")

    @model_validator(mode="after")
    def _selection_has_data(self) -> "PartDistillationSection":
        s = self.selection
        if (s.criterion == "label_free" or s.compare) and not s.holdout:
            raise ValueError("selection.holdout is required by the label-free criterion (selection.criterion: label_free "
                             "or selection.compare): held-out images with no part labels")
        if len({self.train, self.val, self.eval, s.holdout or self.val}) < 3 + bool(s.holdout):
            raise ValueError(f"train, val, eval and selection.holdout must be different datasets: {self.train}, {self.val}, "
                             f"{self.eval}, {s.holdout}")
        return self

    @property
    def one_stage_rounds(self) -> int:
        """Rounds of the one-stage baseline: as many as PartDistillation's unless ranking.one_stage_rounds says."""
        rk = self.ranking
        return self.proposals.rounds + rk.rounds if rk.one_stage_rounds is None else rk.one_stage_rounds


class PartDistillationConfig(PipelineConfig):
    """Pipeline config with a ``partdistillation`` section."""

    pipeline: str = Field(default="partdistillation", description="Pipeline name: selects the typed section and the stage builder.")
    partdistillation: PartDistillationSection = Field(default_factory=PartDistillationSection, description="The method's settings.")

    def reported_splits(self) -> list[str]:
        return [self.partdistillation.eval]

    def stage_specs(self, run: str) -> list[StageSpec]:
        from pipelines.partdistillation.graph import build_stages

        return build_stages(self, run)

    def report(self, result: Any, lineage: Any) -> str:
        """Final tables (printed, logged to the parent MLflow run), the metrics-per-round plot and purity grids."""
        from pipelines.partdistillation.report import write_report

        return write_report(self, result, lineage)


PIPELINES["partdistillation"] = PartDistillationConfig
