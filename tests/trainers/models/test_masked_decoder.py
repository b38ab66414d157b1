"""Masked-attention transformer decoder (Mask2Former sec. 3.2)."""
from __future__ import annotations

import torch

from trainers.models.config import DecoderConfig
from trainers.models.decoder import CrossAttentionLayer, MaskedTransformerDecoder, attention_mask_from_logits


def _decoder(num_layers=4, num_levels=3, **kw) -> MaskedTransformerDecoder:
    cfg = DecoderConfig(num_classes=5, num_queries=6, hidden_dim=32, num_heads=4, dim_feedforward=64, num_layers=num_layers, **kw)
    return MaskedTransformerDecoder(cfg, in_channels=16, mask_dim=24, num_levels=num_levels)


def _features(b=2):
    multi_scale = [torch.randn(b, 16, s, s) for s in (2, 4, 8)]  # coarse to fine
    return multi_scale, torch.randn(b, 24, 16, 16)


def test_outputs_of_every_layer_have_the_right_shapes():
    torch.manual_seed(0)
    out = _decoder(num_layers=4)(*_features())
    assert out["pred_logits"].shape == (2, 6, 6)  # num_classes + no-object
    assert out["pred_masks"].shape == (2, 6, 16, 16)
    assert out["query_features"].shape == (2, 6, 32)
    assert len(out["aux_outputs"]) == 4  # learned queries + 3 earlier layers
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 6, 6) and aux["pred_masks"].shape == (2, 6, 16, 16)
    # the aux predictions differ from the final one: every layer predicts
    assert not torch.allclose(out["aux_outputs"][-1]["pred_masks"], out["pred_masks"])


def test_attention_mask_hides_where_previous_mask_is_below_half():
    logits = torch.full((1, 2, 4, 4), -5.0)
    logits[0, 0, :2, :] = 5.0  # query 0 covers the top half; query 1 covers nothing
    hidden = attention_mask_from_logits(logits, (4, 4), num_heads=3)
    assert hidden.shape == (3, 2, 16) and hidden.dtype == torch.bool
    for h in range(3):  # repeated per head, in nn.MultiheadAttention's (batch * heads) order
        assert not hidden[h, 0, :8].any() and hidden[h, 0, 8:].all()
        assert not hidden[h, 1].any()  # all-hidden row falls back to attending everywhere


def test_attention_mask_follows_the_batch_head_layout():
    logits = torch.full((2, 1, 2, 2), -5.0)
    logits[1, 0] = 5.0  # image 1's query sees everything; image 0's would see nothing -> fallback
    logits[0, 0, 0, 0] = 5.0  # image 0's query sees only the first pixel
    hidden = attention_mask_from_logits(logits, (2, 2), num_heads=2)
    assert hidden[:2, 0].tolist() == [[False, True, True, True]] * 2
    assert not hidden[2:].any()


def test_masked_cross_attention_ignores_hidden_pixels():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(dim=16, num_heads=2).eval()
    tgt, query_pos = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    memory, pos = torch.randn(1, 9, 16), torch.randn(1, 9, 16)
    logits = torch.full((1, 2, 3, 3), -5.0)
    logits[0, 0, 0, :] = 5.0  # query 0 may look at the first row only
    logits[0, 1] = 5.0  # query 1 everywhere
    attn_mask = attention_mask_from_logits(logits, (3, 3), num_heads=2)

    weights = layer.attn(tgt + query_pos, memory + pos, memory, attn_mask=attn_mask, average_attn_weights=False)[1]
    assert torch.all(weights[0, :, 0, 3:] == 0)  # zero attention outside query 0's mask
    assert torch.all(weights[0, :, 1] > 0)

    changed = memory.clone()
    changed[0, 3:] += 10 * torch.randn(6, 16)  # perturb what query 0 must not see
    a = layer(tgt, memory, attn_mask, pos, query_pos)
    b = layer(tgt, changed, attn_mask, pos, query_pos)
    assert torch.allclose(a[0, 0], b[0, 0], atol=1e-5)
    assert not torch.allclose(a[0, 1], b[0, 1], atol=1e-3)


def test_levels_are_visited_round_robin():
    torch.manual_seed(0)
    dec = _decoder(num_layers=3).eval()
    seen = []
    for i, layer in enumerate(dec.cross_attn):
        layer.register_forward_hook(lambda m, args, out, i=i: seen.append(args[1].shape[1]))
    dec(*_features(b=1))
    assert seen == [4, 16, 64]  # 2x2, 4x4, 8x8 memories
