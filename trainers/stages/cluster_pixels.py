"""Stage ``cluster-pixels``: the one-stage self-training baseline's labels (PartDistillation sec. 5, baseline (2)).

Per object class, k-means (k=8) over the **pixels** of all instances of that class across the dataset, then every
pixel of every instance takes its nearest class centroid: a labels dataset that ``train-ranker`` self-trains on,
exactly as it does on ``rank-parts``' output. Pixel features are ``mine-parts``' (multi-scale, L2-normalised,
sampled at pixel centres: ``trainers.parts.mining.point_features``).

Inputs: ``datasets["images"]`` (shards with object labels) and ``models["teacher"]`` (the instance teacher: its pixel
features, and its detections as the instances unless ``objects: gt``). Output: ``outputs.dataset``, every input
record plus ``proposals``: per instance, one entry per cluster id present in it, ``{"object_id", "segmentation",
"score", "area", "label": cluster id, "category_id", "object_score"}`` (``object_id`` None for a detection that
matches no record object; score = object score x mean cosine similarity of the pixels to their centroid), and
``<dataset>/label_map.json`` as ``rank-parts`` writes it (per class k_c, label offset, cluster sizes), so
``train-ranker`` reads either.

Three phases, each resumable: (1) each rank samples ``pixels_per_instance`` pixels of every instance of its shard
share and spills their features per class (``FeatureSpill``); (2) ``cluster_classes`` maps over classes, spread over
ranks (spherical faiss k-means, one result file per class); (3) each rank assigns every pixel of its instances and
writes its part of the dataset; rank 0 publishes the merged index. Spill and cluster results live in
``<workdir>/cluster-pixels-<fingerprint>/`` (inputs, params and world size), so a changed spec starts afresh.

Params (defaults): ``k`` 8, ``pixels_per_instance`` 64 (seeded per instance), ``niter`` 20,
``max_points_per_centroid`` 256 (faiss trains on at most k x this many pixels per class), ``objects`` "detected" |
"gt", ``score_threshold`` 0.5, ``max_detections`` 20, ``min_object_area`` 0.01 (of the image), ``min_part_area`` 0.0
(of the object; smaller clusters of an instance are dropped), ``feature_levels`` [0, 1], ``batch_size`` 8,
``seed`` 0, ``shard_size`` 1000, ``use_gpu`` "auto" (faiss), ``allow_parts`` false (true: cluster an evaluation
split, e.g. Table 2's "K-means" row measured by ``evaluate-parts``; ``parts`` are never copied to the output).

Bad input is counted, never fatal: a class with fewer distinct pixels than k gets fewer clusters, a class with no
usable pixel (every feature NaN or zero) no clusters and its instances no proposals; NaN/zero features are left out
of k-means, and a pixel with a NaN feature goes to cluster 0 (the largest).

Metrics (summed over ranks): ``cluster/images``, ``cluster/images_without_objects``, ``cluster/objects``,
``cluster/objects_too_small``, ``cluster/objects_unclustered`` (class without clusters), ``cluster/pixels_spilled``,
``cluster/pixels_nonfinite``, ``cluster/proposals``, ``cluster/proposals_too_small``, ``cluster/classes``,
``cluster/classes_empty``, ``cluster/classes_fewer_than_k``, ``cluster/features_nan``, ``cluster/features_zero``,
``cluster/clusters_per_class``, ``cluster/wall_seconds``, ``cluster/dataset_samples``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from contract.spec import StageSpec
from trainers.checkpoint import write_atomic
from trainers.data import shards
from trainers.engine import MetricLogger, init_distributed
from trainers.parts.class_clusters import FeatureSpill, cluster_classes, load_class_clusters, spill_counts
from trainers.parts.mining import (MiningConfig, Proposal, detected_instances, gt_instances, instance_seed,
                                   normalize, point_features, proposal_score, proposals_to_records)
from trainers.stages import StageResult
from trainers.stages.common import category_labels, dataset_input, images_to_tensor, load_model_input, stage_device
from trainers.stages.mine_parts import fingerprint, same_size_groups
from trainers.stages.rank_parts import LABEL_MAP_FILE, label_map

DONE_FILE = "clustered.json"  # <dataset>/rank-<r>/clustered.json and <work>/spill/_done-<r>.json


@dataclass
class PixelClusterConfig:
    """Hyper-parameters of ``cluster-pixels`` (``spec.params``); defaults: the paper's k=8, mine-parts' features."""

    k: int = 8
    pixels_per_instance: int = 64
    niter: int = 20
    max_points_per_centroid: int = 256
    objects: str = "detected"
    score_threshold: float = 0.5
    max_detections: int = 20
    min_object_area: float = 0.01
    min_part_area: float = 0.0
    feature_levels: tuple[int, ...] = (0, 1)
    batch_size: int = 8
    seed: int = 0
    shard_size: int = 1000
    use_gpu: bool | str = "auto"
    allow_parts: bool = False

    @classmethod
    def from_params(cls, params: dict) -> "PixelClusterConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"unknown cluster-pixels params {unknown}; known: {sorted(names)}")
        cfg = cls(**params)
        cfg.feature_levels = tuple(int(v) for v in cfg.feature_levels)
        if cfg.k < 1 or cfg.pixels_per_instance < 1 or cfg.batch_size < 1 or not cfg.feature_levels:
            raise ValueError("params.k, pixels_per_instance, batch_size must be >= 1 and feature_levels non-empty")
        if cfg.objects not in ("detected", "gt"):
            raise ValueError(f"params.objects must be 'detected' or 'gt', got {cfg.objects!r}")
        return cfg

    def mining(self) -> MiningConfig:
        """The instance selection of ``mine-parts`` with these thresholds (cosine features)."""
        return MiningConfig(k=self.k, objects=self.objects, score_threshold=self.score_threshold,
                            max_detections=self.max_detections, min_object_area=self.min_object_area,
                            feature_levels=self.feature_levels, batch_size=self.batch_size, seed=self.seed)


@dataclass
class PixelClusterStats:
    """Counts of one rank; ``cluster/<name>`` metrics after summing over ranks."""

    images: int = 0
    images_without_objects: int = 0
    objects: int = 0
    objects_too_small: int = 0
    objects_unclustered: int = 0
    pixels_spilled: int = 0
    pixels_nonfinite: int = 0
    proposals: int = 0
    proposals_too_small: int = 0


class _Predicted:
    """A model stand-in that hands ``detected_instances`` predictions already made (one forward, not two)."""

    def __init__(self, preds):
        self.preds = preds

    def predict(self, images, top_k=None):
        return self.preds


class BatchInstances:
    """One forward pass over a batch of same-size images: its feature levels and its kept instances (with class)."""

    def __init__(self, model, keys, images, records, cfg: PixelClusterConfig, class_of_label: dict[int, int],
                 stats: PixelClusterStats, count: bool):
        mc = cfg.mining()
        levels = model.pixel_features(images)
        self.levels = [levels[i] for i in cfg.feature_levels]
        self.height, self.width = images.shape[-2:]
        if cfg.objects == "gt":
            insts = gt_instances(records, images.device)
            classes = [int(o["category_id"]) for r in records for o in r.get("objects", [])]
        else:
            preds = model.predict(images, top_k=mc.max_detections)
            insts = detected_instances(_Predicted(preds), images, records, mc)  # mine-parts' selection, same order
            classes = []
            for pred in preds:
                keep = (pred.scores > mc.score_threshold) & pred.masks.flatten(1).any(1)
                classes += [class_of_label[int(lab)] for lab in pred.labels[keep].tolist()]
        min_area = max(1.0, cfg.min_object_area * self.height * self.width)
        self.instances = [(i, c) for i, c in zip(insts, classes) if int(i.mask.sum()) >= min_area]
        if count:
            stats.images += len(keys)
            stats.objects += len(insts)
            stats.objects_too_small += len(insts) - len(self.instances)
            stats.images_without_objects += sum(1 for b in range(len(keys)) if not any(i.image == b for i in insts))

    def features(self, inst, ys, xs) -> torch.Tensor:
        return point_features(self.levels, inst.image, ys, xs, self.height, self.width)


def iter_groups(path: str, cfg: PixelClusterConfig, rank: int, world_size: int):
    """This rank's samples as lists of same-size ``(key, image bytes, image, record)`` of up to ``batch_size``."""
    batch = []
    for key, raw, record in shards.iter_samples(path, rank=rank, world_size=world_size, decode=False,
                                                allow_parts=cfg.allow_parts):
        batch.append((key, raw, shards.decode_image(raw, key=key), record))
        if len(batch) == cfg.batch_size:
            yield from same_size_groups(batch)
            batch = []
    if batch:
        yield from same_size_groups(batch)


