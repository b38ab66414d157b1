"""Stage ``generate-labels``: PASS's pixel-label generation (LUSS sec. 4.3, eq. 7) as a resumable map over shards.

Four phases over ``inputs.datasets.images`` with ``inputs.models.model``, every one resumable:

0. **polarity** -- ``method: pixel_attention``: which side of the attention is the object, from the border prior over
   ``polarity_images`` images (``params.polarity``, ``trainers.luss.labels`` "Polarity"); cheap, so it is recomputed on
   a resume rather than stored;
1. **spill** -- each rank embeds its share (``method: pixel_attention``: the attention-pooled image embedding;
   ``pixel_kmeans``: ``pixels_per_image`` sampled pixel features) and appends them to a feature spill on disk
   (``trainers.parts.class_clusters.FeatureSpill``), with a histogram of the pixel attention;
2. **cluster** -- rank 0 trains spherical faiss k-means on a seeded sample of at most ``max_points_per_centroid x k``
   spilled rows (k, or k+1 for pixel_kmeans), re-seeding any cluster left empty (``trainers.luss.kmeans``);
3. **assign** -- each rank streams its spilled rows through the centroid index in blocks; the cluster sizes over
   the whole dataset are summed (a cluster no image joined is counted);
4. **label** -- each rank labels every pixel of its images by the rule (``trainers.luss.labels``): 0 'other' (below
   tau, or the 'other' cluster), else the nearest centroid's id 1..K; one ``proposals`` entry per generated
   category present (RLE, ``label``, ``score`` = its mean attention) -- a DVC version. Records lose their ground-truth
   ``objects`` (never copied). An image left all 'other' is kept (it teaches 'other') and counted.

The output dataset also holds ``label_rule.json`` and ``centroids.npy``: the rule, applied unchanged by the evaluation
to other splits and read by fine-tuning (K). No process holds more than one block of embeddings, the k-means sample
and its own images' labels. Spill and clustering live in ``<workdir>/generate-labels-<fingerprint>/``.
Params: ``python -m trainers generate-labels --help``.
"""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from contract.io import atomic_open, read_json, write_json
from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import Stats, all_reduce_max, all_reduce_stats, all_reduce_sum, barrier
from trainers.data.batches import images_to_tensor, iter_same_size
from trainers.engine import MetricLogger
from trainers.inputs import StageInputError, model_input_path
from trainers.luss.kmeans import ChunkFile, assign_blocks, read_sample, spilled_rows, train_kmeans
from trainers.luss.labels import (
    LabelRule,
    attention_histogram,
    border_contrast,
    features_and_attention,
    image_embeddings,
    label_maps,
    labels_to_proposals,
    otsu_threshold,
    sample_pixels,
)
from trainers.luss.model import PixelAttention, RepresentationFileError, backbone_from, output_stride_of, read_model_file
from trainers.parts.class_clusters import FeatureSpill, faiss_gpu
from trainers.shardmap import ShardMap

log = logging.getLogger(__name__)
HIST_BINS = 256


@dataclass
class LabelStats(Stats):
    """Counters of the spill and label phases (summed over ranks)."""

    prefix = "labels/"
    images: int = 0
    rows_spilled: int = 0
    rows_nonfinite: int = 0
    pixels: int = 0
    pixels_other: int = 0
    images_all_other: int = 0
    proposals: int = 0
    objects_dropped: int = 0

    def derived(self) -> dict[str, float]:
        return {"other_fraction": self.pixels_other / self.pixels if self.pixels else 0.0}


def load_labeller(spec: StageSpec, method: str, device):
    """(backbone, attention or None, model file doc) of ``inputs.models.model``."""
    path = model_input_path(spec, "model")
    try:
        doc = read_model_file(path, needs=("pixel_attention",) if method == "pixel_attention" else ())
    except RepresentationFileError as e:
        raise StageInputError(f"inputs.models.model: {e} (method {method})") from e
    backbone = backbone_from(doc).to(device).eval()
    attention = None
    if method == "pixel_attention":
        attention = PixelAttention(backbone.out_channels)
        attention.load_state_dict(doc["extra"]["pixel_attention"])
        attention = attention.to(device).eval()
    return backbone, attention, doc


