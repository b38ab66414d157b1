"""Class-level part clustering over spilled features and the density scores (PartDistillation sec. 4.3, eq. 2)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from trainers.parts.class_clusters import (
    FeatureSpill,
    cluster_classes,
    density_scores,
    load_class_clusters,
    partition_classes,
    spill_chunks,
    spill_counts,
)

torch.set_num_threads(1)
K, D = 8, 32


def planted_class(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` candidates from 8 orthogonal part directions (>= 5 each), random scale, small noise."""
    dirs = np.linalg.qr(rng.standard_normal((D, K)))[0].T
    lab = rng.permutation(np.concatenate([np.repeat(np.arange(K), 5), rng.integers(0, K, n - 5 * K)]))
    return (dirs[lab] * rng.uniform(0.5, 2, (n, 1)) + 0.03 * rng.standard_normal((n, D))).astype(np.float32), lab


@pytest.fixture()
def spilled(tmp_path):
    """Classes 0-3 planted (spread over two writers, small chunks), class 4 tiny with duplicates, NaN and zero rows,
    class 5 never spilled."""
    rng = np.random.default_rng(0)
    labels, feats = {}, {}
    spill = tmp_path / "spill"
    w0, w1 = FeatureSpill(spill, writer="0", chunk_rows=64), FeatureSpill(spill, writer="1", chunk_rows=64)
    for c in range(4):
        x, lab = planted_class(rng, 200 + 50 * c)
        feats[c], labels[c] = x, lab
        for s in range(0, len(x), 30):
            (w0 if s < len(x) // 2 else w1).append(c, x[s: s + 30], keys=np.arange(s, min(s + 30, len(x))))
    tiny = np.array([[1, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 0], [np.nan, 1, 0], [0, 3, 0], [np.inf, 0, 0]], np.float32)
    w0.append(4, np.pad(tiny, ((0, 0), (0, D - 3))))
    w0.close(), w1.close()
    return {"spill": spill, "out": tmp_path / "out", "feats": feats, "labels": labels}


def test_spill_publishes_chunks_and_counts(spilled):
    assert spill_counts(spilled["spill"]) == {0: 200, 1: 250, 2: 300, 3: 350, 4: 7}
    chunks = spill_chunks(spilled["spill"], 1)
    back = np.concatenate([np.load(p) for p in chunks])
    order = np.concatenate([np.load(p.with_name(p.name[:-4] + ".keys.npy")) for p in chunks])
    assert np.array_equal(back, spilled["feats"][1][order])
    assert not list(spilled["spill"].rglob("*.tmp"))


def test_reopening_a_writer_replaces_its_chunks(spilled):
    with FeatureSpill(spilled["spill"], writer="1") as w:
        w.append(0, np.ones((3, D)))
    counts = spill_counts(spilled["spill"])
    assert counts[0] == 120 + 3 and counts[3] == 180  # writer 0 holds the slices starting before n/2: 120 and 180 rows
    assert sum(len(np.load(p)) for p in spill_chunks(spilled["spill"], 0)) == 123


def test_a_chunk_is_published_whole_or_not_at_all(tmp_path, monkeypatch):
    w = FeatureSpill(tmp_path, writer="0", chunk_rows=4)
    w.append(0, np.ones((4, D)))

    def crash(fh, arr):
        fh.write(b"half a chunk")
        raise OSError("node lost")

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(OSError):
        w.append(0, np.ones((4, D)))
    monkeypatch.undo()
    assert [len(np.load(p)) for p in spill_chunks(tmp_path, 0)] == [4] and not list(tmp_path.rglob("*.tmp"))


def test_mixing_keyed_and_unkeyed_appends_is_refused(tmp_path):
    w = FeatureSpill(tmp_path, writer="0")
    w.append(0, np.ones((2, D)), keys=[1, 2])
    with pytest.raises(ValueError):
        w.append(0, np.ones((2, D)))


@pytest.mark.parametrize("max_points_per_centroid", [256, 10])  # 10: trained on a sample of 80, all assigned
def test_planted_part_clusters_recovered_per_class(spilled, max_points_per_centroid):
    summary = cluster_classes(spilled["spill"], spilled["out"], range(4), k=K, seed=0, use_gpu=False,
                              max_points_per_centroid=max_points_per_centroid)
    assert summary["computed"] == [0, 1, 2, 3]
    for c in range(4):
        res = load_class_clusters(spilled["out"], c)
        keys = res["keys"]
        assert res["centroids"].shape == (K, D) and np.allclose(np.linalg.norm(res["centroids"], axis=1), 1, atol=1e-5)
        assert adjusted_rand_score(spilled["labels"][c][keys], res["assign"]) == 1.0
        assert np.array_equal(res["counts"], np.bincount(res["assign"], minlength=K)) and (np.diff(res["counts"]) <= 0).all()


def test_small_class_gets_fewer_clusters_and_bad_rows_are_counted(spilled):
    summary = cluster_classes(spilled["spill"], spilled["out"], [4], k=K, use_gpu=False)
    info = summary["classes"][4]
    assert (info["k"], info["num_candidates"], info["num_nan"], info["num_zero"]) == (2, 7, 2, 1)
    res = load_class_clusters(spilled["out"], 4)
    # rows: dup, dup, +y, zero, nan, +y (scaled), inf  -> directions x and y; filtered rows get -1
    assert res["assign"].tolist() == [1, 1, 0, -1, -1, 0, -1] and np.isfinite(res["centroids"]).all()


def test_class_without_candidates_is_reported_not_an_error(spilled):
    summary = cluster_classes(spilled["spill"], spilled["out"], [5], k=K, use_gpu=False)
    assert summary["empty"] == [5] and summary["classes"][5]["status"] == "empty"
    assert load_class_clusters(spilled["out"], 5)["centroids"].shape[0] == 0


def test_resume_recomputes_only_missing_classes(spilled):
    first = cluster_classes(spilled["spill"], spilled["out"], range(6), k=K, use_gpu=False)
    assert first["computed"] == list(range(6))
    mtimes = {c: os.stat(spilled["out"] / f"class-{c}.npz").st_mtime_ns for c in range(6)}
    before = load_class_clusters(spilled["out"], 2)
    (spilled["out"] / "class-2.npz").unlink()
    again = cluster_classes(spilled["spill"], spilled["out"], range(6), k=K, use_gpu=False)
    assert again["computed"] == [2] and again["skipped"] == [0, 1, 3, 4, 5] and again["empty"] == [5]
    assert all(os.stat(spilled["out"] / f"class-{c}.npz").st_mtime_ns == mtimes[c] for c in (0, 1, 3, 4, 5))
    assert np.array_equal(load_class_clusters(spilled["out"], 2)["assign"], before["assign"])  # same seed, same answer
    changed = cluster_classes(spilled["spill"], spilled["out"], [0], k=4, use_gpu=False)  # other params: not a resume
    assert changed["computed"] == [0] and changed["classes"][0]["k"] == 4
    (spilled["out"] / "class-1.npz").write_bytes(b"not a zip")  # unreadable output: recomputed, not an error
    assert cluster_classes(spilled["spill"], spilled["out"], [1], k=K, use_gpu=False)["computed"] == [1]


def test_two_ranks_cover_every_class_exactly_once(spilled):
    for counts in (None, spill_counts(spilled["spill"])):
        out = spilled["out"] / ("balanced" if counts else "modulo")
        s0 = cluster_classes(spilled["spill"], out, range(6), k=K, rank=0, world_size=2, counts=counts, use_gpu=False)
        s1 = cluster_classes(spilled["spill"], out, range(6), k=K, rank=1, world_size=2, counts=counts, use_gpu=False)
        assert sorted(s0["computed"] + s1["computed"]) == list(range(6)) and not set(s0["computed"]) & set(s1["computed"])
        assert sorted(p.name for p in out.glob("class-*.npz")) == sorted(f"class-{c}.npz" for c in range(6))


def test_balanced_partition_spreads_candidates():
    counts = {0: 1000, 1: 10, 2: 10, 3: 990, 4: 5, 5: 5}
    parts = partition_classes(counts, 2, counts)
    loads = [sum(counts[c] for c in p) for p in parts]
    assert sorted(c for p in parts for c in p) == list(range(6)) and max(loads) - min(loads) <= 20
    assert partition_classes(range(5), 2) == [[0, 2, 4], [1, 3]]


def test_summary_is_json_serialisable(spilled):
    summary = cluster_classes(spilled["spill"], spilled["out"], range(6), k=K, use_gpu=False)
    reloaded = json.loads(json.dumps(summary))
    assert sorted(reloaded) == sorted(summary) and reloaded["rank"] == summary["rank"]


def test_density_rows_sum_to_one_and_nearest_prototype_scores_highest():
    g = torch.Generator().manual_seed(0)
    centroids = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1)
    feats = torch.randn(200, D, generator=g)
    scores, cluster = density_scores(feats, centroids)
    assert scores.shape == (200, K) and torch.allclose(scores.sum(1), torch.ones(200), atol=1e-6)
    nearest = torch.cdist(torch.nn.functional.normalize(feats, dim=1), centroids).argmin(1)
    assert torch.equal(cluster, nearest) and torch.equal(scores.argmax(1), nearest)
    d = torch.cdist(torch.nn.functional.normalize(feats[:1], dim=1), centroids)[0]
    assert torch.allclose(scores[0], torch.exp(-d) / torch.exp(-d).sum(), atol=1e-6)  # eq. 2 exactly
