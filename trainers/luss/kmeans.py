"""k-means over a whole dataset's embeddings without holding them in one process (PASS sec. 4.3 at ImageNet scale).

The embeddings are spilled to disk by every rank (``trainers.parts.class_clusters.FeatureSpill``: float32 chunks,
published atomically); :func:`train_on_sample` reads a seeded sample of at most ``max_points_per_centroid x k`` rows
(faiss's own budget) from the memory-mapped chunks, trains spherical faiss k-means on it (the GPU index when faiss
sees one) from a k-means++ start (seeded on at most 256 x k of its rows), and guarantees exactly k clusters: a cluster left with no member of the sample is
re-seeded at the sample point farthest from its centroid and the assignment redone; re-seeds are counted, as are
faiss's own splits of empty clusters during training. :func:`assign_blocks` then streams every row through the
index block by block (one block of rows in memory), counting the members of every cluster over the dataset.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trainers.parts.class_clusters import spill_chunks

BLOCK_ROWS = 65536  # rows assigned at once


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


SEED_POINTS_PER_CENTROID = 256  # k-means++ seeds on at most this many rows per centroid (faiss's training budget)


def kmeans_plus_plus(x: np.ndarray, k: int, seed: int, max_rows: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding under the cosine distance (rows of ``x`` unit-norm): of 2 + log(k) candidates drawn
    by distance, each step keeps the one that lowers the potential most (as scikit-learn); k rows of ``x``.
    ``max_rows``: seed on a seeded uniform sample of that many rows when ``x`` has more (the seeding costs k passes
    over its rows; Lloyd's iterations then run on all of ``x``)."""
    rng = np.random.default_rng(seed)
    if max_rows is not None and len(x) > max(max_rows, k):
        x = x[np.sort(rng.choice(len(x), max(max_rows, k), replace=False))]
    n, trials = len(x), 2 + int(np.log(k))
    chosen = [int(rng.integers(n))]
    d = np.clip(1.0 - x @ x[chosen[0]], 0, None).astype(np.float64)
    for _ in range(1, k):
        total = d.sum()
        cands = rng.choice(n, size=trials, p=d / total) if total > 0 else rng.integers(n, size=trials)
        new = np.minimum(d[None], np.clip(1.0 - x[cands] @ x.T, 0, None))  # [trials, n]
        best = int(new.sum(1).argmin())
        chosen.append(int(cands[best]))
        d = new[best]
    return x[chosen].copy()


def _index(centroids: np.ndarray, gpu: bool):
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def nearest(x: np.ndarray, centroids: np.ndarray, gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(cluster [n], cosine [n]) of every row of ``x`` (unit rows) to the nearest of ``centroids`` (unit rows)."""
    sim, idx = _index(centroids, gpu).search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64), sim[:, 0]


def fill_empty_clusters(x: np.ndarray, centroids: np.ndarray, max_rounds: int = 10) -> tuple[np.ndarray, np.ndarray, int]:
    """Re-seed every cluster with no member: it takes the point farthest from its own centroid (a point used once is
    not used again), then points are re-assigned and centroids re-estimated; repeated until none is empty.
    Returns (centroids, assignment, number of re-seeds). With fewer distinct points than clusters some stay empty."""
    cent = normalize_rows(centroids)
    assign, sim = nearest(x, cent)
    reseeded, used = 0, set()
    for _ in range(max_rounds):
        counts = np.bincount(assign, minlength=len(cent))
        empty = np.flatnonzero(counts == 0)
        if not len(empty):
            break
        order = [int(i) for i in np.argsort(sim, kind="stable") if int(i) not in used]  # farthest first
        for c, i in zip(empty, order):
            cent[c] = x[i]
            used.add(i)
            reseeded += 1
        assign, sim = nearest(x, cent)
        for c in range(len(cent)):  # one Lloyd update, empty ones keep their seed
            members = assign == c
            if members.any():
                cent[c] = x[members].mean(0)
        cent = normalize_rows(cent)
        assign, sim = nearest(x, cent)
    return cent, assign, reseeded


def train_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, gpu: bool = False) -> tuple[np.ndarray, dict]:
    """Spherical k-means with exactly ``k`` unit centroids over unit rows ``x``: faiss from a k-means++ start, then
    :func:`fill_empty_clusters`. Returns (centroids [k, D], info: ``reseeded``, ``faiss_splits``, ``sizes``,
    ``empty`` (clusters still empty: fewer distinct points than k))."""
    import faiss

    x = normalize_rows(x)
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means with k={k} needs at least {k} points, got {n}")
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, gpu=gpu, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=n)
    km.train(x, init_centroids=kmeans_plus_plus(x, k, seed, max_rows=SEED_POINTS_PER_CENTROID * k))
    splits = int(sum(s.get("nsplit", 0) for s in km.iteration_stats))
    cent, assign, reseeded = fill_empty_clusters(x, np.asarray(km.centroids))
    sizes = np.bincount(assign, minlength=k)
    return cent, {"reseeded": reseeded, "faiss_splits": splits, "sizes": sizes.tolist(), "empty": int((sizes == 0).sum())}


class ChunkFile:
    """One spilled ``.npy`` chunk read piece by piece: every ``[...]`` maps the file, copies the rows asked for and
    unmaps it. Holding memory maps of every chunk keeps each page read resident in the process (file-backed RSS, the
    whole spill by the end of a pass); this keeps what a pass holds to one block, whatever the dataset's size."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        m = np.load(self.path, mmap_mode="r")
        self.shape, self.dtype = m.shape, m.dtype
        del m

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, index) -> np.ndarray:
        m = np.load(self.path, mmap_mode="r")
        try:
            return np.array(m[index])
        finally:
            mm = getattr(m, "_mmap", None)
            del m
            if mm is not None:
                mm.close()


def spilled_rows(spill_dir: str | Path, class_id: int = 0) -> tuple[list[ChunkFile], int]:
    """The feature chunks of a spill (read block by block, :class:`ChunkFile`) and their total row count."""
    chunks = [ChunkFile(p) for p in spill_chunks(spill_dir, class_id)]
    return chunks, sum(len(c) for c in chunks)


def read_sample(chunks: list[np.ndarray], budget: int, seed: int) -> np.ndarray:
    """A seeded sample of at most ``budget`` rows (in spill order) of the concatenated chunks, as float32."""
    n = sum(len(c) for c in chunks)
    rows = np.arange(n) if n <= budget else np.sort(np.random.default_rng(seed).choice(n, budget, replace=False))
    offsets = np.cumsum([0] + [len(c) for c in chunks])
    out = np.empty((len(rows), chunks[0].shape[1] if chunks else 0), dtype=np.float32)
    which = np.searchsorted(offsets, rows, side="right") - 1
    for c in np.unique(which):
        sel = which == c
        out[sel] = chunks[c][rows[sel] - offsets[c]]
    return out


def assign_blocks(chunks: list[np.ndarray], centroids: np.ndarray, gpu: bool = False, block_rows: int = BLOCK_ROWS):
    """(start row, cluster of each row) for every block of ``block_rows`` rows of the chunks, in spill order."""
    index = _index(normalize_rows(centroids), gpu)
    pos = 0
    for c in chunks:
        for s in range(0, len(c), block_rows):
            blk = normalize_rows(np.asarray(c[s: s + block_rows], dtype=np.float32))
            _, idx = index.search(blk, 1)
            yield pos, idx[:, 0].astype(np.int64)
            pos += len(blk)
