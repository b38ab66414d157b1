"""Batched k-means for part mining (PartDistillation sec. 4.2): planted clusters, padding, degenerate problems."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from trainers.parts.kmeans import assign_to_centroids, batched_kmeans, faiss_kmeans, pack_instances

torch.set_num_threads(1)
K, D = 4, 16


def planted(num: int, seed: int = 0, noise: float = 0.03) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``num`` problems of 4 orthogonal directions each (random scale, small noise), 24-300 points, >= 6 per cluster."""
    g = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for _ in range(num):
        dirs = torch.linalg.qr(torch.randn(D, K, generator=g))[0].T  # [K, D] orthonormal
        n = int(torch.randint(24, 300, (1,), generator=g))
        lab = torch.cat([torch.arange(K).repeat(6), torch.randint(0, K, (n - 6 * K,), generator=g)])
        lab = lab[torch.randperm(n, generator=g)]
        x = dirs[lab] * (0.5 + 1.5 * torch.rand(n, 1, generator=g)) + noise * torch.randn(n, D, generator=g)
        feats.append(x)
        labels.append(lab)
    return feats, labels


def same_partition(a, b) -> bool:
    return adjusted_rand_score(np.asarray(a), np.asarray(b)) == 1.0


def purity(labels: torch.Tensor, assign: torch.Tensor) -> float:
    hits = sum(int(torch.bincount(labels[assign == c]).max()) for c in assign.unique())
    return hits / len(labels)


@pytest.fixture(scope="module")
def problems():
    feats, labels = planted(64)
    x, valid = pack_instances(feats)
    assign, cent, info = batched_kmeans(x, valid, K, seed=0)
    return feats, labels, x, valid, assign, cent, info


def test_planted_clusters_recovered_with_purity_one(problems):
    feats, labels, _, valid, assign, cent, info = problems
    assert assign.shape == valid.shape and cent.shape == (64, K, D)
    assert (info["num_clusters"] == K).all()
    for b, lab in enumerate(labels):
        a = assign[b, : len(lab)]
        assert purity(lab, a) == 1.0 and same_partition(lab, a)
    assert (assign[~valid] == -1).all()
    assert torch.allclose(cent.norm(dim=2), torch.ones(64, K), atol=1e-5)  # spherical: unit centroids


def test_agrees_with_one_sklearn_kmeans_per_problem(problems):
    feats, _, _, _, assign, _, _ = problems
    for b, f in enumerate(feats):
        x = torch.nn.functional.normalize(f, dim=1).numpy()
        ref = KMeans(K, n_init=1, random_state=0).fit_predict(x)
        assert same_partition(ref, assign[b, : len(f)])


def test_clusters_are_numbered_largest_first(problems):
    _, _, _, _, assign, _, info = problems
    counts = info["counts"]
    assert (counts[:, :-1] >= counts[:, 1:]).all()
    assert torch.equal(counts, torch.stack([torch.bincount(a[a >= 0], minlength=K) for a in assign]))


def test_padding_and_batch_never_change_a_problem(problems):
    feats, _, x, valid, assign, cent, _ = problems
    for b in (0, 7, 33):
        alone_a, alone_c, _ = batched_kmeans(feats[b].unsqueeze(0), torch.ones(1, len(feats[b]), dtype=torch.bool), K, seed=0)
        assert torch.equal(alone_a[0], assign[b, : len(feats[b])])
        assert torch.allclose(alone_c[0], cent[b], atol=1e-5)
    # valid points scattered (in order) among padding slots that hold garbage change nothing
    b, n, d = x.shape
    g = torch.Generator().manual_seed(1)
    pos = torch.randperm(2 * n, generator=g)[:n].sort().values
    spread = 1e3 * torch.randn(b, 2 * n, d, generator=g)
    spread[:, pos] = torch.where(valid.unsqueeze(2), x, 1e3 * torch.randn_like(x))
    spread_valid = torch.zeros(b, 2 * n, dtype=torch.bool)
    spread_valid[:, pos] = valid
    a2, c2, _ = batched_kmeans(spread, spread_valid, K, seed=0)
    assert torch.equal(a2[:, pos], assign) and (a2[~spread_valid] == -1).all()
    assert torch.allclose(c2, cent, atol=1e-5)


def test_same_seed_same_answer_and_farthest_init_is_deterministic(problems):
    _, labels, x, valid, assign, cent, _ = problems
    a, c, _ = batched_kmeans(x, valid, K, seed=0)
    assert torch.equal(a, assign) and torch.equal(c, cent)
    f1, _, _ = batched_kmeans(x, valid, K, init="farthest", seed=0)
    f2, _, _ = batched_kmeans(x, valid, K, init="farthest", seed=123)
    assert torch.equal(f1, f2)
    assert all(same_partition(lab, f1[b, : len(lab)]) for b, lab in enumerate(labels))


