"""Stage ``evaluate-parts``: class-specific part segmentation against held-out part masks (PartDistillation sec. 5.1,
Tables 2-3).

Ground truth: ``datasets["eval"]`` (an evaluation split with ``parts``). The predictions come from exactly one of:

- ``models["candidate"]`` (or ``models["ranker"]``): a ``train-ranker`` model, run on the eval images conditioned on
  the objects of each setting (``trainers.parts.ranking.predict_part_labels`` for the cluster-id
  maps, ``class_conditioned_parts`` for the scored part masks of AR);
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
``eval/num_images``, ``eval/pred/objects_per_image`` (detections kept). The pipeline promotes on ``eval/gt/miou``.

Ground truth (``params.reference``): ``parts``, the eval records' part masks; or ``pseudo_labels``, the eval records'
``proposals`` with their cluster ids standing in as part categories (a pseudo-labeller's clusters on held-out images
with no part labels, e.g. ``rank-parts`` run on them: the label-free selection criterion, best read through the
permutation-free NMI; an eval dataset with part labels is refused).

Predictions as files (``outputs.dataset``, versioned with DVC by the runner; the results files logged on the stage's
MLflow run), written by rank 0 after gathering every rank's share (``trainers.evaluation.part_predictions``):
``images.json``, per setting ``results-<s>.json`` (COCO results of disjoint segments, one per (object, object class,
cluster): image_id, category_id of the (class, cluster) label, object_class, cluster, object, RLE, score) and
``proposals-<s>.json`` (the AR@k part masks with scores), ``objects-pred.json`` (the detections the pred setting
conditions on), ``metrics.json``. The metrics are computed from exactly those segments, so
``score_part_results`` re-scores the files to the reported numbers.

Per-class values (NMI, ARI, mIoU both ways, IoU per part, by class id and name) go to
``<workdir>/per_class.json`` (also an artifact of the stage's MLflow run): ``{"gt": {"<class id>": {...}},
"pred": {...}}``.

Params: ``python -m trainers evaluate-parts --help``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from contract.io import write_atomic, write_json
from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import Dist, init_distributed
from trainers.data import shards
from trainers.data.batches import at_input_size, images_to_tensor, iter_batches
from trainers.engine import MetricLogger
from trainers.evaluation import PartClusteringEvaluator, PartProposalRecall
from trainers.evaluation.clustering import NONE, paint_label_map
from trainers.evaluation.part_predictions import (encode_segments, jsonable, labels_predictions,
                                                  ranker_file_predictions, score_part_prediction, write_part_results)
from trainers.evaluation.proposals import metric_key, reference_record, stored_proposals
from trainers.inputs import (StageInputError, dataset_input, load_model_input, model_input_path, output_dataset,
                             stage_device)
from trainers.models.io import load_ranker
from trainers.parts.objects import image_objects
from trainers.stages import StageResult

PER_CLASS_FILE = "per_class.json"


def source_of(spec: StageSpec) -> str:
    """``model`` or ``labels``: exactly one source of part predictions must be given."""
    found = [s for s, ok in (("model", "candidate" in spec.inputs.models or "ranker" in spec.inputs.models),
                             ("labels", "labels" in spec.inputs.datasets)) if ok]
    if len(found) != 1:
        raise StageInputError("evaluate-parts needs exactly one source of part predictions: inputs.models.candidate "
                              f"(a train-ranker model) or inputs.datasets.labels (a labels dataset); got {found or 'none'}")
    return found[0]


class _Sources:
    """What the predictions come from: a ranker (+ the teacher of the pred setting) or a labels dataset."""

    def __init__(self, spec: StageSpec, p, d: Dist, device: torch.device, eval_path: str):
        self.kind = source_of(spec)
        self.model = self.label_map = self.teacher = self.stored = None
        if self.kind == "model":
            name = "candidate" if "candidate" in spec.inputs.models else "ranker"
            try:
                self.model, self.label_map = load_ranker(model_input_path(spec, name), device)
                self.model = at_input_size(self.model, p)  # answers at the eval images' resolution
            except ValueError as e:
                raise StageInputError(f"inputs.models.{name}: {e}") from e
            if "pred" in p.settings:
                if "instance_teacher" not in spec.inputs.models:
                    raise StageInputError("evaluate-parts of a model without GT objects (settings: pred) needs "
                                          "inputs.models.instance_teacher; or set params.settings: [gt]")
                self.teacher = at_input_size(load_model_input(spec, "instance_teacher", device), p)
        else:
            keys = {key for key, _, _ in shards.iter_samples(eval_path, rank=d.rank, world_size=d.world_size,
                                                             decode=False, allow_parts=True)}
            self.stored = stored_proposals(dataset_input(spec, "labels"), keys)


class _Evaluators:
    """Per setting a clustering and a recall evaluator, plus counts: images, images missing from the labels
    dataset, detections kept."""

    def __init__(self, p):
        self.settings = p.settings
        self.clustering = {s: PartClusteringEvaluator() for s in p.settings}
        self.recall = {s: PartProposalRecall(max_dets=p.max_dets, clip_to_objects=(s == "gt")) for s in p.settings}
        self.counts = torch.zeros(3, dtype=torch.float64)
        self.written: list[tuple[dict, dict[str, dict]]] = []  # (image, setting -> prediction) for the files

    def score(self, key: str, record: dict, predictions: dict[str, dict], gt_objects: bool) -> None:
        """Score one image's predictions (per setting) from their file form, and keep them for the files."""
        for s, pred in predictions.items():
            score_part_prediction(self.clustering[s], self.recall[s], record, pred, gt_objects=gt_objects and s == "gt")
        self.written.append(({"key": key, "height": record["height"], "width": record["width"]}, predictions))

    def merge(self, other: "_Evaluators") -> None:
        self.counts += other.counts
        self.written += other.written
        for s in self.settings:
            self.clustering[s].merge(other.clustering[s])
            self.recall[s].merge(other.recall[s])


