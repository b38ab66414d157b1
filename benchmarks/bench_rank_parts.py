"""Benchmark rank-parts' spill / cluster / label machinery at 10k object classes (PartDistillation sec. 4.3).

Phases, each in its own process (so its peak RSS, VmHWM, is its own), one thread (per-core figures):

(1) stream: ``trainers.data.partworld.stream`` of a 10k-class PartWorld (64 px, eval split: its part masks stand
    in for the part model's candidates) -> a cheap per-part feature (mean/std colour, position and size in the
    object, projected to 64-D by a fixed random matrix) -> ``FeatureSpill`` per object class, keyed like the stage.
    Measures render, feature and spill rates; candidates per image for the projection.
(2) scale: the same 10k classes with ``--per-class`` candidates each, synthesised from the class templates
    (``class_template``: each candidate is its part type's 64-D prototype + noise; part types are shared across
    classes as in PartWorld), spilled the same way. Rendering ~1M candidates takes ~100k images (~20 min on this
    machine), so the clustering is measured on template features; the stream phase measures real ones.
(3) cluster: ``cluster_classes`` (faiss per class, what the stage runs) vs one scikit-learn ``KMeans`` per class
    over the same spill (k = min(8, n)), median of ``--repeats``; also on ``--big-classes`` classes holding the
    same features (the per-class regime of 10M images), to split per-class overhead from per-candidate cost.
(4) label: eq. 2 (``score_candidates``: density scores + cluster ids of every candidate, from the spill).

Prints a markdown table with a projection to 10M images (arithmetic shown); JSON to benchmarks/out/.

    python benchmarks/bench_rank_parts.py                              # 10k classes x 100, 3 repeats
    python benchmarks/bench_rank_parts.py --classes 2000 --repeats 1   # quicker
    python benchmarks/bench_rank_parts.py --report                     # re-print the last JSON
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

from bench_kmeans import _maxrss_mb, _single_thread  # noqa: E402  (sets the 1-thread environment)

import numpy as np  # noqa: E402

DIM = 64


def world(classes: int):
    from trainers.data.partworld import PartWorldConfig

    return PartWorldConfig(num_classes=classes, image_size=64, num_part_types=40, min_object_area=32,
                           max_distractors=0)


# -- phases (each runs in a child process) ------------------------------------------------------


def phase_stream(args) -> dict:
    """Render, feature and spill ``--images`` streamed PartWorld images."""
    from trainers.data.partworld import stream
    from trainers.parts.class_clusters import FeatureSpill
    from trainers.structures import decode_mask

    proj = np.random.default_rng(1).standard_normal((10, DIM)).astype(np.float32)
    base = _maxrss_mb()
    t_render = t_feat = t_spill = 0.0
    n_cand = objects = 0
    it = stream(world(args.classes), "eval")
    with FeatureSpill(args.spill, writer="0") as spill:
        for _ in range(args.images):
            t = time.perf_counter()
            _, image, record = next(it)
            t_render += time.perf_counter() - t
            t = time.perf_counter()
            img = image.astype(np.float32) / 255
            objs = {o["id"]: o for o in record["objects"]}
            rows: dict[int, list] = {}
            for j, p in enumerate(record["parts"]):
                m = decode_mask(p["segmentation"])
                ys, xs = np.nonzero(m)
                x0, y0, w, h = objs[p["object_id"]]["bbox"]
                px = img[m]
                f = np.concatenate([px.mean(0), px.std(0), [(xs.mean() - x0) / max(w, 1), (ys.mean() - y0) / max(h, 1),
                                                           m.sum() / max(objs[p["object_id"]]["area"], 1), w / max(h, 1)]])
                c = objs[p["object_id"]]["category_id"]
                rows.setdefault(c, []).append((f @ proj, [0, n_cand, record["image_id"], p["object_id"], j]))
                n_cand += 1
            objects += len(objs)
            t_feat += time.perf_counter() - t
            t = time.perf_counter()
            for c, r in rows.items():
                spill.append(c, np.stack([x[0] for x in r]), keys=np.asarray([x[1] for x in r], dtype=np.int64))
            t_spill += time.perf_counter() - t
        t = time.perf_counter()
    t_spill += time.perf_counter() - t  # close: the last flush and the manifest
    return {"images": args.images, "objects": objects, "candidates": n_cand, "render_s": t_render,
            "feature_s": t_feat, "spill_s": t_spill, "maxrss_mb": _maxrss_mb(), "import_rss_mb": base}


def phase_scale(args) -> dict:
    """Spill ``classes x per_class`` template features."""
    from trainers.data.partworld import class_template
    from trainers.parts.class_clusters import FeatureSpill

    cfg = world(args.classes)
    rng = np.random.default_rng(0)
    protos = rng.standard_normal((cfg.num_part_types + 1, DIM)).astype(np.float32)
    base = _maxrss_mb()
    t_gen = t_spill = 0.0
    seq = 0
    with FeatureSpill(args.spill, writer="0") as spill:
        for c in range(1, args.classes + 1):
            t = time.perf_counter()
            types = [int(p["part_type"]) for p in class_template(cfg, c)["parts"]]
            which = rng.integers(0, len(types), args.per_class)
            f = protos[np.asarray(types)[which]] + 0.6 * rng.standard_normal((args.per_class, DIM)).astype(np.float32)
            keys = np.stack([np.zeros(args.per_class), np.arange(seq, seq + args.per_class), np.full(args.per_class, c),
                             np.zeros(args.per_class), which], 1).astype(np.int64)
            seq += args.per_class
            t_gen += time.perf_counter() - t
            t = time.perf_counter()
            spill.append(c, f, keys=keys)
            t_spill += time.perf_counter() - t
        t = time.perf_counter()
    t_spill += time.perf_counter() - t
    return {"candidates": seq, "generate_s": t_gen, "spill_s": t_spill, "maxrss_mb": _maxrss_mb(), "import_rss_mb": base}


def phase_cluster(args) -> dict:
    """One clustering variant over the spill: ``faiss`` (cluster_classes) or ``sklearn`` (KMeans per class)."""
    from trainers.parts.class_clusters import _atomic_write, cluster_classes, spill_chunks, spill_counts

    classes = sorted(spill_counts(args.spill))
    base = _maxrss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    if args.variant == "faiss":
        summary = cluster_classes(args.spill, args.out, classes, k=8, niter=20, seed=0, use_gpu=False)
        write_s = sum(v["write_seconds"] for v in summary["classes"].values())
    else:  # the same artefact, written the same way: only the clustering differs
        from sklearn.cluster import KMeans

        write_s = 0.0
        for c in classes:
            x = np.concatenate([np.load(p) for p in spill_chunks(args.spill, c)])
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            km = KMeans(min(8, len(x)), n_init=1, max_iter=20, random_state=0, algorithm="lloyd").fit(x)
            res = {"centroids": km.cluster_centers_.astype(np.float32), "assign": km.labels_.astype(np.int64),
                   "counts": np.bincount(km.labels_, minlength=km.n_clusters)}
            t = time.perf_counter()
            _atomic_write(Path(args.out) / f"class-{c}.npz", lambda fh: np.savez(fh, **res))
            write_s += time.perf_counter() - t
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "write_s": write_s,
            "classes": len(classes), "maxrss_mb": _maxrss_mb(), "import_rss_mb": base}


def phase_label(args) -> dict:
    """Eq. 2 density scores and cluster ids of every candidate (the stage's phase 3, one rank)."""
    from trainers.parts.class_clusters import spill_counts
    from trainers.parts.candidates import score_candidates

    n = sum(spill_counts(args.spill).values())
    base = _maxrss_mb()
    t0 = time.perf_counter()
    labels, _ = score_candidates(Path(args.spill), Path(args.out), 0, n, Path(args.work))
    return {"seconds": time.perf_counter() - t0, "labelled": int((np.asarray(labels) >= 0).sum()),
            "maxrss_mb": _maxrss_mb(), "import_rss_mb": base}


PHASES = {"stream": phase_stream, "scale": phase_scale, "cluster": phase_cluster, "label": phase_label}


def child(phase: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", phase] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- driver -------------------------------------------------------------------------------------


def bench_clusters(tmp: Path, spill: Path, repeats: int, label: bool) -> dict:
    runs: dict[str, list[dict]] = {"faiss": [], "sklearn": []}
    out = {}
    for r in range(repeats):
        for v in ("faiss", "sklearn"):
            d = tmp / f"clusters-{v}-{r}"
            runs[v].append(child("cluster", variant=v, spill=spill, out=d))
            if v == "faiss" and label and r == 0:
                out["label"] = child("label", spill=spill, out=d, work=tmp / "work")
            shutil.rmtree(d, ignore_errors=True)
    for v, rs in runs.items():
        out[v] = {"median_s": statistics.median(x["seconds"] for x in rs),
                  "median_cpu_s": statistics.median(x["cpu_seconds"] for x in rs),
                  "write_s": statistics.median(x["write_s"] for x in rs),
                  "peak_rss_mb": statistics.median(x["maxrss_mb"] for x in rs),
                  "rss_above_imports_mb": statistics.median(x["maxrss_mb"] - x["import_rss_mb"] for x in rs),
                  "runs_s": [x["seconds"] for x in rs]}
    out["ratio_sklearn_over_faiss"] = out["sklearn"]["median_s"] / out["faiss"]["median_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=10000)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--big-classes", type=int, default=100, help="the same number of features in this many classes")
    ap.add_argument("--images", type=int, default=1000, help="streamed PartWorld images in phase (1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-images", type=float, default=10e6)
    ap.add_argument("--ranks", type=int, default=64, help="ranks the projection spreads the work over")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "out" / "bench_rank_parts.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("spill", "out", "work", "variant"):
        ap.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true", help="re-print (and re-project) the JSON of an earlier run")
    args = ap.parse_args()
    if args.report:
        report = json.loads(Path(args.json).read_text())
        for k, v in report["config"].items():
            setattr(args, k, v)
        report["projection"] = project(report, args)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print_report(report, args)
        return
    if args.child:
        _single_thread()
        print(json.dumps(PHASES[args.child](args)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench_rank_parts_"))
    report: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "threads": 1,
                                "load_avg_start": os.getloadavg()[0]},
                    "config": {k: v for k, v in vars(args).items() if k not in ("child", "spill", "out", "work", "variant", "report")}}
    try:
        t = time.perf_counter()
        report["stream"] = child("stream", classes=args.classes, images=args.images, spill=tmp / "stream")
        big_per_class = args.classes * args.per_class // args.big_classes
        report["scale"] = child("scale", classes=args.classes, per_class=args.per_class, spill=tmp / "scale")
        report["clusters"] = bench_clusters(tmp, tmp / "scale", args.repeats, label=True)
        shutil.rmtree(tmp / "scale", ignore_errors=True)
        report["big_scale"] = child("scale", classes=args.big_classes, per_class=big_per_class, spill=tmp / "big")
        report["big_clusters"] = bench_clusters(tmp, tmp / "big", args.repeats, label=True)
        report["bench_s"] = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["machine"]["load_avg_end"] = os.getloadavg()[0]
    report["projection"] = project(report, args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print_report(report, args)


def project(r: dict, args) -> dict:
    """Cost at ``target_images``: T(classes, n) = classes * a + n * b, a and b from the two clustering runs."""
    s = r["stream"]
    per_image = s["candidates"] / s["images"]
    n_target = args.target_images * per_image
    m = r["scale"]["candidates"]
    out = {"candidates_per_image": per_image, "target_candidates": n_target, "ranks": args.ranks}
    for v in ("faiss", "sklearn"):
        t_small, t_big = r["clusters"][v]["median_s"], r["big_clusters"][v]["median_s"]
        a = max(0.0, (t_small - t_big) / (args.classes - args.big_classes))  # per-class seconds
        b = max(0.0, (t_big - args.big_classes * a) / m)  # per-candidate seconds
        total = args.classes * a + n_target * b
        out[v] = {"per_class_s": a, "per_candidate_s": b, "total_core_s": total, "per_rank_s": total / args.ranks}
    t_small, t_big = r["clusters"]["label"]["seconds"], r["big_clusters"]["label"]["seconds"]
    a = max(0.0, (t_small - t_big) / (args.classes - args.big_classes))
    b = max(0.0, (t_big - args.big_classes * a) / m)
    # every rank reads each class it has candidates of (all of them, at 10M images): the per-class term is per rank
    out["label"] = {"per_class_s": a, "per_candidate_s": b, "total_core_s": args.classes * a * args.ranks + n_target * b,
                    "per_rank_s": args.classes * a + n_target / args.ranks * b}
    out["label_core_s"] = out["label"]["total_core_s"]
    # spill: chunks are flushed per class (one chunk per class here), so the per-M cost at --per-class is an upper bound
    out["spill_core_s"] = r["scale"]["spill_s"] / m * n_target
    out["spill_gb"] = n_target * (DIM * 4 + 5 * 8) / 1e9
    return out


def print_report(r: dict, args) -> None:
    s, sc, p = r["stream"], r["scale"], r["projection"]
    m = sc["candidates"] / 1e6
    print(f"\n## rank-parts machinery, {args.classes} classes, 1 thread, median of {args.repeats}; load avg "
          f"{r['machine']['load_avg_start']:.1f} -> {r['machine']['load_avg_end']:.1f} on {r['machine']['cpus']} CPUs\n")
    print(f"(1) stream: {s['images']} PartWorld images, {s['objects']} objects, {s['candidates']} part candidates "
          f"({s['candidates'] / s['images']:.1f}/image): render {1e3 * s['render_s'] / s['images']:.1f} ms/image, "
          f"feature {1e3 * s['feature_s'] / s['images']:.1f} ms/image, spill {s['spill_s']:.2f} s "
          f"({s['spill_s'] / s['candidates'] * 1e6:.1f} s/M), peak RSS {s['maxrss_mb']:.0f} MB\n")
    print("| phase | features | classes | wall s | s / M features | CPU s | peak RSS MB | RSS above imports MB |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| spill (template features) | {sc['candidates']} | {args.classes} | {sc['spill_s']:.2f} | "
          f"{sc['spill_s'] / m:.2f} | | {sc['maxrss_mb']:.0f} | {sc['maxrss_mb'] - sc['import_rss_mb']:.0f} |")
    for key, classes in (("clusters", args.classes), ("big_clusters", args.big_classes)):
        c = r[key]
        for v, name in (("faiss", "cluster: faiss per class (cluster_classes)"), ("sklearn", "cluster: sklearn KMeans per class")):
            x = c[v]
            print(f"| {name} | {sc['candidates']} | {classes} | {x['median_s']:.2f} | {x['median_s'] / m:.2f} | "
                  f"{x['median_cpu_s']:.2f} | {x['peak_rss_mb']:.0f} | {x['rss_above_imports_mb']:.0f} |")
        lab = c["label"]
        print(f"| label: eq. 2 scores + ids | {lab['labelled']} | {classes} | {lab['seconds']:.2f} | "
              f"{lab['seconds'] / m:.2f} | | {lab['maxrss_mb']:.0f} | {lab['maxrss_mb'] - lab['import_rss_mb']:.0f} |")
    cpu = {k: r[k]["sklearn"]["median_cpu_s"] / r[k]["faiss"]["median_cpu_s"] for k in ("clusters", "big_clusters")}
    print(f"\nsklearn / faiss CPU-time ratio: {cpu['clusters']:.2f}x at {args.per_class}/class, {cpu['big_clusters']:.2f}x "
          f"at {sc['candidates'] // args.big_classes}/class; runs (wall s): " + "; ".join(
              f"{k} {v}: {', '.join(f'{t:.1f}' for t in r[k][v]['runs_s'])}" for k in ("clusters", "big_clusters")
              for v in ("faiss", "sklearn")))
    print(f"sklearn / faiss wall-time ratio: {r['clusters']['ratio_sklearn_over_faiss']:.2f}x at "
          f"{args.per_class}/class, {r['big_clusters']['ratio_sklearn_over_faiss']:.2f}x at "
          f"{sc['candidates'] // args.big_classes}/class; faiss write share "
          f"{r['clusters']['faiss']['write_s'] / r['clusters']['faiss']['median_s']:.0%} at {args.per_class}/class\n")
    f = p["faiss"]
    print(f"### Projection to {args.target_images:.0f} images (one core a rank, CPU faiss)\n")
    print(f"- candidates: {args.target_images:.0f} images x {p['candidates_per_image']:.1f}/image = "
          f"{p['target_candidates'] / 1e6:.0f} M ({p['target_candidates'] / args.classes:.0f} per class); "
          f"spill on disk {p['target_candidates'] / 1e6:.0f} M x ({DIM} x 4 + 5 x 8) B = {p['spill_gb']:.0f} GB")
    print(f"- clustering: T = classes x a + candidates x b; a = (T_{args.classes} - T_{args.big_classes}) / "
          f"({args.classes} - {args.big_classes}) = {1e3 * f['per_class_s']:.2f} ms/class, b = (T_{args.big_classes} - "
          f"{args.big_classes} a) / {sc['candidates']} = {1e6 * f['per_candidate_s']:.2f} us/candidate -> "
          f"{args.classes} x {f['per_class_s']:.4f} + {p['target_candidates']:.3g} x {f['per_candidate_s']:.3g} = "
          f"{f['total_core_s']:.0f} core-s = {f['per_rank_s']:.0f} s on {p['ranks']} ranks "
          f"(sklearn: {p['sklearn']['total_core_s']:.0f} core-s)")
    print(f"- spill: {sc['spill_s'] / m:.2f} s/M x {p['target_candidates'] / 1e6:.0f} M = {p['spill_core_s']:.0f} core-s "
          f"= {p['spill_core_s'] / p['ranks']:.0f} s per rank, during the forward pass (an upper bound: measured with "
          f"one {args.per_class}-row chunk per class; fsync per chunk dominates)")
    lab = p["label"]
    print(f"- labels (eq. 2), the same split: {1e3 * lab['per_class_s']:.2f} ms/class, {1e6 * lab['per_candidate_s']:.2f} "
          f"us/candidate; each rank reads every class it has candidates of -> per rank {args.classes} x "
          f"{lab['per_class_s']:.4f} + {p['target_candidates']:.3g} / {p['ranks']} x {lab['per_candidate_s']:.3g} = "
          f"{lab['per_rank_s']:.0f} s ({p['label_core_s']:.0f} core-s)")
    print(f"- memory: bounded by a class, not the dataset (peak RSS above imports above); at "
          f"{p['target_candidates'] / args.classes:.0f} per class a class's block + training sample is "
          f"< {(8 << 20) / 1e6 + 2048 * DIM * 4 / 1e6 + p['target_candidates'] / args.classes * 13 / 1e6:.0f} MB")
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
