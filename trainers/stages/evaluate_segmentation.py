"""Stage ``evaluate-segmentation``: a LUSS model scored on one split (PASS sec. 3.2 and supplementary 7.1).

Two passes over ``inputs.datasets.eval``, each rank its share:

1. **predict** -- the predictor (``trainers.luss.predict``: the candidate's segmentation head; the rule of
   ``inputs.datasets.labels`` applied with the candidate; or, ``protocol: distance_matching``, a vote of category
   embeddings from ``inputs.datasets.labeled``) labels every image; the label maps are written to
   ``<out>/predictions/<file_name>.png`` in ImageNet-S's encoding (id = R + 256 G; 0 'other', generated ids 1..K),
   and the image-level matching matrix (eq. 1) and the pixel confusion matrix are summed over ranks.
2. **score** -- the mapping is fixed (fully unsupervised: Hungarian on the matching matrix, 'other' to 'other';
   distance matching and semi-supervised: the labels already are ground-truth ids) and every prediction is re-read,
   mapped and scored against the ground truth painted from the records' objects (``semantic_map``: the object
   classes are the categories, the rest 'other'): mIoU ('other' included), boundary mIoU, Img-Acc, F-beta
   (beta^2 = 0.3) and mIoU per object size (``trainers.evaluation.semantic.LussScores``). The mapped maps go to
   ``<out>/matched/`` in ground-truth category ids, what the benchmark's ``evaluator.py`` scores as it is.

Rank 0 writes ``<out>/match.json`` (generated id -> category id, the protocol) and ``<out>/metrics.json`` (with
per-class IoU); the metrics (``luss/*``, fractions in [0, 1]) are the stage's result, so a promotion rule reads
e.g. ``luss/miou`` -- on a val split only. Params: ``python -m trainers evaluate-segmentation --help``.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from contract.io import write_json
from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import all_reduce_sum, barrier, init_distributed, on_gpu
from trainers.data import shards
from trainers.data.batches import images_to_tensor, iter_same_size
from trainers.data.imagenet_s import IGNORE_LABEL, class_indices, decode_label_png, semantic_map, write_label_png
from trainers.evaluation.semantic import Confusion, LussScores, MatchingMatrix, apply_mapping, image_level_matching, score
from trainers.inputs import StageInputError, dataset_input, log_metrics, model_input_path, output_dataset
from trainers.luss.labels import LabelRule
from trainers.luss.model import RepresentationFileError, read_model_file
from trainers.luss.predict import DistancePredictor, HeadPredictor, RulePredictor
from trainers.stages import StageResult

log = logging.getLogger(__name__)


def predictor_for(spec: StageSpec, p, num_gt: int, device):
    """The protocol's predictor from the spec's inputs (see the module doc); StageInputError names a missing one."""
    try:
        doc = read_model_file(model_input_path(spec, "candidate"))
    except RepresentationFileError as e:
        raise StageInputError(f"inputs.models.candidate: {e}") from e
    if p.protocol == "distance_matching":
        return DistancePredictor(doc, dataset_input(spec, "labeled"), num_gt, p.top_k, p.upsample, device, p.batch_size)
    labels = spec.inputs.datasets.get("labels")
    if labels is not None:
        try:
            rule, centroids = LabelRule.load(labels.path)
            return RulePredictor(doc, rule, centroids, device)
        except ValueError as e:
            raise StageInputError(f"inputs.datasets.labels: {e}") from e
    if "segmentation_head" not in doc["extra"]:
        raise StageInputError(f"inputs.models.candidate: a {doc.get('stage')} file has no segmentation head; give "
                              "inputs.datasets.labels to evaluate a label rule with it")
    head = HeadPredictor(doc, device)
    if p.protocol == "semi_supervised" and head.num_labels != num_gt:
        raise StageInputError(f"inputs.models.candidate: semi_supervised needs a model of the {num_gt - 1} ground-truth "
                              f"categories + 'other', it has {head.num_labels} outputs")
    return head


def prediction_name(key: str, record: dict) -> str:
    """Where an image's prediction goes: its file name (the benchmark's layout), else its key."""
    return str(record.get("file_name") or f"{key}.png")


def run(spec: StageSpec) -> StageResult | None:
    p = params_of(spec)
    d = init_distributed(on_gpu(spec))
    t0 = time.perf_counter()
    path = dataset_input(spec, "eval")
    categories = shards.DatasetIndex.load(path).categories
    classes = class_indices(categories)
    num_gt = len(categories) + 1
    out = output_dataset(spec)
    predictions, matched = out / "predictions", out / "matched"
    predictor = predictor_for(spec, p, num_gt, d.device)
    if p.protocol != "fully_unsupervised" and predictor.num_labels != num_gt:
        raise StageInputError(f"protocol {p.protocol} scores ground-truth ids; the predictor has {predictor.num_labels} labels")

    # pass 1: predict, write, count the matching matrix and the pixel confusion
    matcher = MatchingMatrix(predictor.num_labels, num_gt, ignore=IGNORE_LABEL)
    confusion = Confusion(predictor.num_labels, num_gt, ignore=IGNORE_LABEL)
    for group in iter_same_size(path, p.batch_size, rank=d.rank, world_size=d.world_size, allow_parts=True):
        maps = predictor(images_to_tensor([g[2] for g in group]).to(d.device)).cpu().numpy()
        for (key, _, _, record), m in zip(group, maps):
            gt = semantic_map(record, classes)
            matcher.add(m, gt)
            confusion.add(m, gt)
            write_label_png(predictions, prediction_name(key, record), m)
    counts = np.rint(all_reduce_sum(matcher.counts.ravel().tolist())).astype(np.int64).reshape(matcher.counts.shape)
    pixels = np.rint(all_reduce_sum(confusion.counts.ravel().tolist())).astype(np.int64).reshape(confusion.counts.shape)
    if p.protocol == "fully_unsupervised":
        mapping = image_level_matching(counts)
    else:
        mapping = np.arange(num_gt, dtype=np.int64)

    # pass 2: re-read, map, score; matched maps in category ids
    scores = LussScores(num_gt, p.boundary_ratio, ignore=IGNORE_LABEL)
    to_category = np.array([0] + [int(c["id"]) for c in categories], dtype=np.int64)
    for key, _, record in shards.iter_samples(path, rank=d.rank, world_size=d.world_size, decode=False, allow_parts=True):
        name = prediction_name(key, record)
        raw = decode_label_png((predictions / name).with_suffix(".png"))
        mapped = apply_mapping(raw, mapping)
        scores.add(mapped, semantic_map(record, classes), raw_foreground=raw != 0)
        write_label_png(matched, name, to_category[np.where(mapped < 0, 0, mapped)])
    scores.load_state(all_reduce_sum(scores.state().tolist()))

    if not d.is_main:
        barrier()
        return None
    r = scores.result()
    metrics = {f"luss/{k}": v for k, v in r.items() if not k.startswith("iou_")}
    metrics["luss/miou_pixel_matching"] = score(pixels, "hungarian").miou  # pixel-level Hungarian, 'other' free (reference)
    metrics["luss/generated_categories"] = float(predictor.num_labels - 1)
    metrics["luss/unmatched_categories"] = float((mapping[1:] < 0).sum())
    metrics["time/eval_s"] = time.perf_counter() - t0
    write_json(out / "match.json", {"protocol": p.protocol, "mapping": {str(i): int(to_category[m]) if m >= 0 else None
                                                                       for i, m in enumerate(mapping)},
                                    "categories": categories, "matching_matrix": counts.tolist()}, indent=None)
    write_json(out / "metrics.json", {**metrics, "per_class_iou": {categories[int(k[4:]) - 1]["name"]: v for k, v in r.items()
                                                                   if k.startswith("iou_")}})
    log_metrics(spec, metrics)
    log.info("%s: mIoU %.3f, b-mIoU %.3f, Img-Acc %.3f, F-beta %.3f on %d images (%s)", spec.name, r["miou"],
             r["boundary_miou"], r["img_acc"], r["fbeta"], int(r["images"]), p.protocol)
    barrier()
    return StageResult(metrics=metrics, dataset_path=str(out))
