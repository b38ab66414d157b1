"""The networks of PASS (sec. 4) and the representation model file every LUSS stage writes and reads.

- :class:`Backbone`: a timm model without its classifier (``num_classes=0``; its ``state_dict`` keys are timm's own),
  run with ``output_stride`` (dilated last stages, as segmentation backbones are) and returning the last four
  stages' feature maps. ImageNet normalisation happens inside: inputs are images in [0, 1].
- :class:`RepresentationModel` (sec. 4.2): backbone + SwAV projection head and prototypes, the pixel-level
  projection and predictor of the non-contrastive pixel-to-pixel alignment (eq. 2), and per shallow stage s the
  pixel-level MLP h_s and image-level MLP g_s of the deep-to-shallow supervision (eq. 3).
- :class:`PixelAttention` (eq. 6): sigmoid(MLP(norm(F)) + beta), one attention map per channel, beta zero-initialised.
- :class:`SegmentationModel` (sec. 4.4): backbone + a 1x1 conv with K+1 channels (K generated categories + 'other').

**Model file** (``selftrain-representation/1``, agreed between the dense-representation pipelines so one evaluation
compares them all and any pipeline can use them as an encoder): ``torch.save`` of ``{"format", "timm_name",
"state_dict": backbone weights in timm's key format (classifier omitted), "stage", "extra": {...}}``.
``trainers.models.encoder.load_state_dict_source`` unwraps ``state_dict``, so PartDistillation's encoder loads the
file with ``encoder.pretrained: <path>``; one reader and writer for every pipeline: ``trainers.dense.io``. ``extra``
holds ``model_kwargs`` (``output_stride``, which changes no weight name) and what the next LUSS stage needs:
``config`` (head sizes), ``heads`` (projection, prototypes), ``pixel_attention`` and ``segmentation_head`` weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.dense.io import RepresentationFileError, read_representation, save_representation

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """A timm model's last four stages (fine to coarse) for images in [0, 1]; ``net`` holds timm's own weights."""

    def __init__(self, timm_name: str, output_stride: int = 16):
        super().__init__()
        self.timm_name, self.output_stride = timm_name, int(output_stride)
        kwargs = {} if self.output_stride == 32 else {"output_stride": self.output_stride}
        self.net = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
        self.channels = [int(f["num_chs"]) for f in self.net.feature_info][-4:]
        cfg = getattr(self.net, "pretrained_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", IMAGENET_STD)).view(1, 3, 1, 1), persistent=False)

    @property
    def out_channels(self) -> int:
        return self.channels[-1]

    def forward(self, images: Tensor) -> list[Tensor]:
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        return list(self.net.forward_intermediates(x, intermediates_only=True))[-4:]


def image_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """SwAV's projection head: Linear-BN-ReLU-Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def pixel_mlp(in_ch: int, hidden: int, out_ch: int) -> nn.Sequential:
    """Two 1x1 convolutions with BN and ReLU between them (the pixel-level MLPs of sec. 4.2)."""
    return nn.Sequential(nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, out_ch, 1))


class RepresentationModel(nn.Module):
    """Sec. 4.2: the backbone with SwAV's heads, the P2P projection/predictor and the D2S heads of ``d2s_stages``."""

    def __init__(self, timm_name: str, output_stride: int = 16, feat_dim: int = 128, hidden_dim: int = 512,
                 num_prototypes: int = 100, d2s_stages: tuple[int, ...] = (3,), queue_length: int = 0, assign_crops: int = 2):
        super().__init__()
        self.backbone = Backbone(timm_name, output_stride)
        c = self.backbone.channels
        self.projection = image_mlp(c[-1], hidden_dim, feat_dim)
        self.prototypes = nn.Linear(feat_dim, num_prototypes, bias=False)
        self.pixel_projection = pixel_mlp(c[-1], hidden_dim, feat_dim)  # P: the pixel-level projection of eq. 2
        self.pixel_predictor = pixel_mlp(feat_dim, feat_dim, feat_dim)  # Q: the predictor, stop-gradient on the other side
        self.d2s_stages = tuple(int(s) for s in d2s_stages)
        for s in self.d2s_stages:
            if not 1 <= s <= 3:
                raise ValueError(f"deep-to-shallow stages are 1..3 (4 is the deep one), got {s}")
        self.shallow_pixel = nn.ModuleDict({str(s): pixel_mlp(c[s - 1], hidden_dim, c[s - 1]) for s in self.d2s_stages})
        self.shallow_image = nn.ModuleDict({str(s): image_mlp(c[s - 1], hidden_dim, feat_dim) for s in self.d2s_stages})
        if queue_length:
            self.register_buffer("queue", torch.zeros(assign_crops, queue_length, feat_dim))
        else:
            self.queue = None

    def embed(self, deep: Tensor) -> Tensor:
        """Image-level embedding: GAP -> projection -> L2 norm."""
        return F.normalize(self.projection(deep.mean((2, 3))), dim=1)

    def forward(self, globals_: Tensor, locals_: Tensor | None, grids: Tensor, frozen_prototypes: bool = False) -> dict:
        """``globals_`` [2B, 3, g, g] (view-major), ``locals_`` [LB, 3, l, l] or None, ``grids`` [2, B, S, S, 2]: where
        the two global views overlap, in each view's normalised coordinates."""
        w = F.normalize(self.prototypes.weight, dim=1)  # unit prototypes (SwAV), normalised inside the graph
        w = w.detach() if frozen_prototypes else w
        feats = self.backbone(globals_)
        deep = feats[-1]
        emb = [self.embed(deep)]
        if locals_ is not None and locals_.numel():
            emb.append(self.embed(self.backbone(locals_)[-1]))
        emb = torch.cat(emb)
        b = grids.shape[1]
        z = self.pixel_projection(deep)
        z = torch.cat([F.grid_sample(z[v * b:(v + 1) * b], grids[v].to(z.dtype), mode="bilinear", align_corners=False)
                       for v in range(2)])
        shallow = {s: F.normalize(self.shallow_image[str(s)](self.shallow_pixel[str(s)](feats[s - 1]).mean((2, 3))), dim=1) @ w.T
                   for s in self.d2s_stages}
        return {"embeddings": emb.detach(), "logits": emb @ w.T, "prototypes": w.detach(),
                "z": z, "p": self.pixel_predictor(z), "shallow": shallow}


