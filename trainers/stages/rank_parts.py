"""Stage ``rank-parts``: part proposals assigned to objects, clustered per object class (PartDistillation sec. 4.3).

For every image of ``inputs.datasets.images``, the class-agnostic part model ``inputs.models.parts`` (the
``teacher`` alias of the part-proposal model) predicts part masks M_i^p, scores s_i^p and query features f_i^p.

1. **Eq. 1**: each part goes to the object of highest IoU (no overlap: unassigned).
2. **Candidates**: every pixel of an object goes to its most confident part, ``argmax_i M_i^p(x) s_i^p`` over
   the parts assigned to it; a part whose score > ``score_threshold`` (0.3) and whose pixels cover at least
   ``min_part_area`` (5%) of the object is a candidate; its segment is the pixels it won.
3. **Spill**: the candidate's query feature f_i^p (alone: the clustering is already per object class, and an
   object feature would add a per-instance offset that splits clusters by instance appearance, not by part) is
   appended to its object class in ``<workdir>/spill`` (``FeatureSpill``, writer = rank) with the int64 key
   ``(rank, seq, image_id, object_id, query)``; the candidate's mask goes to ``<workdir>/candidates/rank-<r>.jsonl``.
4. **Cluster** (after a barrier): k-means with ``k`` (8) clusters per object class, classes spread over ranks
   (``cluster_classes``; faiss, on GPU when present); a class with fewer distinct candidates gets fewer clusters,
   NaN/zero features are dropped and counted.
5. **Label**: each rank scores its own candidates with eq. 2 (``density_scores``: softmax over the class's
   prototypes of -||f - mu||); the label is the argmax, i.e. the nearest prototype (k-means' assignment), the
   score its probability. Written as a dataset (``outputs.dataset``; per-rank parts + ``merge_parts``): the input
   record (``parts`` removed) with ``proposals``::

       {"object_id", "category_id": object class, "segmentation", "area", "label": cluster id (< k_c),
        "score": eq. 2 density, "part_score": s_i^p, "query": i, "candidate": [rank, seq]}

   plus ``<dataset>/label_map.json``: per object class its number of clusters k_c, the offset of its labels in a
   class-specific label space (``offset + cluster``; see ``train-ranker``) and its cluster sizes.

Resume: rank r skips collection when its spill and candidates are complete for the same input shards, model
files, params and world size; clustering resumes class by class; labelling skips a complete part. Changed inputs
or params discard the spill and the clusters.

Objects: ``objects: gt`` (default) uses the records' object masks and classes: PartWorld's train labels, the
supervision the method is allowed (instance labels), and the object class is what the clusters are per; the paper
uses detections because ImageNet-21K has no instance masks. ``objects: detected`` uses the instance teacher
``inputs.models.instance_teacher`` (score > ``object_score_threshold``; class = its predicted class).

Params (defaults): ``k`` 8, ``score_threshold`` 0.3, ``min_part_area`` 0.05, ``objects`` "gt",
``object_score_threshold`` 0.5, ``max_detections`` 20, ``niter`` 20, ``seed`` 0, ``max_points_per_centroid`` 256,
``use_gpu`` "auto", ``batch_size`` 16, ``shard_size`` 1000.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from contract.spec import StageSpec
from trainers.checkpoint import write_atomic
from trainers.data import shards
from trainers.engine import Dist, init_distributed, on_gpu
from trainers.parts.class_clusters import FeatureSpill, cluster_classes, density_scores, spill_counts
from trainers.parts.kmeans import ZERO_NORM
from trainers.stages import StageResult
from trainers.stages.common import (
    StageInputError,
    dataset_input,
    images_to_tensor,
    iter_batches,
    load_model_input,
    log_metrics,
    model_input_path,
)
from trainers.stages.pseudo_label import _file_sha256, _iou, detected_objects, gt_objects
from trainers.structures import encode_masks

log = logging.getLogger(__name__)

LABEL_MAP_FILE = "label_map.json"  # <dataset>/label_map.json: per object class k_c and its label offset
KEY_COLUMNS = ("rank", "seq", "image_id", "object_id", "query")  # int64 key of every spilled candidate


@dataclass
class RankPartsConfig:
    """The stage's params (PartDistillation sec. 4.3)."""

    k: int = 8  # clusters per object class ("for association we set k=8", sec. 5)
    score_threshold: float = 0.3  # candidates have s_i^p > this
    min_part_area: float = 0.05  # candidates win at least this fraction of their object's pixels
    objects: str = "gt"  # "gt": the records' objects and classes; "detected": the instance teacher's
    object_score_threshold: float = 0.5  # detections kept with score > this (objects="detected")
    max_detections: int = 20  # instance-teacher predictions considered per image
    niter: int = 20  # k-means iterations
    seed: int = 0  # k-means seed
    max_points_per_centroid: int = 256  # k-means trains on at most this many candidates per cluster (then assigns all)
    use_gpu: bool | str = "auto"  # faiss on GPU: "auto" when one is visible
    batch_size: int = 16  # images per inference batch
    shard_size: int = 1000  # samples per output shard

    @classmethod
    def from_params(cls, params: dict) -> "RankPartsConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in params.items() if k in names})
        if cfg.objects not in ("detected", "gt"):
            raise ValueError(f"params.objects must be 'detected' or 'gt', got {cfg.objects!r}")
        if cfg.k < 1:
            raise ValueError(f"params.k must be >= 1, got {cfg.k}")
        return cfg

    def collect_params(self) -> dict:
        """The params the spilled candidates depend on."""
        return {k: getattr(self, k) for k in ("score_threshold", "min_part_area", "objects", "object_score_threshold",
                                              "max_detections")}


