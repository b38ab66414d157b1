"""Part proposal AR@k: the reference greedy max-overlap protocol, hand-computed recalls, and the COCOeval cross-check."""
from __future__ import annotations

import numpy as np
import pytest

from trainers.evaluation.proposals import PartProposalRecall, coco_proposal_ar, greedy_covered_overlaps
from trainers.structures import annotation_from_mask, encode_mask

H, W = 6, 10


def _mask(rows, cols, h=H, w=W) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[rows, cols] = 1
    return m


def _record(parts: list[np.ndarray], objects: list[np.ndarray] | None = None, image_id: int = 0) -> dict:
    h, w = parts[0].shape if parts else objects[0].shape
    objects = objects if objects is not None else [np.clip(sum(parts), 0, 1)] if parts else []
    return {"image_id": image_id, "height": h, "width": w,
            "objects": [annotation_from_mask(m, id=i + 1, category_id=0, iscrowd=0) for i, m in enumerate(objects)],
            "parts": [annotation_from_mask(m, id=i + 1, object_id=1, category_id=i) for i, m in enumerate(parts)]}


def _pred(mask: np.ndarray, score: float) -> dict:
    return {"segmentation": encode_mask(mask), "score": score}


# g1 = row 0, g2 = row 2 (10 px each). p1 covers 8/10 of g1, p2 6/10 of g2, p3 all of g2 plus one pixel (10/11).
G1, G2 = _mask(0, slice(0, 10)), _mask(2, slice(0, 10))
P1, P2 = _mask(0, slice(0, 8)), _mask(2, slice(0, 6))
P3 = _mask(2, slice(0, 10)) | _mask(3, 0)


def test_perfect_predictions_give_recall_one_at_every_k_and_threshold():
    ev = PartProposalRecall(max_dets=(2, 10))
    ev.process(_record([G1, G2]), [_pred(G1, 0.9), _pred(G2, 0.8)])
    res = ev.evaluate()
    assert res["AR@2"] == 1.0 and res["AR@10"] == 1.0 and res["R50@2"] == 1.0
    assert np.all(ev.recalls() == 1.0)


def test_hand_computed_recall_per_threshold_and_per_k():
    ev = PartProposalRecall(max_dets=(1, 2, 3, 10))
    ev.process(_record([G1, G2]), [_pred(P2, 0.8), _pred(P3, 0.7), _pred(P1, 0.9)])
    thr = ev.iou_thresholds  # 0.50, 0.55, ..., 0.95
    r = ev.recalls()
    # k=1: only p1 -> g1 covered at 0.8, g2 missed.
    np.testing.assert_allclose(r[0], np.where(thr <= 0.8, 0.5, 0.0))
    # k=2: g1 at 0.8 (p1), g2 at exactly 0.6 (p2): an IoU equal to the threshold counts.
    np.testing.assert_allclose(r[1], np.where(thr <= 0.6, 1.0, np.where(thr <= 0.8, 0.5, 0.0)))
    # k=3 (and 10): g2 is now covered at 10/11 by p3.
    expected = np.where(thr <= 0.8, 1.0, np.where(thr <= 10 / 11, 0.5, 0.0))
    np.testing.assert_allclose(r[2], expected)
    np.testing.assert_allclose(r[3], expected)
    res = ev.evaluate()
    assert res["AR@1"] == pytest.approx(7 * 0.5 / 10)
    assert res["AR@2"] == pytest.approx((3 * 1.0 + 4 * 0.5) / 10)
    assert res["AR@3"] == pytest.approx((7 * 1.0 + 2 * 0.5) / 10) == res["AR@10"]
    assert res["R50@1"] == 0.5 and res["R50@2"] == 1.0
    assert res["num_parts"] == 2


def test_images_without_predictions_count_their_parts_as_missed_and_images_without_parts_count_nothing():
    ev = PartProposalRecall(max_dets=(10,))
    ev.process(_record([G1, G2]), [_pred(G1, 1.0), _pred(G2, 1.0)])
    ev.process(_record([G1]), [])                                   # one part, missed
    ev.process(_record([], objects=[G1]), [_pred(G1, 1.0)])          # no parts: ignored
    res = ev.evaluate()
    assert res["num_parts"] == 3
    assert res["AR@10"] == pytest.approx(2 / 3) and res["R50@10"] == pytest.approx(2 / 3)


def test_score_order_decides_which_proposal_counts_at_k_1():
    good_first = PartProposalRecall(max_dets=(1,))
    good_first.process(_record([G1]), [_pred(P2, 0.1), _pred(G1, 0.9)])
    bad_first = PartProposalRecall(max_dets=(1,))
    bad_first.process(_record([G1]), [_pred(P2, 0.9), _pred(G1, 0.1)])
    assert good_first.evaluate()["AR@1"] == 1.0
    assert bad_first.evaluate()["AR@1"] == 0.0