@torch.no_grad()
def spill_pixels(model, path: str, spill: FeatureSpill, cfg: PixelClusterConfig, class_of_label: dict[int, int],
                 *, rank: int, world_size: int, device, stats: PixelClusterStats, on_batch=lambda n: None) -> None:
    """Phase 1: a seeded sample of ``pixels_per_instance`` pixel features of every instance, spilled by class."""
    for group in iter_groups(path, cfg, rank, world_size):
        keys, records = [g[0] for g in group], [g[3] for g in group]
        images = images_to_tensor([g[2] for g in group]).to(device)
        batch = BatchInstances(model, keys, images, records, cfg, class_of_label, stats, count=True)
        for n, (inst, cls) in enumerate(batch.instances):
            ys, xs = torch.nonzero(inst.mask, as_tuple=True)
            if ys.numel() > cfg.pixels_per_instance:
                g = torch.Generator().manual_seed(instance_seed(keys[inst.image], inst.index, cfg.seed))
                pick = torch.randperm(ys.numel(), generator=g)[:cfg.pixels_per_instance].to(ys.device)
                ys, xs = ys[pick], xs[pick]
            spill.append(cls, batch.features(inst, ys, xs).cpu().numpy())
            stats.pixels_spilled += int(ys.numel())
        on_batch(len(group))


