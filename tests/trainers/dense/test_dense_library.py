"""trainers.dense: the pieces the two methods and the evaluation are built from, each checked on a known answer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainers.dense.community import Cooccurrence, communities, merge_rows
from trainers.dense.io import RepresentationFileError, read_representation, save_representation
from trainers.dense.leopart import foreground, sinkhorn
from trainers.dense.views import MultiViewTransform, collate_views, intersection, inverse_augment


def _ramp_image(size: int = 64) -> np.ndarray:
    """x in the red channel, y in the green one: every pixel's colour says where it is."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[..., 0] = np.linspace(0, 255, size)[None, :]
    img[..., 1] = np.linspace(0, 255, size)[:, None]
    return img


def test_inverse_augmentation_aligns_two_cropped_and_flipped_views_pixel_to_pixel():
    torch.manual_seed(0)
    np.random.seed(0)
    t = MultiViewTransform([32, 40], [(0.3, 1.0), (0.3, 1.0)], flip_prob=0.5, jitter=0.0, gray_prob=0.0)
    views, boxes, flips = collate_views([t(("k", _ramp_image(), {})) for _ in range(16)])
    assert flips.any() and not flips.all()  # both cases are exercised
    region, valid = intersection(boxes[:, 0], boxes[:, 1])
    a = inverse_augment(views[0], boxes[:, 0], flips[:, 0], region, 7)[valid]
    b = inverse_augment(views[1], boxes[:, 1], flips[:, 1], region, 7)[valid]
    assert valid.sum() >= 12 and (a - b).abs().max() < 0.03  # the two views see the same image positions
    # without undoing the flip the views disagree: the check above is not vacuous
    c = inverse_augment(views[1], boxes[:, 1], ~flips[:, 1], region, 7)[valid]
    assert (a - c).abs().max() > 0.2


def test_views_never_read_the_record():
    class Exploding(dict):
        def __getitem__(self, key):
            raise AssertionError("a label was read")

        def get(self, *a):
            raise AssertionError("a label was read")

    views, boxes, flips = MultiViewTransform([16, 16], [(0.5, 1), (0.5, 1)])(("k", _ramp_image(), Exploding()))
    assert [v.shape for v in views] == [(3, 16, 16)] * 2 and boxes.shape == (2, 4)


def test_sinkhorn_spreads_tokens_evenly_over_the_prototypes():
    torch.manual_seed(0)
    scores = torch.randn(64, 4) * 0.1
    scores[:, 0] += 1.0  # every token prefers prototype 0
    q = sinkhorn(scores, eps=0.05, iterations=10)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-4)  # one unit of assignment per token
    assert torch.allclose(q.sum(0), torch.full((4,), 16.0), atol=0.5)  # equipartition despite the bias


def test_foreground_keeps_the_tokens_holding_the_attention_mass():
    attn = torch.tensor([0.5, 0.3, 0.1, 0.1]).view(1, 1, 2, 2)
    assert foreground(attn, 0.6).flatten().tolist() == [True, True, False, False]
    assert foreground(attn, 0.5).flatten().tolist() == [True, False, False, False]


def test_community_detection_merges_clusters_that_appear_together_and_leaves_the_background_apart():
    cooc = Cooccurrence(5)
    for i in range(40):  # clusters 1+2 are the parts of one object, 3+4 of another; 0 (background) is everywhere
        cooc.add(np.array([0, 1, 2]) if i % 2 else np.array([0, 3, 4]))
    mapping = communities(cooc, seed=0)
    assert mapping[1] == mapping[2] and mapping[3] == mapping[4] and mapping[1] != mapping[3]
    assert mapping[0] not in (mapping[1], mapping[3])
    counts = np.arange(10).reshape(5, 2)
    merged = merge_rows(counts, mapping)
    assert merged.sum() == counts.sum() and merged[mapping[1]].tolist() == (counts[1] + counts[2]).tolist()


def test_the_representation_file_round_trips_and_bad_files_are_named(tmp_path):
    path = save_representation(tmp_path / "m.pt", "test_convnext", {"a.weight": torch.ones(2)}, "slotcon",
                               extra={"prototypes": torch.zeros(3, 2), "model_kwargs": {"output_stride": 8}})
    blob = read_representation(path)
    assert blob["timm_name"] == "test_convnext" and blob["extra"]["model_kwargs"] == {"output_stride": 8}
    torch.save({"format": "selftrain-representation/1", "timm_name": "x", "state_dict": {}}, tmp_path / "empty.pt")
    with pytest.raises(RepresentationFileError, match="empty.pt: field state_dict"):
        read_representation(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(RepresentationFileError, match="junk.pt: not a readable"):
        read_representation(tmp_path / "junk.pt")
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temp file left behind


def test_leopart_targets_come_from_its_ema_teacher_which_gets_no_gradient_and_follows_the_student():
    from trainers.dense.backbone import DenseBackbone
    from trainers.dense.leopart import Leopart

    torch.manual_seed(0)
    model = Leopart(DenseBackbone("test_vit", {}), 8, 16, 32, fg_mass=None, teacher=True, backbone_lr_scale=0.1)
    t = MultiViewTransform([64, 64, 32], [(0.5, 1), (0.5, 1), (0.2, 0.4)])
    views, boxes, flips = collate_views([t(("k", _ramp_image(), {})) for _ in range(2)])
    loss, _ = model(views, boxes, flips)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(q.grad is None for q in model.teacher_parameters())
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in model.backbone.parameters())
    # the optimizer sees the student only: the backbone at a tenth of the head's lr, the teacher in no group
    (backbone, scale_b), (heads, scale_h) = model.lr_groups()
    teacher_ids = {id(q) for q in model.teacher_parameters()}
    assert scale_b == 0.1 and scale_h == 1.0 and not teacher_ids & {id(q) for q in backbone + heads}
    # EMA: momentum 0.5 moves every teacher weight halfway to the student's
    with torch.no_grad():
        for q in model.projector.parameters():
            q.add_(1.0)
    before = [q.clone() for q in model.teacher["projector"].parameters()]
    model.momentum_update(0.5)
    for b, tq, sq in zip(before, model.teacher["projector"].parameters(), model.projector.parameters()):
        assert torch.allclose(tq, (b + sq) / 2)
