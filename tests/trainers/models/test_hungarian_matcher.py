"""Hungarian matching on class + BCE + dice costs (Mask2Former sec. 3.3)."""
from __future__ import annotations

from itertools import permutations

import pytest
import torch
import torch.nn.functional as F

from trainers.models.matcher import HungarianMatcher, batch_dice_cost, batch_sigmoid_ce_cost, hungarian


def _brute_force(cost: torch.Tensor) -> float:
    n, m = cost.shape
    if n >= m:
        return min(sum(cost[p[j], j].item() for j in range(m)) for p in permutations(range(n), m))
    return min(sum(cost[i, p[i]].item() for i in range(n)) for p in permutations(range(m), n))


def test_hungarian_finds_the_optimum_greedy_misses():
    cost = torch.tensor([[0.0, 1.0], [1.0, 9.0]])  # greedy takes the 0 first and pays 0 + 9
    rows, cols = hungarian(cost)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]  # 1 + 1 = 2
    cost = torch.tensor([[0.0, 1.0, 5.0, 7.0], [1.0, 4.0, 9.0, 9.0], [3.0, 9.0, 2.0, 9.0]])  # 3 queries, 4 targets
    rows, cols = hungarian(cost)
    assert cols.tolist() == [1, 0, 2] and cost[rows, cols].sum().item() == pytest.approx(_brute_force(cost)) == 4.0


@pytest.mark.parametrize("n,m", [(4, 2), (5, 5), (3, 4)])
def test_matcher_agrees_with_brute_force_on_random_costs(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    matcher = HungarianMatcher()
    for _ in range(5):
        logits = torch.randn(n, 4, generator=g)
        pred_masks = torch.randn(n, 4, 4, generator=g) * 3
        labels = torch.randint(0, 3, (m,), generator=g)
        masks = torch.rand(m, 16, 16, generator=g) > 0.5
        cost = matcher.cost_matrix(logits, pred_masks, labels, masks)
        rows, cols = hungarian(cost)
        assert len(rows) == min(n, m) and len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert cost[rows, cols].sum().item() == pytest.approx(_brute_force(cost), abs=1e-5)


def test_matcher_pairs_each_target_with_the_query_predicting_it():
    size = 16
    masks = torch.zeros(3, size, size, dtype=torch.bool)
    masks[0, :8, :8] = masks[1, 8:, :] = masks[2, :8, 8:] = True
    labels = torch.tensor([2, 0, 1])
    # query q predicts target perm[q] well (at stride 4 -> 4x4 logits); query 4 predicts nothing
    perm = [2, 0, 1, 0]
    pred_masks = torch.full((5, 4, 4), -6.0)
    logits = torch.full((5, 4), -4.0)
    logits[4, -1] = 4.0
    for q, t in enumerate(perm[:3]):
        pred_masks[q] = torch.where(F.avg_pool2d(masks[t][None, None].float(), 4)[0, 0] > 0.5, 6.0, -6.0)
        logits[q, labels[t]] = 4.0
    pred_masks[3] = pred_masks[1] * 0.1  # a vaguer duplicate of query 1
    out = {"pred_logits": logits[None], "pred_masks": pred_masks[None]}
    (rows, cols), = HungarianMatcher()(out, [{"labels": labels, "masks": masks}])
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 2, 1: 0, 2: 1}


def test_image_without_targets_gets_an_empty_match():
    out = {"pred_logits": torch.randn(2, 3, 2), "pred_masks": torch.randn(2, 3, 4, 4)}
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16)},
               {"labels": torch.tensor([0]), "masks": torch.ones(1, 16, 16)}]
    (r0, c0), (r1, c1) = HungarianMatcher()(out, targets)
    assert len(r0) == len(c0) == 0 and len(r1) == len(c1) == 1


def test_pairwise_costs_equal_the_per_pair_losses():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 50, generator=g) * 3, (torch.rand(3, 50, generator=g) > 0.5).float()
    bce = torch.stack([torch.stack([F.binary_cross_entropy_with_logits(x[i], t[j]) for j in range(3)]) for i in range(4)])
    assert torch.allclose(batch_sigmoid_ce_cost(x, t), bce, atol=1e-5)
    p = x.sigmoid()
    dice = torch.stack([torch.stack([1 - (2 * (p[i] * t[j]).sum() + 1) / (p[i].sum() + t[j].sum() + 1) for j in range(3)]) for i in range(4)])
    assert torch.allclose(batch_dice_cost(x, t), dice, atol=1e-5)


def test_point_sampled_costs_rank_like_dense_costs():
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :16] = True
    masks[1, 16:] = True
    pred = torch.where(F.avg_pool2d(masks[:, None].float(), 4)[:, 0] > 0.5, 5.0, -5.0)
    logits = torch.zeros(2, 2)
    torch.manual_seed(0)
    cost = HungarianMatcher(num_points=256).cost_matrix(logits, pred, torch.tensor([0, 0]), masks)
    assert cost[0, 0] < cost[0, 1] and cost[1, 1] < cost[1, 0]
