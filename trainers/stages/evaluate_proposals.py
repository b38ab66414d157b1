"""Stage ``evaluate-proposals``: class-agnostic part AR@k against held-out part masks (PartDistillation sec. 5.1).

Ground truth: ``datasets["eval"]`` (an evaluation split with ``parts``). The proposals come from exactly one of:

- ``datasets["proposals"]``: a dataset whose records carry ``proposals`` (e.g. ``mine-parts`` run on the eval
  images with ``allow_parts: true``), matched to the eval records by key (a missing key: no proposals);
- ``models["parts"]`` (or ``models["candidate"]``, the runner's evaluation convention): a part model run on the
  eval images, its top ``top_k`` (200) masks by score;
- ``params.baseline: "strips"``: every instance cut into ``k`` equal-area strips along its major axis
  (``trainers.evaluation.strip_proposals``), instances from ``params.objects``: ``"gt"`` (the records' objects)
  or ``"detected"`` (``models["teacher"]``'s detections with score > ``score_threshold``), as in ``mine-parts``.
  Strip score: the strip's share of the image (``strip_record``).

Ground truth (``params.reference``): ``parts``, the eval records' part masks; or ``pseudo_labels``, the eval records'
``proposals`` standing in as parts (a teacher's pseudo-labels on held-out images with no part labels, e.g.
``mine-parts`` run on them: the label-free selection criterion; an eval dataset with part labels is refused).

Predictions as files (``outputs.dataset``, versioned with DVC by the runner; ``proposals.json`` logged on the stage's
MLflow run): ``images.json`` (image ids -> dataset keys, the k of AR@k, clipping, reference) and ``proposals.json``
(COCO results: image_id, category_id 1, RLE segmentation, score), written by rank 0 after gathering every rank's
share; ``trainers.evaluation.proposals.score_proposal_results`` re-scores them to the same AR@k.

Params: ``python -m trainers evaluate-proposals --help``.

Metrics. MLflow metric names may not contain ``@``, so ``AR@k`` is written ``AR_k``:
``eval/AR_1``, ``eval/AR_10``, ``eval/AR_50``, ``eval/AR_100``, ``eval/AR_200`` (mean recall over IoU
0.50:0.05:0.95, greedy max-overlap matching: ``PartProposalRecall``), ``eval/R50_<k>`` (recall at IoU 0.5),
``eval/coco_AR_1``, ``eval/coco_AR_10``, ``eval/coco_AR_100``, ``eval/coco_AP``, ``eval/coco_AP50``
(``coco_proposal_ar``), ``eval/num_parts``, ``eval/num_images``, ``eval/proposals_per_image``,
``eval/images_without_proposals``. The promotion metric of part-proposal models is ``eval/AR_10``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from contract.io import write_json
from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import init_distributed
from trainers.data import shards
from trainers.data.batches import at_input_size, images_to_tensor, iter_batches
from trainers.engine import MetricLogger
from trainers.evaluation import PartProposalRecall, coco_proposal_ar, strip_record
from trainers.evaluation.baselines import strip_proposals_of_masks
from trainers.evaluation.proposals import (COCO_MAX_DETS, metric_key, reference_record, stored_proposals,
                                           write_proposal_results)
from trainers.inputs import StageInputError, dataset_input, load_model_input, output_dataset, stage_device
from trainers.stages import StageResult
from trainers.structures import encode_masks


def source_of(spec: StageSpec, baseline: str | None) -> str:
    """Which proposals the spec evaluates: ``proposals`` | ``model`` | ``strips`` (exactly one must be given)."""
    found = []
    if "proposals" in spec.inputs.datasets:
        found.append("proposals")
    if "parts" in spec.inputs.models or "candidate" in spec.inputs.models:
        found.append("model")
    if baseline is not None:
        found.append("strips")
    if len(found) != 1:
        raise ValueError("evaluate-proposals needs exactly one source of proposals: inputs.datasets.proposals, "
                         f"inputs.models.parts (or candidate), or params.baseline: strips; got {found or 'none'}")
    return found[0]


def run(spec: StageSpec) -> StageResult | None:
    """AR@k of this rank's share of the eval records; counts summed on rank 0 (COCOeval over all masks there)."""
    p = params_of(spec)
    source = source_of(spec, p.baseline)
    k, objects, score_threshold, max_detections = p.k, p.objects, p.score_threshold, p.max_detections
    max_dets, top_k = p.max_dets, p.top_k or max(p.max_dets)
    batch_size, clip, use_coco = p.batch_size, p.clip_to_objects, p.coco

    device = stage_device(spec)
    d = init_distributed(device.type == "cuda")
    eval_path = dataset_input(spec, "eval")
    out = output_dataset(spec)
    with_parts = p.reference == "parts"
    if not with_parts and shards.DatasetIndex.load(eval_path).has_parts:
        raise StageInputError(f"inputs.datasets.eval ({eval_path}): has part labels; reference: pseudo_labels (the "
                              "label-free criterion) reads held-out images without them")
    model = None
    if source == "model":
        model = load_model_input(spec, "parts" if "parts" in spec.inputs.models else "candidate", device)
    elif source == "strips" and objects == "detected":
        model = load_model_input(spec, "teacher", device)
    model = at_input_size(model, p)  # predictions come back at the eval images' resolution
    stored = None
    if source == "proposals":
        keys = {key for key, _, _ in shards.iter_samples(eval_path, rank=d.rank, world_size=d.world_size,
                                                         decode=False, allow_parts=True)}
        stored = stored_proposals(dataset_input(spec, "proposals"), keys)

    recall = PartProposalRecall(max_dets=max_dets, clip_to_objects=clip)
    gathered: list[tuple[dict, list[dict]]] = []  # (GT parts record, proposals) for COCOeval
    written: list[tuple[dict, list[dict]]] = []  # (image, proposals) for the results files
    counts = torch.zeros(3, dtype=torch.float64)  # images, proposals, images without proposals
    total = shards.num_samples_for(eval_path, rank=d.rank, world_size=d.world_size)
    logger = MetricLogger(spec, d.is_main, total=total, initial=0)
    try:
        for keys, images, records in iter_batches(eval_path, batch_size, rank=d.rank, world_size=d.world_size,
                                                  allow_parts=with_parts):
            preds = predict(source, model, keys, images, records, stored, k=k, objects=objects,
                            score_threshold=score_threshold, max_detections=max_detections, top_k=top_k,
                            device=device)
            for key, record, props in zip(keys, records, preds):
                record = reference_record(record, p.reference)
                recall.process(record, props)
                written.append(({"key": key, "height": record["height"], "width": record["width"]},
                                [{"segmentation": q["segmentation"], "score": float(q.get("score", 1.0))} for q in props]))
                counts += torch.tensor([1.0, len(props), float(not props)], dtype=torch.float64)
                if use_coco:
                    lite = {k_: record[k_] for k_ in ("height", "width", "objects", "parts") if k_ in record}
                    gathered.append((lite, [{"segmentation": q["segmentation"], "score": q.get("score", 1.0)}
                                            for q in props]))
            logger.advance(len(keys))

        hits = torch.from_numpy(recall.hits).to(torch.float64)
        nparts = torch.tensor([float(recall.num_parts)], dtype=torch.float64)
        for t in (hits, nparts, counts):
            dist.all_reduce(t)
        everything = [None] * d.world_size if d.is_main else None
        if use_coco:
            dist.gather_object(gathered, everything, dst=0)
        files = [None] * d.world_size if d.is_main else None
        dist.gather_object(written, files, dst=0)
        if not d.is_main:
            return None
        recall.hits = hits.round().to(torch.int64).numpy()
        recall.num_parts = int(nparts.item())
        metrics = {metric_key(name): v for name, v in recall.evaluate().items()}
        if use_coco:
            pairs = [pair for part in everything for pair in part]
            coco_dets = [m for m in COCO_MAX_DETS if m <= max(max_dets)] or list(max_dets[:1])
            coco = coco_proposal_ar([g for g, _ in pairs], [q for _, q in pairs], max_dets=coco_dets,
                                    clip_to_objects=clip)
            metrics.update({metric_key(name): v for name, v in coco.items()})
        n_images = float(counts[0])
        metrics["eval/num_images"] = n_images
        metrics["eval/proposals_per_image"] = float(counts[1]) / max(n_images, 1.0)
        metrics["eval/images_without_proposals"] = float(counts[2])
        pairs = [pair for part in files for pair in part]
        results = write_proposal_results(out, [im for im, _ in pairs], [q for _, q in pairs], max_dets, clip, p.reference)
        write_json(out / "metrics.json", metrics)
        logger.log(0, metrics)
        _log_artifact(spec, results["proposals.json"])
    finally:
        logger.close()
    return StageResult(metrics=metrics, dataset_path=str(out))