def test_greedy_matching_uses_each_proposal_once_and_takes_the_best_covered_part_first():
    ious = np.array([[0.8, 0.7],
                     [0.75, 0.1]])
    # round 1: part 0 (0.8 via proposal 0) beats part 1 (0.7 via proposal 0); round 2: part 1 only has 0.1 left.
    np.testing.assert_allclose(greedy_covered_overlaps(ious), [0.8, 0.1])
    np.testing.assert_allclose(greedy_covered_overlaps(ious[:1]), [0.8, 0.0])  # one proposal covers one part
    assert greedy_covered_overlaps(np.zeros((0, 3))).tolist() == [0.0, 0.0, 0.0]


def test_merge_of_per_rank_evaluators_equals_one_evaluator():
    recs = [(_record([G1, G2]), [_pred(P1, 0.9), _pred(P3, 0.5)]), (_record([G2]), [_pred(P2, 0.3)])]
    whole = PartProposalRecall()
    for r, p in recs:
        whole.process(r, p)
    a, b = PartProposalRecall(), PartProposalRecall()
    a.process(*recs[0])
    b.process(*recs[1])
    a.merge(b)
    assert a.evaluate() == whole.evaluate()


def test_clip_to_objects_removes_the_part_of_a_proposal_outside_gt_objects():
    spill = G1 | _mask(5, slice(0, 10))  # the part plus a row of background: IoU 0.5
    rec = _record([G1])
    plain, clipped = PartProposalRecall(max_dets=(1,)), PartProposalRecall(max_dets=(1,), clip_to_objects=True)
    plain.process(rec, [_pred(spill, 1.0)])
    clipped.process(rec, [_pred(spill, 1.0)])
    assert plain.evaluate()["AR@1"] == pytest.approx(0.1)   # only the 0.5 threshold passes
    assert clipped.evaluate()["AR@1"] == 1.0
    coco_plain = coco_proposal_ar([rec], [[_pred(spill, 1.0)]])
    coco_clipped = coco_proposal_ar([rec], [[_pred(spill, 1.0)]], clip_to_objects=True)
    assert coco_plain["coco/AR@1"] == pytest.approx(0.1) and coco_clipped["coco/AR@1"] == pytest.approx(1.0)


def _random_dataset(noise: int, n_images: int = 6, seed: int = 0):
    """Images of 24x24 with 3 rectangular parts each; proposals = parts shifted by up to ``noise`` px, plus junk."""
    rng = np.random.default_rng(seed)
    records, preds = [], []
    for i in range(n_images):
        parts, props = [], []
        for j in range(3):
            y, x = 8 * j + 1, int(rng.integers(0, 8))
            h, w = 6, int(rng.integers(8, 14))
            parts.append(_mask(slice(y, y + h), slice(x, x + w), 24, 24))
            dy, dx = rng.integers(-noise, noise + 1, size=2)
            props.append(_pred(_mask(slice(max(y + dy, 0), y + h + dy), slice(max(x + dx, 0), x + w + dx), 24, 24),
                               float(rng.uniform(0.5, 1.0))))
        for _ in range(4):  # low-scored junk
            y, x = rng.integers(0, 18, size=2)
            props.append(_pred(_mask(slice(y, y + 6), slice(x, x + 6), 24, 24), float(rng.uniform(0.0, 0.4))))
        records.append(_record(parts, image_id=i))
        preds.append(props)
    return records, preds


def test_coco_figure_is_one_for_perfect_predictions():
    records, _ = _random_dataset(0)
    preds = [[{"segmentation": p["segmentation"], "score": 1.0} for p in r["parts"]] for r in records]
    res = coco_proposal_ar(records, preds)
    assert res["coco/AR@10"] == pytest.approx(1.0) and res["coco/AR@100"] == pytest.approx(1.0)
    assert res["coco/AR@1"] == pytest.approx(1 / 3)  # one proposal per image, three parts
    assert res["coco/AP"] == pytest.approx(1.0)


def test_coco_figure_follows_the_reference_trend_on_noisy_proposals():
    ours, coco = [], []
    for noise in (0, 1, 2, 3):
        records, preds = _random_dataset(noise)
        ev = PartProposalRecall(max_dets=(1, 10, 100))
        for r, p in zip(records, preds):
            ev.process(r, p)
        ours.append(ev.evaluate()["AR@10"])
        coco.append(coco_proposal_ar(records, preds)["coco/AR@10"])
    assert ours[0] == pytest.approx(1.0) and coco[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(ours, ours[1:])) and ours[-1] < 0.9
    assert all(a >= b for a, b in zip(coco, coco[1:])) and coco[-1] < 0.9
    np.testing.assert_allclose(ours, coco, atol=0.05)


def test_coco_figure_with_no_predictions_is_zero():
    records, _ = _random_dataset(0, n_images=2)
    assert coco_proposal_ar(records, [[], []]) == {"coco/AR@1": 0.0, "coco/AR@10": 0.0, "coco/AR@100": 0.0,
                                                   "coco/AP": 0.0, "coco/AP50": 0.0}

