"""Masked-attention transformer decoder (Mask2Former sec. 3.2): the object decoder D^o and the part decoder D^p.

N learned queries (features + positional embeddings) attend to the multi-scale pixel-decoder levels
round-robin. Each layer: cross-attention masked by the previous prediction's mask (sigmoid < 0.5 is
hidden), then self-attention, then an FFN (post-norm, as Mask2Former). After the learned queries and
after every layer the heads predict class logits (num_classes + 1 no-object) and mask logits
(MLP(query) . per-pixel embeddings); all of them feed the auxiliary losses. The last layer's
normalised query output is each query's feature vector f_i (PartDistillation sec. 4.1, used for ranking).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.models.config import DecoderConfig


def sine_position_embedding(x: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """2-D sine positional encoding of a [B, C, H, W] map -> [B, 2*num_feats, H, W] (DETR, normalised coords)."""
    b, _, h, w = x.shape
    eps, scale = 1e-6, 2 * math.pi
    y_embed = torch.arange(1, h + 1, device=x.device, dtype=torch.float32).view(1, h, 1).expand(b, h, w)
    x_embed = torch.arange(1, w + 1, device=x.device, dtype=torch.float32).view(1, 1, w).expand(b, h, w)
    y_embed = y_embed / (h + eps) * scale
    x_embed = x_embed / (w + eps) * scale
    dim_t = torch.arange(num_feats, device=x.device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


def attention_mask_from_logits(mask_logits: Tensor, size: tuple[int, int], num_heads: int, threshold: float = 0.5) -> Tensor:
    """Masked attention's mask (Mask2Former sec. 3.2.1): True where a query may NOT attend.

    mask_logits [B, N, h, w] are resized to ``size``; a location is hidden when sigmoid < threshold.
    A query whose mask hides everything attends everywhere instead (Mask2Former's fallback, avoids NaN).
    Returns [B * num_heads, N, size[0] * size[1]] as ``nn.MultiheadAttention`` expects.
    """
    m = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    hidden = (m.sigmoid().flatten(2) < threshold).detach()  # [B, N, HW]
    hidden[hidden.all(dim=-1)] = False
    return hidden.repeat_interleave(num_heads, dim=0)


class MLP(nn.Module):
    """Plain multi-layer perceptron with ReLU between layers (the mask-embedding head)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class CrossAttentionLayer(nn.Module):
    """Queries attend to pixel features (keys carry positional encodings), restricted by attn_mask; post-norm."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, attn_mask: Tensor | None, pos: Tensor, query_pos: Tensor) -> Tensor:
        out = self.attn(tgt + query_pos, memory + pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class SelfAttentionLayer(nn.Module):
    """Queries attend to each other; post-norm."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        q = tgt + query_pos
        out = self.attn(q, q, tgt, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class FFNLayer(nn.Module):
    """Position-wise feed-forward block; post-norm."""

    def __init__(self, dim: int, dim_feedforward: int, dropout: float = 0.0):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, dim_feedforward), nn.Linear(dim_feedforward, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor) -> Tensor:
        out = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm(tgt + self.dropout(out))


class MaskedTransformerDecoder(nn.Module):
    """Mask2Former's multi-scale masked-attention decoder; returns predictions of every layer.

    ``forward(multi_scale, mask_features)`` -> dict with
      ``pred_logits`` [B, N, num_classes + 1], ``pred_masks`` [B, N, H/4, W/4] (last layer),
      ``query_features`` [B, N, D] (f_i of the last layer), and
      ``aux_outputs``: list of {pred_logits, pred_masks} for the learned queries and each earlier layer.
    """

    def __init__(self, cfg: DecoderConfig, in_channels: int, mask_dim: int, num_levels: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.num_levels = num_levels
        self.num_heads = cfg.num_heads
        self.input_proj = nn.ModuleList(
            nn.Identity() if in_channels == d else nn.Conv2d(in_channels, d, 1) for _ in range(num_levels)
        )
        self.level_embed = nn.Embedding(num_levels, d)
        self.query_feat = nn.Embedding(cfg.num_queries, d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.cross_attn = nn.ModuleList(CrossAttentionLayer(d, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_layers))
        self.self_attn = nn.ModuleList(SelfAttentionLayer(d, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_layers))
        self.ffn = nn.ModuleList(FFNLayer(d, cfg.dim_feedforward, cfg.dropout) for _ in range(cfg.num_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.mask_embed = MLP(d, d, mask_dim, 3)
        for layers in (self.cross_attn, self.self_attn, self.ffn):
            for p in layers.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def prediction_heads(self, output: Tensor, mask_features: Tensor, attn_size: tuple[int, int]):
        """Class logits, mask logits, next layer's attention mask and f_i from the current query states."""
        decoded = self.decoder_norm(output)
        logits = self.class_embed(decoded)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        attn_mask = attention_mask_from_logits(masks, attn_size, self.num_heads, self.cfg.mask_threshold)
        return logits, masks, attn_mask, decoded

    def forward(self, multi_scale: list[Tensor], mask_features: Tensor) -> dict:
        if len(multi_scale) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(multi_scale)}")
        b = mask_features.shape[0]
        sizes, memories, poses = [], [], []
        for lvl, x in enumerate(multi_scale):
            sizes.append(tuple(x.shape[-2:]))
            pos = sine_position_embedding(x, self.cfg.hidden_dim // 2)
            src = self.input_proj[lvl](x) + self.level_embed.weight[lvl].view(1, -1, 1, 1)
            poses.append(pos.flatten(2).transpose(1, 2))  # [B, HW, D]
            memories.append(src.flatten(2).transpose(1, 2))
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)

        predictions = []
        logits, masks, attn_mask, decoded = self.prediction_heads(output, mask_features, sizes[0])
        predictions.append((logits, masks))
        for i in range(self.cfg.num_layers):
            lvl = i % self.num_levels
            output = self.cross_attn[i](output, memories[lvl], attn_mask, poses[lvl], query_pos)
            output = self.self_attn[i](output, query_pos)
            output = self.ffn[i](output)
            next_size = sizes[(i + 1) % self.num_levels]
            logits, masks, attn_mask, decoded = self.prediction_heads(output, mask_features, next_size)
            predictions.append((logits, masks))
        return {
            "pred_logits": predictions[-1][0],
            "pred_masks": predictions[-1][1],
            "query_features": decoded,
            "aux_outputs": [{"pred_logits": lg, "pred_masks": mk} for lg, mk in predictions[:-1]],
        }