@dataclass
class RankPartsStats:
    """Counts of one rank (summed over ranks for the metrics)."""

    images: int = 0
    images_without_objects: int = 0
    objects: int = 0
    objects_without_candidates: int = 0
    predicted: int = 0  # part predictions considered (every query)
    unassigned: int = 0  # parts overlapping no object (eq. 1 has nothing to pick)
    dropped_low_score: int = 0  # parts that won pixels of an object but have s_i^p <= score_threshold
    dropped_small: int = 0  # parts with enough score that won less than min_part_area of their object
    candidates: int = 0  # spilled
    dropped_bad_feature: int = 0  # candidates with a NaN/inf or zero feature: no cluster, not written
    labelled: int = 0  # candidates written with a cluster id

    def add(self, other: "RankPartsStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


# -- eq. 1 and the per-pixel assignment (shared with train-ranker) -------------------------------


def pixel_owners(part_masks: torch.Tensor, part_scores: torch.Tensor, object_masks: torch.Tensor) -> torch.Tensor:
    """Which part owns each pixel of each object (PartDistillation sec. 4.3): ``[J, H, W]`` part index or -1.

    Parts go to the object of highest IoU (eq. 1); within object j a pixel goes to ``argmax_i M_i(x) s_i`` over
    the parts assigned to j; pixels outside the object, or covered by none of its parts, are -1.
    """
    j_count, h, w = object_masks.shape
    owners = torch.full((j_count, h, w), -1, dtype=torch.int64, device=object_masks.device)
    if part_masks.shape[0] == 0 or j_count == 0:
        return owners
    iou, _ = _iou(part_masks, object_masks)
    best, assign = iou.max(1)
    weighted = part_masks.float() * part_scores.float().clamp(min=1e-6)[:, None, None]
    for j in range(j_count):
        mine = torch.nonzero((assign == j) & (best > 0))[:, 0]
        if mine.numel() == 0:
            continue
        val, idx = weighted[mine].max(0)
        owners[j] = torch.where(object_masks[j] & (val > 0), mine[idx], owners[j])
    return owners


def object_segments(part_masks, part_scores, object_masks, score_threshold: float, min_part_area: float,
                    stats: RankPartsStats | None = None) -> list[list[tuple[int, torch.Tensor]]]:
    """Per object, its candidates ``(part index, segment mask)``: parts with score > ``score_threshold`` whose
    pixels (see :func:`pixel_owners`) cover at least ``min_part_area`` of the object, largest segment first."""
    owners = pixel_owners(part_masks, part_scores, object_masks)
    if stats is not None and part_masks.shape[0] and object_masks.shape[0]:
        stats.unassigned += int((_iou(part_masks, object_masks)[0].max(1).values <= 0).sum())
    elif stats is not None:
        stats.unassigned += int(part_masks.shape[0])
    out = []
    for j in range(object_masks.shape[0]):
        area = float(object_masks[j].sum())
        ids, counts = torch.unique(owners[j][owners[j] >= 0], return_counts=True)
        segs = []
        for i, n in sorted(zip(ids.tolist(), counts.tolist()), key=lambda t: -t[1]):
            if float(part_scores[i]) <= score_threshold:
                if stats is not None:
                    stats.dropped_low_score += 1
                continue
            if n < min_part_area * area or n == 0:
                if stats is not None:
                    stats.dropped_small += 1
                continue
            segs.append((i, owners[j] == i))
        out.append(segs)
    return out


def part_predictions(model, images: torch.Tensor):
    """Every query's prediction of the class-agnostic part model (``InstancePredictions`` per image)."""
    return model.predict(images, top_k=model.cfg.decoder.num_queries * model.cfg.decoder.num_classes)


# -- fingerprints and resume ------------------------------------------------------------------


def collect_fingerprint(spec: StageSpec, cfg: RankPartsConfig, model_paths: dict[str, Path], world_size: int) -> str:
    """What the spill depends on: input shards, model files, the candidate params, world size."""
    index = shards.DatasetIndex.load(spec.inputs.datasets["images"].path)
    doc = {"images": [s["sha256"] for s in index.shards], "models": {k: _file_sha256(p) for k, p in model_paths.items()},
           "params": cfg.collect_params(), "world_size": world_size}
    return "rank-parts:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def _spill_generation(spill: Path) -> str:
    """Hash of the writers' manifests: changes whenever any rank re-collects."""
    sha = hashlib.sha256()
    for m in sorted((spill / "_writers").glob("*.json")):
        sha.update(m.name.encode() + m.read_bytes())
    return sha.hexdigest()[:32]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- phase 1: candidates ----------------------------------------------------------------------


def _objects(record, object_pred, cfg: RankPartsConfig, categories: list[dict], device):
    """(masks [J, H, W], ids, category ids) of one image's objects."""
    if object_pred is None:
        masks, ids = gt_objects(record, device)
        return masks, ids, [int(o["category_id"]) for o in record.get("objects", [])]
    keep = (object_pred.scores > cfg.object_score_threshold) & object_pred.masks.flatten(1).any(1)
    masks, ids = detected_objects(object_pred, record, cfg)
    return masks, ids, [int(categories[int(label)]["id"]) for label in object_pred.labels[keep]]


def collect_share(spec: StageSpec, cfg: RankPartsConfig, d: Dist, spill_dir: Path, jsonl: Path,
                  stats: RankPartsStats) -> None:
    """Phase 1 on this rank's images: spill candidate features per class, candidate masks to ``jsonl``."""
    path = spec.inputs.datasets["images"].path
    categories = shards.DatasetIndex.load(path).categories
    parts = load_model_input(spec, "parts", d.device)
    teacher = load_model_input(spec, "instance_teacher", d.device) if cfg.objects == "detected" else None
    tmp = jsonl.with_name(f".{jsonl.name}.tmp")
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    seq = 0
    with FeatureSpill(spill_dir, writer=str(d.rank)) as spill, open(tmp, "w") as fh:
        for keys, blobs, records in iter_batches(path, cfg.batch_size, rank=d.rank, world_size=d.world_size,
                                                 decode=False):
            images = images_to_tensor([shards.decode_image(b, key=k) for k, b in zip(keys, blobs)]).to(d.device)
            with torch.no_grad():
                preds = part_predictions(parts, images)
                object_preds = teacher.predict(images, top_k=cfg.max_detections) if teacher is not None else None
            for b, (key, record) in enumerate(zip(keys, records)):
                masks, ids, cats = _objects(record, None if object_preds is None else object_preds[b], cfg,
                                            categories, d.device)
                p = preds[b]
                stats.images += 1
                stats.objects += len(ids)
                stats.images_without_objects += not ids
                stats.predicted += len(p)
                proposals, rows = [], []
                for j, segs in enumerate(object_segments(p.masks, p.scores, masks, cfg.score_threshold,
                                                         cfg.min_part_area, stats)):
                    stats.objects_without_candidates += not segs
                    if not segs:
                        continue
                    rles = encode_masks(torch.stack([s for _, s in segs]).cpu().numpy())
                    for (i, seg), rle in zip(segs, rles):
                        q = int(p.query_indices[i])
                        oid = -1 if ids[j] is None else int(ids[j])
                        proposals.append({"object_id": ids[j], "category_id": cats[j], "segmentation": rle,
                                          "area": int(seg.sum()), "part_score": round(float(p.scores[i]), 6),
                                          "query": q, "candidate": seq})
                        rows.append((cats[j], i, [d.rank, seq, int(record["image_id"]), oid, q]))
                        seq += 1
                for c in sorted({r[0] for r in rows}):
                    mine = [r for r in rows if r[0] == c]
                    spill.append(c, p.query_features[[r[1] for r in mine]].float(),
                                 keys=np.asarray([r[2] for r in mine], dtype=np.int64))
                stats.candidates += len(rows)
                fh.write(json.dumps({"key": key, "proposals": proposals}, separators=(",", ":")) + "\n")
        fh.flush()
    tmp.replace(jsonl)


# -- phase 3: labels ---------------------------------------------------------------------------


def score_candidates(spill_dir: Path, clusters_dir: Path, rank: int, num: int, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 2 on this rank's candidates, class by class from its own spill chunks: (label [num], score [num]).

    Held as memory-maps in ``work`` (4 + 4 bytes a candidate); label -1 for NaN/zero features.
    """
    work.mkdir(parents=True, exist_ok=True)
    labels = np.lib.format.open_memmap(work / f"labels-{rank}.npy", mode="w+", dtype=np.int32, shape=(num,))
    scores = np.lib.format.open_memmap(work / f"scores-{rank}.npy", mode="w+", dtype=np.float32, shape=(num,))
    labels[:] = -1
    scores[:] = np.nan
    manifest = _read_json(spill_dir / "_writers" / f"{rank}.json") or {"classes": {}}
    for c in sorted(int(c) for c in manifest["classes"]):
        with np.load(clusters_dir / f"class-{c}.npz") as z:  # the prototypes only (members load lazily)
            centroids = z["centroids"]
        if len(centroids) == 0:
            continue
        for chunk in sorted((spill_dir / f"class-{c}").glob(f"chunk-{rank}-*.npy")):
            if chunk.name.endswith(".keys.npy"):
                continue
            f = np.load(chunk)
            seq = np.load(chunk.with_name(chunk.name[: -len(".npy")] + ".keys.npy"))[:, 1]
            with np.errstate(invalid="ignore", over="ignore"):
                ok = np.isfinite(f).all(1) & (np.linalg.norm(f, axis=1) >= ZERO_NORM)
            if not ok.any():
                continue
            p, lab = density_scores(torch.from_numpy(f[ok]), torch.from_numpy(centroids))
            labels[seq[ok]] = lab.numpy()
            scores[seq[ok]] = p.max(1).values.numpy()
    labels.flush()
    scores.flush()
    return labels, scores


def labelled_samples(images_path: str, jsonl: Path, labels: np.ndarray, scores: np.ndarray, d: Dist,
                     stats: RankPartsStats):
    """This rank's samples with ``proposals`` carrying their cluster id (phase 3)."""
    with open(jsonl) as fh:
        for (key, blob, record), line in zip(shards.iter_samples(images_path, rank=d.rank, world_size=d.world_size,
                                                                 decode=False), fh):
            doc = json.loads(line)
            if doc["key"] != key:
                raise RuntimeError(f"{jsonl}: candidates of {doc['key']!r} where the images have {key!r} "
                                   "(the input changed since collection)")
            proposals = []
            for p in doc["proposals"]:
                seq = p.pop("candidate")
                if labels[seq] < 0:
                    stats.dropped_bad_feature += 1
                    continue
                proposals.append({**p, "label": int(labels[seq]), "score": round(float(scores[seq]), 6),
                                  "candidate": [d.rank, seq]})
            stats.labelled += len(proposals)
            out = {k: v for k, v in record.items() if k not in ("parts", "proposals")}
            yield key, blob, {**out, "proposals": proposals}


def label_map(categories: list[dict], cluster_info: dict[int, dict], k: int) -> dict:
    """``label_map.json``: per object class (dataset order, then any other spilled class) k_c and its label offset."""
    order = [int(c["id"]) for c in categories]
    order += sorted(set(cluster_info) - set(order))
    classes, offset = [], 0
    for c in order:
        info = cluster_info.get(c, {})
        kc = int(info.get("k", 0))
        classes.append({"category_id": c, "num_clusters": kc, "offset": offset,
                        "num_candidates": int(info.get("num_candidates", 0)), "counts": info.get("counts", [])})
        offset += kc
    return {"k": k, "num_labels": offset, "classes": classes}


# -- the stage --------------------------------------------------------------------------------


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run(spec: StageSpec) -> StageResult | None:
    """Collect candidates, cluster per class over ranks, write the cluster-id labels (see the module doc)."""
    cfg = RankPartsConfig.from_params(spec.params)
    out = spec.outputs.dataset
    if not out:
        raise StageInputError("stage 'rank-parts' needs outputs.dataset (where the cluster-id labels go)")
    images_path = dataset_input(spec, "images")
    t0 = time.perf_counter()
    d = init_distributed(on_gpu(spec))
    names = ["parts"] + (["instance_teacher"] if cfg.objects == "detected" else [])
    model_paths = {n: model_input_path(spec, n) for n in names}
    fp = collect_fingerprint(spec, cfg, model_paths, d.world_size)
    work = Path(spec.outputs.workdir)
    spill_dir, clusters_dir, cand_dir = work / "spill", work / "clusters", work / "candidates"
    if d.is_main:  # changed inputs or params: the old spill and clusters are for something else
        state = _read_json(work / "rank_parts_state.json") or {}
        if state.get("fingerprint") != fp:
            for p in (spill_dir, clusters_dir, cand_dir):
                shutil.rmtree(p, ignore_errors=True)
            write_atomic(work / "rank_parts_state.json", json.dumps({"fingerprint": fp}))
    _barrier()

    # -- phase 1: candidates of this rank's images -------------------------------------------------
    done_file = cand_dir / f"rank-{d.rank}.done.json"
    jsonl = cand_dir / f"rank-{d.rank}.jsonl"
    done = _read_json(done_file)
    collect_stats = RankPartsStats()
    reused = bool(done and done.get("fingerprint") == fp and jsonl.is_file()
                  and (spill_dir / "_writers" / f"{d.rank}.json").is_file())
    if reused:
        collect_stats = RankPartsStats(**done["stats"])
        log.info("rank %d: reusing the spill of %d candidates (%s)", d.rank, collect_stats.candidates, fp)
    else:
        done_file.unlink(missing_ok=True)
        collect_share(spec, cfg, d, spill_dir, jsonl, collect_stats)
        write_atomic(done_file, json.dumps({"fingerprint": fp, "stats": dataclasses.asdict(collect_stats)}))
    t_collect = time.perf_counter() - t0
    _barrier()

    # -- phase 2: per-class k-means, classes spread over ranks -------------------------------------
    t1 = time.perf_counter()
    counts = spill_counts(spill_dir)
    index = shards.DatasetIndex.load(images_path)
    class_ids = sorted({int(c["id"]) for c in index.categories} | set(counts))
    generation = _spill_generation(spill_dir)
    if d.is_main:
        mark = _read_json(clusters_dir / "_spill.json") or {}
        if mark.get("generation") != generation:  # some rank re-collected: its clusters are stale
            shutil.rmtree(clusters_dir, ignore_errors=True)
            write_atomic(clusters_dir / "_spill.json", json.dumps({"generation": generation}))
    _barrier()
    summary = cluster_classes(spill_dir, clusters_dir, class_ids, k=cfg.k, niter=cfg.niter, seed=cfg.seed,
                              rank=d.rank, world_size=d.world_size, use_gpu=cfg.use_gpu, counts=counts,
                              max_points_per_centroid=cfg.max_points_per_centroid)
    t_cluster = time.perf_counter() - t1
    _barrier()

    # -- phase 3: eq. 2 scores and cluster ids of this rank's candidates -> dataset part ------------
    t2 = time.perf_counter()
    part = shards.part_dir(out, d.rank)
    label_fp = hashlib.sha256(f"{fp}|{generation}|{cfg.k}|{cfg.niter}|{cfg.seed}|{cfg.max_points_per_centroid}"
                              .encode()).hexdigest()[:32]
    label_done = _read_json(part / "rank_parts.json")
    label_stats = RankPartsStats()
    if label_done and label_done.get("fingerprint") == label_fp:
        label_stats = RankPartsStats(**label_done["stats"])
    else:
        labels, scores = score_candidates(spill_dir, clusters_dir, d.rank, collect_stats.candidates, cand_dir)
        shards.write_dataset(labelled_samples(images_path, jsonl, labels, scores, d, label_stats), part,
                             name=f"{index.name}-ranked-parts", split=index.split, categories=index.categories,
                             shard_size=cfg.shard_size, source=f"rank-parts:{label_fp}")
        write_atomic(part / "rank_parts.json", json.dumps({"fingerprint": label_fp,
                                                            "stats": dataclasses.asdict(label_stats)}))
        del labels, scores
    t_label = time.perf_counter() - t2

    stats = RankPartsStats()
    rank_stats = _gather({"collect": dataclasses.asdict(collect_stats), "label": dataclasses.asdict(label_stats),
                          "classes": summary["classes"], "reused": reused,
                          "seconds": [t_collect, t_cluster, t_label]})
    metrics: dict[str, float] = {}
    if d.is_main:
        cluster_info: dict[int, dict] = {}
        for r in rank_stats:
            stats.add(RankPartsStats(**r["collect"]))
            stats.dropped_bad_feature += r["label"]["dropped_bad_feature"]
            stats.labelled += r["label"]["labelled"]
            cluster_info.update({int(c): v for c, v in r["classes"].items()})
        from trainers.parts.class_clusters import load_class_clusters

        for c, info in cluster_info.items():
            info["counts"] = load_class_clusters(clusters_dir, c)["counts"].tolist() if info["k"] else []
        lmap = label_map(index.categories, cluster_info, cfg.k)
        shards.merge_parts(out, d.world_size, name=f"{index.name}-ranked-parts")
        write_atomic(Path(out) / LABEL_MAP_FILE, json.dumps(lmap, indent=1))
        metrics = summarize(stats, cluster_info, counts, cfg.k, [r["seconds"] for r in rank_stats],
                            time.perf_counter() - t0)
        metrics["rank_parts/reused_spill_ranks"] = float(sum(r["reused"] for r in rank_stats))
        write_atomic(work / "rank_parts_summary.json", json.dumps(
            {"metrics": metrics, "classes": {str(c): v for c, v in sorted(cluster_info.items())},
             "rank_classes": [sorted(int(c) for c in r["classes"]) for r in rank_stats],
             "key_columns": KEY_COLUMNS}, indent=1))
        log_metrics(spec, metrics)
        log.info("rank-parts: %d images, %d objects, %d candidates in %d of %d classes (%d without), %d clusters; "
                 "%d NaN/zero features dropped", stats.images, stats.objects, stats.candidates,
                 int(metrics["rank_parts/classes_with_candidates"]), len(cluster_info),
                 int(metrics["rank_parts/classes_without_candidates"]), int(metrics["rank_parts/clusters"]),
                 stats.dropped_bad_feature)
    _barrier()
    if not d.is_main:
        return None
    return StageResult(metrics=metrics, dataset_path=str(out))


def summarize(stats: RankPartsStats, cluster_info: dict[int, dict], counts: dict[int, int], k: int,
              seconds: list[list[float]], wall: float) -> dict[str, float]:
    """``rank_parts/*`` metrics: the counts, per-class candidate statistics, clusters and time (slowest rank)."""
    m = {f"rank_parts/{f.name}": float(getattr(stats, f.name)) for f in dataclasses.fields(stats)}
    per_class = [counts.get(c, 0) for c in cluster_info]
    with_cands = [n for n in per_class if n > 0]
    m.update({
        "rank_parts/classes": float(len(cluster_info)),
        "rank_parts/classes_with_candidates": float(len(with_cands)),
        "rank_parts/classes_without_candidates": float(len(per_class) - len(with_cands)),
        "rank_parts/classes_fewer_clusters_than_k": float(sum(0 < v["k"] < k for v in cluster_info.values())),
        "rank_parts/classes_only_bad_features": float(sum(v["k"] == 0 and counts.get(c, 0) > 0
                                                          for c, v in cluster_info.items())),
        "rank_parts/clusters": float(sum(v["k"] for v in cluster_info.values())),
        "rank_parts/nan_features": float(sum(v["num_nan"] for v in cluster_info.values())),
        "rank_parts/zero_features": float(sum(v["num_zero"] for v in cluster_info.values())),
        "rank_parts/candidates_per_class_min": float(min(with_cands, default=0)),
        "rank_parts/candidates_per_class_median": float(statistics.median(with_cands)) if with_cands else 0.0,
        "rank_parts/candidates_per_class_max": float(max(with_cands, default=0)),
        "rank_parts/classes_resumed": float(sum(v["status"] == "skipped" for v in cluster_info.values())),
        "time/collect_s": max(s[0] for s in seconds),
        "time/cluster_s": max(s[1] for s in seconds),
        "time/label_s": max(s[2] for s in seconds),
        "time/wall_s": wall,
    })
    return m
