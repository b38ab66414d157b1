"""The diagnosis scripts of issue 13 score as the evaluation stage does (benchmarks/luss_significance.py,
benchmarks/luss_finetune_mechanism.py): their figures are only worth something if they reproduce the stage's."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

from luss_finetune_mechanism import degrade  # noqa: E402
from luss_significance import miou  # noqa: E402

from trainers.evaluation.semantic import LussScores, MatchingMatrix, apply_mapping, image_level_matching  # noqa: E402


def _maps(seed: int, images: int = 12, n_pred: int = 5, n_gt: int = 4, size: int = 16):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(images):
        gt = np.zeros((size, size), dtype=np.int64)
        for c in rng.choice(np.arange(1, n_gt), size=2, replace=False):
            y, x = rng.integers(0, size - 6, size=2)
            gt[y:y + 6, x:x + 6] = c
        pred = np.where(rng.random((size, size)) < 0.7, (gt + 1) % n_pred, rng.integers(0, n_pred, (size, size)))
        out.append((pred, gt))
    return out


def test_the_significance_miou_is_the_evaluation_stages():
    n_pred, n_gt = 5, 4
    for seed in range(3):
        maps = _maps(seed, n_pred=n_pred, n_gt=n_gt)
        matcher = MatchingMatrix(n_pred, n_gt)
        for p, g in maps:
            matcher.add(p, g)
        mapping = image_level_matching(matcher.counts)
        scores = LussScores(n_gt)
        for p, g in maps:
            scores.add(apply_mapping(p, mapping), g, raw_foreground=p != 0)
        conf = np.stack([np.bincount(p.ravel() * n_gt + g.ravel(), minlength=n_pred * n_gt).reshape(n_pred, n_gt)
                         for p, g in maps])
        assert miou(conf) == scores.result()["miou"]


def test_degrade_permutes_relabels_objects_and_samples_on_the_grid():
    gt = np.zeros((8, 8), dtype=np.int64)
    gt[0:4, 0:4] = 1
    gt[4:8, 4:8] = 2
    objs = [gt == 1, gt == 2]
    perm = np.array([0, 2, 1])
    rng = np.random.default_rng(0)
    assert np.array_equal(degrade(gt, perm, 0.0, 1, rng, objs), perm[gt])  # no noise, full grid: ids permuted only
    coarse = degrade(gt, perm, 0.0, 4, rng, objs)
    assert coarse.shape == gt.shape and set(np.unique(coarse)) == {0, 1, 2}
    noisy = [degrade(gt, perm, 1.0, 1, np.random.default_rng(s), objs) for s in range(20)]
    assert any(not np.array_equal(n, perm[gt]) for n in noisy)  # every object relabelled at random
    assert all(np.array_equal(n == 0, gt == 0) for n in noisy)  # 'other' never touched