def test_fewer_points_than_k_gives_one_cluster_per_distinct_point():
    x = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 2, 0], [0, 0, 0]], [[1.0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    assign, cent, info = batched_kmeans(x, valid, 4, metric="cosine")
    assert info["num_clusters"].tolist() == [2, 2]  # [0,1,0] and [0,2,0] share a direction
    assert assign[0, 1] == assign[0, 2] != assign[0, 0] and assign[1, 0] != assign[1, 1]
    assert (cent[:, 2:] == 0).all() and torch.isfinite(cent).all()
    a_l2, _, info_l2 = batched_kmeans(x, valid, 4, metric="l2")
    assert info_l2["num_clusters"].tolist() == [3, 2] and len(set(a_l2[0, :3].tolist())) == 3


def test_problem_without_points_has_no_cluster():
    x = torch.randn(3, 5, 4)
    valid = torch.tensor([[True] * 5, [False] * 5, [True, False, True, False, True]])
    assign, cent, info = batched_kmeans(x, valid, 2)
    assert info["num_clusters"].tolist() == [2, 0, 2] and (assign[1] == -1).all() and (cent[1] == 0).all()
    assert (assign[2, [1, 3]] == -1).all() and (assign[2, [0, 2, 4]] >= 0).all()


def test_all_identical_points_make_one_cluster_without_nan():
    x = torch.full((2, 50, 8), 0.7)
    assign, cent, info = batched_kmeans(x, torch.ones(2, 50, dtype=torch.bool), 4)
    assert info["num_clusters"].tolist() == [1, 1] and (assign == 0).all()
    assert torch.isfinite(cent).all() and torch.allclose(cent[:, 0], torch.full((2, 8), 8 ** -0.5))


def test_zero_vectors_join_the_largest_cluster_without_nan():
    feats, labels = planted(1, seed=3)
    x = torch.cat([feats[0], torch.zeros(5, D)]).unsqueeze(0)
    assign, cent, info = batched_kmeans(x, torch.ones(x.shape[:2], dtype=torch.bool), K)
    n = len(labels[0])
    assert torch.isfinite(cent).all() and info["num_clusters"].item() == K
    assert same_partition(labels[0], assign[0, :n]) and (assign[0, n:] == 0).all()
    assert info["counts"][0, 0] == int((assign[0] == 0).sum()) and (info["counts"][0, :-1] >= info["counts"][0, 1:]).all()
    only_zero, c0, info0 = batched_kmeans(torch.zeros(1, 6, D), torch.ones(1, 6, dtype=torch.bool), K)
    assert (only_zero == 0).all() and info0["num_clusters"].item() == 1 and (c0 == 0).all()
    assert assign_to_centroids(torch.zeros(3, D), cent[0]).tolist() == [0, 0, 0]


def test_empty_cluster_is_reseeded_not_nan():
    # two far groups and one outlier; with k=3 and farthest init a slot can empty, it must never produce NaN
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 2, generator=g) * 0.01 + 5, torch.randn(40, 2, generator=g) * 0.01 - 5, torch.tensor([[5.0, 5.1]])])
    for init in ("k-means++", "farthest"):
        assign, cent, info = batched_kmeans(x.unsqueeze(0), torch.ones(1, 81, dtype=torch.bool), 3, metric="l2", init=init)
        assert torch.isfinite(cent).all()
        assert info["counts"].sum() == 81 and (info["counts"][0, : info["num_clusters"][0]] > 0).all()


def test_assign_to_centroids_matches_the_fit_on_all_points(problems):
    feats, _, _, _, assign, cent, info = problems
    for b in (0, 5):
        full = assign_to_centroids(feats[b], cent[b], "cosine", num_clusters=int(info["num_clusters"][b]))
        assert torch.equal(full, assign[b, : len(feats[b])])


def test_subsampled_fit_then_full_assignment_recovers_the_planted_partition():
    feats, labels = planted(8, seed=5)
    x, valid = pack_instances(feats, max_points=40, seed=0)
    assert x.shape[1] == 40 and valid.sum(1).tolist() == [min(40, len(f)) for f in feats]
    assert all((x[b][valid[b]].unsqueeze(1) == f.unsqueeze(0)).all(2).any(1).all() for b, f in enumerate(feats))  # its rows
    assert torch.equal(pack_instances(feats, max_points=40, seed=0)[0], x)  # seeded
    _, cent, info = batched_kmeans(x, valid, K)
    for b, f in enumerate(feats):
        assert same_partition(labels[b], assign_to_centroids(f, cent[b], num_clusters=int(info["num_clusters"][b])))


def test_faiss_single_problem_agrees_with_batched(problems):
    feats, labels, *_ = problems
    for b in (0, 1):
        x = torch.nn.functional.normalize(feats[b], dim=1).numpy()
        a, cent = faiss_kmeans(x, K, seed=0)
        assert same_partition(labels[b], a) and cent.shape == (K, D)
    a, cent = faiss_kmeans(np.ones((3, D), np.float32) / D ** 0.5, K)
    assert a.tolist() == [0, 0, 0] and cent.shape == (1, D)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gives_the_cpu_partition(problems):
    feats, labels, x, valid, assign, _, _ = problems
    a, c, _ = batched_kmeans(x.cuda(), valid.cuda(), K, seed=0)
    assert a.is_cuda and c.is_cuda
    assert all(same_partition(lab, a[b, : len(lab)].cpu()) for b, lab in enumerate(labels))
