"""Benchmark of PASS label generation at scale (issue 13): memory flat in the dataset size, faiss vs scikit-learn.

1. **Scaling** -- the dataset-scale part of ``generate-labels`` (``trainers.luss.kmeans`` with the project's
   ``FeatureSpill``): spill N image embeddings (dim 320, convnext_atto's), k-means on a sample of
   ``max_points_per_centroid x K`` rows, assignment of all N rows in blocks. Each size runs in a fresh process
   (its peak RSS is its own); N = 1x, 10x, 100x the demo's 1500 images. The embeddings are synthetic (a mixture of
   K Gaussians on the sphere): the model's forward pass is measured apart (``--forward``: images/s of the labelling
   pass on the demo's 112 px images), and the projection to ImageNet-S's 1.28M images adds the two.
2. **faiss vs scikit-learn** -- the same 100k features, the same K and iterations, one k-means each (Lloyd,
   k-means++ start for scikit-learn on all rows, faiss from our k-means++ start on a sample of 256 x K rows, as
   ``train_kmeans`` does): wall seconds, median of ``--repeat`` runs, and the objective each reaches (mean cosine of
   a row to its centroid), so a faster start that clusters worse would show.

    python benchmarks/luss_labels.py [--repeat 3] [--sizes 1,10,100,1000] [--forward] [-o benchmarks/results/luss_labels.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM, K, DEMO_IMAGES, IMAGENET_S = 320, 50, 1500, 1_281_167


def mixture(n: int, k: int = K, dim: int = DIM, seed: int = 0, chunk: int = 50_000):
    """``n`` unit rows from k well-separated Gaussian clusters, yielded in chunks (never all in memory)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)).astype(np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centers[rng.integers(0, k, m)] + 0.5 * rng.normal(size=(m, dim)).astype(np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def scaling_child(n: int) -> dict:
    """One size, in this process: spill -> sample k-means -> block assignment; seconds per phase and peak RSS."""
    from trainers.luss.kmeans import assign_blocks, read_sample, spilled_rows, train_kmeans
    from trainers.parts.class_clusters import FeatureSpill

    with tempfile.TemporaryDirectory(prefix="luss-bench-") as tmp:
        t0 = time.perf_counter()
        with FeatureSpill(Path(tmp) / "spill", writer="0") as spill:
            for x in mixture(n):
                spill.append(0, x)
        t1 = time.perf_counter()
        chunks, total = spilled_rows(Path(tmp) / "spill")
        sample = read_sample(chunks, 256 * K, 0)
        centroids, info = train_kmeans(sample, K, niter=20, seed=0)
        t2 = time.perf_counter()
        sizes = np.zeros(K, np.int64)
        for _, a in assign_blocks(chunks, centroids):
            sizes += np.bincount(a, minlength=K)
        t3 = time.perf_counter()
    return {"rows": n, "spill_s": t1 - t0, "kmeans_s": t2 - t1, "assign_s": t3 - t2, "total_s": t3 - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "sample": len(sample),
            "reseeded": info["reseeded"], "rows_assigned": int(sizes.sum())}


def mean_cosine(x: np.ndarray, centroids: np.ndarray) -> float:
    """The spherical k-means objective: mean cosine of every row to its nearest centroid (higher is better)."""
    from trainers.luss.kmeans import nearest, normalize_rows

    return float(nearest(normalize_rows(x), normalize_rows(centroids))[1].mean())


def faiss_vs_sklearn(n: int, repeat: int) -> dict:
    from sklearn.cluster import KMeans

    from trainers.luss.kmeans import train_kmeans

    x = np.concatenate(list(mixture(n, seed=1)))
    out = {"rows": n, "k": K, "dim": DIM, "niter": 20, "faiss_s": [], "sklearn_s": [], "faiss_objective": [],
           "sklearn_objective": []}
    for r in range(repeat):
        t0 = time.perf_counter()
        cent, _ = train_kmeans(x, K, niter=20, seed=r)
        out["faiss_s"].append(time.perf_counter() - t0)
        out["faiss_objective"].append(mean_cosine(x, cent))
        t0 = time.perf_counter()
        km = KMeans(K, n_init=1, max_iter=20, tol=0.0, random_state=r, algorithm="lloyd").fit(x)
        out["sklearn_s"].append(time.perf_counter() - t0)
        out["sklearn_objective"].append(mean_cosine(x, km.cluster_centers_))
    out["faiss_median_s"] = statistics.median(out["faiss_s"])
    out["sklearn_median_s"] = statistics.median(out["sklearn_s"])
    out["ratio"] = out["sklearn_median_s"] / out["faiss_median_s"]
    return out


def forward_rate(images: int = 256) -> float:
    """Images/s of the labelling pass's forward (convnext_atto, output stride 16, attention, 112 px, batch 32, one thread)."""
    import torch

    from trainers.luss.labels import features_and_attention
    from trainers.luss.model import Backbone, PixelAttention

    torch.set_num_threads(1)
    net, att = Backbone("convnext_atto", 16).eval(), PixelAttention(320).eval()
    x = torch.rand(32, 3, 112, 112)
    features_and_attention(net, att, x, 4)
    t0 = time.perf_counter()
    for _ in range(images // 32):
        features_and_attention(net, att, x, 4)
    return images / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--forward", action="store_true", help="also measure the model's forward rate (images/s)")
    ap.add_argument("--sizes", default="1,10,100", help="dataset sizes as multiples of the demo's 1500 images")
    ap.add_argument("--machine", default="2-core CPU VM", help="recorded with the figures")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("-o", "--out", type=Path, default=REPO / "benchmarks" / "results" / "luss_labels.json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(scaling_child(args.child)))
        return
    res = {"machine": args.machine, "scaling": []}
    for mult in (int(m) for m in args.sizes.split(",")):
        runs = []
        for _ in range(args.repeat):
            proc = subprocess.run([sys.executable, __file__, "--child", str(DEMO_IMAGES * mult)], capture_output=True,
                                  text=True, check=True, cwd=REPO)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        med = {k: statistics.median(r[k] for r in runs) for k in ("spill_s", "kmeans_s", "assign_s", "total_s", "peak_rss_mb")}
        res["scaling"].append({"images": DEMO_IMAGES * mult, **med, "runs": runs})
        print(f"{DEMO_IMAGES * mult:>8} rows: {med['total_s']:.2f} s (spill {med['spill_s']:.2f}, k-means {med['kmeans_s']:.2f}, "
              f"assign {med['assign_s']:.2f}), peak RSS {med['peak_rss_mb']:.0f} MB", flush=True)
    fs = faiss_vs_sklearn(100_000, args.repeat)
    res["faiss_vs_sklearn"] = fs
    print(f"100k x {DIM}, K={K}, 20 iterations: faiss {fs['faiss_median_s']:.2f} s, scikit-learn {fs['sklearn_median_s']:.2f} s "
          f"-> {fs['ratio']:.1f}x; mean cosine to the centroid {statistics.median(fs['faiss_objective']):.4f} vs "
          f"{statistics.median(fs['sklearn_objective']):.4f}", flush=True)
    if args.forward:
        rate = forward_rate()
        big = res["scaling"][-1]
        per_row = big["total_s"] / big["images"]
        res["forward_images_per_s"] = rate
        res["projection_imagenet_s"] = {"images": IMAGENET_S, "forward_passes": 2, "forward_hours_one_thread": 2 * IMAGENET_S / rate / 3600,
                                        "clustering_hours": IMAGENET_S * per_row / 3600}
        print(f"forward (labelling pass, 1 thread): {rate:.1f} images/s; ImageNet-S (1.28M images, 2 passes): "
              f"{res['projection_imagenet_s']['forward_hours_one_thread']:.1f} h of one thread for the forwards, "
              f"{res['projection_imagenet_s']['clustering_hours'] * 60:.1f} min for spill + k-means + assignment", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
