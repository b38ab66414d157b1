"""Class-level part clustering with features spilled to disk (PartDistillation sec. 4.3, eq. 2).

Candidate part features are appended per object class to ``<spill>/class-<id>/`` by any number of
writers (``FeatureSpill``); no process ever holds the whole dataset's features. ``cluster_classes`` then
maps over classes (spread over ranks): per class, spherical faiss k-means (k=8) over its candidates,
one result file per class written atomically, so an interrupted run resumes class by class.
``density_scores`` is the k-means density estimate of eq. 2 (Snell et al. prototypes).

Spill layout::

    <spill>/class-<id>/chunk-<writer>-<seq:06d>.npy        float32 [n, D], published by rename
    <spill>/class-<id>/chunk-<writer>-<seq:06d>.keys.npy   int64 [n, ...], published just before it
    <spill>/_writers/<writer>.json                         {"classes": {id: count}}, written on close

Result ``<out>/class-<id>.npz``: ``centroids [k_c, D]`` (unit norm, largest cluster first), ``counts [k_c]``,
``assign [n]`` (cluster of every candidate in spill order, -1 for filtered ones), ``keys`` (when spilled),
``num_candidates``, ``num_nan``, ``num_zero``, ``params`` (JSON).
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from contract.io import atomic_open

from trainers.parts.kmeans import ZERO_NORM, faiss_kmeans, relabel_by_size

BLOCK_BYTES = 8 << 20  # a class's candidates are scanned and assigned in blocks of this many bytes


def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into ``path`` atomically: readers see all or nothing."""
    with atomic_open(path, "wb") as f:
        write(f)


class FeatureSpill:
    """Append-only per-class store of candidate part features on disk (PartDistillation sec. 4.3).

    Buffers up to ``chunk_rows`` rows per class (and ``max_buffer_bytes`` in all) and publishes each chunk
    atomically. ``writer`` names this producer (a rank or a shard id); opening a spill with a writer id
    removes that writer's earlier chunks, so re-running a producer replaces its output instead of doubling it.
    """

    def __init__(self, root: str | Path, writer: str = "0", chunk_rows: int = 16384, max_buffer_bytes: int = 256 << 20):
        if not writer or "/" in writer or "-" in writer:
            raise ValueError(f"writer id must be non-empty without '/' or '-', got {writer!r}")
        self.root, self.writer = Path(root), writer
        self.chunk_rows, self.max_buffer_bytes = chunk_rows, max_buffer_bytes
        self._buf: dict[int, list[tuple[np.ndarray, np.ndarray | None]]] = defaultdict(list)
        self._buf_rows: dict[int, int] = defaultdict(int)
        self._buf_bytes = 0
        self._seq: dict[int, int] = defaultdict(int)
        self.counts: dict[int, int] = defaultdict(int)
        self.dim: int | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        for old in [*self.root.glob(f"class-*/chunk-{writer}-*.npy"), *self.root.glob(f"class-*/.chunk-{writer}-*.tmp")]:
            old.unlink()
        self._keyed: dict[int, bool] = {}
        (self.root / "_writers" / f"{writer}.json").unlink(missing_ok=True)

    def append(self, class_id: int, features, keys=None) -> None:
        """Add candidate features ``[n, D]`` of object class ``class_id`` (and optional int64 ``keys [n, ...]``
        that identify each candidate, e.g. image id / object id / proposal index)."""
        f = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features, dtype=np.float32)
        if f.ndim != 2:
            raise ValueError(f"features must be [n, D], got shape {f.shape}")
        if self.dim is None:
            self.dim = f.shape[1]
        elif f.shape[1] != self.dim:
            raise ValueError(f"feature dim {f.shape[1]} != {self.dim} of earlier appends")
        kk = None
        if keys is not None:
            kk = np.asarray(keys.detach().cpu() if hasattr(keys, "detach") else keys, dtype=np.int64)
            if kk.shape[0] != f.shape[0]:
                raise ValueError("keys must have one row per feature")
        cid = int(class_id)
        if self._keyed.setdefault(cid, kk is not None) != (kk is not None):
            raise ValueError(f"class {cid}: either every append of a writer gives keys or none does")
        if not len(f):
            return
        self._buf[cid].append((f, kk))
        self._buf_rows[cid] += len(f)
        self._buf_bytes += f.nbytes + (kk.nbytes if kk is not None else 0)
        self.counts[cid] += len(f)
        if self._buf_rows[cid] >= self.chunk_rows:
            self._flush_class(cid)
        if self._buf_bytes > self.max_buffer_bytes:
            self.flush()

    def _flush_class(self, cid: int) -> None:
        parts = self._buf.pop(cid, [])
        self._buf_rows.pop(cid, None)
        if not parts:
            return
        feats = np.concatenate([p[0] for p in parts])
        self._buf_bytes -= sum(p[0].nbytes + (p[1].nbytes if p[1] is not None else 0) for p in parts)
        name = f"chunk-{self.writer}-{self._seq[cid]:06d}"
        self._seq[cid] += 1
        d = self.root / f"class-{cid}"
        if self._keyed[cid]:
            keys = np.concatenate([p[1] for p in parts])
            _atomic_write(d / f"{name}.keys.npy", lambda fh: np.save(fh, keys))
        _atomic_write(d / f"{name}.npy", lambda fh: np.save(fh, feats))

    def flush(self) -> None:
        """Publish every buffered row."""
        for cid in list(self._buf):
            self._flush_class(cid)

    def close(self) -> dict[int, int]:
        """Flush and write this writer's manifest (per-class counts); returns the counts."""
        self.flush()
        counts = dict(sorted(self.counts.items()))
        data = json.dumps({"writer": self.writer, "dim": self.dim, "classes": {str(c): n for c, n in counts.items()}}).encode()
        _atomic_write(self.root / "_writers" / f"{self.writer}.json", lambda fh: fh.write(data))
        return counts

    def __enter__(self) -> FeatureSpill:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()


