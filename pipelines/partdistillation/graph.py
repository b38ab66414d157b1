"""The PartDistillation stage graph: which stages a run has, what each reads and writes, which promote.

Stage 1 (sec. 4.2): instance teacher -> mine parts (k-means inside instance masks) -> R rounds of
[train part proposals -> evaluate -> promote -> pseudo-label]; the naive strip baseline and the mined
proposals are evaluated beside the rounds in the same run.
Stage 2 (sec. 4.3): rank parts (eq. 1 assignment, candidates, per-class k-means k=8, eq. 2) -> R' rounds of
[train the class-specific ranker -> evaluate (NMI/ARI/mIoU/AR@k) -> promote -> relabel]. Baselines through
the same machinery (sec. 5): dataset-level k-means of pixel features per class fitted on the train split and applied
to the eval images ("k-means"; the transductive variant only on request, labelled so), and the one-stage
self-training baseline (that clustering, then as many self-training rounds as PartDistillation's, with its decoder).

Selection never reads the reported split (docs/architecture.md "Tracking and promotion"): every trained model is
evaluated on the eval split (``*-evaluate``, reported, no promotion) and by the selection criterion, which carries the
promotion rule: the val split's part masks (``*-val``) or, label-free, the agreement of the model with the teacher's
pseudo-labels on held-out images without part labels (``*-holdout``: AR@10 against ``mine-parts`` on them for part
proposals; NMI against ``rank-parts`` / ``cluster-pixels`` clusters on them for rankers). ``selection.compare``
measures the other criterion too, without promotion. Every evaluating stage writes its predictions as COCO files.
"""
from __future__ import annotations

from typing import Any

from contract.io import deep_merge
from contract.spec import StageSpec
from contract.stages import STAGES
from contract.stages.input_size import InputSizeParams
from contract.stages.train_proposals import TrainProposalsParams
from pipelines.config import PipelineConfig
from pipelines.partdistillation.config import INSTANCE_TEACHER, ONE_STAGE, PART_PROPOSALS, PART_RANKER, PartDistillationConfig


# -- stage names: the graph and the report agree through these ---------------------------------
# Every trained model is evaluated on the eval split (``*-evaluate``: the reported figures, no promotion), on the val
# split (``*-val``) and, with a holdout, by the label-free criterion (``*-holdout``); the promotion rule sits on the
# evaluation of ``selection.criterion`` only (docs/architecture.md "Tracking and promotion").
def proposals_evaluate(r: int, split: str = "eval") -> str:
    """Evaluation of the stage-1 round ``r`` part decoder on ``split`` (eval | val | holdout)."""
    return f"r{r}-{_suffix(split)}"


def ranker_evaluate(r: int, split: str = "eval") -> str:
    """Evaluation of the stage-2 (final self-training) round ``r`` ranker on ``split``."""
    return f"f{r}-{_suffix(split)}"


def one_stage_evaluate(r: int, split: str = "eval") -> str:
    """Evaluation of the one-stage baseline's round ``r`` on ``split``."""
    return f"one-stage-r{r}-{_suffix(split)}"


def labels_evaluate(r: int) -> str:
    """Evaluation on the eval split of round ``r``'s pseudo-labels (round r + 1's targets) made on the eval images."""
    return f"r{r}-labels-evaluate"


def _suffix(split: str) -> str:
    if split not in ("eval", "val", "holdout"):
        raise ValueError(f"unknown split {split!r}: eval, val or holdout")
    return "evaluate" if split == "eval" else split


STRIPS_EVALUATE, MINED_EVALUATE, KMEANS_EVALUATE, RANK_PARTS = "evaluate-strips", "evaluate-mined", "kmeans-evaluate", "rank-parts"
KMEANS_TRANSDUCTIVE_EVALUATE = "kmeans-transductive-evaluate"
KMEANS_DETECTED_EVALUATE = "kmeans-detected-evaluate"  # the same fit on the teacher's detections: Table 3's "no GT object"
MINE_HOLDOUT, RANK_HOLDOUT, ONE_STAGE_CLUSTER, ONE_STAGE_HOLDOUT = "mine-holdout", "rank-holdout", "one-stage-cluster", "one-stage-cluster-holdout"


def selection_splits(cfg: PartDistillationConfig) -> list[str]:
    """The selection evaluations a run has: ``val`` (its part masks) and/or ``holdout`` (the label-free criterion)."""
    sel = cfg.partdistillation.selection
    splits = [sel.criterion.replace("label_free", "holdout")]
    if sel.compare:
        splits.append("holdout" if sel.criterion == "val" else "val")
    return splits