class PixelAttention(nn.Module):
    """PASS eq. 6: a = sigmoid(MLP(norm(F)) + beta), one map per channel; beta starts at zero."""

    def __init__(self, channels: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                 nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, features: Tensor) -> Tensor:
        """``features``: L2-normalised output features [B, C, h, w] -> attention in (0, 1), same shape."""
        return torch.sigmoid(self.mlp(features) + self.beta)


def output_features(deep: Tensor, upsample: int) -> Tensor:
    """The output features of sec. 4.3: the last stage upsampled ``upsample`` x (bilinear) and L2-normalised per pixel."""
    if upsample > 1:
        deep = F.interpolate(deep, scale_factor=upsample, mode="bilinear", align_corners=False)
    return F.normalize(deep, dim=1)


def attention_pool(features: Tensor, attention: Tensor) -> Tensor:
    """The pixel-attention enhanced image-level feature: mean over pixels of features x attention [B, C]."""
    return (features * attention).mean((2, 3))


class SegmentationModel(nn.Module):
    """Sec. 4.4: the representation's backbone plus a 1x1 conv with ``num_classes`` (K + 1) channels."""

    def __init__(self, timm_name: str, output_stride: int, num_classes: int):
        super().__init__()
        self.backbone = Backbone(timm_name, output_stride)
        self.head = nn.Conv2d(self.backbone.out_channels, num_classes, 1)

    def forward(self, images: Tensor) -> Tensor:
        """Logits at the feature resolution [B, K+1, h, w]."""
        return self.head(self.backbone(images)[-1])

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Eq. 8: the argmax label map at the image size [B, H, W] (0 'other')."""
        logits = self(images)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False).argmax(1)


# -- the model file (one reader and one writer: trainers.dense.io) -------------------------------------------------
def sub_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefix.`` with the prefix removed (a submodule's state_dict)."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def output_stride_of(doc: dict[str, Any]) -> int:
    """The backbone's output stride recorded in a model file (``extra.model_kwargs.output_stride``; 32 when absent)."""
    return int((doc.get("extra", {}).get("model_kwargs") or {}).get("output_stride", 32))


def save_model_file(path: str | Path, timm_name: str, backbone_state: dict[str, Tensor], *, stage: str,
                    output_stride: int, extra: dict[str, Any]) -> Path:
    """Write the representation file (``trainers.dense.io.save_representation``) with ``extra.model_kwargs`` rebuilding
    the same feature extractor (the output stride changes no weight name)."""
    kwargs = {} if int(output_stride) == 32 else {"output_stride": int(output_stride)}
    return save_representation(path, timm_name, backbone_state, stage, {**extra, "model_kwargs": kwargs})


def read_model_file(path: str | Path, needs: tuple[str, ...] = ()) -> dict[str, Any]:
    """A representation file's dict (``trainers.dense.io.read_representation``); RepresentationFileError naming the file
    when it lacks ``needs`` (keys of ``extra``)."""
    doc = read_representation(path)
    missing = [n for n in needs if n not in doc["extra"]]
    if missing:
        raise RepresentationFileError(f"{path}: written by stage {doc.get('stage')!r}, it lacks {', '.join(missing)} "
                                      f"(has: {', '.join(sorted(doc['extra'])) or 'nothing'})")
    return doc


def backbone_from(doc: dict[str, Any]) -> Backbone:
    """The backbone a model file describes, with its weights."""
    net = Backbone(doc["timm_name"], output_stride_of(doc))
    net.net.load_state_dict(doc["state_dict"])
    return net
