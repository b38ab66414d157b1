"""Benchmark part mining (PartDistillation sec. 4.2, stage ``mine-parts``) on the demo PartWorld images.

(a) Throughput of ``trainers.parts.mining.mine_batch`` (teacher forward + multi-scale features + batched k-means +
    full-resolution assignment + RLE): images/s, instances/s, and the share of the time spent outside the model's
    forward pass (docs/architecture.md "Scale": it must stay small).
(b) The clustering alone, on the very k-means problems (a): one ``batched_kmeans`` call per image batch (as the
    stage does) vs one scikit-learn ``KMeans`` per instance (k-means++, n_init=1, same iterations, on the
    L2-normalised features = spherical k-means up to the centroid re-normalisation); ratio of the times.

One thread (torch, OpenMP/BLAS), so figures are per core. Median of ``--repeats`` runs (>= 3).
Prints a markdown table and writes ``benchmarks/out/bench_mining.json``.

    python benchmarks/bench_mining.py                                  # demo eval images, GT objects
    python benchmarks/bench_mining.py --teacher /tmp/pd/teacher/model.pt --objects detected --images 64
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_teacher(path: str | None):
    from trainers.models.config import DecoderConfig, SegmenterConfig
    from trainers.models.io import load_segmenter
    from trainers.models.segmenter import Segmenter

    if path and Path(path).is_file():
        return load_segmenter(path), path
    import torch

    torch.manual_seed(0)  # no trained teacher: the default architecture, random weights (throughput only)
    return Segmenter(SegmenterConfig(decoder=DecoderConfig(num_classes=12))).eval(), "random-init default Segmenter"


def batches(data: str, count: int, batch_size: int):
    from trainers.data import shards
    from trainers.data.batches import images_to_tensor

    samples = list(itertools.islice(shards.iter_samples(data, allow_parts=True), count))
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        out.append(([s[0] for s in chunk], images_to_tensor([s[1] for s in chunk]), [s[2] for s in chunk]))
    return out


def run_mining(model, data, cfg) -> dict:
    from trainers.parts.mining import MiningStats, mine_batch

    stats = MiningStats()
    t0 = time.perf_counter()
    for keys, images, records in data:
        mine_batch(model, keys, images, records, cfg, stats)
    wall = time.perf_counter() - t0
    mined = stats.objects - stats.objects_too_small
    return {"wall_s": wall, "images_per_s": stats.images / wall, "instances_per_s": mined / wall,
            "share_outside_forward": stats.seconds_mining / (stats.seconds_forward + stats.seconds_mining),
            "forward_s": stats.seconds_forward, "mining_s": stats.seconds_mining, "images": stats.images,
            "instances": mined, "proposals": stats.proposals}


def kmeans_problems(model, data, cfg) -> list[list]:
    """The k-means point sets of every mined instance, grouped by image batch (what ``mine_batch`` clusters)."""
    import torch

    from trainers.parts.mining import detected_instances, gt_instances, instance_points

    out = []
    with torch.no_grad():
        for keys, images, records in data:
            levels = [model.pixel_features(images)[i] for i in cfg.feature_levels]
            insts = gt_instances(records, images.device) if cfg.objects == "gt" else \
                detected_instances(model, images, records, cfg)
            h, w = images.shape[-2:]
            insts = [i for i in insts if int(i.mask.sum()) >= max(1.0, cfg.min_object_area * h * w)]
            if insts:
                out.append(instance_points(levels, insts, keys, cfg)[0])
    return out


def time_batched(problems, cfg) -> float:
    from trainers.parts.kmeans import batched_kmeans, pack_instances

    t0 = time.perf_counter()
    for points in problems:
        x, valid = pack_instances(points)
        batched_kmeans(x, valid, cfg.k, iters=cfg.iters, metric=cfg.metric, seed=cfg.seed)
    return time.perf_counter() - t0


def time_sklearn(problems, cfg) -> float:
    import warnings

    from sklearn.cluster import KMeans

    arrays = [(p / p.norm(dim=1, keepdim=True).clamp(min=1e-12)).numpy() for batch in problems for p in batch]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on degenerate instances
        for a in arrays:
            KMeans(n_clusters=min(cfg.k, len(a)), n_init=1, max_iter=cfg.iters, init="k-means++",
                   random_state=cfg.seed).fit(a)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO / "data/partworld-demo/eval"))
    ap.add_argument("--teacher", default="/tmp/pd/teacher/model.pt", help="segmenter file (random init if missing)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--objects", choices=("gt", "detected"), default="gt")
    ap.add_argument("--score-threshold", type=float, default=0.5, help="detections kept above it (--objects detected)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks/out/bench_mining.json"))
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error("--repeats must be >= 3 (median of >= 3 runs)")

    import torch

    from contract.stages.mine_parts import MinePartsParams

    torch.set_num_threads(1)
    model, teacher = load_teacher(args.teacher)
    cfg = MinePartsParams(objects=args.objects, batch_size=args.batch_size, score_threshold=args.score_threshold)
    data = batches(args.data, args.images, args.batch_size)
    run_mining(model, data[:1], cfg)  # warm-up
    runs = [run_mining(model, data, cfg) for _ in range(args.repeats)]
    problems = kmeans_problems(model, data, cfg)
    n_problems = sum(len(b) for b in problems)
    batched = [time_batched(problems, cfg) for _ in range(args.repeats)]
    sk = [time_sklearn(problems, cfg) for _ in range(args.repeats)]

    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    doc = {
        "benchmark": "bench_mining", "teacher": teacher, "data": args.data, "objects": args.objects, "score_threshold": args.score_threshold,
        "images": args.images, "batch_size": args.batch_size, "repeats": args.repeats, "threads": 1,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg()},
        "mining_median": med, "mining_runs": runs,
        "clustering": {"instances": n_problems, "batched_kmeans_s": statistics.median(batched),
                       "sklearn_per_instance_s": statistics.median(sk),
                       "ratio_sklearn_over_batched": statistics.median(sk) / statistics.median(batched),
                       "batched_runs": batched, "sklearn_runs": sk},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    c = doc["clustering"]
    print(f"mining on {args.images} images ({args.objects} objects, {med['instances']:.0f} instances), "
          f"teacher: {teacher}, 1 thread, median of {args.repeats}\n")
    print("| figure | value |\n| --- | ---: |")
    print(f"| images/s | {med['images_per_s']:.2f} |")
    print(f"| instances/s | {med['instances_per_s']:.2f} |")
    print(f"| share of mining time outside the forward pass | {100 * med['share_outside_forward']:.1f}% |")
    print(f"| batched k-means, {c['instances']} instances | {c['batched_kmeans_s'] * 1000:.1f} ms |")
    print(f"| one sklearn KMeans per instance | {c['sklearn_per_instance_s'] * 1000:.1f} ms |")
    print(f"| ratio sklearn / batched | {c['ratio_sklearn_over_batched']:.1f}x |")
    print(f"\nwrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