def proposal_rows(cfg: PartDistillationConfig) -> list[tuple[str, str]]:
    """(row label, evaluating stage) of the stage-1 table: naive strips, mined k-means (round 1's targets), round 1..R,
    each but the last followed by its pseudo-labels (the next round's targets) with ``proposals.measure_labels``."""
    rows = [("naive strips", STRIPS_EVALUATE), ("mined k-means", MINED_EVALUATE)]
    p = cfg.partdistillation.proposals
    for r in range(1, p.rounds + 1):
        rows.append((f"round {r}", proposals_evaluate(r)))
        if p.measure_labels and r < p.rounds:
            rows.append((f"round {r} pseudo-labels (round {r + 1} targets)", labels_evaluate(r)))
    return rows


def part_rows(cfg: PartDistillationConfig) -> list[tuple[str, str]]:
    """(row label, evaluating stage) of the Table 3-shaped parts table: k-means, one-stage rounds, PartDistillation rounds."""
    pd, rk = cfg.partdistillation, cfg.partdistillation.ranking
    kmeans = "k-means (pixels, per class; fitted on train)"  # one method: its GT-object and detected-object rows
    rows = [(kmeans, KMEANS_EVALUATE), (kmeans, KMEANS_DETECTED_EVALUATE)] if rk.kmeans_baseline else []
    if rk.kmeans_transductive:
        rows.append(("k-means (pixels, per class; transductive: fitted on the eval images)", KMEANS_TRANSDUCTIVE_EVALUATE))
    rows += [(f"one-stage, round {r}", one_stage_evaluate(r)) for r in range(1, pd.one_stage_rounds + 1)]
    return rows + [(f"PartDistillation, round {r}", ranker_evaluate(r)) for r in range(1, rk.rounds + 1)]


def selection_rounds(cfg: PartDistillationConfig) -> list[tuple[str, str, int, Any]]:
    """(model line, registered model, rounds, evaluating-stage name of round r on a split) of every promoted line."""
    pd = cfg.partdistillation
    lines = [("part proposals", PART_PROPOSALS, pd.proposals.rounds, proposals_evaluate)]
    if pd.ranking.enabled:
        lines.append(("PartDistillation ranker", PART_RANKER, pd.ranking.rounds, ranker_evaluate))
        if pd.one_stage_rounds:
            lines.append(("one-stage baseline", ONE_STAGE, pd.one_stage_rounds, one_stage_evaluate))
    return lines


def selection_metric(cfg: PartDistillationConfig, model: str, split: str) -> str:
    """The metric the selection evaluation of ``model`` (a registered-model name) on ``split`` compares."""
    pd = cfg.partdistillation
    if split == "val":
        return pd.proposals.promotion_metric if model == PART_PROPOSALS else pd.ranking.promotion_metric
    sel = pd.selection
    return sel.label_free_proposals_metric if model == PART_PROPOSALS else sel.label_free_ranker_metric


def predictions_dir(cfg: PartDistillationConfig, run: str, stage: str) -> str:
    """The predictions folder (COCO results files) an evaluating stage of a run writes (the purity grids of the final
    model draw from its ``ranker_evaluate(r)``'s)."""
    return _out(cfg, run, f"predictions-{stage}")


def _out(cfg: PipelineConfig, run: str, name: str) -> str:
    """Datasets a run writes live in the run folder (absolute, so new_stage_spec keeps it)."""
    return str(cfg.run_dir(run) / "datasets" / name)


def query_count(cfg: PartDistillationConfig) -> int:
    """Part masks a part model puts out per image: its decoder's queries, at most its top_k (train-proposals params)."""
    model = TrainProposalsParams.model_validate({"model": cfg.partdistillation.proposals.train.get("model") or {}}).model
    return min(int(model["decoder"]["num_queries"]), int(model.get("top_k") or model["decoder"]["num_queries"]))


def max_dets(cfg: PartDistillationConfig) -> list[int]:
    """The k of AR@k: the configured ones up to the query count, and the query count itself (AR@200 of a 40-query
    model would be AR@40 under another name)."""
    q = query_count(cfg)
    return sorted({k for k in cfg.partdistillation.evaluation.max_dets if k <= q} | {q})


