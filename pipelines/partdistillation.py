"""The PartDistillation pipeline (Cho et al., "Learning Parts from Instance Segmentation"): stages, config, report.

Stage 1 (sec. 4.2): instance teacher -> mine parts (k-means inside instance masks) -> R rounds of
[train part proposals -> evaluate -> promote -> pseudo-label]; the naive strip baseline and the mined
proposals are evaluated beside the rounds in the same run.
Stage 2 (sec. 4.3): rank parts (eq. 1 assignment, candidates, per-class k-means k=8, eq. 2) -> R' rounds of
[train the class-specific ranker -> evaluate (NMI/ARI/mIoU/AR@200) -> promote -> relabel]. Baselines through
the same machinery (sec. 5): dataset-level k-means of pixel features per class alone ("k-means"), and the
one-stage self-training baseline (that clustering, then self-training).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from pipelines.config import PIPELINES, PipelineConfig, PromotionPolicy, _Strict
from contract.spec import StageSpec

INSTANCE_TEACHER = "partdistillation-instance-teacher"
PART_PROPOSALS = "partdistillation-part-proposals"
PART_RANKER = "partdistillation-part-ranker"
ONE_STAGE = "partdistillation-one-stage-baseline"
TABLE_COLUMNS = ("AR@1", "AR@10", "AR@100")
PART_COLUMNS = ("nmi", "ari", "miou", "miou_hungarian", "AR_200")


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
    promotion_metric: str = Field(default="eval/AR_10", description="Metric the part-proposal teacher alias moves on.")
    init_from_previous: bool = Field(default=True, description="Rounds after the first start from the previous round's part decoder.")
    later_rounds_lr: float | None = Field(default=5e-4, gt=0, description="Learning rate of rounds after the first (None: the train params' lr).")


class EvaluationParams(_Strict):
    """Class-agnostic part proposal recall on the held-out part masks."""

    max_dets: list[int] = Field(default_factory=lambda: [1, 10, 50, 100, 200], description="AR@k for these k.")
    params: dict[str, Any] = Field(default_factory=dict, description="Further evaluate-proposals params passed through.")


class RankingParams(_Strict):
    """Class-specific part ranking and the final self-training (sec. 4.3)."""

    enabled: bool = Field(default=True, description="Run stage 2 (ranking, final self-training, part evaluation, baselines).")
    k: int = Field(default=8, ge=1, description="Part clusters per object class.")
    score_threshold: float = Field(default=0.3, ge=0, le=1, description="Candidates: part score above this.")
    min_part_area: float = Field(default=0.05, ge=0, le=1, description="Candidates: at least this fraction of their object.")
    objects: str = Field(default="gt", pattern="^(detected|gt)$", description="Objects parts are assigned to while training: the train split's object labels or the teacher's detections.")
    rounds: int = Field(default=1, ge=1, description="R': rounds of train-ranker -> evaluate -> promote -> relabel.")
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the train-ranker trainer's params (steps, lr, ...).")
    one_stage_rounds: int = Field(default=1, ge=0, description="Self-training rounds of the one-stage baseline (0: skip that baseline).")
    kmeans_baseline: bool = Field(default=True, description="Evaluate dataset-level k-means of pixel features per class alone.")
    promotion_metric: str = Field(default="eval/gt/miou", description="Metric the ranker's teacher alias moves on.")
    evaluation: dict[str, Any] = Field(default_factory=dict, description="Further evaluate-parts params passed through.")
    purity_grids: bool = Field(default=True, description="Write 3x3 purity grids per (object class, part cluster) with an HTML index.")


class PartDistillationSection(_Strict):
    """What PartDistillation runs on and with which hyper-parameters (paper values by default)."""

    train: str = Field(default="partworld-demo/train", description="Training images with object labels (relative: to workspace.data).")
    eval: str = Field(default="partworld-demo/eval", description="Held-out split with part masks (relative: to workspace.data); only evaluation reads it.")
    teacher: TeacherParams = Field(default_factory=TeacherParams, description="Instance teacher.")
    mining: MiningParams = Field(default_factory=MiningParams, description="Part mining (sec. 4.2).")
    proposals: RoundParams = Field(default_factory=RoundParams, description="Self-training rounds of part proposals.")
    evaluation: EvaluationParams = Field(default_factory=EvaluationParams, description="Proposal evaluation.")
    ranking: RankingParams = Field(default_factory=RankingParams, description="Class-specific part ranking, final self-training, baselines (sec. 4.3, 5).")


class PartDistillationConfig(PipelineConfig):
    """Pipeline config with a ``partdistillation`` section."""

    pipeline: str = Field(default="partdistillation", description="Pipeline name: selects the typed section and the stage builder.")
    partdistillation: PartDistillationSection = Field(default_factory=PartDistillationSection, description="The method's settings.")

    def stage_specs(self, run: str) -> list[StageSpec]:
        return build_stages(self, run)

    def promotion_for(self, model: str) -> PromotionPolicy:
        pd = self.partdistillation
        metric = {PART_PROPOSALS: pd.proposals.promotion_metric, PART_RANKER: pd.ranking.promotion_metric,
                  ONE_STAGE: pd.ranking.promotion_metric}.get(model)
        return self.promotion.model_copy(update={"metric": metric}) if metric else self.promotion

    def report(self, result: Any, lineage: Any) -> str:
        """Final tables (printed, logged to the parent MLflow run), the metrics-per-round plot and purity grids."""
        return write_report(self, result, lineage)


def _out(cfg: PipelineConfig, run: str, name: str) -> str:
    """Datasets a run writes live in the run folder (absolute, so new_stage_spec keeps it)."""
    return str(cfg.run_dir(run) / "datasets" / name)


def build_stages(cfg: PartDistillationConfig, run: str) -> list[StageSpec]:
    """Stage 1, then (``ranking.enabled``) stage 2 and its baselines, in an order every input exists."""
    pd = cfg.partdistillation
    specs = _stage1(cfg, run)
    if pd.ranking.enabled:
        specs += _stage2(cfg, run)
    return specs


def _stage1(cfg: PartDistillationConfig, run: str) -> list[StageSpec]:
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
        params, models = {**pd.proposals.train, "round": r}, {"teacher": teacher_ref}
        if r > 1 and pd.proposals.init_from_previous:
            models["init"] = f"stage:r{r - 1}-train-proposals"
        if r > 1 and pd.proposals.later_rounds_lr is not None:
            params.setdefault("lr", pd.proposals.later_rounds_lr)
        specs += [
            cfg.new_stage_spec(run, "train-proposals", train, params=params, datasets={"proposals": proposals},
                               models=models, output_model=PART_PROPOSALS),
            cfg.new_stage_spec(run, "evaluate-proposals", f"r{r}-evaluate", params=evaluation,
                               datasets={"eval": pd.eval}, models={"candidate": f"stage:{train}", "parts": f"stage:{train}"}),
        ]
        if r < pd.proposals.rounds:  # the last round's teacher feeds stage 2 directly
            specs.append(cfg.new_stage_spec(
                run, "pseudo-label", f"r{r}-pseudo-label",
                params={"score_threshold": pd.proposals.pseudo_label_score_threshold, "objects": pd.mining.objects,
                        "min_part_area": pd.mining.min_part_area, **pd.proposals.pseudo_label},
                datasets={"images": pd.train},
                models={"parts": f"models:/{PART_PROPOSALS}@teacher", "instance_teacher": teacher_ref},
                output_dataset=_out(cfg, run, f"pseudo-r{r}")))
            proposals = _out(cfg, run, f"pseudo-r{r}")
    return specs


def _stage2(cfg: PartDistillationConfig, run: str) -> list[StageSpec]:
    """rank-parts -> R' x [train-ranker -> evaluate-parts (+promote) -> relabel]; k-means and one-stage baselines."""
    pd, rk = cfg.partdistillation, cfg.partdistillation.ranking
    teacher_ref, parts_ref = "stage:instance-teacher", f"models:/{PART_PROPOSALS}@teacher"
    ranking = {"k": rk.k, "score_threshold": rk.score_threshold, "min_part_area": rk.min_part_area, "objects": rk.objects}
    evaluation = {**rk.evaluation}
    specs = [cfg.new_stage_spec(run, "rank-parts", "rank-parts", params=ranking, datasets={"images": pd.train},
                                models={"parts": parts_ref, "instance_teacher": teacher_ref},
                                output_dataset=_out(cfg, run, "ranked-parts"))]
    labels = _out(cfg, run, "ranked-parts")
    for r in range(1, rk.rounds + 1):
        train = f"f{r}-train-ranker"
        init = {"init": f"stage:f{r - 1}-train-ranker"} if r > 1 else {}
        specs += [
            cfg.new_stage_spec(run, "train-ranker", train, params={**rk.train, "round": r},
                               datasets={"ranked_parts": labels}, models={"parts": parts_ref, **init},
                               output_model=PART_RANKER),
            cfg.new_stage_spec(run, "evaluate-parts", f"f{r}-evaluate", params=evaluation, datasets={"eval": pd.eval},
                               models={"candidate": f"stage:{train}", "instance_teacher": teacher_ref}),
        ]
        if r < rk.rounds:
            specs.append(cfg.new_stage_spec(
                run, "rank-pseudo-label", f"f{r}-relabel",
                params={"score_threshold": rk.score_threshold, "min_part_area": rk.min_part_area, "objects": rk.objects},
                datasets={"images": pd.train}, models={"ranker": f"models:/{PART_RANKER}@teacher", "instance_teacher": teacher_ref},
                output_dataset=_out(cfg, run, f"ranked-r{r}")))
            labels = _out(cfg, run, f"ranked-r{r}")
    pixels = {"k": rk.k, "objects": rk.objects, "min_object_area": pd.mining.min_object_area}
    if rk.kmeans_baseline:  # Table 2's "K-means": per-class k-means of the teacher's pixel features on the held-out images
        specs += [
            cfg.new_stage_spec(run, "cluster-pixels", "kmeans-eval", params={**pixels, "objects": "gt", "allow_parts": True},
                               datasets={"images": pd.eval}, models={"teacher": teacher_ref},
                               output_dataset=_out(cfg, run, "kmeans-eval")),
            cfg.new_stage_spec(run, "evaluate-parts", "kmeans-evaluate", params={**evaluation, "settings": ["gt"]},
                               datasets={"eval": pd.eval, "labels": _out(cfg, run, "kmeans-eval")}),
        ]
    if rk.one_stage_rounds:  # one-stage self-training: dataset-level clustering per class, then self-training
        specs.append(cfg.new_stage_spec(run, "cluster-pixels", "one-stage-cluster", params=pixels,
                                        datasets={"images": pd.train}, models={"teacher": teacher_ref},
                                        output_dataset=_out(cfg, run, "one-stage-labels")))
        labels = _out(cfg, run, "one-stage-labels")
        for r in range(1, rk.one_stage_rounds + 1):
            train = f"one-stage-r{r}-train"
            init = {"init": f"stage:one-stage-r{r - 1}-train"} if r > 1 else {}
            specs += [
                # no stage-1 part model here: the baseline starts from the instance teacher alone
                cfg.new_stage_spec(run, "train-ranker", train, params={**rk.train, "round": r},
                                   datasets={"ranked_parts": labels}, models={"parts": teacher_ref, **init},
                                   output_model=ONE_STAGE),
                cfg.new_stage_spec(run, "evaluate-parts", f"one-stage-r{r}-evaluate", params=evaluation,
                                   datasets={"eval": pd.eval}, models={"candidate": f"stage:{train}", "instance_teacher": teacher_ref}),
            ]
            if r < rk.one_stage_rounds:
                specs.append(cfg.new_stage_spec(
                    run, "rank-pseudo-label", f"one-stage-r{r}-relabel",
                    params={"score_threshold": rk.score_threshold, "min_part_area": rk.min_part_area, "objects": rk.objects},
                    datasets={"images": pd.train}, models={"ranker": f"models:/{ONE_STAGE}@teacher", "instance_teacher": teacher_ref},
                    output_dataset=_out(cfg, run, f"one-stage-labels-r{r}")))
                labels = _out(cfg, run, f"one-stage-labels-r{r}")
    return specs


