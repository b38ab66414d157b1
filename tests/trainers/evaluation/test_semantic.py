"""trainers.evaluation.semantic: Hungarian and many-to-one scores against hand-computed values."""
import numpy as np
import pytest

from trainers.evaluation.semantic import Confusion, score


def test_a_permuted_perfect_prediction_scores_one_under_hungarian():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[2, 2, 0, 0], [1, 1, 1, 0]])  # cluster 2->0, 0->1, 1->2; the ignore pixel never counts
    c = Confusion(3, 3)
    c.add(pred, gt)
    s = score(c)
    assert s.mapping == [1, 2, 0]
    assert s.miou == pytest.approx(1.0) and s.pixel_accuracy == pytest.approx(1.0)


def test_overclustering_many_to_one_merges_clusters_that_hungarian_leaves_unmatched():
    gt = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 1, 1, 2, 2])  # two clusters cover class 0
    c = Confusion(3, 2)
    c.add(pred, gt)
    h = score(c, "hungarian")
    assert h.pixel_accuracy == pytest.approx(4 / 6)  # one of the class-0 clusters stays unmatched
    assert h.iou[0] == pytest.approx(2 / 4) and h.iou[1] == pytest.approx(1.0)
    m = score(c, "many_to_one")
    assert m.mapping == [0, 0, 1] and m.miou == pytest.approx(1.0)


def test_labels_outside_the_declared_range_are_named():
    c = Confusion(2, 2)
    with pytest.raises(ValueError, match="ground-truth label 7"):
        c.add(np.zeros(3), np.array([0, 7, 1]))
    with pytest.raises(ValueError, match="predicted label 5"):
        c.add(np.array([0, 5, 1]), np.zeros(3))
