"""Pixel decoder: backbone features -> per-pixel embeddings at stride 4 + multi-scale features.

Mask2Former (sec. 3.2, 4.1) uses a multi-scale deformable-attention (MSDeformAttn) pixel decoder.
Here a light FPN (Lin et al. 2017; Mask2Former's "FPN" ablation, tab. 4e) takes its place: it trains
on CPU and has no custom kernels. Outputs are the same as Mask2Former's: the stride-4 "mask features"
(the penultimate per-pixel features PartDistillation sec. 4.2 clusters) and the coarser levels the
transformer decoder attends to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


def _conv_norm_act(c_in: int, c_out: int, k: int, groups: int, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.GroupNorm(groups, c_out)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@dataclass
class PixelDecoderOutput:
    """mask_features: [B, mask_dim, H/4, W/4]; multi_scale: [B, pixel_dim, h_l, w_l] for the coarser levels, coarse to fine."""

    mask_features: Tensor
    multi_scale: list[Tensor]


class FPNPixelDecoder(nn.Module):
    """Top-down FPN over backbone levels (finest stride 4); a CPU-friendly stand-in for MSDeformAttn."""

    def __init__(self, in_channels: list[int], pixel_dim: int = 128, mask_dim: int = 128, norm_groups: int = 16):
        super().__init__()
        self.lateral = nn.ModuleList(_conv_norm_act(c, pixel_dim, 1, norm_groups, act=False) for c in in_channels)
        self.output = nn.ModuleList(_conv_norm_act(pixel_dim, pixel_dim, 3, norm_groups) for _ in in_channels)
        self.mask_features = nn.Conv2d(pixel_dim, mask_dim, 1)
        self.num_levels = len(in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # c2_xavier_fill, as detectron2's FPN
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> PixelDecoderOutput:
        """features: backbone maps fine to coarse (first at stride 4)."""
        if len(features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(features)}")
        outs: list[Tensor] = []
        top: Tensor | None = None
        for i in range(self.num_levels - 1, -1, -1):  # coarse -> fine
            lat = self.lateral[i](features[i])
            if top is not None:
                lat = lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest")
            top = self.output[i](lat)
            outs.append(top)
        # outs is coarse -> fine; the finest (stride 4) map becomes the mask features.
        return PixelDecoderOutput(mask_features=self.mask_features(outs[-1]), multi_scale=outs[:-1])