def build_stages(cfg: PartDistillationConfig, run: str) -> list[StageSpec]:
    """Stage 1, then (``ranking.enabled``) stage 2 and its baselines, in an order every input exists."""
    pd = cfg.partdistillation
    specs = _stage1(cfg, run)
    if pd.ranking.enabled:
        specs += _stage2(cfg, run)
    return [_at_input_size(cfg, s) for s in specs]


def _at_input_size(cfg: PartDistillationConfig, spec: StageSpec) -> StageSpec:
    """``input_size`` into the params of a stage that runs the models on images (its params mix in InputSizeParams);
    the stage's own min_size / max_size win. Unset: the spec unchanged (images as stored)."""
    size = cfg.partdistillation.input_size.model_dump(exclude_none=True)
    if not size or not issubclass(STAGES[spec.stage].params, InputSizeParams):
        return spec
    return spec.model_copy(update={"params": {**size, **spec.params}})


def _promotion(cfg: PartDistillationConfig, model: str, split: str):
    """The promotion rule of the selection evaluation on ``split``; None for the criterion not selected."""
    if split != selection_splits(cfg)[0]:
        return None
    return cfg.promotion_rule(selection_metric(cfg, model, split))


def _setting_of(metric: str) -> list[str]:
    """The evaluate-parts setting a metric needs (<setting>/..., logged as eval/<setting>/...)."""
    parts = metric.removeprefix("eval/").split("/")
    return [parts[0]] if len(parts) > 1 and parts[0] in ("gt", "pred") else ["gt", "pred"]


def _mining(cfg: PartDistillationConfig) -> dict:
    m = cfg.partdistillation.mining
    return {"k": m.k, "objects": m.objects, "score_threshold": m.score_threshold, "min_part_area": m.min_part_area,
            "min_object_area": m.min_object_area, "refine": m.refine, **m.params}