def _log_artifact(spec: StageSpec, path: str) -> None:
    if spec.tracking.run_id is None:
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=spec.tracking.mlflow_uri).log_artifact(spec.tracking.run_id, path, "predictions")


@torch.no_grad()
def predict(source: str, model, keys, images, records, stored, *, k: int, objects: str, score_threshold: float,
            max_detections: int, top_k: int, device: torch.device) -> list[list[dict]]:
    """The proposals (``{"segmentation", "score", ...}``) of one batch of eval images, by source."""
    if source == "proposals":
        return [stored.get(key, []) for key in keys]
    if source == "strips" and objects == "gt":
        return [strip_record(record, k) for record in records]
    out: list[list[dict]] = [[] for _ in keys]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):  # eval images may differ in size: one forward per size, never padded
        by_size.setdefault(image.shape[:2], []).append(i)
    for (h, w), idx in by_size.items():
        x = images_to_tensor([images[i] for i in idx]).to(device)
        preds = model.predict(x, top_k=top_k if source == "model" else max_detections)
        for i, pred in zip(idx, preds):
            if source == "model":
                rles = encode_masks(pred.masks.cpu().numpy())
                out[i] = [{"segmentation": r, "score": float(s)} for r, s in zip(rles, pred.scores.tolist())]
            else:  # strips of detected instances
                keep = pred.scores > score_threshold
                out[i] = strip_proposals_of_masks(pred.masks[keep].cpu().numpy(), h, w, k)
    return out
