"""Segmenter: the assembled model learns, shares a frozen encoder, and post-processes to scored masks."""
from __future__ import annotations

import time

import pytest
import torch

from trainers.models.config import DecoderConfig, LossConfig, SegmenterConfig
from trainers.models.segmenter import InstancePredictions, Segmenter, postprocess
from trainers.structures import decode_mask
from model_helpers import TINY_ENCODER, mask_iou, rectangles_batch, tiny_config


def test_overfits_a_tiny_batch_of_rectangles():
    torch.manual_seed(0)
    model = Segmenter(tiny_config(num_classes=3))
    images, targets = rectangles_batch(size=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    start = time.time()
    history = []
    for _ in range(200):
        losses = model.loss(model(images), targets)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append(losses["loss"].item())
    print(f"overfit: loss {history[0]:.2f} -> {history[-1]:.4f} in {time.time() - start:.1f}s")
    assert history[-1] < history[0] / 50

    model.eval()
    ious = []
    for pred, tgt in zip(model.predict(images, top_k=4), targets):
        for label, mask in zip(tgt["labels"], tgt["masks"]):
            confident = pred.scores > 0.5
            iou = mask_iou(pred.masks[confident], mask[None])[:, 0]
            best = iou.argmax()
            ious.append(iou[best].item())
            assert pred.labels[confident][best] == label
    print(f"overfit: IoU of each target's best confident prediction {[round(v, 3) for v in ious]}")
    assert min(ious) > 0.7


def test_shapes_and_query_features_of_predictions():
    torch.manual_seed(0)
    model = Segmenter(tiny_config(num_classes=4)).eval()
    images = torch.rand(2, 3, 64, 64)
    out = model(images)
    assert out["pred_masks"].shape == (2, 8, 16, 16)
    preds = model.predict(images, top_k=5)
    assert len(preds) == 2 and all(isinstance(p, InstancePredictions) for p in preds)
    p = preds[0]
    assert p.masks.shape == (5, 64, 64) and p.masks.dtype == torch.bool
    assert p.scores.shape == p.labels.shape == p.query_indices.shape == (5,)
    assert torch.all(p.scores[:-1] >= p.scores[1:]) and p.labels.max() < 4
    assert torch.allclose(p.query_features, out["query_features"][0, p.query_indices])


def test_postprocess_scores_are_class_probability_times_mask_quality():
    logits = torch.tensor([[[4.0, 0.0], [0.0, 4.0]]])  # class-agnostic: part vs no-part
    masks = torch.full((1, 2, 4, 4), -3.0)
    masks[0, 0, :2] = 3.0
    masks[0, 1, 2:] = 3.0
    out = {"pred_logits": logits, "pred_masks": masks, "query_features": torch.randn(1, 2, 6)}
    (p,) = postprocess(out, (16, 16), top_k=2)
    assert p.query_indices.tolist() == [0, 1]
    prob = torch.softmax(logits[0], -1)[:, 0]
    assert p.scores[0].item() < prob[0].item() and p.scores[0].item() > 0.8 * prob[0].item()
    assert p.masks[0, :8].all() and not p.masks[0, 8:].any()
    rles = p.to_rle()
    assert len(rles) == 2 and (decode_mask(rles[0]) == p.masks[0].numpy()).all()


def test_part_decoder_shares_and_freezes_the_teacher_encoder():
    torch.manual_seed(0)
    teacher = Segmenter(tiny_config(num_classes=3))
    parts = Segmenter(
        SegmenterConfig(decoder=DecoderConfig(num_classes=1, num_queries=6, hidden_dim=32, num_heads=4, dim_feedforward=64),
                        freeze_encoder=True),
        encoder=teacher.encoder,
    )
    assert parts.encoder is teacher.encoder and parts.cfg.encoder == TINY_ENCODER
    before = {k: v.clone() for k, v in teacher.encoder.state_dict().items()}
    parts.train()
    assert not parts.encoder.training and parts.decoder.training
    images, targets = rectangles_batch(size=64)
    targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    out = parts(images)
    assert out["pred_logits"].shape == (2, 6, 2)
    parts.loss(out, targets)["loss"].backward()
    assert all(p.grad is None for p in parts.encoder.parameters())
    assert all(p.grad is not None for p in parts.decoder.parameters() if p.requires_grad)
    assert all(torch.equal(before[k], v) for k, v in teacher.encoder.state_dict().items())  # weights and norm statistics


def test_pixel_features_are_mask_features_then_coarser_levels():
    torch.manual_seed(0)
    model = Segmenter(tiny_config()).eval()
    images = torch.rand(1, 3, 64, 64)
    feats = model.pixel_features(images)
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert torch.allclose(feats[0], model.encoder(images).mask_features)


def test_state_dict_round_trip_and_seeded_init(tmp_path):
    torch.manual_seed(1)
    a = Segmenter(tiny_config())
    torch.manual_seed(1)
    b = Segmenter(tiny_config())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    torch.save(a.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(2)
    c = Segmenter(tiny_config())
    c.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    images = torch.rand(1, 3, 64, 64)
    assert torch.allclose(a.eval()(images)["pred_masks"], c.eval()(images)["pred_masks"])


def test_bfloat16_model_trains_on_float_images_and_cpu_targets():
    torch.manual_seed(0)
    model = Segmenter(tiny_config()).to(torch.bfloat16)
    images, targets = rectangles_batch(size=64)
    out = model(images)  # float32 images: the encoder casts to the model's dtype
    assert out["pred_masks"].dtype == torch.bfloat16
    losses = model.loss(out, targets)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_with_targets_left_on_cpu():
    torch.manual_seed(0)
    model = Segmenter(tiny_config().model_copy(update={"loss": LossConfig(num_points=256)})).cuda()
    images, targets = rectangles_batch(size=64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images.cuda())
    losses = model.loss(out, targets)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and losses["loss"].device.type == "cuda"
    preds = model.eval().predict(images.cuda(), top_k=3)
    assert preds[0].masks.device.type == "cuda" and len(preds[0].to_rle()) == 3
