"""Stage ``rank-parts``: part proposals assigned to objects, clustered per object class (PartDistillation sec. 4.3).

For every image of ``inputs.datasets.images``, the class-agnostic part model ``inputs.models.parts`` (the
``teacher`` alias of the part-proposal model) predicts part masks M_i^p, scores s_i^p and query features f_i^p.

1. **Eq. 1**: each part goes to the object of highest IoU (no overlap: unassigned).
2. **Candidates**: every pixel of an object goes to its most confident part, ``argmax_i M_i^p(x) s_i^p`` over
   the parts assigned to it; a part whose score > ``score_threshold`` and whose pixels cover at least
   ``min_part_area`` of the object is a candidate; its segment is the pixels it won.
3. **Spill**: the candidate's query feature f_i^p (alone: the clustering is already per object class, and an
   object feature would add a per-instance offset that splits clusters by instance appearance, not by part) is
   appended to its object class in ``<workdir>/spill`` (``FeatureSpill``, writer = rank) with the int64 key
   ``(rank, seq, image_id, object_id, query)``; the candidate's mask goes to ``<workdir>/candidates/rank-<r>.jsonl``.
4. **Cluster** (after a barrier): k-means with ``k`` clusters per object class, classes spread over ranks
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

Resume: rank r skips collection when its spill and candidates are complete for the same inputs, candidate params
(``COLLECT_PARAMS``) and world size; clustering resumes class by class; labelling skips a complete part (the
shard-map fingerprint of ``trainers.shardmap``, plus the spill's generation). Changed inputs or candidate params
discard the spill and the clusters.

Objects: ``objects: gt`` uses the records' object masks and classes: PartWorld's train labels, the supervision the
method is allowed (instance labels), and the object class is what the clusters are per; the paper uses detections
because ImageNet-21K has no instance masks. ``objects: detected`` uses the instance teacher
``inputs.models.instance_teacher`` (its predicted class). The library: ``trainers.parts.candidates``,
``trainers.parts.class_clusters``, ``trainers.parts.label_map``. Params: ``python -m trainers rank-parts --help``.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from contract.io import read_json, write_json
from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import all_gather, all_reduce_stats, barrier
from trainers.data import shards
from trainers.data.batches import at_input_size
from trainers.inputs import load_model_input, log_metrics
from trainers.parts.candidates import (KEY_COLUMNS, RankPartsStats, collect_candidates, labelled_samples,
                                       score_candidates, spill_generation, summarize)
from trainers.parts.class_clusters import cluster_classes, load_class_clusters, spill_counts
from trainers.parts.label_map import LABEL_MAP_FILE, label_map_doc
from trainers.shardmap import ShardMap, fingerprint
from trainers.stages import StageResult

log = logging.getLogger(__name__)

COLLECT_PARAMS = ("score_threshold", "min_part_area", "objects", "object_score_threshold", "max_detections")


class _Work:
    """The stage's workdir: the spill (features per class), the clusters and the candidates (masks per rank)."""

    def __init__(self, spec: StageSpec):
        self.root = Path(spec.outputs.workdir)
        self.spill, self.clusters, self.candidates = self.root / "spill", self.root / "clusters", self.root / "candidates"
        self.state = self.root / "rank_parts_state.json"


def run(spec: StageSpec) -> StageResult | None:
    """Collect candidates, cluster per class over ranks, write the cluster-id labels (see the module doc)."""
    p = params_of(spec)
    sm = ShardMap(spec, p, name="ranked-parts")
    work = _Work(spec)
    fp = fingerprint(spec, {k: getattr(p, k) for k in COLLECT_PARAMS}, sm.dist.world_size)
    if sm.dist.is_main and (read_json(work.state) or {}).get("fingerprint") != fp:
        for path in (work.spill, work.clusters, work.candidates):  # the old spill is for other inputs or params
            shutil.rmtree(path, ignore_errors=True)
        write_json(work.state, {"fingerprint": fp}, indent=None)
    barrier()
    stats, reused, t_collect = _collect(spec, p, sm, work, fp)
    barrier()
    t1 = time.perf_counter()
    counts = spill_counts(work.spill)
    generation = spill_generation(work.spill)
    summary = _cluster(p, sm, work, counts, generation)
    t_cluster = time.perf_counter() - t1
    barrier()

    t2 = time.perf_counter()
    sm.depend_on(spill=generation)

    def samples():
        labels, scores = score_candidates(work.spill, work.clusters, sm.dist.rank, stats.candidates, work.candidates)
        yield from labelled_samples(sm.images, work.candidates / f"rank-{sm.dist.rank}.jsonl", labels, scores,
                                    sm.dist, stats)

    stats = sm.write_part(samples, stats)
    return _finish(spec, p, sm, work, stats, counts, {"classes": summary["classes"], "reused": reused,
                                                      "seconds": [t_collect, t_cluster, time.perf_counter() - t2]})


