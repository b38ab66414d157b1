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


# -- LUSS (PASS sec. 3.2) ---------------------------------------------------------------------------------------------
from trainers.evaluation.semantic import (  # noqa: E402
    IGNORE,
    DistanceMatching,
    LussScores,
    MatchingMatrix,
    apply_mapping,
    boundary_band,
    image_level_matching,
)


def test_image_level_matching_counts_category_sets_and_keeps_other_on_other():
    m = MatchingMatrix(n_pred=3, n_gt=3)
    # image 1: generated {1} with ground truth {2}; image 2: generated {1, 2} with ground truth {2, 1}; image 3: {2} with {1}
    m.add(np.array([[0, 1], [1, 1]]), np.array([[0, 2], [2, 2]]))
    m.add(np.array([[1, 2], [0, 0]]), np.array([[2, 1], [0, IGNORE]]))
    m.add(np.array([[2, 2]]), np.array([[1, 0]]))
    assert m.counts[1:, 1:].tolist() == [[1, 2], [2, 1]] and m.images == 3
    assert image_level_matching(m.counts).tolist() == [0, 2, 1]


def test_unmatched_generated_categories_map_to_nothing():
    counts = np.zeros((4, 2), dtype=np.int64)
    counts[1, 1], counts[3, 1] = 5, 2
    mapping = image_level_matching(counts)
    assert mapping.tolist() == [0, 1, -1, -1]
    assert apply_mapping(np.array([0, 1, 2, 3]), mapping).tolist() == [0, 1, -1, -1]


def test_a_perfect_prediction_scores_one_on_every_luss_metric():
    gt = np.zeros((20, 20), dtype=np.int64)
    gt[2:10, 2:10] = 1
    gt[12:18, 5:15] = 2
    s = LussScores(3)
    s.add(gt.copy(), gt)
    r = s.result()
    assert r["miou"] == r["boundary_miou"] == r["img_acc"] == pytest.approx(1.0)
    assert r["fbeta"] == pytest.approx(1.0) and r["images_all_other"] == 0


def test_luss_miou_counts_other_and_ignores_ignore_pixels():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, IGNORE]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 0, 1]])
    s = LussScores(2, boundary_ratio=0.0)
    s.add(pred, gt)
    r = s.result()
    # other: tp 3, pred 4, gt 4 -> 3/5; category 1: tp 2, pred 3, gt 3 -> 2/4
    assert r["other_iou"] == pytest.approx(3 / 5) and r["iou_1"] == pytest.approx(2 / 4)
    assert r["miou"] == pytest.approx((3 / 5 + 2 / 4) / 2)


def test_img_acc_takes_the_largest_predicted_category_and_an_all_other_image_is_wrong():
    gt = np.array([[1, 1, 0, 0]])
    s = LussScores(3)
    s.add(np.array([[1, 2, 2, 0]]), gt)  # largest predicted: 2, not in the image -> wrong
    s.add(np.array([[1, 1, 2, 0]]), gt)  # largest predicted: 1 -> right
    s.add(np.array([[0, 0, 0, 0]]), gt)  # all 'other' -> wrong, counted
    r = s.result()
    assert r["img_acc"] == pytest.approx(1 / 3) and r["images_all_other"] == 1


def test_fbeta_uses_beta_squared_point_three_on_foreground_versus_other():
    gt = np.array([[1, 1, 1, 1, 0, 0, 0, 0]])
    pred = np.array([[2, 2, 0, 0, 2, 0, 0, 0]])  # foreground: precision 2/3, recall 2/4
    s = LussScores(3)
    s.add(pred, gt)
    p, r = 2 / 3, 1 / 2
    assert s.result()["fbeta"] == pytest.approx(1.3 * p * r / (0.3 * p + r))


def test_boundary_band_is_the_inner_ring_of_the_given_width():
    m = np.zeros((9, 9), dtype=bool)
    m[1:8, 1:8] = True
    band = boundary_band(m, 1)
    assert band.sum() == 7 * 7 - 5 * 5 and not band[4, 4]
    assert boundary_band(m, 2).sum() == 7 * 7 - 3 * 3


def test_boundary_miou_punishes_a_shifted_edge_more_than_mask_miou():
    gt = np.zeros((40, 40), dtype=np.int64)
    gt[10:30, 10:30] = 1
    pred = np.roll(gt, 2, axis=1)
    s = LussScores(2, boundary_ratio=0.03)
    s.add(pred, gt)
    r = s.result()
    assert r["boundary_miou"] < r["iou_1"] < 1.0


def test_size_groups_split_categories_by_their_share_of_the_image():
    gt = np.zeros((10, 10), dtype=np.int64)
    gt[0, 0:4] = 1  # 4% -> S
    gt[5:10, 0:10] = 2  # 50% -> M.L.
    s = LussScores(3)
    s.add(gt.copy(), gt)
    r = s.result()
    assert r["miou_S"] == r["miou_ML"] == pytest.approx(1.0)
    assert "miou_MS" not in r and "miou_L" not in r  # no category of that size


def test_luss_scores_survive_a_round_trip_through_their_state_vector():
    rng = np.random.default_rng(0)
    a = LussScores(4)
    for _ in range(3):
        a.add(rng.integers(-1, 4, (12, 12)), rng.integers(0, 4, (12, 12)))
    b = LussScores(4).load_state(a.state())
    assert b.result() == a.result()
    c = LussScores(4)
    c.merge(a)
    c.merge(a)
    assert c.images == 6 and c.result()["miou"] == pytest.approx(a.result()["miou"])


def test_distance_matching_labels_pixels_by_their_nearest_category_embeddings():
    dm = DistanceMatching(top_k=1)
    feats = np.zeros((2, 2, 2), dtype=np.float32)
    feats[0, 0, :] = 1.0  # top row: direction x, category 1
    feats[1, 1, :] = 1.0  # bottom row: direction y, 'other'
    dm.add_image(feats, np.array([[1, 1], [0, 0]]))
    bank, labels = dm.bank()
    query = np.zeros((2, 1, 2), dtype=np.float32)
    query[:, 0, 0] = [0.9, 0.1]
    query[:, 0, 1] = [0.2, 0.8]
    assert DistanceMatching.vote(query, bank, labels, 1).tolist() == [[1, 0]]
