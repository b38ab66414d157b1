"""Batched k-means for many small problems: part mining inside instance masks (PartDistillation sec. 4.2).

One padded, masked batch of B independent problems is solved at once in torch (GPU when the tensors are
on GPU). ``metric="cosine"`` is spherical k-means: features are L2-normalised and centroids re-normalised
after every update, as the paper groups pixel features by cosine similarity (k=4).

Guarantees, per problem (each problem's answer depends only on its own valid points and ``seed``; padding
and the other problems of the batch never change it, up to float rounding):

- fewer distinct points than ``k`` -> one cluster per distinct point; ``info["num_clusters"]`` says how
  many centroids are real, the rest are zero and no point is assigned to them;
- all-identical points -> one cluster, no NaN;
- zero vectors under ``cosine`` (direction undefined) take no part in fitting and are assigned to
  cluster 0, the largest cluster; a problem of zero vectors only is one cluster with a zero centroid;
- a cluster that empties during the iterations is re-seeded from the point farthest from its centroid
  (or keeps its previous centroid when every point sits on a centroid); never NaN;
- clusters are numbered by size, largest first; padded points get assignment -1.

Points closer than a relative squared distance of ``DISTINCT_TOL`` count as the same point.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

Metric = Literal["cosine", "l2"]
DISTINCT_TOL = 1e-5  # squared distance below DISTINCT_TOL * (|x|^2 + |c|^2): the same point (float32 dot-product noise)
ZERO_NORM = 1e-12  # features with a smaller L2 norm are "zero vectors" under the cosine metric
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 28}  # padded points x D per chunk of problems solved together


def pack_instances(features: list[Tensor], max_points: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Pad a list of ``[n_i, D]`` point sets into one batch ``([B, Nmax, D], valid [B, Nmax])``.

    With ``max_points``, an instance with more points keeps a seeded random subset of ``max_points`` of them (in
    their original order); cluster the subset, then label every point with ``assign_to_centroids``.
    """
    if not features:
        raise ValueError("pack_instances needs at least one instance")
    dim = features[0].shape[1]
    gen = torch.Generator().manual_seed(seed)
    kept = []
    for f in features:
        if f.ndim != 2 or f.shape[1] != dim:
            raise ValueError(f"every instance must be [n, {dim}], got {tuple(f.shape)}")
        n = f.shape[0]
        kept.append(torch.randperm(n, generator=gen)[:max_points].sort().values if max_points is not None and n > max_points else None)
    sizes = [len(k) if k is not None else f.shape[0] for k, f in zip(kept, features)]
    out = features[0].new_zeros((len(features), max(1, max(sizes)), dim))
    valid = torch.zeros(out.shape[:2], dtype=torch.bool, device=out.device)
    for b, (f, idx) in enumerate(zip(features, kept)):
        out[b, : sizes[b]] = f if idx is None else f[idx.to(f.device)]
        valid[b, : sizes[b]] = True
    return out, valid


