"""The PartDistillation stage graph: which stages a run has, what each reads and writes, which promote.

Stage 1 (sec. 4.2): instance teacher -> mine parts (k-means inside instance masks) -> R rounds of
[train part proposals -> evaluate -> promote -> pseudo-label]; the naive strip baseline and the mined
proposals are evaluated beside the rounds in the same run.
Stage 2 (sec. 4.3): rank parts (eq. 1 assignment, candidates, per-class k-means k=8, eq. 2) -> R' rounds of
[train the class-specific ranker -> evaluate (NMI/ARI/mIoU/AR@200) -> promote -> relabel]. Baselines through
the same machinery (sec. 5): dataset-level k-means of pixel features per class alone ("k-means"), and the
one-stage self-training baseline (that clustering, then self-training).
"""
from __future__ import annotations

from contract.spec import StageSpec
from pipelines.config import PipelineConfig
from pipelines.partdistillation.config import INSTANCE_TEACHER, ONE_STAGE, PART_PROPOSALS, PART_RANKER, PartDistillationConfig


# -- stage names: the graph and the report agree through these ---------------------------------
def proposals_evaluate(r: int) -> str:
    """Evaluation of the stage-1 round ``r`` part decoder."""
    return f"r{r}-evaluate"


def ranker_evaluate(r: int) -> str:
    """Evaluation of the stage-2 (final self-training) round ``r`` ranker."""
    return f"f{r}-evaluate"


def one_stage_evaluate(r: int) -> str:
    """Evaluation of the one-stage baseline's round ``r``."""
    return f"one-stage-r{r}-evaluate"


STRIPS_EVALUATE, MINED_EVALUATE, KMEANS_EVALUATE, RANK_PARTS = "evaluate-strips", "evaluate-mined", "kmeans-evaluate", "rank-parts"


def proposal_rows(cfg: PartDistillationConfig) -> list[tuple[str, str]]:
    """(row label, evaluating stage) of the stage-1 table: naive strips, mined k-means, round 1..R."""
    rows = [("naive strips", STRIPS_EVALUATE), ("mined k-means", MINED_EVALUATE)]
    return rows + [(f"round {r}", proposals_evaluate(r)) for r in range(1, cfg.partdistillation.proposals.rounds + 1)]


def part_rows(cfg: PartDistillationConfig) -> list[tuple[str, str]]:
    """(row label, evaluating stage) of the Table 3-shaped parts table: k-means, one-stage rounds, PartDistillation rounds."""
    rk = cfg.partdistillation.ranking
    rows = [("k-means (pixels, per class)", KMEANS_EVALUATE)] if rk.kmeans_baseline else []
    rows += [(f"one-stage, round {r}", one_stage_evaluate(r)) for r in range(1, rk.one_stage_rounds + 1)]
    return rows + [(f"PartDistillation, round {r}", ranker_evaluate(r)) for r in range(1, rk.rounds + 1)]


def final_part_labels(cfg: PartDistillationConfig, run: str) -> str:
    """The pseudo-label dataset the last final-self-training round learned from (the purity grids draw from it)."""
    rounds = cfg.partdistillation.ranking.rounds
    return _out(cfg, run, f"ranked-r{rounds - 1}" if rounds > 1 else "ranked-parts")


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
    imported = {"import_from": pd.teacher.import_from} if pd.teacher.import_from else {}  # a pinned model input

    specs = [
        cfg.new_stage_spec(run, "instance-teacher", "instance-teacher", params=dict(pd.teacher.params), datasets=data,
                           models=imported, output_model=INSTANCE_TEACHER),
        cfg.new_stage_spec(run, "mine-parts", "mine-train", params=mining, datasets={"images": pd.train},
                           models={"teacher": teacher_ref}, output_dataset=_out(cfg, run, "mined-train")),
        # mined proposals on the held-out images, only to measure them (the stage never copies part labels)
        cfg.new_stage_spec(run, "mine-parts", "mine-eval", params={**mining, "allow_parts": True}, datasets={"images": pd.eval},
                           models={"teacher": teacher_ref}, output_dataset=_out(cfg, run, "mined-eval")),
        cfg.new_stage_spec(run, "evaluate-proposals", STRIPS_EVALUATE,
                           params={**evaluation, "baseline": "strips", "k": pd.mining.k, "objects": pd.mining.objects,
                                   "score_threshold": pd.mining.score_threshold},
                           datasets={"eval": pd.eval}, models={"teacher": teacher_ref}),
        cfg.new_stage_spec(run, "evaluate-proposals", MINED_EVALUATE, params=evaluation,
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
            cfg.new_stage_spec(run, "evaluate-proposals", proposals_evaluate(r), params=evaluation,
                               datasets={"eval": pd.eval}, models={"candidate": f"stage:{train}", "parts": f"stage:{train}"},
                               promotion=cfg.promotion_rule(pd.proposals.promotion_metric)),
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
    specs = [cfg.new_stage_spec(run, "rank-parts", RANK_PARTS, params=ranking, datasets={"images": pd.train},
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
            cfg.new_stage_spec(run, "evaluate-parts", ranker_evaluate(r), params=evaluation, datasets={"eval": pd.eval},
                               models={"candidate": f"stage:{train}", "instance_teacher": teacher_ref},
                               promotion=cfg.promotion_rule(rk.promotion_metric)),
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
            cfg.new_stage_spec(run, "evaluate-parts", KMEANS_EVALUATE, params={**evaluation, "settings": ["gt"]},
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
                cfg.new_stage_spec(run, "evaluate-parts", one_stage_evaluate(r), params=evaluation,
                                   datasets={"eval": pd.eval}, models={"candidate": f"stage:{train}", "instance_teacher": teacher_ref},
                                   promotion=cfg.promotion_rule(rk.promotion_metric)),
            ]
            if r < rk.one_stage_rounds:
                specs.append(cfg.new_stage_spec(
                    run, "rank-pseudo-label", f"one-stage-r{r}-relabel",
                    params={"score_threshold": rk.score_threshold, "min_part_area": rk.min_part_area, "objects": rk.objects},
                    datasets={"images": pd.train}, models={"ranker": f"models:/{ONE_STAGE}@teacher", "instance_teacher": teacher_ref},
                    output_dataset=_out(cfg, run, f"one-stage-labels-r{r}")))
                labels = _out(cfg, run, f"one-stage-labels-r{r}")
    return specs


