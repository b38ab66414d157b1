"""Final self-training with cluster ids as labels (PartDistillation sec. 4.3 "Final self training").

The class-specific part model ("part ranker", registered as ``partdistillation-part-ranker``): a Segmenter whose
part decoder D^p predicts one label per (object class c, cluster k) of ``rank-parts``, i.e. the class-specific
label ``offset[c] + k`` (``label_map.json`` of the rank-parts dataset). The encoder is the part model's, frozen
(sec. 4.1); the decoder starts from the part model's D^p wherever shapes agree (everything but the class head),
or from the previous round's ranker (``inputs.models.init``). Trained with the SetCriterion (Hungarian matching,
CE over the labels + no-object, mask BCE + dice). One call is one round; the pipeline loops R' rounds with
promotion, relabelling between rounds with ``rank-pseudo-label`` (below).

Inference is conditioned on the object class: a part assigned to an object (eq. 1) is scored only among the
labels of that object's class, ``r(f_i^p | c) = softmax([logits of c's clusters, no-object])``; its cluster is the
argmax and its score that probability times Mask2Former's mask quality.

Stages:
- ``train-ranker``: ``inputs.datasets.ranked_parts`` (rank-parts output, or the previous round's
  rank-pseudo-label output), ``inputs.models.parts`` (the part-proposal model), optional ``inputs.models.init``.
  Writes ``<workdir>/model.pt``: a segmenter file with ``label_map`` (the rank-parts ``label_map.json``).
  Params (besides the engine's ``TrainConfig``): ``model`` (decoder/loss/top_k overrides; ``num_classes`` is the
  label map's), ``flip_prob`` 0.5, ``round`` 1; defaults steps 200, lr 1e-3, warmup_steps 10, checkpoint_every 50.
- ``rank-pseudo-label``: the next round's labels from the ranker ``inputs.models.ranker`` on
  ``inputs.datasets.images``, with the same filters as rank-parts (score > ``score_threshold`` 0.3, at least
  ``min_part_area`` 0.05 of the object); objects ``gt`` (default) or ``detected`` (``inputs.models.instance_teacher``).
  Records as rank-parts' (``label`` = cluster id, ``score`` = the class-conditioned score); copies the label map.

Evaluation: :func:`predict_part_labels` gives per-image HxW maps of cluster ids per object for
``PartClusteringEvaluator.process(record_gt, pred_label_map, object_class_map)``; :func:`load_ranker` reads a model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from contract.spec import StageSpec
from trainers.checkpoint import write_atomic
from trainers.data import shards
from trainers.engine import init_distributed, on_gpu
from trainers.stages import StageResult
from trainers.stages.common import (
    StageInputError,
    ToTrainSample,
    _masks,
    collate,
    dataset_input,
    images_to_tensor,
    iter_batches,
    load_model_input,
    log_metrics,
    model_input_path,
    set_loss,
)
from trainers.stages.instance_teacher import deep_update
from trainers.stages.rank_parts import LABEL_MAP_FILE, RankPartsConfig, RankPartsStats, _objects, object_segments, pixel_owners
from trainers.stages.pseudo_label import _iou
from trainers.structures import encode_masks

log = logging.getLogger(__name__)

PARAM_DEFAULTS: dict = {"steps": 200, "lr": 1e-3, "warmup_steps": 10, "checkpoint_every": 50, "flip_prob": 0.5,
                        "round": 1}


@dataclass(frozen=True)
class LabelMap:
    """Class-specific part labels: object class ``c``'s cluster ``k`` is label ``offset[c] + k`` (k < num_clusters[c])."""

    offsets: dict[int, int]
    num_clusters: dict[int, int]
    doc: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_doc(cls, doc: dict) -> "LabelMap":
        """From rank-parts' ``label_map.json`` (``{"classes": [{"category_id", "num_clusters", "offset"}, ...]}``)."""
        classes = doc["classes"]
        return cls(offsets={int(c["category_id"]): int(c["offset"]) for c in classes},
                   num_clusters={int(c["category_id"]): int(c["num_clusters"]) for c in classes}, doc=doc)

    @classmethod
    def load(cls, dataset_dir: str | Path) -> "LabelMap":
        path = Path(dataset_dir) / LABEL_MAP_FILE
        try:
            return cls.from_doc(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise StageInputError(f"{path}: no readable label map (is this a rank-parts dataset?): {e}") from e

    @property
    def num_labels(self) -> int:
        return sum(self.num_clusters.values())

    def label(self, category_id: int, cluster: int) -> int | None:
        """The class-specific label, or None when the class has no such cluster."""
        c = int(category_id)
        if not 0 <= int(cluster) < self.num_clusters.get(c, 0):
            return None
        return self.offsets[c] + int(cluster)


class RankerTargets:
    """SetCriterion targets of a ranked-parts record: every proposal with label ``offset[category] + cluster``."""

    def __init__(self, label_map: LabelMap):
        self.label_map = label_map

    def __call__(self, record: dict) -> dict[str, torch.Tensor]:
        h, w = int(record["height"]), int(record["width"])
        kept = [(lab, p) for p in record.get("proposals", [])
                if (lab := self.label_map.label(p["category_id"], p["label"])) is not None]
        return {"labels": torch.tensor([lab for lab, _ in kept], dtype=torch.int64),
                "masks": _masks([p["segmentation"] for _, p in kept], h, w)}


def ranker_config(parts_cfg, label_map: LabelMap, overrides: dict):
    """The ranker's SegmenterConfig: the part model's (encoder frozen) <- ``params.model``, one label per (class, cluster)."""
    from trainers.models.config import SegmenterConfig

    if "encoder" in overrides:
        raise StageInputError("params.model.encoder: the ranker's encoder is the part model's")
    base = parts_cfg.model_dump(mode="json")
    base.pop("encoder")
    cfg = deep_update(deep_update(base, overrides),
                      {"decoder": {"num_classes": max(1, label_map.num_labels)}, "freeze_encoder": True})
    return SegmenterConfig.model_validate({**cfg, "encoder": parts_cfg.encoder.model_dump()})


def initial_state(model, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``source`` whose name and shape the model has (the part model's E and D^p but its class head)."""
    own = model.state_dict()
    return {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}


def run(spec: StageSpec) -> StageResult | None:
    """Train one round of the class-specific part model; rank 0 writes model.pt (with the label map)."""
    from trainers.engine import fit
    from trainers.models.io import read_segmenter_file, save_segmenter
    from trainers.models.segmenter import Segmenter

    params = {**PARAM_DEFAULTS, **spec.params}
    spec = spec.model_copy(update={"params": params})
    t_start = time.perf_counter()
    data = dataset_input(spec, "ranked_parts")
    lmap = LabelMap.load(data)
    if lmap.num_labels == 0:
        raise StageInputError(f"inputs.datasets.ranked_parts ({data}): no object class has a cluster (no candidates)")
    cpu = torch.device("cpu")
    parts = load_model_input(spec, "parts", cpu)
    cfg = ranker_config(parts.cfg, lmap, params.get("model") or {})
    source = parts.state_dict()
    del parts
    if "init" in spec.inputs.models:
        path = model_input_path(spec, "init")
        blob = read_segmenter_file(path)
        if LabelMap.from_doc(blob.get("label_map") or {"classes": []}) != lmap:
            raise StageInputError(f"inputs.models.init ({path}): its label map differs from the dataset's")
        source = {**source, **blob["state_dict"]}

    def build_model():
        model = Segmenter(cfg)
        model.load_state_dict(initial_state(model, source), strict=False)
        return model

    result = fit(spec, build_model=build_model, loss_fn=set_loss,
                 transform=ToTrainSample(RankerTargets(lmap), float(params["flip_prob"])), collate=collate,
                 dataset="ranked_parts")
    if not result.dist.is_main:
        return None
    model_path = Path(spec.outputs.workdir) / "model.pt"
    save_segmenter(model_path, cfg, result.state_dict, stage="train-ranker", round=int(params["round"]),
                   steps=result.steps, label_map=lmap.doc)
    metrics = {f"train/{k}": v for k, v in result.metrics.items() if k.startswith("loss")}
    metrics["ranker/num_labels"] = float(lmap.num_labels)
    metrics["time/train_s"] = time.perf_counter() - t_start
    return StageResult(metrics=metrics, model_path=str(model_path), steps=result.steps)


# -- inference conditioned on the object class ------------------------------------------------


def load_ranker(path: str | Path, device: torch.device | str = "cpu"):
    """``(Segmenter in eval mode, LabelMap)`` of a ``train-ranker`` model file."""
    from trainers.models.io import load_segmenter, read_segmenter_file

    blob = read_segmenter_file(path)
    if "label_map" not in blob:
        raise ValueError(f"{path}: not a part-ranker model (no label_map)")
    return load_segmenter(path).to(device).eval(), LabelMap.from_doc(blob["label_map"])


@torch.no_grad()
def class_conditioned_parts(logits: torch.Tensor, mask_logits: torch.Tensor, object_masks: torch.Tensor,
                            object_classes: list[int], label_map: LabelMap):
    """One image: ``(masks [N, H, W] bool, scores [N], clusters [N])`` of every query, each scored within the class
    of the object it overlaps most (eq. 1): softmax over that class's cluster logits and no-object, times mask
    quality; queries on no object (or on a class without clusters) get score 0 and cluster -1.

    ``logits [N, L+1]``, ``mask_logits [N, h, w]`` (one image of the decoder outputs), ``object_masks [J, H, W]``.
    """
    size = tuple(object_masks.shape[-2:])
    up = F.interpolate(mask_logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    masks = up > 0
    quality = (up.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    n = logits.shape[0]
    scores = torch.zeros(n, device=logits.device)
    clusters = torch.full((n,), -1, dtype=torch.int64, device=logits.device)
    if object_masks.shape[0] == 0 or n == 0:
        return masks, scores, clusters
    iou, _ = _iou(masks, object_masks)
    best, assign = iou.max(1)
    for j, c in enumerate(object_classes):
        mine = torch.nonzero((assign == j) & (best > 0))[:, 0]
        kc = label_map.num_clusters.get(int(c), 0)
        if mine.numel() == 0 or kc == 0:
            continue
        off = label_map.offsets[int(c)]
        sub = torch.cat([logits[mine, off: off + kc], logits[mine, -1:]], dim=1).float().softmax(-1)[:, :kc]
        p, k = sub.max(1)
        scores[mine] = p * quality[mine]
        clusters[mine] = k
    return masks, scores, clusters


@torch.no_grad()
def predict_part_labels(model, images: torch.Tensor, object_masks: list[torch.Tensor],
                        object_classes: list[list[int]], label_map: LabelMap) -> list[np.ndarray]:
    """Part cluster ids per pixel for evaluation (PartDistillation sec. 5.1, "GT object" setting).

    ``images [B, 3, H, W]``; per image ``object_masks[b]`` bool ``[J, H, W]`` and ``object_classes[b]`` their J
    category ids. Returns per image an ``H x W`` int64 map: inside each object, the cluster id (< k_c of the
    object's class) of the part that owns the pixel (``argmax_i M_i(x) s_i`` over the parts assigned to the object,
    scored within its class), -1 elsewhere (background, objects of classes without clusters, uncovered pixels).
    Later objects paint over earlier ones. The object-class map for ``PartClusteringEvaluator.process`` is the one
    the objects paint (``paint_label_map(object RLEs, classes, H, W)``), or None for GT objects.
    """
    outputs = model(images.to(next(model.parameters()).device))
    out = []
    for b in range(images.shape[0]):
        om = object_masks[b].to(outputs["pred_masks"].device).bool()
        masks, scores, clusters = class_conditioned_parts(outputs["pred_logits"][b], outputs["pred_masks"][b], om,
                                                          list(object_classes[b]), label_map)
        owners = pixel_owners(masks, scores, om)
        labels = torch.full(tuple(om.shape[-2:]), -1, dtype=torch.int64, device=om.device)
        for j in range(om.shape[0]):
            sel = owners[j] >= 0
            labels[sel] = clusters[owners[j][sel]]
            labels[om[j] & ~sel] = -1
        out.append(labels.cpu().numpy())
    return out


def relabel(model, images: torch.Tensor, objects: list[tuple[torch.Tensor, list, list[int]]], label_map: LabelMap,
            score_threshold: float = 0.3, min_part_area: float = 0.05,
            stats: RankPartsStats | None = None) -> list[list[dict]]:
    """The next round's pseudo-labels (sec. 4.3: "the same postprocessing step (area and score thresholds)").

    ``objects[b] = (masks [J, H, W], object ids, category ids)``. Returns per image the proposals
    ``{"object_id", "category_id", "segmentation", "area", "label": cluster, "score", "query"}``.
    """
    with torch.no_grad():
        outputs = model(images.to(next(model.parameters()).device))
    result = []
    for b, (om, ids, cats) in enumerate(objects):
        om = om.to(outputs["pred_masks"].device).bool()
        masks, scores, clusters = class_conditioned_parts(outputs["pred_logits"][b], outputs["pred_masks"][b], om,
                                                          list(cats), label_map)
        if stats is not None:
            stats.predicted += int(masks.shape[0])
        proposals = []
        for j, segs in enumerate(object_segments(masks, scores, om, score_threshold, min_part_area, stats)):
            if stats is not None:
                stats.objects_without_candidates += not segs
            if not segs:
                continue
            rles = encode_masks(torch.stack([s for _, s in segs]).cpu().numpy())
            proposals += [{"object_id": ids[j], "category_id": int(cats[j]), "segmentation": rle,
                           "area": int(seg.sum()), "label": int(clusters[i]), "score": round(float(scores[i]), 6),
                           "query": int(i)} for (i, seg), rle in zip(segs, rles)]
        if stats is not None:
            stats.labelled += len(proposals)
        result.append(proposals)
    return result


def _relabel_fingerprint(spec: StageSpec, cfg: RankPartsConfig, d) -> str:
    """What a rank's relabelled part depends on: input shards, model files, params, (rank, world size)."""
    import hashlib

    from trainers.stages.pseudo_label import _file_sha256

    names = ["ranker"] + (["instance_teacher"] if cfg.objects == "detected" else [])
    doc = {"images": [s["sha256"] for s in shards.DatasetIndex.load(spec.inputs.datasets["images"].path).shards],
           "models": {n: _file_sha256(model_input_path(spec, n)) for n in names}, "params": dataclasses.asdict(cfg),
           "rank": d.rank, "world_size": d.world_size}
    return "rank-pseudo-label:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def run_relabel(spec: StageSpec) -> StageResult | None:
    """Stage ``rank-pseudo-label``: this rank's share relabelled by the ranker into ``<out>/rank-<r>``; rank 0 merges."""
    cfg = RankPartsConfig.from_params(spec.params)
    out = spec.outputs.dataset
    if not out:
        raise StageInputError("stage 'rank-pseudo-label' needs outputs.dataset (where the pseudo-labels go)")
    images_path = dataset_input(spec, "images")
    d = init_distributed(on_gpu(spec))
    t0 = time.perf_counter()
    model, lmap = load_ranker(model_input_path(spec, "ranker"), d.device)
    teacher = load_model_input(spec, "instance_teacher", d.device) if cfg.objects == "detected" else None
    index = shards.DatasetIndex.load(images_path)
    stats = RankPartsStats()

    def samples():
        for keys, blobs, records in iter_batches(images_path, cfg.batch_size, rank=d.rank, world_size=d.world_size,
                                                 decode=False):
            images = images_to_tensor([shards.decode_image(b, key=k) for k, b in zip(keys, blobs)]).to(d.device)
            with torch.no_grad():
                object_preds = teacher.predict(images, top_k=cfg.max_detections) if teacher is not None else None
            objects = [_objects(r, None if object_preds is None else object_preds[b], cfg, index.categories, d.device)
                       for b, r in enumerate(records)]
            stats.images += len(keys)
            stats.objects += sum(len(o[1]) for o in objects)
            for key, blob, record, props in zip(keys, blobs, records,
                                                relabel(model, images, objects, lmap, cfg.score_threshold,
                                                        cfg.min_part_area, stats)):
                yield key, blob, {**{k: v for k, v in record.items() if k not in ("parts", "proposals")},
                                  "proposals": props}

    part = shards.part_dir(out, d.rank)
    source = _relabel_fingerprint(spec, cfg, d)
    done = part / "rank_pseudo_label.json"
    try:
        skip = shards.DatasetIndex.load(part).source == source and done.is_file()
    except shards.DataError:
        skip = False
    if skip:  # a rerun for the same inputs and params: this rank's part is complete
        stats = RankPartsStats(**json.loads(done.read_text()))
    else:
        done.unlink(missing_ok=True)
        shards.write_dataset(samples(), part, name=f"{index.name}-ranked-parts", split=index.split,
                             categories=index.categories, shard_size=cfg.shard_size, source=source)
        write_atomic(done, json.dumps(dataclasses.asdict(stats)))
    gathered = [dataclasses.asdict(stats)]
    if dist.is_initialized() and d.world_size > 1:
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, dataclasses.asdict(stats))
    metrics: dict[str, float] = {}
    if d.is_main:
        total = RankPartsStats()
        for g in gathered:
            total.add(RankPartsStats(**g))
        shards.merge_parts(out, d.world_size, name=f"{index.name}-ranked-parts")
        write_atomic(Path(out) / LABEL_MAP_FILE, json.dumps(lmap.doc, indent=1))
        metrics = {f"rank_pseudo_label/{k}": float(v) for k, v in dataclasses.asdict(total).items()
                   if k not in ("candidates", "dropped_bad_feature")}
        metrics["time/wall_s"] = time.perf_counter() - t0
        log_metrics(spec, metrics)
    if dist.is_initialized():
        dist.barrier()
    if not d.is_main:
        return None
    return StageResult(metrics=metrics, dataset_path=str(out))
