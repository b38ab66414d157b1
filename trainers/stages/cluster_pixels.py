"""Stage ``cluster-pixels``: the one-stage self-training baseline's labels (PartDistillation sec. 5, baseline (2)).

Per object class, k-means over the **pixels** of all instances of that class across the dataset, then every
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
writes its part of the dataset (``trainers.shardmap``); rank 0 publishes the merged index. Spill and cluster
results live in ``<workdir>/cluster-pixels-<fingerprint>/`` (the shard-map fingerprint: inputs, params, world
size), so a changed spec starts afresh.

Fitted centroids: the output dataset also holds the per-class k-means results (``clusters/class-<c>.npz``). Given
``datasets["centroids"]`` (such a dataset, e.g. the train split's), phases 1-2 are skipped: the instance pixels of
``datasets["images"]`` take their nearest centroid of that fit (the k-means baseline fitted on the train split and
applied to the evaluation split, never fitted on the images it labels), and its ``label_map.json`` is kept.

Params: ``python -m trainers cluster-pixels --help``. The library: ``trainers.parts.pixel_clusters``.

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

import shutil
from pathlib import Path

import torch

from contract.io import read_json, write_json
from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import all_reduce_sum, barrier
from trainers.data.batches import at_input_size, category_labels
from trainers.engine import MetricLogger
from trainers.inputs import StageInputError, dataset_input, load_model_input
from trainers.parts.class_clusters import FeatureSpill, cluster_classes, load_class_clusters, spill_counts
from trainers.parts.label_map import LABEL_MAP_FILE, cluster_info, label_map_doc
from trainers.parts.pixel_clusters import PixelClusterStats, label_pixels, spill_pixels
from trainers.shardmap import ShardMap


CLUSTERS = "clusters"  # the per-class k-means results inside the output dataset


def run(spec: StageSpec):
    """Spill, cluster per class over ranks, label every instance pixel; rank 0 publishes the labels dataset."""
    if "centroids" in spec.inputs.datasets:
        return _apply(spec)
    p = params_of(spec)
    sm = ShardMap(spec, p, name=spec.name)
    d = sm.dist
    class_of_label = {i: cid for cid, i in category_labels(sm.images).items()}
    work = Path(spec.outputs.workdir) / f"cluster-pixels-{sm.fingerprint[:12]}"
    spill_dir, clusters_dir = work / "spill", work / "clusters"
    n_mine = sm.num_samples()
    logger = MetricLogger(spec, d.is_main, total=2 * n_mine, initial=0)
    model = None
    try:
        # phase 1: spill (skipped when this rank's spill is complete)
        spill_done = spill_dir / "_done" / f"{d.rank}.json"
        done = read_json(spill_done)
        if done is not None and done.get("fingerprint") == sm.fingerprint:
            stats = PixelClusterStats.from_dict(done["stats"])
            logger.advance(n_mine)
        else:
            stats = PixelClusterStats()
            model = at_input_size(load_model_input(spec, "teacher", d.device), p)
            spill = FeatureSpill(spill_dir, writer=str(d.rank))
            spill_pixels(model, sm.images, spill, p, class_of_label, rank=d.rank, world_size=d.world_size,
                         device=d.device, stats=stats, on_batch=logger.advance)
            spill.close()
            write_json(spill_done, {"fingerprint": sm.fingerprint, "stats": stats.to_dict()}, indent=None)
        barrier()

        # phase 2: k-means per class, classes spread over ranks (each class file resumable)
        counts = spill_counts(spill_dir)
        summary = cluster_classes(spill_dir, clusters_dir, list(counts), k=p.k, niter=p.niter, seed=p.seed,
                                  rank=d.rank, world_size=d.world_size, use_gpu=p.use_gpu, counts=counts,
                                  max_points_per_centroid=p.max_points_per_centroid)
        barrier()

        # phase 3: label every pixel of every instance (a map over shards)
        def labeller():
            centroids = {c: torch.from_numpy(load_class_clusters(clusters_dir, c)["centroids"]).float() for c in counts}
            teacher = model or at_input_size(load_model_input(spec, "teacher", d.device), p)
            return lambda keys, images, records, st: label_pixels(teacher, keys, images, records, centroids, p,
                                                                  class_of_label, st)

        if sm.done() is not None:
            logger.advance(n_mine)
        stats = sm.write_part(lambda: sm.labelled(labeller(), stats, same_size=True, allow_parts=p.allow_parts,
                                                  on_batch=logger.advance), stats)
        def publish(out: Path) -> None:
            write_json(out / LABEL_MAP_FILE, label_map_doc(sm.index.categories, cluster_info(clusters_dir, counts), p.k),
                       indent=1)
            (out / CLUSTERS).mkdir(exist_ok=True)
            for c in counts:  # the fit, so other splits can be labelled with it (datasets.centroids)
                shutil.copyfile(clusters_dir / f"class-{int(c)}.npz", out / CLUSTERS / f"class-{int(c)}.npz")

        return sm.finish(stats, lambda total, wall, merged: _metrics(total, summary, p.k, wall, merged),
                         publish=publish, logger=logger)
    finally:
        logger.close()


def _apply(spec: StageSpec):
    """Label every instance pixel of ``datasets.images`` with the centroids of a fitted cluster-pixels dataset."""
    p = params_of(spec)
    fitted = Path(dataset_input(spec, "centroids"))
    label_map = read_json(fitted / LABEL_MAP_FILE)
    files = sorted((fitted / CLUSTERS).glob("class-*.npz"))
    if label_map is None or not files:
        raise StageInputError(f"inputs.datasets.centroids ({fitted}): not a cluster-pixels dataset with its fit "
                              f"({LABEL_MAP_FILE} and {CLUSTERS}/class-<id>.npz)")
    if int(label_map.get("k", p.k)) != p.k:
        raise StageInputError(f"inputs.datasets.centroids ({fitted}): fitted with k={label_map.get('k')}, params.k={p.k}")
    classes = [int(f.stem.split("-", 1)[1]) for f in files]
    centroids = {c: torch.from_numpy(load_class_clusters(fitted / CLUSTERS, c)["centroids"]).float() for c in classes}
    sm = ShardMap(spec, p, name=spec.name)
    class_of_label = {i: cid for cid, i in category_labels(sm.images).items()}

    def labeller(d):
        teacher = at_input_size(load_model_input(spec, "teacher", d.device), p)
        return lambda keys, images, records, st: label_pixels(teacher, keys, images, records, centroids, p,
                                                              class_of_label, st)

    def metrics(total: PixelClusterStats, wall: float, merged) -> dict[str, float]:
        out = total.as_metrics()
        out.update({"cluster/classes": float(len(classes)), "cluster/wall_seconds": float(wall)})
        if merged is not None:
            out["cluster/dataset_samples"] = float(merged.num_samples)
        return out

    return sm.run(labeller, PixelClusterStats(), same_size=True, allow_parts=p.allow_parts, metrics=metrics,
                  publish=lambda out: write_json(out / LABEL_MAP_FILE, label_map, indent=1))


def _metrics(total: PixelClusterStats, summary: dict, k: int, wall: float, merged) -> dict[str, float]:
    """``cluster/*`` metrics (a collective): the summed counts plus every rank's classes' clustering summary."""
    classes = summary["classes"].values()
    n_cls, empty, fewer, nan, zero, ksum = all_reduce_sum([
        len(classes), sum(1 for c in classes if c["k"] == 0), sum(1 for c in classes if 0 < c["k"] < k),
        sum(c["num_nan"] for c in classes), sum(c["num_zero"] for c in classes), sum(c["k"] for c in classes)])
    metrics = total.as_metrics()
    metrics.update({"cluster/classes": n_cls, "cluster/classes_empty": empty, "cluster/classes_fewer_than_k": fewer,
                    "cluster/features_nan": nan, "cluster/features_zero": zero,
                    "cluster/clusters_per_class": ksum / max(n_cls - empty, 1.0),
                    "cluster/wall_seconds": float(wall)})
    if merged is not None:
        metrics["cluster/dataset_samples"] = float(merged.num_samples)
    return metrics