def spill_chunks(spill_dir: str | Path, class_id: int) -> list[Path]:
    """The published feature chunks of one class, in spill order (writer, then sequence)."""
    return sorted(p for p in (Path(spill_dir) / f"class-{int(class_id)}").glob("chunk-*.npy") if not p.name.endswith(".keys.npy"))


def spill_counts(spill_dir: str | Path) -> dict[int, int]:
    """Candidates per class, summed over the writers' manifests (no chunk is opened)."""
    total: dict[int, int] = defaultdict(int)
    for m in sorted((Path(spill_dir) / "_writers").glob("*.json")):
        for c, n in json.loads(m.read_text())["classes"].items():
            total[int(c)] += int(n)
    return dict(sorted(total.items()))


def partition_classes(class_ids, world_size: int, counts: dict[int, int] | None = None) -> list[list[int]]:
    """Classes per rank: ``class_id % world_size`` or, given candidate ``counts``, a balanced split
    (largest class first to the least-loaded rank; deterministic, so every rank computes the same split)."""
    ids = sorted({int(c) for c in class_ids})
    out: list[list[int]] = [[] for _ in range(world_size)]
    if counts is None:
        for c in ids:
            out[c % world_size].append(c)
        return out
    load = [0] * world_size
    for c in sorted(ids, key=lambda c: (-counts.get(c, 0), c)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        out[r].append(c)
        load[r] += counts.get(c, 0) + 1
    return [sorted(o) for o in out]


def faiss_gpu(use_gpu) -> bool:
    """Whether a faiss index should live on the GPU: ``use_gpu`` "auto" (when this faiss build sees one), True (an
    error if it sees none) or False. One resolution for every stage that clusters with faiss."""
    import faiss

    available = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if use_gpu == "auto":
        return available
    if use_gpu and not available:
        raise RuntimeError("use_gpu=True but this faiss build sees no GPU")
    return bool(use_gpu)


def _load_class(chunks: list[Path]) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Memory-mapped feature chunks of one class and, when every chunk has them, its keys."""
    feats = [np.load(p, mmap_mode="r") for p in chunks]
    key_paths = [p.with_name(p.name[: -len(".npy")] + ".keys.npy") for p in chunks]
    keys = np.concatenate([np.load(k) for k in key_paths]) if key_paths and all(k.exists() for k in key_paths) else None
    return feats, keys


def _blocks(feats: list[np.ndarray], rows: int):
    """(start row, float32 block) over the concatenation of memory-mapped chunks."""
    pos = 0
    for f in feats:
        for s in range(0, len(f), rows):
            blk = np.asarray(f[s: s + rows], dtype=np.float32)
            yield pos, blk
            pos += len(blk)


def _cluster_one(chunks: list[Path], k: int, niter: int, seed: int, gpu: bool, max_points_per_centroid: int) -> dict:
    """Spherical k-means over one class's candidates (sec. 4.3): drop NaN/inf and zero rows, train faiss on at most
    ``max_points_per_centroid * k`` of the rest (seeded sample), assign every candidate. Memory: a block of rows,
    the training sample and ~13 bytes per candidate, never the class's whole feature matrix."""
    feats, keys = _load_class(chunks)
    n = sum(len(f) for f in feats)
    dim = feats[0].shape[1] if feats else 0
    rows = max(1, BLOCK_BYTES // (4 * max(1, dim)))
    ok = np.zeros(n, dtype=bool)
    inv_norm = np.zeros(n, dtype=np.float32)
    num_nan = num_zero = 0
    for pos, blk in _blocks(feats, rows):
        finite = np.isfinite(blk).all(1)
        with np.errstate(invalid="ignore", over="ignore"):
            norm = np.sqrt(np.einsum("ij,ij->i", blk, blk, dtype=np.float64))
        zero = finite & (norm < ZERO_NORM)
        good = finite & ~zero
        num_nan += int((~finite).sum())
        num_zero += int(zero.sum())
        ok[pos: pos + len(blk)] = good
        inv_norm[pos: pos + len(blk)][good] = 1.0 / norm[good]
    valid_idx = np.flatnonzero(ok)
    budget = max_points_per_centroid * k
    sample = valid_idx if len(valid_idx) <= budget else np.sort(np.random.default_rng(seed).choice(valid_idx, budget, replace=False))
    offsets = np.cumsum([0] + [len(f) for f in feats])
    which = np.searchsorted(offsets, sample, side="right") - 1
    train = np.empty((len(sample), dim), dtype=np.float32)
    for c in np.unique(which):
        sel = which == c
        train[sel] = feats[c][sample[sel] - offsets[c]]
    train *= inv_norm[sample, None]
    a, cent = faiss_kmeans(train, k, niter=niter, seed=seed, metric="cosine", gpu=gpu)
    assign = np.full(n, -1, dtype=np.int64)
    if len(sample) == len(valid_idx):
        assign[sample] = a
    else:  # nearest centroid (max cosine) for every candidate, block by block
        for pos, blk in _blocks(feats, rows):
            good = ok[pos: pos + len(blk)]
            assign[pos: pos + len(blk)][good] = (blk[good] @ cent.T).argmax(1)
        assign, cent = relabel_by_size(assign, cent)
    out = {"centroids": cent, "counts": np.bincount(assign[assign >= 0], minlength=len(cent)).astype(np.int64),
           "assign": assign, "num_candidates": np.int64(n), "num_nan": np.int64(num_nan), "num_zero": np.int64(num_zero)}
    if keys is not None:
        out["keys"] = keys
    return out


def cluster_classes(
    spill_dir: str | Path,
    out_dir: str | Path,
    class_ids,
    k: int = 8,
    niter: int = 20,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    use_gpu: bool | str = "auto",
    counts: dict[int, int] | None = None,
    max_points_per_centroid: int = 256,
) -> dict:
    """Cluster the candidate part features of this rank's classes, k-means with ``k`` clusters per class (sec. 4.3).

    Classes go to ranks by ``partition_classes`` (balanced when ``counts`` is given, e.g. ``spill_counts``).
    A class whose ``<out>/class-<id>.npz`` exists with the same params is skipped (resume). A class with
    fewer distinct candidates than ``k`` gets that many clusters; a class with none is reported as empty.
    faiss trains on at most ``max_points_per_centroid * k`` candidates of a class (faiss's own default, 256),
    then every candidate is assigned to its nearest centroid.
    Returns a JSON-able summary: ``classes`` (per class: status, num_candidates, num_nan, num_zero, k, seconds to
    load and cluster, write_seconds),
    and the lists ``computed``, ``skipped``, ``empty``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = partition_classes(class_ids, world_size, counts)[rank]
    gpu = faiss_gpu(use_gpu)
    params = json.dumps({"k": k, "niter": niter, "seed": seed, "metric": "cosine",
                         "max_points_per_centroid": max_points_per_centroid}, sort_keys=True)
    summary: dict = {"rank": rank, "world_size": world_size, "classes": {}, "computed": [], "skipped": [], "empty": []}
    for cid in mine:
        path = out_dir / f"class-{cid}.npz"
        if path.exists():
            try:
                with np.load(path) as done:
                    same = str(done["params"]) == params
                    info = {"num_candidates": int(done["num_candidates"]), "num_nan": int(done["num_nan"]),
                            "num_zero": int(done["num_zero"]), "k": int(len(done["counts"]))}
            except Exception:  # unreadable or from an older layout: recompute
                same = False
            if same:
                summary["classes"][cid] = {"status": "skipped", **info, "seconds": 0.0, "write_seconds": 0.0}
                summary["skipped"].append(cid)
                if info["k"] == 0:
                    summary["empty"].append(cid)
                continue
        t0 = time.perf_counter()
        res = _cluster_one(spill_chunks(spill_dir, cid), k, niter, seed, gpu, max_points_per_centroid)
        res["params"] = np.array(params)
        t1 = time.perf_counter()
        _atomic_write(path, lambda fh: np.savez(fh, **res))
        kc = int(len(res["counts"]))
        summary["classes"][cid] = {"status": "empty" if kc == 0 else "computed", "num_candidates": int(res["num_candidates"]),
                                   "num_nan": int(res["num_nan"]), "num_zero": int(res["num_zero"]), "k": kc,
                                   "seconds": t1 - t0, "write_seconds": time.perf_counter() - t1}
        summary["computed"].append(cid)
        if kc == 0:
            summary["empty"].append(cid)
    return summary


def load_class_clusters(out_dir: str | Path, class_id: int) -> dict[str, np.ndarray]:
    """The clustering result of one class as written by ``cluster_classes``."""
    with np.load(Path(out_dir) / f"class-{int(class_id)}.npz") as z:
        return {name: z[name] for name in z.files}


def density_scores(features, centroids, normalize: bool = True):
    """PartDistillation eq. 2: softmax over clusters of ``-||f - mu_l||_2`` (Snell et al. prototypes).

    ``features [M, D]``, ``centroids [k, D]`` (torch tensors) -> ``(scores [M, k], cluster [M])``; rows sum to 1
    and ``cluster`` is the argmax, the nearest prototype. ``normalize`` L2-normalises the features first, as the
    centroids of ``cluster_classes`` come from spherical k-means on normalised features.
    """
    import torch

    f = torch.as_tensor(features, dtype=torch.float32)
    mu = torch.as_tensor(centroids, dtype=torch.float32, device=f.device)
    if normalize:
        f = f / f.norm(dim=1, keepdim=True).clamp(min=ZERO_NORM)
    scores = torch.softmax(-torch.cdist(f, mu), dim=1)
    return scores, scores.argmax(1)
