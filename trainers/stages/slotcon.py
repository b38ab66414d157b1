"""Stage ``slotcon``: SlotCon dense representation learning on the images of ``inputs.datasets.train``.

Trained through the engine (DeepSpeed, ZeRO 0-2 from the spec) on two views per image (``trainers.dense.views``;
labels never read), with the model and loss of ``trainers.dense.slotcon``; the teacher (the model the supplement
evaluates, A.3) is written as a representation file ``<workdir>/model.pt`` (``trainers.dense.io``): backbone in timm
keys, projector and prototypes in ``extra``. Params: ``python -m trainers slotcon --help``.
"""
from __future__ import annotations

import time
from pathlib import Path

from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import barrier
from trainers.dense.backbone import DenseBackbone
from trainers.dense.ema import momentum_at
from trainers.dense.slotcon import SlotCon
from trainers.dense.training import check_zero, write_representation
from trainers.dense.views import MultiViewTransform, collate_views
from trainers.engine import fit
from trainers.stages import StageResult


def run(spec: StageSpec) -> StageResult | None:
    p = params_of(spec)
    check_zero(spec, "slotcon")
    t0 = time.perf_counter()

    def build() -> SlotCon:
        return SlotCon(DenseBackbone(p.backbone, p.model_kwargs(), p.weights), p.num_prototypes, p.dim, p.hidden_dim,
                       student_temp=p.student_temp, teacher_temp=p.teacher_temp, center_momentum=p.center_momentum,
                       contrast_temp=p.contrast_temp, group_loss_weight=p.group_loss_weight, align_size=p.align_size)

    def loss_fn(engine, batch):
        engine.module.momentum_update(momentum_at(engine.global_steps, p.steps, p.teacher_momentum))
        return engine(*batch)

    transform = MultiViewTransform([p.crop_size] * 2, [tuple(p.crop_scale)] * 2, p.flip_prob, p.jitter, p.gray_prob)
    result = fit(spec, p, build_model=build, loss_fn=loss_fn, transform=transform, collate=collate_views)
    barrier()
    if not result.dist.is_main:
        return None
    sd = result.state_dict
    path = write_representation(Path(spec.outputs.workdir) / "model.pt", sd, prefix="teacher_backbone.",
                                timm_name=p.backbone, model_kwargs=p.model_kwargs(), stage="slotcon",
                                projector_prefix="teacher_projector.", projector_config=build_projector_config(p, sd),
                                prototypes=sd["teacher_prototypes"], method="slotcon", steps=result.steps)
    metrics = {f"train/{k}": v for k, v in result.metrics.items() if k.startswith(("loss", "active"))}
    metrics["time/train_s"] = time.perf_counter() - t0
    return StageResult(metrics=metrics, model_path=str(path), steps=result.steps)


def build_projector_config(p, sd) -> dict:
    """The projector's constructor args, read back from its trained weights (first conv: in_dim -> hidden)."""
    first = sd["teacher_projector.net.0.weight"]
    return {"in_dim": int(first.shape[1]), "hidden_dim": p.hidden_dim, "out_dim": p.dim, "layers": 3, "norm": True}
