"""Encoder E (PartDistillation sec. 4.1): a timm backbone (``features_only``) plus the FPN pixel decoder.

Mask2Former's pixel decoder is MSDeformAttn; this one is a light FPN, which trains on CPU (see
``pixel_decoder``). The default backbone, ``convnext_atto`` (3.4M parameters, strides 4-32), trains at
112x112 on two CPU cores; any timm name with a stride-4 level works (``resnet10t``, ``resnet50``, ...).

Weights: ``pretrained=None`` (random init), ``"timm"`` (timm's own weights for the name, via the
HF hub or its URL), an http(s) URL (``torch.hub.load_state_dict_from_url``) or a local path to a
state_dict in timm's key format (``timm.create_model(name).state_dict()``).
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from trainers.models.config import EncoderConfig
from trainers.models.pixel_decoder import FPNPixelDecoder, PixelDecoderOutput


class PretrainedWeightsError(ValueError):
    """Backbone weights could not be read or do not fit the backbone; the message names the source."""


def load_state_dict_source(source: str) -> dict[str, Tensor]:
    """Read a state_dict from an http(s) URL or a local file; unwraps ``{"state_dict"|"model": ...}`` and ``module.``."""
    if source.startswith(("http://", "https://")):
        obj = torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(f"pretrained weights {source!r}: no such file")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle / zip errors: name the file, keep the cause
            raise PretrainedWeightsError(f"pretrained weights {source!r}: not a readable state_dict ({e})") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"pretrained weights {source!r}: expected a dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _check_fits(name: str, state_dict: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Load into the full timm model to validate keys/shapes (the classifier may differ); return its state_dict."""
    full = timm.create_model(name, pretrained=False)
    head = full.pretrained_cfg.get("classifier") or ()
    head = (head,) if isinstance(head, str) else tuple(head)  # "fc" is one name, not ("f", "c")
    own = full.state_dict()
    is_head = lambda k: any(k == h or k.startswith(h + ".") for h in head)  # noqa: E731
    wrong = [k for k, v in state_dict.items() if k in own and not is_head(k) and own[k].shape != v.shape]
    unexpected = [k for k in state_dict if k not in own]
    missing = [k for k in own if k not in state_dict and not is_head(k)]
    if wrong or unexpected or missing:
        raise PretrainedWeightsError(
            f"pretrained weights {source!r} do not fit backbone {name!r}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} with wrong shape (e.g. {wrong[:3]})"
        )
    full.load_state_dict({k: v for k, v in state_dict.items() if not is_head(k)}, strict=False)
    return full.state_dict()


def create_backbone(cfg: EncoderConfig) -> nn.Module:
    """timm ``features_only`` backbone returning the maps at ``cfg.strides`` (fine to coarse)."""
    probe = timm.create_model(cfg.backbone, pretrained=False, features_only=True)
    reductions = probe.feature_info.reduction()
    missing = [s for s in cfg.strides if s not in reductions]
    if missing:
        raise ValueError(f"backbone {cfg.backbone!r} has strides {reductions}, not {missing}")
    out_indices = tuple(reductions.index(s) for s in cfg.strides)
    kwargs: dict = dict(features_only=True, out_indices=out_indices)
    if cfg.pretrained is None:
        return timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    if cfg.pretrained == "timm":
        return timm.create_model(cfg.backbone, pretrained=True, **kwargs)
    state_dict = _check_fits(cfg.backbone, load_state_dict_source(cfg.pretrained), cfg.pretrained)
    # timm maps the full model's keys onto its feature wrapper (e.g. stages.0 -> stages_0).
    return timm.create_model(cfg.backbone, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state_dict), **kwargs)


class Encoder(nn.Module):
    """E: images -> mask features (stride 4) + multi-scale features; normalises with the backbone's mean/std."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(cfg)
        pcfg = self.backbone.pretrained_cfg if hasattr(self.backbone, "pretrained_cfg") else {}
        mean, std = pcfg.get("mean", (0.485, 0.456, 0.406)), pcfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.pixel_decoder = FPNPixelDecoder(
            self.backbone.feature_info.channels(), cfg.pixel_dim, cfg.mask_dim, cfg.norm_groups
        )

    @property
    def size_divisibility(self) -> int:
        """Image sides should be multiples of this (the coarsest stride)."""
        return max(self.cfg.strides)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [0, 255] or float [0, 1] images [B, 3, H, W] -> backbone input (in the model's dtype)."""
        dtype = self.pixel_mean.dtype  # follows model.to(torch.bfloat16) etc.
        x = images.to(dtype) / 255.0 if images.dtype == torch.uint8 else images.to(dtype)
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, images: Tensor) -> PixelDecoderOutput:
        return self.pixel_decoder(self.backbone(self.normalize(images)))


def with_pretrained(cfg: EncoderConfig, source: str) -> EncoderConfig:
    """``cfg`` initialised from ``source`` (a local file, already fetched, or a timm hub name):

    - a representation file (``trainers.dense.io``: SlotCon, Leopart, PASS): its backbone weights, and the backbone
      becomes its ``timm_name`` (the representation defines the architecture);
    - any other file or URL: a timm-format state_dict of ``cfg.backbone``;
    - ``timm``: timm's hub weights of ``cfg.backbone``; ``timm:<name>``: the hub weights of ``<name>`` (e.g.
      ``timm:convnext_atto.d2_in1k``), which becomes the backbone.
    """
    if source == "timm":
        return cfg.model_copy(update={"pretrained": "timm"})
    if source.startswith("timm:"):
        return cfg.model_copy(update={"backbone": source[len("timm:"):], "pretrained": "timm"})
    if not source.startswith(("http://", "https://")):
        from trainers.dense.io import FORMAT, read_representation

        path = Path(source)
        if not path.is_file():
            raise PretrainedWeightsError(f"pretrained encoder {source!r}: no such file")
        try:
            head = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise PretrainedWeightsError(f"pretrained encoder {source!r}: not a readable model file ({e})") from e
        if isinstance(head, dict) and head.get("format") == FORMAT:
            return cfg.model_copy(update={"backbone": read_representation(path)["timm_name"], "pretrained": str(path)})
    return cfg.model_copy(update={"pretrained": source})