def _stage1(cfg: PartDistillationConfig, run: str) -> list[StageSpec]:
    """teacher -> mine -> baselines -> R x [train -> evaluate on val/holdout (+promote) and eval -> pseudo-label]."""
    pd = cfg.partdistillation
    mining = _mining(cfg)
    evaluation = {"max_dets": max_dets(cfg), **pd.evaluation.params}
    teacher_ref = "stage:instance-teacher"
    imported = {"import_from": pd.teacher.import_from} if pd.teacher.import_from else {}  # a pinned model input
    holdout = "holdout" in selection_splits(cfg)

    specs = [
        # the teacher's mask AP on the eval split is a reported figure (nothing selects on it)
        cfg.new_stage_spec(run, "instance-teacher", "instance-teacher", params=dict(pd.teacher.params),
                           datasets={"train": pd.train, "eval": pd.eval}, models=imported, output_model=INSTANCE_TEACHER),
        cfg.new_stage_spec(run, "mine-parts", "mine-train", params=mining, datasets={"images": pd.train},
                           models={"teacher": teacher_ref}, output_dataset=_out(cfg, run, "mined-train")),
        # mined proposals on the held-out images, only to measure them (the stage never copies part labels)
        cfg.new_stage_spec(run, "mine-parts", "mine-eval", params={**mining, "allow_parts": True}, datasets={"images": pd.eval},
                           models={"teacher": teacher_ref}, output_dataset=_out(cfg, run, "mined-eval")),
        cfg.new_stage_spec(run, "evaluate-proposals", STRIPS_EVALUATE,
                           params={**evaluation, "baseline": "strips", "k": pd.mining.k, "objects": pd.mining.objects,
                                   "score_threshold": pd.mining.score_threshold},
                           datasets={"eval": pd.eval}, models={"teacher": teacher_ref},
                           output_dataset=_out(cfg, run, f"predictions-{STRIPS_EVALUATE}")),
        cfg.new_stage_spec(run, "evaluate-proposals", MINED_EVALUATE, params=evaluation,
                           datasets={"eval": pd.eval, "proposals": _out(cfg, run, "mined-eval")},
                           output_dataset=_out(cfg, run, f"predictions-{MINED_EVALUATE}")),
    ]
    if holdout:  # the first teacher's pseudo-labels on the held-out images: the label-free criterion's reference
        specs.append(cfg.new_stage_spec(run, "mine-parts", MINE_HOLDOUT, params=mining, datasets={"images": pd.selection.holdout},
                                        models={"teacher": teacher_ref}, output_dataset=_out(cfg, run, "mined-holdout")))
    proposals = _out(cfg, run, "mined-train")
    for r in range(1, pd.proposals.rounds + 1):
        train = f"r{r}-train-proposals"
        params, models = {**pd.proposals.train, "round": r}, {"teacher": teacher_ref}
        if r > 1 and pd.proposals.init_from_previous:
            models["init"] = f"stage:r{r - 1}-train-proposals"
        if r > 1 and pd.proposals.later_rounds_lr is not None:
            params.setdefault("lr", pd.proposals.later_rounds_lr)
        if r > 1 and pd.proposals.later_rounds_augment is not None:
            params.setdefault("augment", pd.proposals.later_rounds_augment)
        candidate = {"candidate": f"stage:{train}"}
        specs.append(cfg.new_stage_spec(run, "train-proposals", train, params=params, datasets={"proposals": proposals},
                                        models=models, output_model=PART_PROPOSALS))
        for split in selection_splits(cfg):  # cheap: the selection splits are small, no COCOeval
            name = proposals_evaluate(r, split)
            data = {"eval": pd.val} if split == "val" else {"eval": _out(cfg, run, "mined-holdout")}
            extra = {} if split == "val" else {"reference": "pseudo_labels"}
            specs.append(cfg.new_stage_spec(run, "evaluate-proposals", name, params={**evaluation, "coco": False, **extra},
                                            datasets=data, models=candidate, output_dataset=_out(cfg, run, f"predictions-{name}"),
                                            promotion=_promotion(cfg, PART_PROPOSALS, split)))
        specs.append(cfg.new_stage_spec(run, "evaluate-proposals", proposals_evaluate(r), params=evaluation,
                                        datasets={"eval": pd.eval}, models=candidate,
                                        output_dataset=_out(cfg, run, f"predictions-{proposals_evaluate(r)}")))
        if r < pd.proposals.rounds:  # the last round's teacher feeds stage 2 directly
            labelling = {"score_threshold": pd.proposals.pseudo_label_score_threshold,
                         "objects": pd.proposals.objects or pd.mining.objects,
                         "min_part_area": pd.mining.min_part_area, **pd.proposals.pseudo_label}
            labeller = {"parts": f"models:/{PART_PROPOSALS}@teacher", "instance_teacher": teacher_ref}
            specs.append(cfg.new_stage_spec(run, "pseudo-label", f"r{r}-pseudo-label", params=labelling,
                                            datasets={"images": pd.train}, models=labeller,
                                            output_dataset=_out(cfg, run, f"pseudo-r{r}")))
            proposals = _out(cfg, run, f"pseudo-r{r}")
            if pd.proposals.measure_labels:  # the same labeller (alias unchanged until the next round's promotion) on eval
                specs += [
                    cfg.new_stage_spec(run, "pseudo-label", f"r{r}-pseudo-label-eval", params={**labelling, "allow_parts": True},
                                       datasets={"images": pd.eval}, models=labeller,
                                       output_dataset=_out(cfg, run, f"pseudo-r{r}-eval")),
                    cfg.new_stage_spec(run, "evaluate-proposals", labels_evaluate(r), params=evaluation,
                                       datasets={"eval": pd.eval, "proposals": _out(cfg, run, f"pseudo-r{r}-eval")},
                                       output_dataset=_out(cfg, run, f"predictions-{labels_evaluate(r)}")),
                ]
    return specs


def _evaluations(cfg: PartDistillationConfig, run: str, train: str, model: str, name_of, r: int,
                 holdout_labels: str | None) -> list[StageSpec]:
    """evaluate-parts of a stage-2 model: on the selection splits (the selected one with the promotion rule; gt objects
    only, as the promotion metric needs) and on the eval split (both settings: the reported figures)."""
    pd = cfg.partdistillation
    evaluation = {"max_dets": max_dets(cfg), **pd.ranking.evaluation}
    dedup = {"object_nms_iou": pd.ranking.object_nms_iou}  # only where the pred setting (detections) is evaluated
    models = {"candidate": f"stage:{train}", "instance_teacher": "stage:instance-teacher"}
    specs = []
    for split in selection_splits(cfg):
        name = name_of(r, split)
        settings = _setting_of(selection_metric(cfg, model, split))
        params = {**evaluation, **(dedup if "pred" in settings else {}), "settings": settings}
        data = {"eval": pd.val}
        if split == "holdout":
            params["reference"], data = "pseudo_labels", {"eval": holdout_labels}
        specs.append(cfg.new_stage_spec(run, "evaluate-parts", name, params=params, datasets=data, models=models,
                                        output_dataset=_out(cfg, run, f"predictions-{name}"),
                                        promotion=_promotion(cfg, model, split)))
    specs.append(cfg.new_stage_spec(run, "evaluate-parts", name_of(r), params={**dedup, **evaluation}, datasets={"eval": pd.eval},
                                    models=models, output_dataset=_out(cfg, run, f"predictions-{name_of(r)}")))
    return specs


