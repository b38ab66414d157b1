"""Stage ``evaluate-parts``: class-specific part segmentation against held-out part masks (PartDistillation sec. 5.1,
Tables 2-3).

Ground truth: ``datasets["eval"]`` (an evaluation split with ``parts``). The predictions come from exactly one of:

- ``models["candidate"]`` (or ``models["ranker"]``): a ``train-ranker`` model, run on the eval images conditioned on
  the objects of each setting (``train_ranker.predict_part_labels`` for the cluster-id maps,
  ``class_conditioned_parts`` for the scored part masks of AR);
- ``datasets["labels"]``: a labels dataset on the eval images (records with ``proposals`` carrying ``label`` =
  cluster id and ``category_id``, as ``rank-parts`` / ``cluster-pixels`` write them), matched by key: evaluates the
  clustering alone. Where masks overlap, the higher score wins.

Two settings, each reported (``params.settings``, default both), as Table 3's "GT Object" column:

- ``gt``: with ground-truth object masks and classes: the model is conditioned on the GT objects; a labels dataset
  is restricted to pixels inside GT objects; AR proposals are clipped to the GT objects' union.
- ``pred``: without: the objects are ``models["instance_teacher"]``'s detections (score > ``object_score_threshold``,
  class = its predicted class; needed for a model only); a labels dataset is taken as it is (its own objects).
  Pixels of a detected object count for the detected class (a wrong class is a miss for the true one).

Metrics (fractions in [0, 1]), ``<s>`` the setting (``gt`` | ``pred``; MLflow names may hold ``/`` but not ``@``):
``eval/<s>/nmi``, ``eval/<s>/ari`` (per object class over its foreground pixels, Choudhury et al., then averaged
over classes), ``eval/<s>/miou`` (majority mapping of clusters to parts, class mean: the reference),
``eval/<s>/miou_parts`` (all-part mean), ``eval/<s>/miou_hungarian``, ``eval/<s>/miou_hungarian_parts``
(one-to-one Hungarian mapping), ``eval/<s>/num_classes`` (see ``PartClusteringEvaluator``); ``eval/<s>/AR_<k>`` and
``eval/<s>/R50_<k>`` for k in ``max_dets`` (class-agnostic, ``PartProposalRecall``), ``eval/<s>/num_parts``;
``eval/num_images``, ``eval/pred/objects_per_image`` (detections kept). **Promotion metric: ``eval/gt/miou``.**

Per-class values (NMI, ARI, mIoU both ways, IoU per part, by class id and name) go to
``<workdir>/per_class.json`` (also an artifact of the stage's MLflow run): ``{"gt": {"<class id>": {...}},
"pred": {...}}``.

Params (defaults): ``settings`` ["gt", "pred"], ``max_dets`` [1, 10, 50, 100, 200], ``object_score_threshold`` 0.5,
``max_detections`` 20, ``batch_size`` 8.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from contract.spec import StageSpec
from trainers.checkpoint import write_atomic
from trainers.data import shards
from trainers.engine import MetricLogger, init_distributed
from trainers.evaluation import PartClusteringEvaluator, PartProposalRecall, paint_label_map
from trainers.evaluation.clustering import NONE
from trainers.stages import StageResult
from trainers.stages.common import (StageInputError, dataset_input, images_to_tensor, iter_batches, load_model_input,
                                    model_input_path, stage_device)
from trainers.stages.evaluate_proposals import MAX_DETS, metric_key, stored_proposals
from trainers.structures import decode_mask, encode_masks

SETTINGS = ("gt", "pred")
PER_CLASS_FILE = "per_class.json"
PROMOTION_METRIC = "eval/gt/miou"


def source_of(spec: StageSpec) -> str:
    """``model`` or ``labels``: exactly one source of part predictions must be given."""
    found = [s for s, ok in (("model", "candidate" in spec.inputs.models or "ranker" in spec.inputs.models),
                             ("labels", "labels" in spec.inputs.datasets)) if ok]
    if len(found) != 1:
        raise StageInputError("evaluate-parts needs exactly one source of part predictions: inputs.models.candidate "
                              f"(a train-ranker model) or inputs.datasets.labels (a labels dataset); got {found or 'none'}")
    return found[0]


def object_class_map(masks: np.ndarray, classes: list[int], height: int, width: int) -> np.ndarray:
    """HxW object class of each pixel from object masks [J, H, W] (later objects paint over earlier ones, as
    ``predict_part_labels`` does); -1 on no object."""
    out = np.full((height, width), NONE, dtype=np.int64)
    for m, c in zip(masks, classes):
        out[m] = int(c)
    return out


def gt_object_union(record: dict) -> np.ndarray:
    h, w = int(record["height"]), int(record["width"])
    out = np.zeros((h, w), dtype=bool)
    for o in record.get("objects", []):
        out |= decode_mask(o["segmentation"])
    return out


def labels_predictions(record: dict, proposals: list[dict], setting: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(cluster map, object class map, AR proposals) of one eval image from a labels dataset's proposals."""
    h, w = int(record["height"]), int(record["width"])
    usable = [p for p in proposals if p.get("label") is not None and int(p["label"]) >= 0
              and p.get("category_id") is not None]
    segs = [p["segmentation"] for p in usable]
    scores = [float(p.get("score", 1.0)) for p in usable]
    clusters = paint_label_map(segs, [int(p["label"]) for p in usable], h, w, scores)
    classes = paint_label_map(segs, [int(p["category_id"]) for p in usable], h, w, scores)
    if setting == "gt":
        classes = np.where(gt_object_union(record), classes, NONE)
    return clusters, classes, [{"segmentation": p["segmentation"], "score": float(p.get("score", 1.0))}
                               for p in proposals]