def run(spec: StageSpec) -> StageResult | None:
    """NMI/ARI/mIoU and AR@k of this rank's share of the eval split per setting; summed and reported on rank 0."""
    p = params_of(spec)
    source_of(spec)
    device = stage_device(spec)
    d = init_distributed(device.type == "cuda")
    eval_path = dataset_input(spec, "eval")
    out = output_dataset(spec)
    index = shards.DatasetIndex.load(eval_path)
    if p.reference == "pseudo_labels" and index.has_parts:
        raise StageInputError(f"inputs.datasets.eval ({eval_path}): has part labels; reference: pseudo_labels (the "
                              "label-free criterion) reads held-out images without them")
    categories = index.categories
    src = _Sources(spec, p, d, device, eval_path)
    ev = _Evaluators(p)
    logger = MetricLogger(spec, d.is_main, total=shards.num_samples_for(eval_path, rank=d.rank, world_size=d.world_size),
                          initial=0)
    try:
        for keys, images, records in iter_batches(eval_path, p.batch_size, rank=d.rank, world_size=d.world_size,
                                                  allow_parts=p.reference == "parts"):
            ev.counts[0] += len(keys)
            records = [reference_record(r, p.reference) for r in records]
            if src.kind == "labels":
                _process_labels(ev, src, keys, records)
            else:
                _process_model(ev, src, p, keys, images, records, categories, device)
            logger.advance(len(keys))
        gathered = [None] * d.world_size if d.is_main else None
        dist.gather_object(ev, gathered, dst=0)  # objects: any backend, CPU state
        if not d.is_main:
            return None
        for other in gathered[1:]:
            ev.merge(other)
        metrics, per_class = _metrics(ev, src.kind, categories)
        per_class_path = write_atomic(Path(spec.outputs.workdir) / PER_CLASS_FILE,
                                      json.dumps(per_class, indent=1, sort_keys=True))
        files = write_part_results(out, [im for im, _ in ev.written],
                                   {s: [preds[s] for _, preds in ev.written] for s in p.settings}, categories,
                                   p.max_dets, gt_class_map=["gt"] if src.kind == "model" else [])
        write_json(out / "metrics.json", metrics)
        logger.log(0, metrics)
        if spec.tracking.run_id is not None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=spec.tracking.mlflow_uri)
            client.log_artifact(spec.tracking.run_id, str(per_class_path))
            for name, path in files.items():
                if name.startswith(("results-", "images")):
                    client.log_artifact(spec.tracking.run_id, path, "predictions")
    finally:
        logger.close()
    return StageResult(metrics=metrics, dataset_path=str(out))


