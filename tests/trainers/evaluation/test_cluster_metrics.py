"""Cluster metrics: NMI/ARI from streamed contingency tables (== sklearn), mIoU under majority and Hungarian mapping."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from trainers.evaluation.clustering import (
    Contingency,
    PartClusteringEvaluator,
    ari_from_contingency,
    gt_label_maps,
    nmi_from_contingency,
    paint_label_map,
)
from trainers.structures import annotation_from_mask, encode_mask


def _table(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    c = Contingency()
    half = len(pred) // 2  # two updates: the table accumulates
    c.add(pred[:half], gt[:half])
    c.add(pred[half:], gt[half:])
    return c.table()[2]


@pytest.mark.parametrize("seed", range(12))
def test_nmi_and_ari_from_contingency_equal_sklearn_on_random_labelings(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    gt = rng.integers(-1, int(rng.integers(1, 7)), size=n) * 3     # arbitrary, non-contiguous ids
    pred = rng.integers(0, int(rng.integers(1, 9)), size=n)
    if seed % 3 == 0:  # correlated labelings, not only independent ones
        pred = np.where(rng.random(n) < 0.7, gt + 10, pred)
    table = _table(pred, gt)
    assert nmi_from_contingency(table) == pytest.approx(normalized_mutual_info_score(gt, pred), abs=1e-12)
    assert ari_from_contingency(table) == pytest.approx(adjusted_rand_score(gt, pred), abs=1e-12)


@pytest.mark.parametrize("gt,pred", [([1, 1, 1], [0, 0, 0]), ([1, 1, 2], [0, 0, 0]), ([1, 2, 3], [0, 0, 0]),
                                     ([5], [7]), ([1, 2], [3, 4])])
def test_nmi_and_ari_match_sklearn_on_degenerate_labelings(gt, pred):
    table = _table(np.array(pred), np.array(gt))
    assert nmi_from_contingency(table) == pytest.approx(normalized_mutual_info_score(gt, pred))
    assert ari_from_contingency(table) == pytest.approx(adjusted_rand_score(gt, pred))


def test_ari_stays_exact_for_pixel_counts_whose_squares_overflow_int64():
    cells = [[3_000_000_000, 1_000_000], [2_000_000, 4_000_000_000]]
    table = np.array(cells, dtype=np.int64)
    # Hubert-Arabie form with exact Python integers: (index - expected) / (max - expected)

    def pairs(x: int) -> int:
        return x * (x - 1) // 2

    n = sum(map(sum, cells))
    index = sum(pairs(x) for row in cells for x in row)
    rows, cols = sum(pairs(sum(r)) for r in cells), sum(pairs(sum(c)) for c in zip(*cells))
    expected = Fraction(rows * cols, pairs(n))
    exact = (index - expected) / (Fraction(rows + cols, 2) - expected)
    assert ari_from_contingency(table) == pytest.approx(float(exact), rel=1e-12)
    assert 0.99 < ari_from_contingency(table) < 1.0
    assert 0.9 < nmi_from_contingency(table) < 1.0


# --- a record: two objects of class 0 (parts 10, 11), one of class 1 (parts 20, 21, 22), on a 12 x 30 image.
H, W = 12, 30


def _box(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


OBJECTS = [(1, 0, _box(0, 6, 0, 10)), (2, 0, _box(6, 12, 0, 10)), (3, 1, _box(0, 12, 12, 30))]
PARTS = [(1, 10, _box(0, 3, 0, 10)), (1, 11, _box(3, 6, 0, 10)),
         (2, 10, _box(6, 9, 0, 10)), (2, 11, _box(9, 12, 0, 10)),
         (3, 20, _box(0, 4, 12, 30)), (3, 21, _box(4, 8, 12, 30)), (3, 22, _box(8, 12, 12, 30))]
RECORD = {"image_id": 0, "height": H, "width": W,
          "objects": [annotation_from_mask(m, id=i, category_id=c, iscrowd=0) for i, c, m in OBJECTS],
          "parts": [annotation_from_mask(m, id=j, object_id=i, category_id=c) for j, (i, c, m) in enumerate(PARTS)]}
PERMUTATION = {10: 1, 11: 0, 20: 2, 21: 0, 22: 1}  # cluster ids are arbitrary and per class


def _perfect_prediction() -> np.ndarray:
    _, part = gt_label_maps(RECORD)
    return np.vectorize(lambda p: PERMUTATION.get(p, -1))(part)


def test_gt_label_maps_paint_object_classes_and_part_categories():
    obj, part = gt_label_maps(RECORD)
    assert obj[0, 0] == 0 and obj[0, 20] == 1 and obj[0, 11] == -1
    assert part[0, 0] == 10 and part[7, 0] == 10 and part[11, 29] == 22 and part[5, 11] == -1


def test_permuted_perfect_prediction_scores_one_everywhere():
    ev = PartClusteringEvaluator()
    ev.process(RECORD, _perfect_prediction())
    res = ev.evaluate()
    for key in ("nmi", "ari", "miou", "miou_parts", "miou_hungarian", "miou_hungarian_parts"):
        assert res[key] == pytest.approx(1.0), key
    assert res["num_classes"] == 2
    per = ev.per_class()
    assert set(per) == {0, 1} and per[1]["miou_per_part"] == {20: 1.0, 21: 1.0, 22: 1.0}


def test_majority_and_hungarian_mapping_differ_when_two_clusters_share_a_part():
    # one object (10 x 10, class 0); part A = first 60 pixels, part B = last 40 (row-major).
    flat_part = np.r_[np.full(60, 1), np.full(40, 2)]
    # cluster 0: 50 px of A; cluster 1: 10 px of A + 5 px of B; cluster 2: 35 px of B.
    flat_pred = np.r_[np.full(50, 0), np.full(15, 1), np.full(35, 2)]
    record = {"image_id": 0, "height": 10, "width": 10,
              "objects": [annotation_from_mask(np.ones((10, 10), np.uint8), id=1, category_id=0)],
              "parts": [annotation_from_mask((flat_part == k).reshape(10, 10).astype(np.uint8), id=k, object_id=1,
                                             category_id=k) for k in (1, 2)]}
    ev = PartClusteringEvaluator()
    ev.process(record, flat_pred.reshape(10, 10))
    per = ev.per_class()[0]
    # majority: clusters 0 and 1 both -> A (merged: 60 of A's 60 px, 65 px predicted); cluster 2 -> B.
    assert per["miou_per_part"] == pytest.approx({1: 60 / 65, 2: 35 / 40})
    # Hungarian (one-to-one by IoU): 0 -> A, 2 -> B, cluster 1 left unmatched.
    assert per["miou_hungarian_per_part"] == pytest.approx({1: 50 / 60, 2: 35 / 40})
    res = ev.evaluate()
    assert res["miou"] == pytest.approx((60 / 65 + 35 / 40) / 2)
    assert res["miou_hungarian"] == pytest.approx((50 / 60 + 35 / 40) / 2)
    assert res["nmi"] == pytest.approx(normalized_mutual_info_score(flat_part, flat_pred))
    assert res["ari"] == pytest.approx(adjusted_rand_score(flat_part, flat_pred))


def test_class_mean_and_all_part_mean_weight_classes_differently():
    pred = _perfect_prediction()
    pred[0:3, 0:10] = 0  # class 0: part 10 of object 1 predicted as part 11's cluster
    ev = PartClusteringEvaluator()
    ev.process(RECORD, pred)
    per = ev.per_class()
    parts = [v for c in per.values() for v in c["miou_per_part"].values()]
    res = ev.evaluate()
    assert res["miou"] == pytest.approx((per[0]["miou"] + 1.0) / 2)
    assert res["miou_parts"] == pytest.approx(np.mean(parts))
    assert res["miou"] != pytest.approx(res["miou_parts"]) and res["miou"] < 1.0


def test_unassigned_foreground_counts_against_nmi_and_miou():
    pred = _perfect_prediction()
    pred[0:12, 12:15] = -1  # leave a band of class 1 unassigned
    ev = PartClusteringEvaluator()
    ev.process(RECORD, pred)
    per = ev.per_class()
    assert per[0]["nmi"] == pytest.approx(1.0) and per[1]["nmi"] < 1.0 and per[1]["ari"] < 1.0
    assert per[1]["miou_per_part"][20] == pytest.approx(15 / 18)


def test_without_gt_objects_predictions_on_background_are_false_positives():
    obj_gt, _ = gt_label_maps(RECORD)
    pred = _perfect_prediction()
    pred_class = obj_gt.copy()
    pred[0:3, 10:12] = PERMUTATION[20]  # the model's class-1 object spills onto 6 background pixels ...
    pred_class[0:3, 10:12] = 1
    with_gt, without = PartClusteringEvaluator(), PartClusteringEvaluator()
    with_gt.process(RECORD, pred)            # object_class_map=None: GT objects, spill dropped
    without.process(RECORD, pred, pred_class)
    assert with_gt.evaluate()["miou"] == pytest.approx(1.0)
    assert without.per_class()[1]["miou_per_part"][20] == pytest.approx(72 / 78)
    assert without.per_class()[1]["nmi"] == pytest.approx(1.0)  # NMI/ARI only look at GT part pixels


def test_prediction_under_the_wrong_object_class_is_a_miss_for_the_true_class():
    obj_gt, _ = gt_label_maps(RECORD)
    pred_class = obj_gt.copy()
    pred_class[pred_class == 0] = 1  # the model calls class-0 objects class 1
    ev = PartClusteringEvaluator()
    ev.process(RECORD, _perfect_prediction(), pred_class)
    per = ev.per_class()
    # every class-0 part pixel is "none": a single cluster explains nothing about the two GT parts
    assert per[0]["miou"] == 0.0 and per[0]["nmi"] == 0.0 and per[0]["ari"] == 0.0
    assert per[1]["miou"] < 1.0  # ... and class 1 gets the class-0 pixels as false positives


def test_merged_evaluators_equal_one_evaluator_over_all_records():
    rng = np.random.default_rng(0)
    preds = [np.where(rng.random((H, W)) < 0.2, rng.integers(0, 3, (H, W)), _perfect_prediction()) for _ in range(3)]
    whole = PartClusteringEvaluator()
    for p in preds:
        whole.process(RECORD, p)
    a, b = PartClusteringEvaluator(), PartClusteringEvaluator()
    a.process(RECORD, preds[0])
    b.process(RECORD, preds[1])
    b.process(RECORD, preds[2])
    a.merge(b)
    assert a.evaluate() == pytest.approx(whole.evaluate())
    assert 0 < whole.evaluate()["nmi"] < 1


def test_reset_forgets_everything():
    ev = PartClusteringEvaluator()
    ev.process(RECORD, _perfect_prediction())
    ev.reset()
    assert ev.evaluate()["num_classes"] == 0


def test_paint_label_map_lets_the_higher_score_win_overlaps():
    a, b = _box(0, 4, 0, 4), _box(2, 6, 2, 6)
    out = paint_label_map([encode_mask(a), encode_mask(b)], [7, 3], H, W, scores=[0.9, 0.5])
    assert out[3, 3] == 7 and out[5, 5] == 3 and out[0, 0] == 7 and out[8, 8] == -1
