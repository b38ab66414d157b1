"""Stage ``leopart``: Leopart dense fine-tuning of a ViT on the images of ``inputs.datasets.train``.

Trained through the engine (DeepSpeed, ZeRO 0-2 from the spec) on two global and ``num_local`` local crops per
image (``trainers.dense.views``; labels never read), with the model and loss of ``trainers.dense.leopart``; written
as a representation file ``<workdir>/model.pt`` (``trainers.dense.io``): ViT in timm keys, MLP head and prototypes
in ``extra``. Params: ``python -m trainers leopart --help``.
"""
from __future__ import annotations

import time
from pathlib import Path

from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import barrier
from trainers.dense.backbone import DenseBackbone
from trainers.dense.ema import momentum_at
from trainers.dense.leopart import Leopart
from trainers.dense.training import check_zero, write_representation
from trainers.dense.views import MultiViewTransform, collate_views
from trainers.engine import fit
from trainers.stages import StageResult


def run(spec: StageSpec) -> StageResult | None:
    p = params_of(spec)
    check_zero(spec, "leopart")
    t0 = time.perf_counter()
    fg_mass = p.fg_mass if p.foreground == "attention" else None

    def build() -> Leopart:
        return Leopart(DenseBackbone(p.backbone, p.model_kwargs(), p.weights), p.num_prototypes, p.dim, p.hidden_dim,
                       temperature=p.temperature, sinkhorn_eps=p.sinkhorn_eps, sinkhorn_iterations=p.sinkhorn_iterations,
                       fg_mass=fg_mass, align_size=p.align_size, backbone_lr_scale=p.backbone_lr_scale,
                       teacher=p.teacher_momentum is not None)

    transform = MultiViewTransform([p.global_size] * 2 + [p.local_size] * p.num_local,
                                   [tuple(p.global_scale)] * 2 + [tuple(p.local_scale)] * p.num_local,
                                   p.flip_prob, p.jitter, p.gray_prob)
    def loss_fn(engine, batch):
        engine.module.freeze_prototypes = engine.global_steps < p.freeze_prototypes_steps
        if p.teacher_momentum is not None:
            engine.module.momentum_update(momentum_at(engine.global_steps, p.steps, p.teacher_momentum))
        return engine(*batch)

    result = fit(spec, p, build_model=build, loss_fn=loss_fn, transform=transform, collate=collate_views)
    barrier()
    if not result.dist.is_main:
        return None
    sd = result.state_dict
    first = sd["projector.net.0.weight"]
    path = write_representation(Path(spec.outputs.workdir) / "model.pt", sd, prefix="backbone.", timm_name=p.backbone,
                                model_kwargs=p.model_kwargs(), stage="leopart", projector_prefix="projector.",
                                projector_config={"in_dim": int(first.shape[1]), "hidden_dim": p.hidden_dim,
                                                  "out_dim": p.dim, "layers": 3, "norm": False},
                                prototypes=sd["prototypes"], method="leopart", steps=result.steps)
    metrics = {f"train/{k}": v for k, v in result.metrics.items() if k.startswith(("loss", "fg", "score"))}
    metrics["time/train_s"] = time.perf_counter() - t0
    return StageResult(metrics=metrics, model_path=str(path), steps=result.steps)
