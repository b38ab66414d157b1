"""Stage ``fit-objects``: a small CNN learning PartWorld object classes per pixel (stride-4 logits).

It exists to exercise the engine and the stage runtime end to end (the network: ``trainers.models.object_seg``);
the PartDistillation models live in ``trainers/models``. Params: ``python -m trainers fit-objects --help``.
"""
from __future__ import annotations

import torch.distributed as dist

from contract.spec import StageSpec
from contract.stages import params_of
from trainers.engine import fit
from trainers.inputs import log_metrics
from trainers.models.object_seg import ObjectSegNet, ToTensors, class_labels, collate, evaluate, loss_fn
from trainers.stages import StageResult


def run(spec: StageSpec) -> StageResult | None:
    """Train ObjectSegNet on the train shards; evaluate on ``eval`` if given. Rank 0 returns the result."""
    p = params_of(spec)
    labels = class_labels(spec.inputs.datasets["train"].path)
    num_classes = len(labels)
    transform = ToTensors(p.image_size, labels)
    result = fit(spec, p, build_model=lambda: ObjectSegNet(num_classes, p.width), loss_fn=loss_fn,
                 transform=transform, collate=collate)
    d = result.dist
    metrics = {f"train/{k}": v for k, v in result.metrics.items() if k in ("loss", "pixel_accuracy")}

    eval_ref = spec.inputs.datasets.get("eval")
    if eval_ref is not None:
        holder = [result.state_dict]
        dist.broadcast_object_list(holder, src=0)  # every rank evaluates its share with the full weights
        model = ObjectSegNet(num_classes, p.width).to(d.device)
        model.load_state_dict(holder[0])
        eval_metrics = evaluate(model, eval_ref.path, d, num_classes, transform)
        metrics.update(eval_metrics)
        if d.is_main:
            log_metrics(spec, eval_metrics, step=result.steps)
    if not d.is_main:
        return None
    return StageResult(metrics=metrics, model_path=result.model_path, steps=result.steps)