def polarity(sm: ShardMap, p, backbone, attention) -> tuple[bool, float]:
    """Phase 0 (every rank): (flip the attention?, the mean border contrast over the images read). ``auto`` reads this
    rank's first ``polarity_images / world_size`` images and averages the border contrast over all ranks."""
    if attention is None or p.polarity == "as_trained":
        return False, float("nan")
    if p.polarity == "flipped":
        return True, float("nan")
    d = sm.dist
    want = -(-p.polarity_images // d.world_size)
    total, count = 0.0, 0
    for group in iter_same_size(sm.images, p.batch_size, rank=d.rank, world_size=d.world_size):
        if count >= want:
            break
        images = images_to_tensor([g[2] for g in group[: want - count]]).to(d.device)
        _, att = features_and_attention(backbone, attention, images, p.upsample)
        c = border_contrast(att)
        total, count = total + float(c.sum()), count + len(c)
    total, count = all_reduce_sum([total, float(count)])
    mean = total / max(count, 1.0)
    return bool(mean < 0), mean


def spill(sm: ShardMap, p, backbone, attention, spill_dir: Path, logger, flipped: bool = False) -> tuple[LabelStats, np.ndarray]:
    """Phase 1 on this rank: embeddings (or sampled pixels) into the spill; the attention histogram."""
    d = sm.dist
    stats, hist = LabelStats(), np.zeros(HIST_BINS, dtype=np.int64)
    gen = torch.Generator().manual_seed(p.seed * 1000003 + d.rank)
    with FeatureSpill(spill_dir, writer=str(d.rank)) as out:
        for group in iter_same_size(sm.images, p.batch_size, rank=d.rank, world_size=d.world_size):
            images = images_to_tensor([g[2] for g in group]).to(d.device)
            feats, att = features_and_attention(backbone, attention, images, p.upsample, flipped)
            rows = image_embeddings(feats, att) if p.method == "pixel_attention" else sample_pixels(feats, p.pixels_per_image, gen)
            rows = rows.float().cpu().numpy()
            finite = np.isfinite(rows).all(1)
            out.append(0, rows[finite])
            stats.images += len(group)
            stats.rows_spilled += int(finite.sum())
            stats.rows_nonfinite += int((~finite).sum())
            if att is not None:
                hist += attention_histogram(att, HIST_BINS)
            logger.advance(len(group))
    return stats, hist


def cluster(p, spill_dir: Path, kmeans_file: Path, fingerprint: str) -> dict:
    """Phase 2 (rank 0): k-means on a seeded sample of the spill; its result file is reused for the same fingerprint."""
    done = read_json(kmeans_file.with_suffix(".json"))
    if done and done.get("fingerprint") == fingerprint and kmeans_file.is_file():
        return done
    k = p.k + (1 if p.method == "pixel_kmeans" else 0)
    chunks, n = spilled_rows(spill_dir)
    t0 = time.perf_counter()
    sample = read_sample(chunks, p.max_points_per_centroid * k, p.seed)
    centroids, info = train_kmeans(sample, k, niter=p.niter, seed=p.seed, gpu=faiss_gpu(p.use_gpu))
    with atomic_open(kmeans_file, "wb") as f:
        np.save(f, centroids)
    doc = {"fingerprint": fingerprint, "rows": n, "sample": len(sample), "seconds": time.perf_counter() - t0, **info}
    write_json(kmeans_file.with_suffix(".json"), doc, indent=None)
    return doc


def run(spec: StageSpec):
    p = params_of(spec)
    sm = ShardMap(spec, p, name=spec.name)
    d = sm.dist
    work = Path(spec.outputs.workdir) / f"generate-labels-{sm.fingerprint[:12]}"
    spill_dir, kmeans_file = work / "spill", work / "centroids.npy"
    n_mine = sm.num_samples()
    logger = MetricLogger(spec, d.is_main, total=(2 if p.write_labels else 1) * n_mine, initial=0)
    backbone, attention, doc = load_labeller(spec, p.method, d.device)
    try:
        # phase 0: the attention's polarity (label-free), before anything is pooled with it
        flipped, contrast = polarity(sm, p, backbone, attention)
        if attention is not None:
            log.info("%s: attention %s (border contrast %+.4f, polarity %s)", spec.name,
                     "flipped: 1 - a is the object side" if flipped else "as trained", contrast, p.polarity)
        # phase 1: spill (skipped when this rank's spill is complete for the fingerprint)
        marker = spill_dir / "_done" / f"{d.rank}.json"
        done = read_json(marker)
        if done is not None and done.get("fingerprint") == sm.fingerprint:
            stats, hist = LabelStats.from_dict(done["stats"]), np.asarray(done["hist"], dtype=np.int64)
            logger.advance(n_mine)
        else:
            stats, hist = spill(sm, p, backbone, attention, spill_dir, logger, flipped)
            write_json(marker, {"fingerprint": sm.fingerprint, "stats": stats.to_dict(), "hist": hist.tolist()}, indent=None)
        barrier()
        # phase 2: k-means on a sample (rank 0), the same centroids for every rank
        info = cluster(p, spill_dir, kmeans_file, sm.fingerprint) if d.is_main else None
        barrier()
        info = info or read_json(kmeans_file.with_suffix(".json"))
        centroids = np.load(kmeans_file)
        # phase 3: every spilled row to its nearest centroid, in blocks; cluster sizes over the dataset
        mine = [ChunkFile(c) for c in sorted(spill_dir.glob(f"class-0/chunk-{d.rank}-*.npy")) if not c.name.endswith(".keys.npy")]
        sizes = np.zeros(len(centroids), dtype=np.int64)
        for _, a in assign_blocks(mine, centroids, gpu=faiss_gpu(p.use_gpu)):
            sizes += np.bincount(a, minlength=len(centroids))
        sizes = np.rint(all_reduce_sum(sizes.tolist())).astype(np.int64)
        hist = np.rint(all_reduce_sum(hist.tolist())).astype(np.int64)
        threshold = None
        if p.method == "pixel_attention":
            threshold = otsu_threshold(hist) if p.threshold == "otsu" else float(p.threshold)
        other = int(np.argmax(sizes)) if p.method == "pixel_kmeans" else None
        rule = LabelRule(method=p.method, k=p.k, threshold=threshold, other_cluster=other, upsample=p.upsample,
                         timm_name=doc["timm_name"], output_stride=output_stride_of(doc),
                         model=spec.inputs.models["model"].uri,
                         stats={"cluster_sizes": sizes.tolist(), "reseeded": info["reseeded"], "faiss_splits": info["faiss_splits"],
                                "sample": info["sample"], "rows": info["rows"], "attention_histogram": hist.tolist(),
                                "border_contrast": contrast if contrast == contrast else None},
                         attention_flipped=flipped)
        extra = {"labels/k": float(p.k), "labels/reseeded": float(info["reseeded"]),
                 "labels/faiss_splits": float(info["faiss_splits"]), "labels/kmeans_sample": float(info["sample"]),
                 "labels/kmeans_seconds": float(info["seconds"]),
                 "labels/clusters_without_rows": float((sizes == 0).sum()),
                 **({"labels/threshold": float(threshold)} if threshold is not None else {}),
                 **({"labels/attention_flipped": float(flipped), "labels/border_contrast": contrast}
                    if attention is not None and contrast == contrast else {})}

        def metrics(total: LabelStats, wall: float, merged) -> dict[str, float]:
            out = total.as_metrics()
            out.update(extra)
            out["labels/wall_seconds"] = float(wall)
            out["labels/peak_rss_mb"] = all_reduce_max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
            if merged is not None:
                out["labels/dataset_samples"] = float(merged.num_samples)
            return out

        if not p.write_labels:  # the rule alone (an evaluation applies it); no label shards
            result_metrics = metrics(all_reduce_stats(stats), all_reduce_max(time.perf_counter() - sm.t0), None)
            if d.is_main:
                sm.out.mkdir(parents=True, exist_ok=True)
                rule.save(sm.out, centroids)
                logger.log(0, result_metrics)
            barrier()
            from trainers.stages import StageResult

            return StageResult(metrics=result_metrics, dataset_path=str(sm.out)) if d.is_main else None

        # phase 4: label every pixel of this rank's images (a resumable shard part)
        cent = torch.from_numpy(centroids).float().to(d.device)

        def label(keys, images, records, st: LabelStats):
            feats, att = features_and_attention(backbone, attention, images, p.upsample, flipped)
            size = tuple(images.shape[-2:])
            maps = label_maps(rule, cent, feats, att, size).cpu().numpy()
            att_up = (F.interpolate(att.mean(1, keepdim=True), size=size, mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
                      if att is not None else [None] * len(keys))
            out = []
            for m, a, record in zip(maps, att_up, records):
                st.objects_dropped += len(record.pop("objects", None) or [])  # ground truth is never copied
                props = labels_to_proposals(m, a)
                st.pixels += m.size
                st.pixels_other += int((m == 0).sum())
                st.images_all_other += int(not props)
                st.proposals += len(props)
                out.append(props)
            return out

        if sm.done() is not None:
            logger.advance(n_mine)
        stats = sm.write_part(lambda: sm.labelled(label, stats, same_size=True, on_batch=logger.advance), stats)
        return sm.finish(stats, metrics, publish=lambda out: rule.save(out, centroids), logger=logger)
    finally:
        logger.close()
