"""Set-prediction losses: CE with no-object weight, BCE + dice on matched masks, deep supervision."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainers.models.config import LossConfig
from trainers.models.losses import SetCriterion, dice_loss, sigmoid_ce_loss


def _outputs(b=2, n=4, c=3, h=8, aux=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: {"pred_logits": torch.randn(b, n, c + 1, generator=g).requires_grad_(),  # noqa: E731
                  "pred_masks": torch.randn(b, n, h, h, generator=g).requires_grad_()}
    out = mk()
    out["aux_outputs"] = [mk() for _ in range(aux)]
    return out


def _targets(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, 3, (2,), generator=g), "masks": torch.rand(2, size, size, generator=g) > 0.5}
            for _ in range(b)]


def test_losses_are_finite_for_every_layer_and_sum_to_the_weighted_total():
    cfg = LossConfig()
    out = _outputs()
    losses = SetCriterion(3, cfg)(out, _targets())
    names = ["loss_ce", "loss_mask", "loss_dice"]
    assert set(losses) == {"loss"} | {n + s for n in names for s in ("", "_0", "_1")}
    assert all(torch.isfinite(v) for v in losses.values())
    w = {"loss_ce": cfg.class_weight, "loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight}
    expected = sum(w[n] * losses[n + s] for n in names for s in ("", "_0", "_1"))
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    losses["loss"].backward()
    assert out["aux_outputs"][0]["pred_masks"].grad.abs().sum() > 0  # aux layers get gradients


def test_without_deep_supervision_only_the_last_layer_counts():
    losses = SetCriterion(3, LossConfig(deep_supervision=False))(_outputs(), _targets())
    assert set(losses) == {"loss", "loss_ce", "loss_mask", "loss_dice"}


def test_no_object_weight_scales_unmatched_queries_in_the_ce():
    # one image, one target; query 0 predicts its mask exactly, so it is the match
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    masks[0, :8] = True
    pred_masks = torch.full((1, 3, 4, 4), -8.0)
    pred_masks[0, 0, :2] = 8.0
    logits = torch.tensor([[[0.5, 1.0, -0.2], [0.3, 0.1, 0.4], [-1.0, 2.0, 0.0]]])  # 2 classes + no-object
    targets = [{"labels": torch.tensor([1]), "masks": masks}]
    ce = F.cross_entropy(logits[0], torch.tensor([1, 2, 2]), reduction="none")
    for eos in (0.0, 0.1, 1.0):
        crit = SetCriterion(2, LossConfig(eos_coef=eos, deep_supervision=False))
        got = crit({"pred_logits": logits, "pred_masks": pred_masks}, targets)["loss_ce"]
        want = (ce[0] + eos * (ce[1] + ce[2])) / (1 + 2 * eos)
        assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_mask_losses_vanish_for_a_perfect_prediction_and_not_otherwise():
    t = (torch.rand(3, 100) > 0.5).float()
    perfect = (t * 2 - 1) * 30
    assert sigmoid_ce_loss(perfect, t, 3).item() < 1e-6 and dice_loss(perfect, t, 3).item() < 1e-3
    assert sigmoid_ce_loss(-perfect, t, 3).item() > 10 and dice_loss(-perfect, t, 3).item() > 0.9


def test_images_without_targets_give_only_no_object_ce():
    out = _outputs(aux=0)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)}] * 2
    losses = SetCriterion(3)(out, empty)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    want = F.cross_entropy(out["pred_logits"].detach().flatten(0, 1), torch.full((8,), 3))
    assert losses["loss_ce"].item() == pytest.approx(want.item(), rel=1e-5)
    losses["loss"].backward()


def test_point_sampled_losses_are_finite_and_track_mask_quality():
    torch.manual_seed(0)
    out, targets = _outputs(aux=0), _targets()
    points = SetCriterion(3, LossConfig(num_points=512))(out, targets)
    assert all(torch.isfinite(v) for v in points.values())
    points["loss"].backward()
    assert out["pred_masks"].grad.abs().sum() > 0

    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, 8:24, 4:20] = True
    good = torch.where(F.avg_pool2d(masks[None].float(), 4) > 0.5, 10.0, -10.0)  # [1, 1, 8, 8] at stride 4
    tgt = [{"labels": torch.tensor([0]), "masks": masks}]
    crit = SetCriterion(1, LossConfig(num_points=256, deep_supervision=False))
    logits = torch.tensor([[[5.0, -5.0]]])
    ok = crit({"pred_logits": logits, "pred_masks": good}, tgt)
    bad = crit({"pred_logits": logits, "pred_masks": -good}, tgt)
    assert ok["loss_dice"] < 0.3 < 0.8 < bad["loss_dice"]  # points crowd at the boundary
    assert ok["loss_mask"] < 1.0 < 5.0 < bad["loss_mask"]


def test_labels_outside_the_classes_are_a_clear_error():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        SetCriterion(1)(_outputs(c=1, aux=0), _targets())
