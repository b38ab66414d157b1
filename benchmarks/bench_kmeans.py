"""Benchmark the clustering core of PartDistillation (trainers/parts).

(a) mining (sec. 4.2): one ``batched_kmeans`` call over many instances vs one scikit-learn KMeans per instance
    (and one faiss k-means per instance), same instances, same run; k=4, cosine, 20 iterations.
(b) class clustering (sec. 4.3): ``cluster_classes`` (faiss per class, features read from a spill on disk)
    vs one scikit-learn KMeans per class over the same spilled features; k=8. Each variant runs in its own
    process so its peak RSS (VmHWM, i.e. ``ru_maxrss`` of that process image) is its own; reported per million candidate features.

Everything runs on one thread (torch, faiss, OpenMP/BLAS) so the comparison is per core. Median of ``--repeats``.
Prints a markdown table and writes ``benchmarks/out/bench_kmeans.json``.

    python benchmarks/bench_kmeans.py                      # the defaults below
    python benchmarks/bench_kmeans.py --classes 200 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _single_thread() -> None:
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    threadpool_limits(1)


def _maxrss_mb() -> float:
    """Peak RSS of this process image: VmHWM (Linux keeps ``ru_maxrss`` across exec, so a child would report its
    parent's peak); ``ru_maxrss`` elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------- (a) mining
def make_instances(num: int, dim: int, nmin: int, nmax: int, seed: int = 0) -> list[np.ndarray]:
    """Per instance 3-6 part directions with noise: pixel features with some structure, not trivially separable."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        n = int(rng.integers(nmin, nmax + 1))
        parts = rng.standard_normal((int(rng.integers(3, 7)), dim))
        out.append((parts[rng.integers(0, len(parts), n)] + 0.8 * rng.standard_normal((n, dim))).astype(np.float32))
    return out


def bench_mining(args) -> dict:
    import torch
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from trainers.parts.kmeans import batched_kmeans, faiss_kmeans, pack_instances

    inst = make_instances(args.instances, args.dim, args.min_points, args.max_points)
    tens = [torch.from_numpy(x) for x in inst]
    normed = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in inst]
    k, iters = 4, 20

    def run_batched():
        x, valid = pack_instances(tens)
        return batched_kmeans(x, valid, k, iters=iters, seed=0)[0]

    def run_sklearn():
        return [KMeans(k, n_init=1, max_iter=iters, random_state=0, algorithm="lloyd").fit_predict(x) for x in normed]

    def run_faiss():
        return [faiss_kmeans(x, k, niter=iters, seed=0)[0] for x in normed]

    variants = (("batched_torch", run_batched), ("sklearn_per_instance", run_sklearn), ("faiss_per_instance", run_faiss))
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    cpu: dict[str, list[float]] = {name: [] for name, _ in variants}
    results = {}
    for _ in range(args.repeats):  # interleaved so load on the shared machine hits all variants alike
        for name, fn in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    assign = results["batched_torch"]
    ari_sk = [adjusted_rand_score(results["sklearn_per_instance"][b], assign[b, : len(x)].numpy()) for b, x in enumerate(inst)]
    ari_fa = [adjusted_rand_score(results["faiss_per_instance"][b], assign[b, : len(x)].numpy()) for b, x in enumerate(inst)]
    med = {n: statistics.median(t) for n, t in times.items()}
    med_cpu = {n: statistics.median(t) for n, t in cpu.items()}
    pts = sum(len(x) for x in inst)
    return {
        "what": f"{args.instances} instances, {args.min_points}-{args.max_points} points (total {pts}), {args.dim}-D, k=4, "
                f"cosine, {iters} iterations max, 1 thread, CPU",
        "runs_s": times, "runs_cpu_s": cpu, "median_s": med, "median_cpu_s": med_cpu,
        "speedup_vs_sklearn": med["sklearn_per_instance"] / med["batched_torch"],
        "speedup_vs_faiss": med["faiss_per_instance"] / med["batched_torch"],
        "cpu_speedup_vs_sklearn": med_cpu["sklearn_per_instance"] / med_cpu["batched_torch"],
        "cpu_speedup_vs_faiss": med_cpu["faiss_per_instance"] / med_cpu["batched_torch"],
        "mean_ari_vs_sklearn": float(np.mean(ari_sk)), "mean_ari_vs_faiss": float(np.mean(ari_fa)),
    }


# -------------------------------------------------------------------------------------- (b) class clustering
def write_spill(spill: Path, classes: int, per_class: int, dim: int, seed: int = 0) -> None:
    from trainers.parts.class_clusters import FeatureSpill

    rng = np.random.default_rng(seed)
    with FeatureSpill(spill, writer="0", chunk_rows=per_class) as w:
        for c in range(classes):
            parts = rng.standard_normal((8, dim))
            w.append(c, parts[rng.integers(0, 8, per_class)] + 0.8 * rng.standard_normal((per_class, dim)))


def child(variant: str, spill: str, out: str, classes: int) -> None:
    """One class-clustering variant in this process; prints JSON with time and peak RSS."""
    _single_thread()
    from sklearn.cluster import KMeans

    from trainers.parts.class_clusters import _atomic_write, cluster_classes, spill_chunks

    base = _maxrss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    if variant == "faiss":
        summary = cluster_classes(spill, out, range(classes), k=8, niter=20, seed=0, use_gpu=False)
        per_class_s = [v["seconds"] for v in summary["classes"].values()]
        write_s = [v["write_seconds"] for v in summary["classes"].values()]
    else:  # the same artefact, written the same way (atomic, fsync'ed): only the clustering differs
        per_class_s, write_s = [], []
        for c in range(classes):
            t = time.perf_counter()
            x = np.concatenate([np.load(p) for p in spill_chunks(spill, c)])
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            km = KMeans(8, n_init=1, max_iter=20, random_state=0, algorithm="lloyd").fit(x)
            res = {"centroids": km.cluster_centers_.astype(np.float32), "assign": km.labels_.astype(np.int64),
                   "counts": np.bincount(km.labels_, minlength=8)}
            t1 = time.perf_counter()
            _atomic_write(Path(out) / f"class-{c}.npz", lambda fh: np.savez(fh, **res))
            per_class_s.append(t1 - t)
            write_s.append(time.perf_counter() - t1)
    print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "maxrss_mb": _maxrss_mb(), "import_rss_mb": base,
                      "per_class_median_s": statistics.median(per_class_s), "cluster_s": sum(per_class_s),
                      "write_s": sum(write_s)}))


def bench_classes(args, classes: int, per_class: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_kmeans_"))
    try:
        write_spill(tmp / "spill", classes, per_class, args.class_dim)
        runs: dict[str, list[dict]] = {"faiss_per_class": [], "sklearn_per_class": []}
        for r in range(args.repeats):
            for name, variant in (("faiss_per_class", "faiss"), ("sklearn_per_class", "sklearn")):
                out = tmp / f"out-{variant}-{r}"
                proc = subprocess.run([sys.executable, __file__, "--child", variant, "--spill", str(tmp / "spill"),
                                       "--out", str(out), "--classes", str(classes)],
                                      capture_output=True, text=True, check=True, cwd=REPO)
                runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    millions = classes * per_class / 1e6
    res: dict = {"what": f"{classes} classes x {per_class} features x {args.class_dim}-D ({millions:g} M features), k=8, "
                         f"20 iterations, 1 thread, CPU, features read from a spill on disk",
                 "runs": runs}
    for name, rs in runs.items():
        sec = statistics.median(r["seconds"] for r in rs)
        res[name] = {"median_s": sec, "s_per_million": sec / millions,
                     "median_cpu_s": statistics.median(r["cpu_seconds"] for r in rs),
                     "peak_rss_mb": statistics.median(r["maxrss_mb"] for r in rs),
                     "rss_above_imports_mb": statistics.median(r["maxrss_mb"] - r["import_rss_mb"] for r in rs),
                     "per_class_median_ms": 1e3 * statistics.median(r["per_class_median_s"] for r in rs),
                     "load_and_cluster_s": statistics.median(r["cluster_s"] for r in rs),
                     "write_s": statistics.median(r["write_s"] for r in rs)}
    res["speedup_faiss_vs_sklearn"] = res["sklearn_per_class"]["median_s"] / res["faiss_per_class"]["median_s"]
    res["cpu_speedup_faiss_vs_sklearn"] = res["sklearn_per_class"]["median_cpu_s"] / res["faiss_per_class"]["median_cpu_s"]
    res["speedup_cluster_only"] = res["sklearn_per_class"]["load_and_cluster_s"] / res["faiss_per_class"]["load_and_cluster_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--min-points", type=int, default=50)
    ap.add_argument("--max-points", type=int, default=800)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--class-dim", type=int, default=64)
    ap.add_argument("--big-classes", type=int, default=10, help="(b') the same features in a few big classes")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: mining,classes,big")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "bench_kmeans.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spill", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.spill, args.out, args.classes)
        return
    _single_thread()
    skip = set(filter(None, args.skip.split(",")))
    import torch

    report: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                                "load_avg_start": os.getloadavg()[0], "threads": 1}, "repeats": args.repeats}
    if "mining" not in skip:
        report["mining"] = bench_mining(args)
    if "classes" not in skip:
        report["classes"] = bench_classes(args, args.classes, args.per_class)
    if "big" not in skip and args.big_classes:
        report["big_classes"] = bench_classes(args, args.big_classes, args.classes * args.per_class // args.big_classes)
    report["machine"]["load_avg_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"\n## Clustering (trainers/parts), median of {args.repeats}, 1 thread, load avg "
          f"{report['machine']['load_avg_start']:.1f} -> {report['machine']['load_avg_end']:.1f} on {os.cpu_count()} CPUs\n")
    if "mining" in report:
        m = report["mining"]
        print(f"(a) mining: {m['what']}\n")
        print("| variant | median wall s | vs batched | median CPU s | vs batched (CPU) |\n| --- | ---: | ---: | ---: | ---: |")
        for n, s in m["median_s"].items():
            c = m["median_cpu_s"][n]
            print(f"| {n} | {s:.3f} | {s / m['median_s']['batched_torch']:.2f}x | {c:.3f} | "
                  f"{c / m['median_cpu_s']['batched_torch']:.2f}x |")
        print(f"\nagreement with batched (mean ARI): sklearn {m['mean_ari_vs_sklearn']:.3f}, faiss {m['mean_ari_vs_faiss']:.3f}\n")
    for key in ("classes", "big_classes"):
        if key in report:
            c = report[key]
            print(f"(b) class clustering: {c['what']}\n")
            print("| variant | total wall s | total CPU s | wall s / M features | load+cluster s | write s "
                  "| per class ms (load+cluster) | peak RSS MB | RSS above imports MB |\n"
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            for n in ("faiss_per_class", "sklearn_per_class"):
                v = c[n]
                print(f"| {n} | {v['median_s']:.2f} | {v['median_cpu_s']:.2f} | {v['s_per_million']:.2f} | "
                      f"{v['load_and_cluster_s']:.2f} | "
                      f"{v['write_s']:.2f} | {v['per_class_median_ms']:.1f} | {v['peak_rss_mb']:.0f} | "
                      f"{v['rss_above_imports_mb']:.0f} |")
            print(f"\nfaiss speed-up over sklearn: {c['speedup_faiss_vs_sklearn']:.1f}x total wall, "
                  f"{c['cpu_speedup_faiss_vs_sklearn']:.1f}x total CPU, {c['speedup_cluster_only']:.1f}x load+cluster\n")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