def _stage2(cfg: PartDistillationConfig, run: str) -> list[StageSpec]:
    """rank-parts -> R' x [train-ranker -> evaluate-parts (+promote) -> relabel]; k-means and one-stage baselines."""
    pd, rk = cfg.partdistillation, cfg.partdistillation.ranking
    teacher_ref, parts_ref = "stage:instance-teacher", f"models:/{PART_PROPOSALS}@teacher"
    ranking = {"k": rk.k, "score_threshold": rk.score_threshold, "min_part_area": rk.min_part_area, "objects": rk.objects}
    holdout = "holdout" in selection_splits(cfg)
    relabel = {"score_threshold": rk.score_threshold, "min_part_area": rk.min_part_area, "objects": rk.objects}
    specs = [cfg.new_stage_spec(run, "rank-parts", RANK_PARTS, params=ranking, datasets={"images": pd.train},
                                models={"parts": parts_ref, "instance_teacher": teacher_ref},
                                output_dataset=_out(cfg, run, "ranked-parts"))]
    if holdout:  # the pseudo-labeller's clusters on the held-out images (label-free reference)
        specs.append(cfg.new_stage_spec(run, "rank-parts", RANK_HOLDOUT, params=ranking, datasets={"images": pd.selection.holdout},
                                        models={"parts": parts_ref, "instance_teacher": teacher_ref},
                                        output_dataset=_out(cfg, run, "ranked-holdout")))
    labels = _out(cfg, run, "ranked-parts")
    for r in range(1, rk.rounds + 1):
        train = f"f{r}-train-ranker"
        init = {"init": f"stage:f{r - 1}-train-ranker"} if r > 1 else {}
        specs.append(cfg.new_stage_spec(run, "train-ranker", train, params={**rk.train, "round": r},
                                        datasets={"ranked_parts": labels}, models={"parts": parts_ref, **init},
                                        output_model=PART_RANKER))
        specs += _evaluations(cfg, run, train, PART_RANKER, ranker_evaluate, r, _out(cfg, run, "ranked-holdout"))
        if r < rk.rounds:
            specs.append(cfg.new_stage_spec(
                run, "rank-pseudo-label", f"f{r}-relabel", params=relabel, datasets={"images": pd.train},
                models={"ranker": f"models:/{PART_RANKER}@teacher", "instance_teacher": teacher_ref},
                output_dataset=_out(cfg, run, f"ranked-r{r}")))
            labels = _out(cfg, run, f"ranked-r{r}")
    pixels = {"k": rk.k, "objects": rk.objects, "min_object_area": pd.mining.min_object_area}
    if rk.kmeans_baseline or pd.one_stage_rounds:  # dataset-level k-means of pixel features per class, on train
        specs.append(cfg.new_stage_spec(run, "cluster-pixels", ONE_STAGE_CLUSTER, params=pixels,
                                        datasets={"images": pd.train}, models={"teacher": teacher_ref},
                                        output_dataset=_out(cfg, run, "one-stage-labels")))
    fitted = {"centroids": _out(cfg, run, "one-stage-labels")}
    if rk.kmeans_baseline:  # Table 2's "K-means": the train split's centroids applied to the eval images (GT objects)
        specs += [
            cfg.new_stage_spec(run, "cluster-pixels", "kmeans-eval", params={**pixels, "objects": "gt", "allow_parts": True},
                               datasets={"images": pd.eval, **fitted}, models={"teacher": teacher_ref},
                               output_dataset=_out(cfg, run, "kmeans-eval")),
            cfg.new_stage_spec(run, "evaluate-parts", KMEANS_EVALUATE, params={"max_dets": max_dets(cfg), **rk.evaluation, "settings": ["gt"]},
                               datasets={"eval": pd.eval, "labels": _out(cfg, run, "kmeans-eval")},
                               output_dataset=_out(cfg, run, f"predictions-{KMEANS_EVALUATE}")),
            # without GT objects: the same centroids on the teacher's detections (each labelled by its predicted class)
            cfg.new_stage_spec(run, "cluster-pixels", "kmeans-eval-detected",
                               params={**pixels, "objects": "detected", "score_threshold": pd.mining.score_threshold,
                                       "object_nms_iou": rk.object_nms_iou, "allow_parts": True},
                               datasets={"images": pd.eval, **fitted}, models={"teacher": teacher_ref},
                               output_dataset=_out(cfg, run, "kmeans-eval-detected")),
            cfg.new_stage_spec(run, "evaluate-parts", KMEANS_DETECTED_EVALUATE, params={"max_dets": max_dets(cfg), **rk.evaluation, "settings": ["pred"]},
                               datasets={"eval": pd.eval, "labels": _out(cfg, run, "kmeans-eval-detected")},
                               output_dataset=_out(cfg, run, f"predictions-{KMEANS_DETECTED_EVALUATE}")),
        ]
    if rk.kmeans_transductive:  # fitted on the eval images themselves: labelled transductive in the table
        specs += [
            cfg.new_stage_spec(run, "cluster-pixels", "kmeans-transductive", params={**pixels, "objects": "gt", "allow_parts": True},
                               datasets={"images": pd.eval}, models={"teacher": teacher_ref},
                               output_dataset=_out(cfg, run, "kmeans-transductive")),
            cfg.new_stage_spec(run, "evaluate-parts", KMEANS_TRANSDUCTIVE_EVALUATE, params={"max_dets": max_dets(cfg), **rk.evaluation, "settings": ["gt"]},
                               datasets={"eval": pd.eval, "labels": _out(cfg, run, "kmeans-transductive")},
                               output_dataset=_out(cfg, run, f"predictions-{KMEANS_TRANSDUCTIVE_EVALUATE}")),
        ]
    if pd.one_stage_rounds:  # one-stage self-training: that clustering, then self-training (sec. 5 baseline (2))
        specs += _one_stage(cfg, run, pixels, fitted, relabel, holdout)
    return specs


