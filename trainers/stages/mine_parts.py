"""Stage ``mine-parts``: class-agnostic part proposals by k-means inside object instances (PartDistillation sec. 4.2).

Inputs: ``datasets["images"]`` (shards) and ``models["teacher"]`` (the instance teacher, a segmenter file or
``models:/`` URI; its pixel features are clustered, its detections are the instances unless ``objects: gt``).
Output: ``outputs.dataset``, a pseudo-label dataset: every input record plus ``proposals``
(``{"object_id", "segmentation", "score", "area", "label": 0, "object_score"}``, see ``trainers.structures``);
``parts`` are never copied. A map over shards by rank: rank r mines its share (``iter_samples(rank, world_size)``)
into ``<dataset>/rank-<r>`` (skipped on restart when that part is complete for the same inputs and params),
then rank 0 publishes one index (``shards.merge_parts``).

Params (defaults): ``k`` 4, ``metric`` "cosine", ``feature_levels`` [0, 1] (mask features at stride 4 + FPN
stride 8), ``max_points`` 1024, ``iters`` 20, ``objects`` "detected" | "gt", ``score_threshold`` 0.5,
``max_detections`` 20, ``min_object_area`` 0.01 (of the image), ``min_part_area`` 0.05 (of the object),
``refine`` false, ``refine_iters`` 5, ``batch_size`` 8, ``seed`` 0 (see ``trainers.parts.mining.MiningConfig``);
``allow_parts`` false (true: mine an evaluation split, to measure mined-proposal quality with
``evaluate-proposals``), ``shard_size`` 1000.

Proposal score: the instance's score (detection score; 1 for GT objects) x the cluster's cohesion (mean cosine
similarity of its pixels to its centroid): see ``trainers.parts.mining.proposal_score``.

Metrics (summed over ranks): ``mine/images``, ``mine/images_without_objects``, ``mine/objects``,
``mine/objects_too_small``, ``mine/objects_fewer_points_than_k``, ``mine/objects_degenerate_features``,
``mine/objects_mined``, ``mine/proposals``, ``mine/proposals_too_small``, ``mine/proposals_per_object``,
``mine/seconds_forward``, ``mine/seconds_mining``, ``mine/share_outside_forward``, ``mine/wall_seconds``,
``mine/images_per_second``, ``mine/objects_per_second``.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist

from contract.spec import StageSpec
from trainers.checkpoint import write_atomic
from trainers.data import shards
from trainers.engine import MetricLogger, init_distributed
from trainers.parts.mining import MiningConfig, MiningStats, mine_batch
from trainers.stages import StageResult
from trainers.stages.common import dataset_input, images_to_tensor, load_model_input, stage_device

DONE_FILE = "mined.json"  # <dataset>/rank-<r>/mined.json: fingerprint + stats of a complete part


def fingerprint(spec: StageSpec, world_size: int) -> str:
    """What a complete rank part depends on: inputs, params, world size."""
    doc = {"inputs": spec.inputs.model_dump(mode="json"), "params": spec.params, "world_size": world_size}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def same_size_groups(items: list[tuple]) -> list[list[tuple]]:
    """Split a batch of (key, image bytes, image, record) into runs of one image size (mining never pads)."""
    groups: dict[tuple[int, int], list[tuple]] = {}
    for it in items:
        groups.setdefault(it[2].shape[:2], []).append(it)
    return list(groups.values())


def mined_samples(path: str, model, cfg: MiningConfig, *, rank: int, world_size: int, allow_parts: bool,
                  device: torch.device, stats: MiningStats, on_batch=lambda n: None):
    """Yield this rank's ``(key, image bytes, record + proposals)``, mined in batches of ``cfg.batch_size``."""

    def flush(batch):
        for group in same_size_groups(batch):
            keys = [g[0] for g in group]
            records = [g[3] for g in group]
            images = images_to_tensor([g[2] for g in group]).to(device)
            proposals = mine_batch(model, keys, images, records, cfg, stats)
            for (key, raw, _, record), props in zip(group, proposals):
                out = {k: v for k, v in record.items() if k != "parts"}
                out["proposals"] = props
                yield key, raw, out
        on_batch(len(batch))

    batch = []
    for key, raw, record in shards.iter_samples(path, rank=rank, world_size=world_size, decode=False,
                                                allow_parts=allow_parts):
        batch.append((key, raw, shards.decode_image(raw, key=key), record))
        if len(batch) == cfg.batch_size:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


