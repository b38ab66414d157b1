"""Part candidates of ``rank-parts``, per object class (PartDistillation sec. 4.3): collection, eq. 2 scores, labels.

Phase 1 (:func:`collect_candidates`): on every image the part model's masks, scores and query features; each part
goes to its object (eq. 1), every object pixel to its most confident part, and a part with enough score and
pixels is a candidate (:func:`~trainers.parts.assignment.object_segments`). Its query feature is spilled to its
object class (``FeatureSpill``, key :data:`KEY_COLUMNS`), its mask to a JSON-lines file. Phase 2 is
``class_clusters.cluster_classes``. Phase 3 (:func:`score_candidates`, :func:`labelled_samples`): eq. 2 density
scores against the class's prototypes; the label is the nearest prototype.
"""
from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contract.io import atomic_open, read_json
from trainers.comm import Dist, Stats
from trainers.data import shards
from trainers.data.batches import images_to_tensor, iter_batches, with_proposals
from trainers.parts.assignment import object_segments, part_predictions
from trainers.parts.class_clusters import FeatureSpill, density_scores
from trainers.parts.kmeans import ZERO_NORM
from trainers.parts.objects import image_objects
from trainers.structures import encode_masks

KEY_COLUMNS = ("rank", "seq", "image_id", "object_id", "query")  # int64 key of every spilled candidate


@dataclass
class RankPartsStats(Stats):
    """Counts of one rank (summed over ranks for the metrics)."""

    prefix = "rank_parts/"

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


def spill_generation(spill: Path) -> str:
    """Hash of the writers' manifests: changes whenever any rank re-collects."""
    sha = hashlib.sha256()
    for m in sorted((spill / "_writers").glob("*.json")):
        sha.update(m.name.encode() + m.read_bytes())
    return sha.hexdigest()[:32]


def collect_candidates(images_path: str, parts, teacher, p, d: Dist, spill_dir: Path, jsonl: Path,
                       stats: RankPartsStats) -> None:
    """Phase 1 on this rank's images: spill candidate features per class, candidate masks to ``jsonl`` (atomically).

    ``teacher`` None: the records' objects; else its detections (``p.object_score_threshold``, ``p.max_detections``).
    """
    categories = shards.DatasetIndex.load(images_path).categories
    seq = 0
    with FeatureSpill(spill_dir, writer=str(d.rank)) as spill, atomic_open(jsonl, "w") as fh:
        for keys, blobs, records in iter_batches(images_path, p.batch_size, rank=d.rank, world_size=d.world_size,
                                                 decode=False):
            images = images_to_tensor([shards.decode_image(b, key=k) for k, b in zip(keys, blobs)]).to(d.device)
            with torch.no_grad():
                preds = part_predictions(parts, images)
                object_preds = teacher.predict(images, top_k=p.max_detections) if teacher is not None else None
            for b, (key, record) in enumerate(zip(keys, records)):
                objects = image_objects(record, None if object_preds is None else object_preds[b],
                                        p.object_score_threshold, categories, d.device)
                proposals, seq = _image_candidates(record, preds[b], objects, p, d.rank, seq, spill, stats)
                fh.write(json.dumps({"key": key, "proposals": proposals}, separators=(",", ":")) + "\n")


def _image_candidates(record: dict, pred, objects, p, rank: int, seq: int, spill: FeatureSpill,
                      stats: RankPartsStats) -> tuple[list[dict], int]:
    """One image's candidates (their features spilled); returns its proposals and the next sequence number."""
    masks, ids, cats = objects
    stats.images += 1
    stats.objects += len(ids)
    stats.images_without_objects += not ids
    stats.predicted += len(pred)
    proposals, rows = [], []
    for j, segs in enumerate(object_segments(pred.masks, pred.scores, masks, p.score_threshold, p.min_part_area,
                                             stats)):
        stats.objects_without_candidates += not segs
        if not segs:
            continue
        rles = encode_masks(torch.stack([s for _, s in segs]).cpu().numpy())
        for (i, seg), rle in zip(segs, rles):
            q = int(pred.query_indices[i])
            oid = -1 if ids[j] is None else int(ids[j])
            proposals.append({"object_id": ids[j], "category_id": cats[j], "segmentation": rle,
                              "area": int(seg.sum()), "part_score": round(float(pred.scores[i]), 6),
                              "query": q, "candidate": seq})
            rows.append((cats[j], i, [rank, seq, int(record["image_id"]), oid, q]))
            seq += 1
    for c in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == c]
        spill.append(c, pred.query_features[[r[1] for r in mine]].float(),
                     keys=np.asarray([r[2] for r in mine], dtype=np.int64))
    stats.candidates += len(rows)
    return proposals, seq


def score_candidates(spill_dir: Path, clusters_dir: Path, rank: int, num: int, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 2 on this rank's candidates, class by class from its own spill chunks: (label [num], score [num]).

    Held as memory-maps in ``work`` (4 + 4 bytes a candidate); label -1 for NaN/zero features.
    """
    work.mkdir(parents=True, exist_ok=True)
    labels = np.lib.format.open_memmap(work / f"labels-{rank}.npy", mode="w+", dtype=np.int32, shape=(num,))
    scores = np.lib.format.open_memmap(work / f"scores-{rank}.npy", mode="w+", dtype=np.float32, shape=(num,))
    labels[:] = -1
    scores[:] = np.nan
    manifest = read_json(spill_dir / "_writers" / f"{rank}.json") or {"classes": {}}
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
            prob, lab = density_scores(torch.from_numpy(f[ok]), torch.from_numpy(centroids))
            labels[seq[ok]] = lab.numpy()
            scores[seq[ok]] = prob.max(1).values.numpy()
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
            yield key, blob, with_proposals(record, proposals)


def summarize(stats: RankPartsStats, cluster_info: dict[int, dict], counts: dict[int, int], k: int,
              seconds: list[list[float]], wall: float) -> dict[str, float]:
    """``rank_parts/*`` metrics: the counts, per-class candidate statistics, clusters and time (slowest rank)."""
    m = stats.as_metrics()
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
