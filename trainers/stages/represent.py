"""Stage ``represent``: PASS's self-supervised representation learning (LUSS sec. 4.2) on unlabeled image shards.

The engine (DeepSpeed, ZeRO from the spec) trains :class:`~trainers.luss.model.RepresentationModel` on multi-crop
views of ``inputs.datasets.train`` (``trainers.luss.multicrop``; only images reach it) with eq. 5's loss:
SwAV's swapped prediction over all crops with Sinkhorn-Knopp codes of the two global crops (computed over every
rank's batch, and a queue of earlier embeddings once it is full), plus ``p2p_weight`` x the pixel-to-pixel alignment
of the two global views' overlap (eq. 2), plus ``d2s_weight`` x the deep-to-shallow supervision of ``d2s_stages``
(eq. 4, cross-view). Prototypes are unit vectors, without gradient for the first ``freeze_prototypes_steps``.

Writes ``<workdir>/model.pt`` in the representation file format (``trainers.luss.model``): the backbone in timm's
key format, plus the heads the pixel-attention stage continues from. ``steps: 0`` trains nothing and writes the
seeded random initialisation instead (the "randomly initialised" baseline). Params: ``python -m trainers represent --help``.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch

from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import barrier, init_distributed, on_gpu
from trainers.engine import fit, seed_everything
from trainers.inputs import dataset_input
from trainers.luss.losses import deep_to_shallow, pixel_to_pixel, swapped_prediction, swav_codes
from trainers.luss.model import RepresentationModel, save_model_file, sub_state
from trainers.luss.multicrop import ImagesOnly, MultiCrop, collate_views
from trainers.stages import StageResult


def build(p, world_size: int) -> RepresentationModel:
    return RepresentationModel(p.backbone, p.output_stride, p.feat_dim, p.hidden_dim, p.num_prototypes,
                               tuple(p.d2s_stages), queue_length=p.queue_length // max(1, world_size))


class RepresentLoss:
    """Eq. 5 on one batch: SwAV + p2p_weight x P2P + d2s_weight x D2S (returns the loss and its parts)."""

    def __init__(self, p):
        self.p = p

    def __call__(self, engine, batch):
        p = self.p
        step = int(engine.global_steps)
        out = engine(batch["globals"], batch.get("locals"), batch["grids"], step < p.freeze_prototypes_steps)
        b = batch["valid"].shape[0]
        logits = list(out["logits"].split(b))
        queue = getattr(engine.module, "queue", None)
        codes = swav_codes(logits, out["embeddings"], out["prototypes"], queue if step >= p.queue_start_step else None,
                           p.epsilon, p.sinkhorn_iterations)
        swav = swapped_prediction(logits, codes, p.temperature)
        loss, parts = swav, {"swav": float(swav.detach())}
        if p.p2p_weight > 0:
            p2p = pixel_to_pixel(out["p"], out["z"], batch["valid"])
            loss = loss + p.p2p_weight * p2p
            parts["p2p"] = float(p2p.detach())
        if out["shallow"] and p.d2s_weight > 0:
            d2s = sum(deep_to_shallow(list(s.split(b)), codes, p.temperature) for s in out["shallow"].values()) / len(out["shallow"])
            loss = loss + p.d2s_weight * d2s
            parts["d2s"] = float(d2s.detach())
        q = torch.stack(list(codes.values()))
        parts["code_entropy"] = float(-(q * q.clamp(min=1e-12).log()).sum(-1).mean())
        return loss, parts


def extra_of(p, state: dict[str, torch.Tensor]) -> dict:
    """What the pixel-attention stage continues from: head sizes and weights."""
    return {"config": {"feat_dim": p.feat_dim, "hidden_dim": p.hidden_dim, "num_prototypes": p.num_prototypes,
                       "d2s_stages": list(p.d2s_stages), "global_size": p.global_size},
            "heads": {"projection": sub_state(state, "projection"), "prototypes": sub_state(state, "prototypes")}}


def run(spec: StageSpec) -> StageResult | None:
    p = params_of(spec)
    t0 = time.perf_counter()
    model_path = Path(spec.outputs.workdir) / "model.pt"
    if p.steps == 0:  # the seeded random initialisation, written as a model (a baseline row)
        d = init_distributed(on_gpu(spec))
        if d.is_main:
            seed_everything(p.seed)
            state = build(p, 1).state_dict()
            save_model_file(model_path, p.backbone, sub_state(state, "backbone.net"), stage="represent",
                            output_stride=p.output_stride, extra={**extra_of(p, state), "random_init": True, "seed": p.seed})
        barrier()
        return StageResult(metrics={"time/train_s": time.perf_counter() - t0}, model_path=str(model_path)) if d.is_main else None
    dataset_input(spec, "train")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the queue is split over the ranks
    crops = MultiCrop(p.global_size, p.global_scale, p.local_size, p.local_count, p.local_scale, p.grid_size,
                      p.flip_prob, p.jitter)
    result = fit(spec, p, build_model=functools.partial(build, p, world), loss_fn=RepresentLoss(p),
                 transform=ImagesOnly(crops), collate=collate_views)
    d = result.dist
    if d.is_main:  # the representation file replaces the engine's plain state_dict export
        state = result.state_dict
        save_model_file(model_path, p.backbone, sub_state(state, "backbone.net"), stage="represent",
                        output_stride=p.output_stride, extra={**extra_of(p, state), "steps": result.steps})
    barrier()
    if not d.is_main:
        return None
    metrics = {f"train/{k}": v for k, v in result.metrics.items() if k in ("loss", "swav", "p2p", "d2s", "code_entropy")}
    metrics["time/train_s"] = time.perf_counter() - t0
    return StageResult(metrics=metrics, model_path=str(model_path), steps=result.steps)