@torch.no_grad()
def labelled_samples(model, path: str, centroids: dict[int, torch.Tensor], cfg: PixelClusterConfig,
                     class_of_label: dict[int, int], *, rank: int, world_size: int, device, stats: PixelClusterStats,
                     on_batch=lambda n: None):
    """Phase 3: yield ``(key, image bytes, record + proposals)``, every instance pixel labelled by its class's
    nearest centroid (max cosine similarity)."""
    for group in iter_groups(path, cfg, rank, world_size):
        keys, records = [g[0] for g in group], [g[3] for g in group]
        images = images_to_tensor([g[2] for g in group]).to(device)
        batch = BatchInstances(model, keys, images, records, cfg, class_of_label, stats, count=False)
        props: list[list[dict]] = [[] for _ in group]
        for inst, cls in batch.instances:
            cent = centroids.get(cls)
            if cent is None or not len(cent):
                stats.objects_unclustered += 1
                continue
            ys, xs = torch.nonzero(inst.mask, as_tuple=True)
            feats = batch.features(inst, ys, xs)
            finite = torch.isfinite(feats).all(1)
            stats.pixels_nonfinite += int((~finite).sum())
            feats = torch.where(finite[:, None], feats, torch.zeros_like(feats))
            sim = normalize(feats, 1) @ cent.to(feats.device).T  # zero / NaN rows: all 0 -> cluster 0, the largest
            labels = sim.argmax(1)
            best = sim.gather(1, labels[:, None])[:, 0]
            area_obj = int(ys.numel())
            found, ids = [], []
            for j, n in enumerate(torch.bincount(labels, minlength=len(cent)).tolist()):
                if n == 0:
                    continue
                if n < cfg.min_part_area * area_obj:
                    stats.proposals_too_small += 1
                    continue
                sel = labels == j
                m = np.zeros((batch.height, batch.width), dtype=bool)
                m[ys[sel].cpu().numpy(), xs[sel].cpu().numpy()] = True
                p = Proposal(object_id=inst.object_id, mask=m, score=0.0, area=n, cohesion=float(best[sel].mean()),
                             object_score=inst.score)
                p.score = proposal_score(p, area_obj)
                found.append(p)
                ids.append(j)
            for rec, j in zip(proposals_to_records(found), ids):
                props[inst.image].append({**rec, "label": j, "category_id": cls})
            stats.proposals += len(found)
        for (key, raw, _, record), p in zip(group, props):
            out = {k: v for k, v in record.items() if k != "parts"}
            out["proposals"] = p
            yield key, raw, out
        on_batch(len(group))