@torch.no_grad()
def model_predictions(model, label_map, x: torch.Tensor, objects: list[tuple[torch.Tensor, list[int]]],
                      top_k: int) -> list[tuple[np.ndarray, np.ndarray, list[dict]]]:
    """Per image of a same-size batch ``x``: (cluster map, object class map, AR proposals) of the ranker conditioned
    on ``objects[b] = (masks [J, H, W] bool, category ids)``."""
    from trainers.stages.train_ranker import class_conditioned_parts, predict_part_labels

    h, w = x.shape[-2:]
    maps = predict_part_labels(model, x, [m for m, _ in objects], [c for _, c in objects], label_map)
    outputs = model(x.to(next(model.parameters()).device))
    out = []
    for b, (masks, classes) in enumerate(objects):
        om = masks.to(outputs["pred_masks"].device).bool()
        part_masks, scores, _ = class_conditioned_parts(outputs["pred_logits"][b], outputs["pred_masks"][b], om,
                                                        list(classes), label_map)
        order = scores.argsort(descending=True, stable=True)[:top_k]
        rles = encode_masks(part_masks[order].cpu().numpy())
        props = [{"segmentation": r, "score": float(s)} for r, s in zip(rles, scores[order].tolist())]
        out.append((maps[b], object_class_map(om.cpu().numpy(), list(classes), h, w), props))
    return out


