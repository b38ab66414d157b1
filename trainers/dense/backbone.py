"""A timm backbone as a dense feature extractor: images -> a feature map [B, C, h, w] (and a ViT's CLS attention).

CNNs (``resnet10t``, ``convnext_atto``, ...) give their last stage; ``output_stride`` (8 or 16, timm's dilation) keeps
it fine enough for segmentation without changing any weight name. ViTs (``vit_tiny_patch16_224``, ...) give their
patch tokens on the patch grid; ``dynamic_img_size`` lets one model see crops and full images of any size. The
classifier head is dropped (``num_classes=0``), so ``state_dict()`` is timm's full-model key format without the
head: the weights of the representation file (``trainers.dense.io``).

Weights: ``None`` (random init, seeded by the caller), ``"timm"`` (timm's own weights for the name, from the HF hub
or its URL), an http(s) URL or a local file (a timm-format state_dict or a representation file).
"""
from __future__ import annotations

from typing import Any

import timm
import torch
from torch import Tensor, nn

from trainers.models.encoder import PretrainedWeightsError, load_state_dict_source


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


def _head_keys(model: nn.Module) -> tuple[str, ...]:
    head = model.pretrained_cfg.get("classifier") or ()
    return (head,) if isinstance(head, str) else tuple(head)


class DenseBackbone(nn.Module):
    """timm model ``timm_name`` (``model_kwargs`` passed to ``timm.create_model``) -> dense features."""

    def __init__(self, timm_name: str, model_kwargs: dict[str, Any] | None = None, weights: str | None = None):
        super().__init__()
        self.timm_name, self.model_kwargs = timm_name, dict(model_kwargs or {})
        kwargs = dict(self.model_kwargs)
        probe_vit = "vit" in timm_name or "deit" in timm_name
        kwargs.setdefault("num_classes", 0)
        if probe_vit:
            kwargs.setdefault("dynamic_img_size", True)
        else:
            kwargs.setdefault("global_pool", "")
        try:
            self.model = timm.create_model(timm_name, pretrained=weights == "timm", **kwargs)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"timm model {timm_name!r} with {kwargs}: {e}") from e
        self.vit = is_vit(self.model)
        if not self.vit:  # a CNN's head (e.g. ConvNeXt's pre-logits norm) is off the dense path: kept, not trained
            for name, p in self.model.named_parameters():
                if name.startswith("head."):
                    p.requires_grad_(False)
        if weights not in (None, "timm"):
            self.load_weights(load_state_dict_source(weights), weights)
        cfg = self.model.pretrained_cfg
        self.register_buffer("pixel_mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, -1, 1, 1), persistent=False)
        self._attn_input: Tensor | None = None

    @property
    def dim(self) -> int:
        return int(self.model.num_features)

    @property
    def stride(self) -> int:
        if self.vit:
            return int(self.model.patch_embed.patch_size[0])
        return int(self.model_kwargs.get("output_stride", self.model.feature_info[-1]["reduction"]))

    def load_weights(self, state_dict: dict[str, Tensor], source: str = "weights") -> None:
        """Load timm-format weights (the head, if present, is ignored); a missing or misshapen weight is an error."""
        head = _head_keys(self.model)
        sd = {k: v for k, v in state_dict.items() if not any(k == h or k.startswith(h + ".") for h in head)}
        own = self.model.state_dict()
        wrong = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
        if wrong or set(own) - set(sd) or set(sd) - set(own):
            raise PretrainedWeightsError(
                f"{source} do not fit {self.timm_name!r} {self.model_kwargs}: missing {sorted(set(own) - set(sd))[:3]}, "
                f"unexpected {sorted(set(sd) - set(own))[:3]}, wrong shape {wrong[:3]}")
        self.model.load_state_dict(sd)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [0, 255] or float [0, 1] images [B, 3, H, W] -> the backbone's input."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, images: Tensor) -> Tensor:
        """Dense features [B, C, h, w] of images [B, 3, H, W]."""
        return self.features(images)[0]

    def features(self, images: Tensor, attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """(features [B, C, h, w], the last block's CLS-to-patch attention [B, heads, h, w] when ``attention``, a ViT only)."""
        x = self.normalize(images)
        if not self.vit:
            if attention:
                raise ValueError(f"{self.timm_name!r} is not a ViT: it has no attention maps")
            return self.model.forward_features(x), None
        hook = self.model.blocks[-1].attn.register_forward_pre_hook(self._keep_attn_input) if attention else None
        try:
            tokens = self.model.forward_features(x)
        finally:
            if hook is not None:
                hook.remove()
        h, w = self.model.patch_embed.dynamic_feat_size(x.shape[-2:])
        prefix = self.model.num_prefix_tokens
        feats = tokens[:, prefix:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        attn = None
        if attention:
            attn = self._cls_attention(self._attn_input)[:, :, prefix:].reshape(x.shape[0], -1, h, w)
            self._attn_input = None
        return feats, attn

    def _keep_attn_input(self, module: nn.Module, args: tuple) -> None:
        self._attn_input = args[0]

    def _cls_attention(self, x: Tensor) -> Tensor:
        """softmax(q_cls k^T / sqrt(d)) of the last block's attention: [B, heads, tokens] (DINO's attention maps)."""
        attn = self.model.blocks[-1].attn
        b, n, c = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0]


def load_backbone(blob: dict[str, Any]) -> DenseBackbone:
    """The DenseBackbone of a representation file's dict (``trainers.dense.io.read_representation``), in eval mode."""
    model = DenseBackbone(blob["timm_name"], blob["extra"].get("model_kwargs"))
    model.load_weights(blob["state_dict"], f"state_dict of {blob['timm_name']!r}")
    return model.eval()
