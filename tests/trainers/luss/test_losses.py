"""trainers.luss.losses: Sinkhorn-Knopp equipartition, SwAV's swapped prediction, P2P (eq. 2), D2S (eq. 4)."""
import torch

from trainers.luss.losses import deep_to_shallow, pixel_to_pixel, sinkhorn, swapped_prediction, swav_codes


def test_sinkhorn_codes_are_distributions_that_use_every_prototype_equally():
    torch.manual_seed(0)
    scores = torch.randn(64, 8) * 0.3 + torch.tensor([1.0] + [0.0] * 7)  # every sample prefers prototype 0
    q = sinkhorn(scores, epsilon=0.05, iterations=10)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-4)
    assert torch.softmax(scores / 0.05, 1).sum(0)[0] > 40  # without the transport almost every sample takes prototype 0
    usage = q.sum(0)  # with it, each of the 8 prototypes gets close to 64 / 8 = 8 samples
    assert usage.min() > 5 and usage.max() < 11


def test_swapped_prediction_is_lowest_when_every_crop_predicts_the_codes():
    codes = {0: torch.eye(4), 1: torch.eye(4)}
    right = [torch.eye(4) * 10, torch.eye(4) * 10, torch.eye(4) * 10]
    wrong = [torch.eye(4).roll(1, 1) * 10] * 3
    assert swapped_prediction(right, codes, 1.0) < 0.01 < swapped_prediction(wrong, codes, 1.0)
    assert deep_to_shallow(right[:2], codes, 1.0) < 0.01 < deep_to_shallow(wrong[:2], codes, 1.0)


def test_p2p_aligns_predictions_with_the_other_view_and_skips_views_without_overlap():
    z = torch.randn(4, 8, 3, 3)
    p = torch.cat([z[2:], z[:2]])  # each view's prediction equals the other view's projection
    valid = torch.tensor([True, False])
    assert pixel_to_pixel(p, z, valid).item() == torch.tensor(-1.0).item()
    assert pixel_to_pixel(p, z, torch.tensor([False, False])).item() == 0.0


def test_the_queue_joins_the_codes_once_full_and_takes_the_batch_in():
    queue = torch.zeros(2, 4, 3)
    emb = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)  # 2 crops x B=2
    protos = torch.eye(3)
    logits = [emb[:2] @ protos.T, emb[2:] @ protos.T]
    swav_codes(logits, emb, protos, queue, 0.05, 3)
    assert torch.equal(queue[0, :2], emb[:2]) and torch.equal(queue[1, :2], emb[2:]) and not queue[0, -1].any()
    swav_codes(logits, emb, protos, queue, 0.05, 3)
    assert queue[0, -1].any()  # full now: the next codes see 4 queued rows plus the batch