def _one_stage(cfg: PartDistillationConfig, run: str, pixels: dict, fitted: dict, relabel: dict, holdout: bool) -> list[StageSpec]:
    """R_1 = proposals.rounds + ranking.rounds rounds (by default) of a ranker with PartDistillation's decoder (its
    query count and top_k): no stage-1 part model, the encoder and initial labels come from the instance teacher."""
    pd, rk = cfg.partdistillation, cfg.partdistillation.ranking
    teacher_ref = "stage:instance-teacher"
    part_model = TrainProposalsParams.model_validate({"model": pd.proposals.train.get("model") or {}}).model
    same_decoder = {"decoder": {k: v for k, v in part_model["decoder"].items() if k != "num_classes"}, "top_k": part_model["top_k"]}
    train_params = {**rk.train, "model": deep_merge(same_decoder, rk.train.get("model") or {})}
    specs = []
    if holdout:  # the train split's centroids on the held-out images: the one-stage line's label-free reference
        specs.append(cfg.new_stage_spec(run, "cluster-pixels", ONE_STAGE_HOLDOUT, params=pixels,
                                        datasets={"images": pd.selection.holdout, **fitted}, models={"teacher": teacher_ref},
                                        output_dataset=_out(cfg, run, "one-stage-holdout")))
    labels = _out(cfg, run, "one-stage-labels")
    for r in range(1, pd.one_stage_rounds + 1):
        train = f"one-stage-r{r}-train"
        init = {"init": f"stage:one-stage-r{r - 1}-train"} if r > 1 else {}
        specs.append(cfg.new_stage_spec(run, "train-ranker", train, params={**train_params, "round": r},
                                        datasets={"ranked_parts": labels}, models={"parts": teacher_ref, **init},
                                        output_model=ONE_STAGE))
        specs += _evaluations(cfg, run, train, ONE_STAGE, one_stage_evaluate, r, _out(cfg, run, "one-stage-holdout"))
        if r < pd.one_stage_rounds:
            specs.append(cfg.new_stage_spec(
                run, "rank-pseudo-label", f"one-stage-r{r}-relabel", params=relabel, datasets={"images": pd.train},
                models={"ranker": f"models:/{ONE_STAGE}@teacher", "instance_teacher": teacher_ref},
                output_dataset=_out(cfg, run, f"one-stage-labels-r{r}")))
            labels = _out(cfg, run, f"one-stage-labels-r{r}")
    return specs

