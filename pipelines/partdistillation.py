"""The PartDistillation pipeline (Cho et al.): stage list, typed section, final table.

Stage 1 (sec. 4.2, this module today): instance teacher -> mine parts (k-means inside instance
masks) -> R rounds of [train part proposals -> evaluate -> promote -> pseudo-label], with the naive
strip baseline and the mined proposals evaluated beside the rounds in the same run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from pipelines.config import PIPELINES, PipelineConfig, _Strict
from pipelines.spec import StageSpec

INSTANCE_TEACHER = "partdistillation-instance-teacher"
PART_PROPOSALS = "partdistillation-part-proposals"
TABLE_COLUMNS = ("AR@1", "AR@10", "AR@100")


class TeacherParams(_Strict):
    """The instance segmentation teacher (encoder + object decoder), trained on object labels."""

    import_from: str | None = Field(default=None, description="Use this segmenter file / URL instead of training a teacher.")
    params: dict[str, Any] = Field(default_factory=dict, description="Overrides of the instance-teacher trainer's params (steps, lr, model, ...).")


class MiningParams(_Strict):
    """Part mining by k-means inside instance masks (PartDistillation sec. 4.2)."""

    k: int = Field(default=4, ge=1, description="Clusters (part proposals) per instance.")
    objects: str = Field(default="detected", pattern="^(detected|gt)$", description="Instance masks to mine in: the teacher's detections or the dataset's object labels.")
    score_threshold: float = Field(default=0.5, ge=0, le=1, description="Detections below this score are not mined.")
    min_part_area: float = Field(default=0.05, ge=0, le=1, description="Proposals below this fraction of their object are dropped.")
    min_object_area: float = Field(default=0.01, ge=0, le=1, description="Objects below this fraction of the image are skipped.")
    refine: bool = Field(default=False, description="Smooth each instance's assignment with a colour-affinity (CRF-like) step.")
    params: dict[str, Any] = Field(default_factory=dict, description="Further mine-parts params passed through.")


class RoundParams(_Strict):
    """Self-training rounds of the class-agnostic part decoder."""

    rounds: int = Field(default=2, ge=1, description="R: rounds of train -> evaluate -> promote -> pseudo-label.")
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the train-proposals trainer's params (steps, lr, queries, ...).")
    pseudo_label_score_threshold: float = Field(default=0.5, ge=0, le=1, description="Predicted parts below this score are not kept as pseudo-labels.")
    pseudo_label: dict[str, Any] = Field(default_factory=dict, description="Further pseudo-label params passed through.")


class EvaluationParams(_Strict):
    """Class-agnostic part proposal recall on the held-out part masks."""

    max_dets: list[int] = Field(default_factory=lambda: [1, 10, 50, 100, 200], description="AR@k for these k.")
    params: dict[str, Any] = Field(default_factory=dict, description="Further evaluate-proposals params passed through.")


class PartDistillationSection(_Strict):
    """What PartDistillation runs on and with which hyper-parameters (paper values by default)."""

    train: str = Field(default="partworld-demo/train", description="Training images with object labels (relative: to workspace.data).")
    eval: str = Field(default="partworld-demo/eval", description="Held-out split with part masks (relative: to workspace.data); only evaluation reads it.")
    teacher: TeacherParams = Field(default_factory=TeacherParams, description="Instance teacher.")
    mining: MiningParams = Field(default_factory=MiningParams, description="Part mining (sec. 4.2).")
    proposals: RoundParams = Field(default_factory=RoundParams, description="Self-training rounds of part proposals.")
    evaluation: EvaluationParams = Field(default_factory=EvaluationParams, description="Proposal evaluation.")


class PartDistillationConfig(PipelineConfig):
    """Pipeline config with a ``partdistillation`` section."""

    pipeline: str = Field(default="partdistillation", description="Pipeline name: selects the typed section and the stage builder.")
    partdistillation: PartDistillationSection = Field(default_factory=PartDistillationSection, description="The method's settings.")

    def stage_specs(self, run: str) -> list[StageSpec]:
        return build_stages(self, run)

    def report(self, result: Any, lineage: Any) -> str:
        """The run's final table, printed and logged to the parent MLflow run (artifact + metrics)."""
        table = proposals_table(result.stages, self.partdistillation.proposals.rounds)
        text = "Part proposals (class-agnostic AR, %, held-out part masks)\n" + format_table(table)
        lineage.client.log_text(result.mlflow_run_id, text + "\n", "proposals_table.md")
        for label, vals in table:
            for col, v in vals.items():
                if v == v:  # not NaN
                    lineage.client.log_metric(result.mlflow_run_id, f"table.{label.replace(' ', '_')}.{col.replace('@', '_')}", v)
        return text


def _out(cfg: PipelineConfig, run: str, name: str) -> str:
    """Datasets a run writes live in the run folder (absolute, so new_stage_spec keeps it)."""
    return str(cfg.run_dir(run) / "datasets" / name)