def run(spec: StageSpec) -> StageResult | None:
    """Mine this rank's share into ``<dataset>/rank-<r>``, then rank 0 publishes the merged dataset."""
    cfg = MiningConfig.from_params(spec.params)
    allow_parts = bool(spec.params.get("allow_parts", False))
    shard_size = int(spec.params.get("shard_size", 1000))
    if not spec.outputs.dataset:
        raise ValueError("mine-parts needs outputs.dataset (the directory of the mined proposals)")
    device = stage_device(spec)
    d = init_distributed(device.type == "cuda")
    t_start = time.perf_counter()
    images_path = dataset_input(spec, "images")
    index = shards.DatasetIndex.load(images_path)
    out_dir = Path(spec.outputs.dataset)
    part = shards.part_dir(out_dir, d.rank)
    fp = fingerprint(spec, d.world_size)
    stats = MiningStats()

    done = _read_done(part)
    resumed = done is not None and done.get("fingerprint") == fp
    total = 0 if resumed else shards.num_samples_for(index, rank=d.rank, world_size=d.world_size)
    logger = MetricLogger(spec, d.is_main, total=total, initial=0)
    try:
        if resumed:
            stats = MiningStats(**{f.name: done["stats"][f.name] for f in fields(MiningStats)})
        else:
            model = load_model_input(spec, "teacher", device)
            samples = mined_samples(images_path, model, cfg, rank=d.rank, world_size=d.world_size,
                                    allow_parts=allow_parts, device=device, stats=stats, on_batch=logger.advance)
            shards.write_dataset(samples, part, name=f"{index.name}-{spec.name}", split=index.split,
                                 categories=index.categories, shard_size=shard_size,
                                 source=f"mine-parts:{images_path}")
            write_atomic(part / DONE_FILE, json.dumps({"fingerprint": fp, "stats": asdict(stats)}, indent=1))
        metrics = reduce_metrics(stats, time.perf_counter() - t_start)
        if d.is_main:
            merged = shards.merge_parts(out_dir, d.world_size, name=f"{index.name}-{spec.name}")
            metrics["mine/dataset_samples"] = float(merged.num_samples)
            logger.log(0, metrics)
    finally:
        logger.close()
    dist.barrier()
    if not d.is_main:
        return None
    return StageResult(metrics=metrics, dataset_path=str(out_dir))


def reduce_metrics(stats: MiningStats, seconds: float) -> dict[str, float]:
    """``mine/*`` metrics of all ranks (a collective): counts and busy seconds summed, wall time the slowest rank's."""
    totals = torch.tensor([float(getattr(stats, f.name)) for f in fields(MiningStats)], dtype=torch.float64)
    dist.all_reduce(totals)
    wall = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    summed = MiningStats(**{f.name: (float(v) if f.type in ("float", float) else int(v))
                            for f, v in zip(fields(MiningStats), totals.tolist())})
    wall_s = max(float(wall.item()), 1e-9)
    metrics = summed.as_metrics()
    metrics["mine/wall_seconds"] = wall_s
    metrics["mine/images_per_second"] = summed.images / wall_s
    metrics["mine/objects_per_second"] = (summed.objects - summed.objects_too_small) / wall_s
    return metrics


def _read_done(part: Path) -> dict | None:
    try:
        doc = json.loads((part / DONE_FILE).read_text())
        shards.DatasetIndex.load(part)
        return doc
    except (OSError, ValueError, shards.DataError):
        return None