# -- report ------------------------------------------------------------------------------------
def _metrics(outcomes: dict[str, Any], stage: str) -> dict[str, float]:
    o = outcomes.get(stage)
    return ((o.result or {}).get("metrics") or {}) if o else {}


def _metric(metrics: dict[str, Any], name: str) -> float:
    alt = name.replace("@", "_")
    for key in (name, f"eval/{name}", alt, f"eval/{alt}"):
        if key in metrics:
            return float(metrics[key])
    return float("nan")


def proposals_table(outcomes: list[Any], rounds: int) -> list[tuple[str, dict[str, float]]]:
    """Rows of the stage-1 table: naive strips, mined k-means, round 1..R (AR@1/10/100)."""
    by_name = {o.name: o for o in outcomes}
    rows = [("naive strips", "evaluate-strips"), ("mined k-means", "evaluate-mined")]
    rows += [(f"round {r}", f"r{r}-evaluate") for r in range(1, rounds + 1)]
    return [(label, {c: _metric(_metrics(by_name, stage), c) for c in TABLE_COLUMNS}) for label, stage in rows]


def parts_table(outcomes: list[Any], cfg: PartDistillationConfig) -> list[tuple[str, str, dict[str, float]]]:
    """Rows shaped like the paper's Table 3: method x GT object (with / without) -> NMI, ARI, mIoU, AR@200."""
    rk = cfg.partdistillation.ranking
    by_name = {o.name: o for o in outcomes}
    rows = []
    if rk.kmeans_baseline:
        rows.append(("k-means (pixels, per class)", "kmeans-evaluate"))
    rows += [(f"one-stage, round {r}", f"one-stage-r{r}-evaluate") for r in range(1, rk.one_stage_rounds + 1)]
    rows += [(f"PartDistillation, round {r}", f"f{r}-evaluate") for r in range(1, rk.rounds + 1)]
    table = []
    for label, stage in rows:
        m = _metrics(by_name, stage)
        for setting, gt in (("gt", "yes"), ("pred", "no")):
            vals = {c: float(m.get(f"eval/{setting}/{c}", float("nan"))) for c in PART_COLUMNS}
            if any(v == v for v in vals.values()):
                table.append((label, gt, vals))
    return table