def build_stages(cfg: PartDistillationConfig, run: str) -> list[StageSpec]:
    """teacher -> mine -> baselines -> R x [train -> evaluate (+promote) -> pseudo-label]."""
    pd = cfg.partdistillation
    data = {"train": pd.train, "eval": pd.eval}
    mining = {"k": pd.mining.k, "objects": pd.mining.objects, "score_threshold": pd.mining.score_threshold,
              "min_part_area": pd.mining.min_part_area, "min_object_area": pd.mining.min_object_area,
              "refine": pd.mining.refine, **pd.mining.params}
    evaluation = {"max_dets": pd.evaluation.max_dets, **pd.evaluation.params}
    teacher_ref = "stage:instance-teacher"
    teacher_params = dict(pd.teacher.params)
    if pd.teacher.import_from:
        teacher_params["import_from"] = pd.teacher.import_from

    specs = [
        cfg.new_stage_spec(run, "instance-teacher", "instance-teacher", params=teacher_params, datasets=data,
                           output_model=INSTANCE_TEACHER),
        cfg.new_stage_spec(run, "mine-parts", "mine-train", params=mining, datasets={"images": pd.train},
                           models={"teacher": teacher_ref}, output_dataset=_out(cfg, run, "mined-train")),
        # mined proposals on the held-out images, only to measure them (the stage never copies part labels)
        cfg.new_stage_spec(run, "mine-parts", "mine-eval", params={**mining, "allow_parts": True}, datasets={"images": pd.eval},
                           models={"teacher": teacher_ref}, output_dataset=_out(cfg, run, "mined-eval")),
        cfg.new_stage_spec(run, "evaluate-proposals", "evaluate-strips",
                           params={**evaluation, "baseline": "strips", "k": pd.mining.k, "objects": pd.mining.objects,
                                   "score_threshold": pd.mining.score_threshold},
                           datasets={"eval": pd.eval}, models={"teacher": teacher_ref}),
        cfg.new_stage_spec(run, "evaluate-proposals", "evaluate-mined", params=evaluation,
                           datasets={"eval": pd.eval, "proposals": _out(cfg, run, "mined-eval")}),
    ]
    proposals = _out(cfg, run, "mined-train")
    for r in range(1, pd.proposals.rounds + 1):
        train = f"r{r}-train-proposals"
        specs += [
            cfg.new_stage_spec(run, "train-proposals", train, params={**pd.proposals.train, "round": r},
                               datasets={"proposals": proposals}, models={"teacher": teacher_ref},
                               output_model=PART_PROPOSALS),
            cfg.new_stage_spec(run, "evaluate-proposals", f"r{r}-evaluate", params=evaluation,
                               datasets={"eval": pd.eval}, models={"candidate": f"stage:{train}", "parts": f"stage:{train}"}),
            cfg.new_stage_spec(run, "pseudo-label", f"r{r}-pseudo-label",
                               params={"score_threshold": pd.proposals.pseudo_label_score_threshold,
                                       "min_part_area": pd.mining.min_part_area, **pd.proposals.pseudo_label},
                               datasets={"images": pd.train},
                               models={"parts": f"models:/{PART_PROPOSALS}@teacher", "instance_teacher": teacher_ref},
                               output_dataset=_out(cfg, run, f"pseudo-r{r}")),
        ]
        proposals = _out(cfg, run, f"pseudo-r{r}")
    return specs


def proposals_table(outcomes: list[Any], rounds: int) -> list[tuple[str, dict[str, float]]]:
    """Rows of the run's final table: naive strips, mined k-means, round 1..R (AR@1/10/100)."""
    by_name = {o.name: o for o in outcomes}
    rows = [("naive strips", "evaluate-strips"), ("mined k-means", "evaluate-mined")]
    rows += [(f"round {r}", f"r{r}-evaluate") for r in range(1, rounds + 1)]
    table = []
    for label, stage in rows:
        o = by_name.get(stage)
        metrics = ((o.result or {}).get("metrics") or {}) if o else {}
        table.append((label, {c: _metric(metrics, c) for c in TABLE_COLUMNS}))
    return table


def _metric(metrics: dict[str, Any], name: str) -> float:
    alt = name.replace("@", "_")
    for key in (name, f"eval/{name}", alt, f"eval/{alt}"):
        if key in metrics:
            return float(metrics[key])
    return float("nan")


def format_table(table: list[tuple[str, dict[str, float]]]) -> str:
    """Markdown table (percent, one decimal, like the paper)."""
    lines = ["| proposals | " + " | ".join(TABLE_COLUMNS) + " |", "| --- |" + " ---: |" * len(TABLE_COLUMNS)]
    for label, vals in table:
        lines.append(f"| {label} | " + " | ".join("n/a" if v != v else f"{100 * v:.1f}" for v in vals.values()) + " |")
    return "\n".join(lines)


PIPELINES["partdistillation"] = PartDistillationConfig
