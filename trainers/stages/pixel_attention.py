"""Stage ``pixel-attention``: PASS's pixel-attention module (LUSS sec. 4.3, eq. 6) on a frozen representation.

The backbone, projection head and prototypes of ``inputs.models.representation`` (a represent file) stay fixed; only
:class:`~trainers.luss.model.PixelAttention` trains. Its pooled embedding, the mean over pixels of norm(F) x a with F
the last stage upsampled ``upsample`` times, goes through the frozen projection head (batch statistics in its BN:
attention-pooled features are not what its running statistics saw) and the frozen prototypes, and SwAV's swapped
prediction between two crops of every image (Sinkhorn codes, optional queue) is the loss. The frozen parts live
outside the module DeepSpeed optimises, so only the attention's weights are trained, checkpointed and exported.

Writes ``<workdir>/model.pt`` in the representation file format: the same backbone and heads plus
``extra.pixel_attention`` (its weights) and ``extra.upsample``. Params: ``python -m trainers pixel-attention --help``.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import barrier
from trainers.engine import fit
from trainers.inputs import StageInputError, dataset_input, model_input_path
from trainers.luss.losses import swapped_prediction, swav_codes
from trainers.luss.model import (
    RepresentationFileError,
    PixelAttention,
    attention_pool,
    backbone_from,
    image_mlp,
    output_stride_of,
    output_features,
    read_model_file,
    save_model_file,
)
from trainers.luss.multicrop import ImagesOnly, MultiCrop, collate_views
from trainers.stages import StageResult


class Frozen:
    """The representation's fixed parts, kept out of the trained module's parameters."""

    def __init__(self, doc: dict):
        cfg, heads = doc["extra"]["config"], doc["extra"]["heads"]
        self.backbone = backbone_from(doc).eval().requires_grad_(False)
        self.projection = image_mlp(self.backbone.out_channels, cfg["hidden_dim"], cfg["feat_dim"])
        self.projection.load_state_dict(heads["projection"])
        self.projection.requires_grad_(False)
        self.prototypes = F.normalize(heads["prototypes"]["weight"].float(), dim=1)

    def to(self, device) -> "Frozen":
        self.backbone.to(device)
        self.projection.to(device)
        self.prototypes = self.prototypes.to(device)
        return self


class AttentionTrainer(nn.Module):
    """The attention module (trained) over the frozen representation; forward gives SwAV's logits of the pooled embedding."""

    def __init__(self, doc: dict, upsample: int, queue_length: int):
        super().__init__()
        object.__setattr__(self, "frozen", Frozen(doc))  # not a submodule: DeepSpeed never sees these weights
        self.upsample = upsample
        self.attention = PixelAttention(self.frozen.backbone.out_channels)
        feat_dim = self.frozen.prototypes.shape[1]
        if queue_length:
            self.register_buffer("queue", torch.zeros(2, queue_length, feat_dim))
        else:
            self.queue = None

    def forward(self, images: torch.Tensor) -> dict:
        fr = self.frozen
        if fr.prototypes.device != images.device:
            fr.to(images.device)
        with torch.no_grad():
            feats = output_features(fr.backbone(images)[-1], self.upsample)
        fr.projection.train(self.training)
        emb = F.normalize(fr.projection(attention_pool(feats, self.attention(feats))), dim=1)
        return {"embeddings": emb.detach(), "logits": emb @ fr.prototypes.T, "prototypes": fr.prototypes}


class AttentionLoss:
    """SwAV's swapped prediction between the two crops' attention-pooled embeddings."""

    def __init__(self, p):
        self.p = p

    def __call__(self, engine, batch):
        p = self.p
        out = engine(batch["globals"])
        logits = list(out["logits"].split(batch["valid"].shape[0]))
        queue = getattr(engine.module, "queue", None)
        codes = swav_codes(logits, out["embeddings"], out["prototypes"],
                           queue if int(engine.global_steps) >= p.queue_start_step else None, p.epsilon, p.sinkhorn_iterations)
        loss = swapped_prediction(logits, codes, p.temperature)
        return loss, {"swav": float(loss.detach())}


def run(spec: StageSpec) -> StageResult | None:
    p = params_of(spec)
    t0 = time.perf_counter()
    dataset_input(spec, "train")
    source = model_input_path(spec, "representation")
    try:
        doc = read_model_file(source, needs=("config", "heads"))
    except RepresentationFileError as e:
        raise StageInputError(f"inputs.models.representation: {e}") from e
    world = int(os.environ.get("WORLD_SIZE", "1"))
    crops = MultiCrop(p.global_size, p.global_scale, p.global_size, 0, p.global_scale, 1, p.flip_prob, p.jitter)
    build = functools.partial(AttentionTrainer, doc, p.upsample, p.queue_length // max(1, world))
    result = fit(spec, p, build_model=build, loss_fn=AttentionLoss(p), transform=ImagesOnly(crops), collate=collate_views)
    model_path = Path(spec.outputs.workdir) / "model.pt"
    if result.dist.is_main:
        attention = {k.removeprefix("attention."): v for k, v in result.state_dict.items() if k.startswith("attention.")}
        save_model_file(model_path, doc["timm_name"], doc["state_dict"], stage="pixel-attention",
                        output_stride=output_stride_of(doc),
                        extra={**doc["extra"], "pixel_attention": attention, "upsample": p.upsample,
                               "representation": str(spec.inputs.models["representation"].uri)})
    barrier()
    if not result.dist.is_main:
        return None
    metrics = {f"train/{k}": v for k, v in result.metrics.items() if k in ("loss", "swav")}
    metrics["time/train_s"] = time.perf_counter() - t0
    return StageResult(metrics=metrics, model_path=str(model_path), steps=result.steps)