def format_table(table: list[tuple[str, dict[str, float]]]) -> str:
    """Markdown table (percent, one decimal, like the paper)."""
    lines = ["| proposals | " + " | ".join(TABLE_COLUMNS) + " |", "| --- |" + " ---: |" * len(TABLE_COLUMNS)]
    for label, vals in table:
        lines.append(f"| {label} | " + " | ".join(_pct(v) for v in vals.values()) + " |")
    return "\n".join(lines)


def format_parts_table(table: list[tuple[str, str, dict[str, float]]]) -> str:
    heads = ("NMI", "ARI", "mIoU (majority)", "mIoU (Hungarian)", "AR@200")
    lines = ["| method | GT object | " + " | ".join(heads) + " |", "| --- | --- |" + " ---: |" * len(heads)]
    for label, gt, vals in table:
        lines.append(f"| {label} | {gt} | " + " | ".join(_pct(v) for v in vals.values()) + " |")
    return "\n".join(lines)


def _pct(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.1f}"


def plot_rounds(outcomes: list[Any], cfg: PartDistillationConfig, out_png: Path) -> Path:
    """Every metric across rounds: proposal AR@k per stage-1 round, part metrics per stage-2 round (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pd = cfg.partdistillation
    by_name = {o.name: o for o in outcomes}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(range(1, pd.proposals.rounds + 1))
    for col in ("AR@1", "AR@10", "AR@100"):
        axes[0].plot(xs, [100 * _metric(_metrics(by_name, f"r{r}-evaluate"), col) for r in xs], marker="o", label=col)
        mined = _metric(_metrics(by_name, "evaluate-mined"), col)
        if mined == mined:
            axes[0].axhline(100 * mined, ls="--", lw=0.8, color=axes[0].lines[-1].get_color())
    axes[0].set(title="Part proposals (dashed: mined k-means)", xlabel="self-training round", ylabel="%")
    axes[0].set_xlim(0.5, pd.proposals.rounds + 0.5)
    axes[0].set_xticks(xs)
    axes[0].legend()
    if pd.ranking.enabled:
        xs2 = list(range(1, pd.ranking.rounds + 1))
        for c in ("nmi", "ari", "miou", "miou_hungarian", "AR_200"):
            axes[1].plot(xs2, [100 * _metrics(by_name, f"f{r}-evaluate").get(f"eval/gt/{c}", float("nan")) for r in xs2],
                         marker="o", label=c)
            one = _metrics(by_name, f"one-stage-r{pd.ranking.one_stage_rounds}-evaluate").get(f"eval/gt/{c}")
            if one is not None:
                axes[1].axhline(100 * one, ls="--", lw=0.8, color=axes[1].lines[-1].get_color())
        axes[1].set(title="Class-specific parts, GT objects (dashed: one-stage)", xlabel="final self-training round", ylabel="%")
        axes[1].set_xlim(0.5, pd.ranking.rounds + 0.5)
        axes[1].set_xticks(xs2)
        axes[1].legend()
    else:
        axes[1].axis("off")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


def write_report(cfg: PartDistillationConfig, result: Any, lineage: Any) -> str:
    pd = cfg.partdistillation
    run_dir = cfg.run_dir(result.run)
    report_dir = run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    sections = ["Part proposals (class-agnostic AR, %, held-out part masks)\n" + format_table(proposals_table(result.stages, pd.proposals.rounds))]
    ptable = parts_table(result.stages, cfg) if pd.ranking.enabled else []
    if ptable:
        sections.append("Class-specific parts (%, held-out part masks; Table 3 layout)\n" + format_parts_table(ptable))
    text = "\n\n".join(sections)
    (report_dir / "tables.md").write_text(text + "\n")
    png = plot_rounds(result.stages, cfg, report_dir / "metrics_by_round.png")
    lineage.client.log_artifact(result.mlflow_run_id, str(report_dir / "tables.md"), "report")
    lineage.client.log_artifact(result.mlflow_run_id, str(png), "report")
    for label, vals in proposals_table(result.stages, pd.proposals.rounds):
        for col, v in vals.items():
            if v == v:
                lineage.client.log_metric(result.mlflow_run_id, f"proposals.{label.replace(' ', '_')}.{col.replace('@', '_')}", v)
    for label, gt, vals in ptable:
        for col, v in vals.items():
            if v == v:
                key = f"parts.{label.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}.{'gt' if gt == 'yes' else 'pred'}.{col}"
                lineage.client.log_metric(result.mlflow_run_id, key, v)
    lines = [text, "", f"plot: {png}"]
    if pd.ranking.enabled and pd.ranking.purity_grids:
        from pipelines import purity

        last = {o.name: o for o in result.stages}
        labels = Path(_out(cfg, result.run, f"ranked-r{pd.ranking.rounds - 1}")) if pd.ranking.rounds > 1 else Path(_out(cfg, result.run, "ranked-parts"))
        if "rank-parts" in last and labels.is_dir():
            index = purity.grids(labels, report_dir / "purity")
            lineage.client.log_artifacts(result.mlflow_run_id, str(report_dir / "purity"), "purity")
            lines.append(f"purity grids: {index}  (rate them, then: selftrain purity curve <ratings.csv> -o curve.png)")
    lines.append(f"report folder: {report_dir}")
    (report_dir / "summary.json").write_text(json.dumps({"run": result.run, "mlflow_run_id": result.mlflow_run_id}, indent=2))
    return "\n".join(lines)


PIPELINES["partdistillation"] = PartDistillationConfig
