"""Strip baseline: k equal-area, disjoint strips that tile the object, cut across its major axis."""
from __future__ import annotations

import numpy as np
import pytest

from trainers.evaluation.baselines import strip_baseline, strip_proposals, strip_record
from trainers.evaluation.proposals import PartProposalRecall
from trainers.structures import annotation_from_mask, decode_mask


def _check_tiling(mask: np.ndarray, strips: list[np.ndarray], k: int) -> None:
    areas = [int(s.sum()) for s in strips]
    assert len(strips) == k
    assert max(areas) - min(areas) <= 1
    assert np.all(np.sum(strips, axis=0) <= 1)                     # disjoint
    assert np.array_equal(np.any(strips, axis=0), mask.astype(bool))  # union = mask


def test_horizontal_bar_is_cut_by_vertical_lines_into_equal_strips():
    mask = np.zeros((20, 50), dtype=bool)
    mask[5:15, 5:45] = True  # 10 x 40
    strips = strip_proposals(mask, k=4)
    _check_tiling(mask, strips, 4)
    column_ranges = []
    for s in strips:
        rows, cols = np.nonzero(s)
        assert set(rows.tolist()) == set(range(5, 15))            # every strip spans the bar's full height
        assert s[:, cols.min():cols.max() + 1][5:15].all()        # ... as a solid block of 10 columns
        column_ranges.append((cols.min(), cols.max()))
    assert sorted(column_ranges) == [(5, 14), (15, 24), (25, 34), (35, 44)]


def test_vertical_bar_is_cut_by_horizontal_lines():
    mask = np.zeros((50, 20), dtype=bool)
    mask[5:45, 8:12] = True
    for s in strip_proposals(mask, k=4):
        rows, cols = np.nonzero(s)
        assert set(cols.tolist()) == {8, 9, 10, 11} and rows.max() - rows.min() == 9


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_diagonal_ellipse_gives_k_equal_disjoint_strips_covering_it(k):
    yy, xx = np.mgrid[0:64, 0:64]
    u, v = (xx - 32 + yy - 32) / np.sqrt(2), (xx - 32 - (yy - 32)) / np.sqrt(2)
    mask = (u / 28) ** 2 + (v / 9) ** 2 <= 1                      # long axis along the diagonal
    strips = strip_proposals(mask, k)
    _check_tiling(mask, strips, k)
    if k == 2:  # the cut is across the long (diagonal) axis: the halves are the two ends, not the two sides
        centres = [np.argwhere(s).mean(axis=0) for s in strips]
        d = centres[1] - centres[0]
        assert abs(d[0]) > 10 and abs(d[1]) > 10 and np.sign(d[0]) == np.sign(d[1])


def test_masks_with_fewer_pixels_than_k_give_one_pixel_strips_and_empty_gives_none():
    mask = np.zeros((5, 5), dtype=bool)
    assert strip_proposals(mask, 4) == []
    mask[2, 1:4] = True
    strips = strip_proposals(mask, 4)
    _check_tiling(mask, strips, 3)
    mask1 = np.zeros((5, 5), dtype=bool)
    mask1[0, 0] = True
    _check_tiling(mask1, strip_proposals(mask1, 4), 1)


def test_odd_pixel_counts_split_within_one_pixel():
    mask = np.zeros((9, 30), dtype=bool)
    mask[1:8, 2:27] = True  # 7 x 25 = 175 pixels
    _check_tiling(mask, strip_proposals(mask, 4), 4)


def test_strip_baseline_streams_proposals_for_every_object_and_scores_bigger_objects_higher():
    big, small = np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8)
    big[2:10, 0:32] = 1
    small[20:24, 4:12] = 1
    strips = strip_proposals(big, 4)
    record = {"image_id": 0, "height": 32, "width": 32,
              "objects": [annotation_from_mask(small, id=1, category_id=0), annotation_from_mask(big, id=2, category_id=1)],
              "parts": [annotation_from_mask(s.astype(np.uint8), id=i + 1, object_id=2, category_id=i)
                        for i, s in enumerate(strips)]}
    props = strip_record(record, 4)
    assert [p["object_id"] for p in props] == [1] * 4 + [2] * 4
    assert all(p["score"] == p["area"] / 32 ** 2 for p in props)
    assert min(p["score"] for p in props[4:]) > max(p["score"] for p in props[:4])
    np.testing.assert_array_equal(decode_mask(props[4]["segmentation"]), strips[0])
    ev = PartProposalRecall(max_dets=(4, 8))
    for rec, predictions in strip_baseline(iter([record]), k=4):
        ev.process(rec, predictions)
    res = ev.evaluate()
    assert res["AR@4"] == 1.0 and res["AR@8"] == 1.0  # the GT parts here are the big object's strips