def _uniforms(seed: int, count: int) -> np.ndarray:
    """``count`` reproducible uniforms in [0, 1) from ``seed`` alone (splitmix64), the same for every problem."""
    with np.errstate(over="ignore"):
        z = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _sample(weights: Tensor, u: Tensor) -> Tensor:
    """Per row, the index drawn with probability proportional to ``weights`` [B, N] by inverse CDF at ``u`` [B]."""
    cdf = weights.double().cumsum(1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp_(max=weights.shape[1] - 1)


def _sq_dist_to(x: Tensor, sqn: Tensor, c: Tensor) -> Tensor:
    """Squared distance of every point [B, N, D] to T centres per problem [B, T, D] -> [B, N, T];
    near-duplicates (within float32 dot-product noise) -> exactly 0."""
    csq = (c * c).sum(-1).unsqueeze(1)  # [B, 1, T]
    scale = sqn.unsqueeze(2) + csq
    d2 = scale - 2 * torch.bmm(x, c.transpose(1, 2))
    return d2.masked_fill_(d2 <= DISTINCT_TOL * scale, 0.0)


def _init(x: Tensor, sqn: Tensor, fit: Tensor, k: int, init: str, seed: int) -> tuple[Tensor, Tensor]:
    """Greedy k-means++ (seeded) or farthest-point (deterministic) seeding; stops early per problem when no distinct point is left."""
    b, n, d = x.shape
    trials = 2 + int(np.log(k))  # as scikit-learn's greedy k-means++
    u = torch.as_tensor(_uniforms(seed, k * trials).reshape(k, trials), device=x.device).expand(b, k, trials)
    cent = x.new_zeros((b, k, d))
    nclus = torch.zeros(b, dtype=torch.long, device=x.device)
    mind = torch.full((b, n), float("inf"), dtype=x.dtype, device=x.device)
    has = fit.any(1)
    rows = torch.arange(b, device=x.device)
    for j in range(k):
        if j == 0:
            if init == "k-means++":
                idx = _sample(fit.to(x.dtype), u[:, 0, 0])
            else:  # farthest from the problem's mean
                mean = (x * fit.unsqueeze(2)).sum(1) / fit.sum(1, keepdim=True).clamp(min=1)
                idx = _sq_dist_to(x, sqn, mean.unsqueeze(1)).squeeze(2).masked_fill_(~fit, -1.0).argmax(1)
            take = has
            d_new = _sq_dist_to(x, sqn, x[rows, idx].unsqueeze(1)).squeeze(2)
        else:
            w = mind.masked_fill(~fit, 0.0)
            take = w.amax(1) > 0
            if init == "k-means++":  # greedy: of `trials` draws keep the one that lowers the potential most
                w = torch.where(take.unsqueeze(1), w, fit.to(x.dtype))
                cands = torch.stack([_sample(w, u[:, j, t]) for t in range(trials)], 1)  # [B, T]
                d_t = _sq_dist_to(x, sqn, x[rows.unsqueeze(1), cands])  # [B, N, T]: one pass for all trials
                d_t = torch.minimum(d_t, mind.unsqueeze(2))
                best = d_t.masked_fill_(~fit.unsqueeze(2), 0.0).sum(1).argmin(1)  # [B]
                idx = cands.gather(1, best.unsqueeze(1)).squeeze(1)
                d_new = d_t.gather(2, best.view(b, 1, 1).expand(b, n, 1)).squeeze(2)
            else:
                idx = w.argmax(1)
                d_new = _sq_dist_to(x, sqn, x[rows, idx].unsqueeze(1)).squeeze(2)
        cent[:, j] = torch.where(take.unsqueeze(1), x[rows, idx], cent[:, j])
        nclus += take.long()
        mind = torch.where(take.unsqueeze(1), torch.minimum(mind, d_new), mind)
        if not bool(take.any()):
            break
    return cent, nclus


def _nearest(x: Tensor, sqn: Tensor, cent: Tensor, cvalid: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Nearest valid centroid per point and its distance (1 - cos for cosine, squared L2 for l2)."""
    dots = torch.bmm(x, cent.transpose(1, 2))  # [B, N, k]
    if metric == "cosine":
        sim = dots.masked_fill(~cvalid.unsqueeze(1), float("-inf"))
        best, idx = sim.max(2)
        return idx, 1 - best
    d2 = sqn.unsqueeze(2) + (cent * cent).sum(-1).unsqueeze(1) - 2 * dots
    d2 = d2.masked_fill(~cvalid.unsqueeze(1), float("inf"))
    best, idx = d2.min(2)
    return idx, best


def _solve(x: Tensor, valid: Tensor, k: int, iters: int, metric: str, seed: int, init: str) -> tuple[Tensor, Tensor, dict]:
    """``batched_kmeans`` on one chunk of problems (float32, on its device)."""
    device = x.device
    b, n, _ = x.shape
    x = x.masked_fill(~valid.unsqueeze(2), 0.0)
    zero = torch.zeros_like(valid)
    if metric == "cosine":
        norm = torch.linalg.vector_norm(x, dim=2)
        zero = valid & (norm < ZERO_NORM)
        x.mul_(torch.where(zero | ~valid, 0.0, 1.0 / norm.clamp(min=ZERO_NORM)).unsqueeze(2))
    fit = valid & ~zero  # points that shape the centroids
    sqn = torch.linalg.vector_norm(x, dim=2).square_()

    cent, nclus = _init(x, sqn, fit, k, init, seed)
    slots = torch.arange(k, device=device)
    cvalid = slots.unsqueeze(0) < nclus.unsqueeze(1)  # [B, k]
    fitf = fit.to(x.dtype)
    prev = torch.full((b, n), -1, dtype=torch.long, device=device)
    stable = torch.zeros(b, dtype=torch.bool, device=device)
    ran = 0
    for _ in range(iters):
        ran += 1
        idx, dist = _nearest(x, sqn, cent, cvalid, metric)
        idx = torch.where(fit, idx, torch.full_like(idx, -1))
        stable = (idx == prev).all(1)
        if bool(stable.all()):
            break
        prev = idx
        onehot = x.new_zeros((b, n, k)).scatter_(2, idx.clamp(min=0).unsqueeze(2), fitf.unsqueeze(2))  # [B, N, k]
        counts = onehot.sum(1)  # [B, k]
        sums = torch.bmm(onehot.transpose(1, 2), x)  # [B, k, D]
        new = sums / counts.clamp(min=1).unsqueeze(2)
        ok = counts > 0
        if metric == "cosine":
            nn_ = new.norm(dim=2, keepdim=True)
            ok = ok & (nn_.squeeze(2) > ZERO_NORM)  # antipodal points can cancel: keep the previous centroid
            new = new / nn_.clamp(min=ZERO_NORM)
        cent = torch.where(ok.unsqueeze(2), new, cent)
        # Empty clusters: the r-th empty slot of a problem takes its r-th farthest point (if that point is off-centre).
        empty = cvalid & (counts == 0)
        if bool(empty.any()):
            far, order = torch.where(fit, dist, torch.full_like(dist, -1.0)).sort(1, descending=True)
            rank = (empty.long().cumsum(1) - 1).clamp(min=0, max=n - 1)
            pick = order.gather(1, rank)
            tol = DISTINCT_TOL * (2.0 if metric == "cosine" else 4 * sqn.amax(1, keepdim=True))  # on-centre: noise
            reseed = empty & (far.gather(1, rank) > tol)
            cand = x.gather(1, pick.unsqueeze(2).expand(-1, -1, x.shape[2]))
            cent = torch.where(reseed.unsqueeze(2), cand, cent)
    idx, _ = _nearest(x, sqn, cent, cvalid, metric)
    idx = torch.where(fit, idx, torch.full_like(idx, -1))

    # Number clusters by size (largest first; ties by slot), drop empty ones, zero vectors join cluster 0.
    counts = torch.nn.functional.one_hot(idx.clamp(min=0), k).mul_(fit.unsqueeze(2)).sum(1)  # [B, k]
    order = torch.sort(counts * (k + 1) + (k - 1 - slots), dim=1, descending=True).indices  # stable by slot
    rank_of = torch.empty_like(order).scatter_(1, order, slots.expand(b, k).contiguous())
    cent = cent.gather(1, order.unsqueeze(2).expand(-1, -1, cent.shape[2]))
    counts = counts.gather(1, order)
    assign = torch.where(fit, rank_of.gather(1, idx.clamp(min=0)), torch.full_like(idx, -1))
    nclus = (counts > 0).sum(1)
    only_zero = zero.any(1) & (nclus == 0)
    assign = torch.where(zero, torch.zeros_like(assign), assign)
    counts[:, 0] += zero.sum(1)
    nclus = torch.where(only_zero, torch.ones_like(nclus), nclus)
    cent = torch.where((slots.unsqueeze(0) < nclus.unsqueeze(1)).unsqueeze(2), cent, torch.zeros_like(cent))
    ran_t = torch.full((b,), ran, dtype=torch.long, device=device)
    return assign, cent, {"num_clusters": nclus, "counts": counts, "iters": ran_t, "converged": stable}


def batched_kmeans(
    features: Tensor,
    valid: Tensor,
    k: int,
    iters: int = 20,
    metric: Metric = "cosine",
    seed: int = 0,
    device: torch.device | str | None = None,
    init: Literal["k-means++", "farthest"] = "k-means++",
) -> tuple[Tensor, Tensor, dict]:
    """Solve B independent k-means problems ``features [B, N, D]`` (``valid [B, N]`` marks real points) at once.

    Returns ``assign [B, N]`` (-1 on padding), ``centroids [B, k, D]`` and ``info`` with ``num_clusters [B]``,
    ``counts [B, k]``, ``iters [B]`` (Lloyd iterations run) and ``converged [B]`` (assignments stable).
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    if init not in ("k-means++", "farthest"):
        raise ValueError(f"init must be 'k-means++' or 'farthest', got {init!r}")
    if features.ndim != 3 or valid.shape != features.shape[:2]:
        raise ValueError(f"features must be [B, N, D] and valid [B, N], got {tuple(features.shape)} and {tuple(valid.shape)}")
    if k < 1:
        raise ValueError("k must be >= 1")
    device = torch.device(device) if device is not None else features.device
    x = features.to(device=device, dtype=torch.float32)
    valid = valid.to(device=device, dtype=torch.bool)
    b, n, d = x.shape
    assign = torch.full((b, n), -1, dtype=torch.long, device=device)
    cent = x.new_zeros((b, k, d))
    info = {"num_clusters": torch.zeros(b, dtype=torch.long, device=device),
            "counts": torch.zeros((b, k), dtype=torch.long, device=device),
            "iters": torch.zeros(b, dtype=torch.long, device=device),
            "converged": torch.ones(b, dtype=torch.bool, device=device)}
    if n == 0 or b == 0:
        return assign, cent, info
    # Valid points to the front (order kept, so seeding is unchanged), problems sorted by size and solved in chunks
    # of similar size: little padding, and on CPU each chunk stays in cache.
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # [B, N]
    sizes = valid.sum(1)
    by_size = torch.sort(sizes, stable=True).indices.tolist()
    sizes_l = sizes.tolist()
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    i = 0
    while i < b:
        j = i + 1
        while j < b and (j + 1 - i) * max(1, sizes_l[by_size[j]]) * d <= budget:
            j += 1
        rows = torch.tensor(by_size[i:j], device=device)
        m = max(1, sizes_l[by_size[j - 1]])
        pts = order[rows, :m]  # [c, m]
        xs = x[rows.unsqueeze(1), pts]
        vs = valid[rows.unsqueeze(1), pts]
        a, c, inf = _solve(xs, vs, k, iters, metric, seed, init)
        assign[rows.unsqueeze(1), pts] = torch.where(vs, a, torch.full_like(a, -1))
        cent[rows] = c
        for key, val in inf.items():
            info[key][rows] = val
        i = j
    return assign, cent, info


def assign_to_centroids(features: Tensor, centroids: Tensor, metric: Metric = "cosine", num_clusters: int | None = None) -> Tensor:
    """Nearest centroid for every row of ``features [M, D]``: full-resolution mask pixels after clustering a subsample.

    Only the first ``num_clusters`` centroids are candidates (``batched_kmeans`` puts the real ones first).
    Under ``cosine`` a zero vector goes to cluster 0, the largest, as in ``batched_kmeans``.
    """
    k = centroids.shape[0] if num_clusters is None else int(num_clusters)
    if k < 1:
        raise ValueError("assign_to_centroids needs at least one centroid")
    x = features.to(device=centroids.device, dtype=torch.float32)
    c = centroids[:k].to(torch.float32)
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True).clamp(min=ZERO_NORM)
        c = c / c.norm(dim=1, keepdim=True).clamp(min=ZERO_NORM)
        return (x @ c.T).argmax(1)
    if metric == "l2":
        return ((c * c).sum(1).unsqueeze(0) - 2 * (x @ c.T)).argmin(1)
    raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")


def distinct_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First index of every distinct row of ``x [n, D]`` (bitwise equality) and each row's distinct-row id."""
    x = np.ascontiguousarray(x)
    rows = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).reshape(-1)
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def relabel_by_size(assign: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Number clusters by size, largest first (ties by old id), dropping empty ones; -1 stays -1."""
    counts = np.bincount(assign[assign >= 0], minlength=len(centroids))
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0]
    rank_of = np.full(len(centroids) + 1, -1, np.int64)  # last slot: -1 maps to -1
    rank_of[order] = np.arange(len(order))
    return rank_of[assign], np.ascontiguousarray(centroids[order], dtype=np.float32)


def faiss_kmeans(
    x: np.ndarray, k: int, niter: int = 20, seed: int = 0, metric: Metric = "cosine", gpu: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One k-means problem with faiss (``spherical=True`` for cosine) over all rows of ``x``: ``(assign [n], centroids [k_c, D])``.

    ``x`` must already be normalised for cosine and free of NaN/zero rows. With at most ``k`` distinct rows,
    ``k_c`` is the number of distinct rows and each is its own cluster (no random centroids). faiss starts from
    the same greedy k-means++ seeding as ``batched_kmeans`` (its own random init falls into poor local minima
    for k=8). Clusters are numbered by size, largest first.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, d), np.float32)
    if n <= 4096:
        first, inverse = distinct_rows(x)
    else:  # cheap pre-check on a sample; a full pass only when the sample is short of k
        first, inverse = distinct_rows(x[:: n // 4096])
        if len(first) < k:
            first, inverse = distinct_rows(x)
    if len(first) <= k and len(inverse) == n:
        return relabel_by_size(inverse.astype(np.int64), x[first])
    t = torch.from_numpy(x).unsqueeze(0)
    init, _ = _init(t, (t * t).sum(2), torch.ones(t.shape[:2], dtype=torch.bool), k, "k-means++", seed)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=(metric == "cosine"), gpu=gpu, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=n)  # no warning, no second subsample
    km.train(x, init_centroids=init[0].numpy())
    _, a = km.index.search(x, 1)
    return relabel_by_size(a[:, 0].astype(np.int64), km.centroids)