def run(spec: StageSpec) -> StageResult | None:
    """Spill, cluster per class over ranks, label every instance pixel; rank 0 publishes the labels dataset."""
    cfg = PixelClusterConfig.from_params(spec.params)
    if not spec.outputs.dataset:
        raise ValueError("cluster-pixels needs outputs.dataset (the directory of the labels dataset)")
    device = stage_device(spec)
    d = init_distributed(device.type == "cuda")
    t_start = time.perf_counter()
    images_path = dataset_input(spec, "images")
    index = shards.DatasetIndex.load(images_path)
    class_of_label = {i: cid for cid, i in category_labels(images_path).items()}
    fp = fingerprint(spec, d.world_size)
    work = Path(spec.outputs.workdir) / f"cluster-pixels-{fp[:12]}"
    spill_dir, clusters_dir = work / "spill", work / "clusters"
    out_dir = Path(spec.outputs.dataset)
    part = shards.part_dir(out_dir, d.rank)
    stats = PixelClusterStats()
    n_mine = shards.num_samples_for(index, rank=d.rank, world_size=d.world_size)
    logger = MetricLogger(spec, d.is_main, total=2 * n_mine, initial=0)
    model = None
    try:
        # phase 1: spill (skipped when this rank's spill is complete)
        spill_done = spill_dir / "_done" / f"{d.rank}.json"
        done = _read_json(spill_done)
        if done is not None and done.get("fingerprint") == fp:
            stats = PixelClusterStats(**done["stats"])
            logger.advance(n_mine)
        else:
            model = load_model_input(spec, "teacher", device)
            spill = FeatureSpill(spill_dir, writer=str(d.rank))
            spill_pixels(model, images_path, spill, cfg, class_of_label, rank=d.rank, world_size=d.world_size,
                         device=device, stats=stats, on_batch=logger.advance)
            spill.close()
            write_atomic(spill_done, json.dumps({"fingerprint": fp, "stats": asdict(stats)}))
        dist.barrier()

        # phase 2: k-means per class, classes spread over ranks (each class file resumable)
        counts = spill_counts(spill_dir)
        summary = cluster_classes(spill_dir, clusters_dir, list(counts), k=cfg.k, niter=cfg.niter, seed=cfg.seed,
                                  rank=d.rank, world_size=d.world_size, use_gpu=cfg.use_gpu, counts=counts,
                                  max_points_per_centroid=cfg.max_points_per_centroid)
        dist.barrier()

        # phase 3: label every pixel of every instance
        part_done = _read_json(part / DONE_FILE)
        if part_done is not None and part_done.get("fingerprint") == fp and _published(part):
            stats = PixelClusterStats(**part_done["stats"])
            logger.advance(n_mine)
        else:
            centroids = {c: torch.from_numpy(load_class_clusters(clusters_dir, c)["centroids"]).float()
                         for c in counts}
            model = model or load_model_input(spec, "teacher", device)
            samples = labelled_samples(model, images_path, centroids, cfg, class_of_label, rank=d.rank,
                                       world_size=d.world_size, device=device, stats=stats, on_batch=logger.advance)
            shards.write_dataset(samples, part, name=f"{index.name}-{spec.name}", split=index.split,
                                 categories=index.categories, shard_size=cfg.shard_size,
                                 source=f"cluster-pixels:{images_path}")
            write_atomic(part / DONE_FILE, json.dumps({"fingerprint": fp, "stats": asdict(stats)}, indent=1))

        metrics = reduce_metrics(stats, summary, cfg.k, time.perf_counter() - t_start)
        if d.is_main:
            merged = shards.merge_parts(out_dir, d.world_size, name=f"{index.name}-{spec.name}")
            metrics["cluster/dataset_samples"] = float(merged.num_samples)
            write_atomic(out_dir / LABEL_MAP_FILE,
                         json.dumps(label_map(index.categories, cluster_info(clusters_dir, counts), cfg.k), indent=1))
            logger.log(0, metrics)
    finally:
        logger.close()
    dist.barrier()
    if not d.is_main:
        return None
    return StageResult(metrics=metrics, dataset_path=str(out_dir))


def cluster_info(clusters_dir: Path, counts: dict[int, int]) -> dict[int, dict]:
    """Per class: clusters found, pixels clustered and cluster sizes (what ``rank_parts.label_map`` reads)."""
    out = {}
    for c in counts:
        res = load_class_clusters(clusters_dir, c)
        out[int(c)] = {"k": int(len(res["counts"])), "num_candidates": int(res["num_candidates"]),
                       "counts": [int(v) for v in res["counts"]]}
    return out


def reduce_metrics(stats: PixelClusterStats, summary: dict, k: int, seconds: float) -> dict[str, float]:
    """``cluster/*`` metrics of all ranks (a collective): this rank's counts plus its classes' clustering summary."""
    classes = summary["classes"].values()
    per_class = [len(classes), sum(1 for c in classes if c["k"] == 0), sum(1 for c in classes if 0 < c["k"] < k),
                 sum(c["num_nan"] for c in classes), sum(c["num_zero"] for c in classes), sum(c["k"] for c in classes)]
    mine = [float(getattr(stats, f.name)) for f in fields(PixelClusterStats)] + per_class
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, seconds))  # objects: any backend (gloo or nccl), no device tensors
    values = [sum(v) for v in zip(*(g[0] for g in gathered))]
    wall = max(g[1] for g in gathered)
    metrics = {f"cluster/{f.name}": v for f, v in zip(fields(PixelClusterStats), values)}
    n_cls, empty, fewer, nan, zero, ksum = values[len(fields(PixelClusterStats)):]
    metrics.update({"cluster/classes": n_cls, "cluster/classes_empty": empty, "cluster/classes_fewer_than_k": fewer,
                    "cluster/features_nan": nan, "cluster/features_zero": zero,
                    "cluster/clusters_per_class": ksum / max(n_cls - empty, 1.0),
                    "cluster/wall_seconds": float(wall)})
    return metrics


def _published(part: Path) -> bool:
    try:
        shards.DatasetIndex.load(part)
        return True
    except shards.DataError:
        return False


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