def _process_labels(ev: _Evaluators, src: _Sources, keys, records) -> None:
    ev.counts[1] += sum(key not in src.stored for key in keys)
    for key, record in zip(keys, records):
        stored = src.stored.get(key, [])
        objects = _label_objects(record, stored)
        preds = {}
        for s in ev.settings:
            clusters, classes, props = labels_predictions(record, stored, s)
            preds[s] = {"segments": encode_segments(clusters, classes, objects), "proposals": props}
        ev.score(key, record, preds, gt_objects=False)


def _label_objects(record: dict, proposals: list[dict]):
    """HxW index (into the record's objects) of the object each labelled proposal pixel belongs to, painted as the
    cluster map is (higher score wins); -1 where none or unknown."""
    index = {o.get("id"): j for j, o in enumerate(record.get("objects", []))}
    usable = [q for q in proposals if q.get("label") is not None and int(q["label"]) >= 0 and q.get("category_id") is not None]
    return paint_label_map([q["segmentation"] for q in usable], [index.get(q.get("object_id"), NONE) for q in usable],
                           int(record["height"]), int(record["width"]), [float(q.get("score", 1.0)) for q in usable])


def _process_model(ev: _Evaluators, src: _Sources, p, keys, images, records, categories, device) -> None:
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):  # one forward per image size, never padded
        by_size.setdefault(image.shape[:2], []).append(i)
    for idx in by_size.values():
        x = images_to_tensor([images[i] for i in idx]).to(device)
        recs = [records[i] for i in idx]
        preds: list[dict[str, dict]] = [{} for _ in idx]
        for s in ev.settings:
            if s == "gt":
                objs = [image_objects(r, None, p.object_score_threshold, categories, device) for r in recs]
            else:
                dets = src.teacher.predict(x, top_k=p.max_detections)
                objs = [image_objects(r, pr, p.object_score_threshold, categories, device, p.object_nms_iou)
                        for r, pr in zip(recs, dets)]
                ev.counts[2] += sum(len(o[1]) for o in objs)
            for b, pred in enumerate(ranker_file_predictions(src.model, src.label_map, x, [(m, cats) for m, _, cats in objs],
                                                             top_k=max(p.max_dets), with_objects=s == "pred",
                                                             soft=p.pixel_assignment == "soft")):
                preds[b][s] = pred
        for b, i in enumerate(idx):
            ev.score(keys[i], records[i], preds[b], gt_objects=True)


def _metrics(ev: _Evaluators, kind: str, categories: list[dict]) -> tuple[dict[str, float], dict]:
    """The reported metrics and the per-class values (``per_class.json``) of the merged evaluators."""
    metrics: dict[str, float] = {"eval/num_images": float(ev.counts[0])}
    if kind == "labels":
        metrics["eval/images_without_labels"] = float(ev.counts[1])
    elif "pred" in ev.settings:
        metrics["eval/pred/objects_per_image"] = float(ev.counts[2]) / max(float(ev.counts[0]), 1.0)
    names = {int(c["id"]): c["name"] for c in categories}
    per_class = {}
    for s in ev.settings:
        metrics.update({f"eval/{s}/{k}": v for k, v in ev.clustering[s].evaluate().items()})
        metrics.update({metric_key(k).replace("eval/", f"eval/{s}/", 1): v for k, v in ev.recall[s].evaluate().items()})
        per_class[s] = {str(c): {"name": names.get(c, str(c)), **jsonable(v)}
                        for c, v in ev.clustering[s].per_class().items()}
    return metrics, per_class