def _collect(spec: StageSpec, p, sm: ShardMap, work: _Work, fp: str) -> tuple[RankPartsStats, bool, float]:
    """Phase 1 on this rank's images, or its complete spill reused: (stats, reused, seconds)."""
    d = sm.dist
    done_file = work.candidates / f"rank-{d.rank}.done.json"
    done = read_json(done_file)
    if (done and done.get("fingerprint") == fp and (work.candidates / f"rank-{d.rank}.jsonl").is_file()
            and (work.spill / "_writers" / f"{d.rank}.json").is_file()):
        stats = RankPartsStats.from_dict(done["stats"])
        log.info("rank %d: reusing the spill of %d candidates (%s)", d.rank, stats.candidates, fp)
        return stats, True, time.perf_counter() - sm.t0
    done_file.unlink(missing_ok=True)
    stats = RankPartsStats()
    parts = at_input_size(load_model_input(spec, "parts", d.device), p)
    teacher = at_input_size(load_model_input(spec, "instance_teacher", d.device), p) if p.objects == "detected" else None
    collect_candidates(sm.images, parts, teacher, p, d, work.spill, work.candidates / f"rank-{d.rank}.jsonl", stats)
    write_json(done_file, {"fingerprint": fp, "stats": stats.to_dict()}, indent=None)
    return stats, False, time.perf_counter() - sm.t0


def _cluster(p, sm: ShardMap, work: _Work, counts: dict[int, int], generation: str) -> dict:
    """Phase 2: per-class k-means, classes spread over ranks (stale clusters of an older spill discarded first)."""
    if sm.dist.is_main and (read_json(work.clusters / "_spill.json") or {}).get("generation") != generation:
        shutil.rmtree(work.clusters, ignore_errors=True)  # some rank re-collected: its clusters are stale
        write_json(work.clusters / "_spill.json", {"generation": generation}, indent=None)
    barrier()
    class_ids = sorted({int(c["id"]) for c in sm.index.categories} | set(counts))
    return cluster_classes(work.spill, work.clusters, class_ids, k=p.k, niter=p.niter, seed=p.seed,
                           rank=sm.dist.rank, world_size=sm.dist.world_size, use_gpu=p.use_gpu, counts=counts,
                           max_points_per_centroid=p.max_points_per_centroid)


def _finish(spec: StageSpec, p, sm: ShardMap, work: _Work, stats: RankPartsStats, counts: dict[int, int],
            mine: dict) -> StageResult | None:
    """Counts over ranks; rank 0 publishes the index, ``label_map.json`` and the summary, and logs the metrics."""
    total = all_reduce_stats(stats)
    ranks = all_gather(mine)
    metrics: dict[str, float] = {}
    if sm.dist.is_main:
        cluster_info: dict[int, dict] = {}
        for r in ranks:
            cluster_info.update({int(c): v for c, v in r["classes"].items()})
        for c, info in cluster_info.items():
            info["counts"] = load_class_clusters(work.clusters, c)["counts"].tolist() if info["k"] else []
        shards.merge_parts(sm.out, sm.dist.world_size, name=sm.name)
        write_json(sm.out / LABEL_MAP_FILE, label_map_doc(sm.index.categories, cluster_info, p.k), indent=1)
        metrics = summarize(total, cluster_info, counts, p.k, [r["seconds"] for r in ranks], time.perf_counter() - sm.t0)
        metrics["rank_parts/reused_spill_ranks"] = float(sum(r["reused"] for r in ranks))
        write_json(work.root / "rank_parts_summary.json", {
            "metrics": metrics, "classes": {str(c): v for c, v in sorted(cluster_info.items())},
            "rank_classes": [sorted(int(c) for c in r["classes"]) for r in ranks], "key_columns": KEY_COLUMNS},
            indent=1)
        log_metrics(spec, metrics)
        log.info("rank-parts: %d images, %d objects, %d candidates in %d of %d classes (%d without), %d clusters; "
                    "%d NaN/zero features dropped", total.images, total.objects, total.candidates,
                    int(metrics["rank_parts/classes_with_candidates"]), len(cluster_info),
                    int(metrics["rank_parts/classes_without_candidates"]), int(metrics["rank_parts/clusters"]),
                    total.dropped_bad_feature)
    barrier()
    if not sm.dist.is_main:
        return None
    return StageResult(metrics=metrics, dataset_path=str(sm.out))