def run(spec: StageSpec) -> StageResult | None:
    """NMI/ARI/mIoU and AR@k of this rank's share of the eval split per setting; summed and reported on rank 0."""
    from trainers.stages.rank_parts import RankPartsConfig, _objects

    p = spec.params
    source = source_of(spec)
    settings = tuple(p.get("settings", SETTINGS))
    if not settings or any(s not in SETTINGS for s in settings):
        raise ValueError(f"params.settings must be a non-empty subset of {list(SETTINGS)}, got {settings!r}")
    max_dets = tuple(int(v) for v in p.get("max_dets", MAX_DETS))
    batch_size = int(p.get("batch_size", 8))
    objects_cfg = RankPartsConfig(objects="detected", object_score_threshold=float(p.get("object_score_threshold", 0.5)),
                                  max_detections=int(p.get("max_detections", 20)))

    device = stage_device(spec)
    d = init_distributed(device.type == "cuda")
    eval_path = dataset_input(spec, "eval")
    categories = shards.DatasetIndex.load(eval_path).categories
    model = label_map = teacher = stored = None
    if source == "model":
        from trainers.stages.train_ranker import load_ranker

        name = "candidate" if "candidate" in spec.inputs.models else "ranker"
        try:
            model, label_map = load_ranker(model_input_path(spec, name), device)
        except ValueError as e:
            raise StageInputError(f"inputs.models.{name}: {e}") from e
        if "pred" in settings:
            if "instance_teacher" not in spec.inputs.models:
                raise StageInputError("evaluate-parts of a model without GT objects (settings: pred) needs "
                                      "inputs.models.instance_teacher; or set params.settings: [gt]")
            teacher = load_model_input(spec, "instance_teacher", device)
    else:
        keys = {key for key, _, _ in shards.iter_samples(eval_path, rank=d.rank, world_size=d.world_size,
                                                         decode=False, allow_parts=True)}
        stored = stored_proposals(dataset_input(spec, "labels"), keys)

    clustering = {s: PartClusteringEvaluator() for s in settings}
    recall = {s: PartProposalRecall(max_dets=max_dets, clip_to_objects=(s == "gt")) for s in settings}
    counts = torch.zeros(3, dtype=torch.float64)  # images, images missing from the labels dataset, detections kept
    logger = MetricLogger(spec, d.is_main, total=shards.num_samples_for(eval_path, rank=d.rank, world_size=d.world_size),
                          initial=0)
    try:
        for keys, images, records in iter_batches(eval_path, batch_size, rank=d.rank, world_size=d.world_size,
                                                  allow_parts=True):
            counts[0] += len(keys)
            if source == "labels":
                counts[1] += sum(key not in stored for key in keys)
                for key, record in zip(keys, records):
                    for s in settings:
                        clusters, classes, props = labels_predictions(record, stored.get(key, []), s)
                        clustering[s].process(record, clusters, classes)
                        recall[s].process(record, props)
            else:
                by_size: dict[tuple[int, int], list[int]] = {}
                for i, image in enumerate(images):  # one forward per image size, never padded
                    by_size.setdefault(image.shape[:2], []).append(i)
                for idx in by_size.values():
                    x = images_to_tensor([images[i] for i in idx]).to(device)
                    recs = [records[i] for i in idx]
                    for s in settings:
                        if s == "gt":
                            objs = [_objects(r, None, objects_cfg, categories, device) for r in recs]
                        else:
                            preds = teacher.predict(x, top_k=objects_cfg.max_detections)
                            objs = [_objects(r, pr, objects_cfg, categories, device) for r, pr in zip(recs, preds)]
                            counts[2] += sum(len(o[1]) for o in objs)
                        outs = model_predictions(model, label_map, x, [(m, cats) for m, _, cats in objs],
                                                 top_k=max(max_dets))
                        for record, (clusters, classes, props) in zip(recs, outs):
                            clustering[s].process(record, clusters, None if s == "gt" else classes)
                            recall[s].process(record, props)
            logger.advance(len(keys))

        gathered = [None] * d.world_size if d.is_main else None
        dist.gather_object((clustering, recall, counts), gathered, dst=0)  # objects: any backend, CPU state
        if not d.is_main:
            return None
        for other_clustering, other_recall, other_counts in gathered[1:]:
            counts += other_counts
            for s in settings:
                clustering[s].merge(other_clustering[s])
                recall[s].merge(other_recall[s])
        metrics: dict[str, float] = {"eval/num_images": float(counts[0])}
        if source == "labels":
            metrics["eval/images_without_labels"] = float(counts[1])
        elif "pred" in settings:
            metrics["eval/pred/objects_per_image"] = float(counts[2]) / max(float(counts[0]), 1.0)
        names = {int(c["id"]): c["name"] for c in categories}
        per_class = {}
        for s in settings:
            metrics.update({f"eval/{s}/{k}": v for k, v in clustering[s].evaluate().items()})
            metrics.update({metric_key(k).replace("eval/", f"eval/{s}/", 1): v for k, v in recall[s].evaluate().items()})
            per_class[s] = {str(c): {"name": names.get(c, str(c)), **_jsonable(v)}
                            for c, v in clustering[s].per_class().items()}
        per_class_path = write_atomic(Path(spec.outputs.workdir) / PER_CLASS_FILE,
                                      json.dumps(per_class, indent=1, sort_keys=True))
        logger.log(0, metrics)
        if spec.tracking.run_id is not None:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=spec.tracking.mlflow_uri).log_artifact(spec.tracking.run_id, str(per_class_path))
    finally:
        logger.close()
    return StageResult(metrics=metrics)


def _jsonable(v: dict) -> dict:
    return {k: ({str(pk): float(pv) for pk, pv in x.items()} if isinstance(x, dict) else float(x)) for k, x in v.items()}
