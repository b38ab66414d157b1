"""Stage ``train-proposals``: the class-agnostic part decoder D^p on part proposals (PartDistillation sec. 4.2).

A single-class query-based segmenter whose encoder is the frozen instance teacher's E
(``inputs.models.teacher``; only D^p trains) learns from the proposals of ``inputs.datasets.proposals``
(mined parts in round 1, the previous round's pseudo-labels later): every proposal of an image is a
target of class 0 (part), and the loss is Mask2Former's part/no-part CE (no-object weight
``eos_coef``) + mask BCE + dice. The decoder may start from the previous round's part model
(``inputs.models.init``, optional). Writes ``<workdir>/model.pt``, a segmenter file holding E too, so
later stages need only this file.

Params (besides the engine's ``TrainConfig``: steps, lr, warmup_steps, ...):
  model      overrides of :data:`MODEL_DEFAULTS` (``decoder``, ``loss``, ``top_k``); the encoder always
             comes from the teacher and ``decoder.num_classes`` is 1.
  flip_prob  horizontal flip probability, default 0.5.
  round      the self-training round (recorded in the model file), default 1.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from contract.spec import StageSpec
from trainers.engine import fit
from trainers.stages import StageResult
from trainers.stages.common import (
    StageInputError,
    ToTrainSample,
    collate,
    dataset_input,
    load_model_input,
    proposal_targets,
    set_loss,
)
from trainers.stages.instance_teacher import deep_update

log = logging.getLogger(__name__)

# 1-4 objects x up to ~6 parts per PartWorld image: 40 queries leave room for misses and background.
# On the demo PartWorld, 400 steps of 2 ranks x 4 images take ~3 minutes on 2 shared CPU cores.
MODEL_DEFAULTS: dict = {
    "decoder": {"num_queries": 40, "hidden_dim": 64, "num_heads": 4, "dim_feedforward": 256, "num_layers": 3},
    # Mask2Former's weights (class 2, mask BCE 5, dice 5): the class term learns far faster than with 1/20/1
    "loss": {"num_points": 1024, "class_weight": 2.0, "mask_weight": 5.0, "dice_weight": 5.0},
    "top_k": 40,
}
PARAM_DEFAULTS: dict = {"steps": 400, "lr": 1e-3, "warmup_steps": 10, "checkpoint_every": 50, "flip_prob": 0.5,
                        "round": 1}


def part_config(params: dict, encoder_cfg):
    """D^p's SegmenterConfig: MODEL_DEFAULTS <- params.model, the teacher's encoder (frozen), one class."""
    from trainers.models.config import SegmenterConfig

    cfg = deep_update(MODEL_DEFAULTS, params.get("model") or {})
    if "encoder" in cfg:
        raise StageInputError("params.model.encoder: the part model's encoder is the teacher's; set it on instance-teacher")
    cfg = deep_update(cfg, {"decoder": {"num_classes": 1}, "freeze_encoder": True})
    return SegmenterConfig.model_validate({**cfg, "encoder": encoder_cfg.model_dump()})


def decoder_state(model) -> dict[str, torch.Tensor]:
    """The decoder's weights of a Segmenter, keyed as in the Segmenter's state_dict."""
    return {f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}


def run(spec: StageSpec) -> StageResult | None:
    """Train D^p on the proposals with the teacher's frozen E; rank 0 writes model.pt and returns the result."""
    from trainers.models.io import save_segmenter
    from trainers.models.segmenter import Segmenter

    params = {**PARAM_DEFAULTS, **spec.params}
    spec = spec.model_copy(update={"params": params})
    t_start = time.perf_counter()
    dataset_input(spec, "proposals")
    cpu = torch.device("cpu")
    teacher = load_model_input(spec, "teacher", cpu)
    cfg = part_config(params, teacher.cfg.encoder)
    encoder_state = teacher.encoder.state_dict()
    del teacher
    init_state = None
    if "init" in spec.inputs.models:
        init = load_model_input(spec, "init", cpu)
        init_state = decoder_state(init)
        if init.cfg.decoder != cfg.decoder:
            raise StageInputError(f"inputs.models.init: its decoder {init.cfg.decoder} differs from this round's {cfg.decoder}")
        del init

    def build_model():
        model = Segmenter(cfg)
        model.encoder.load_state_dict(encoder_state)
        if init_state is not None:
            model.load_state_dict(init_state, strict=False)
        return model

    result = fit(spec, build_model=build_model, loss_fn=set_loss,
                 transform=ToTrainSample(proposal_targets, float(params["flip_prob"])), collate=collate,
                 dataset="proposals")
    if not result.dist.is_main:
        return None
    model_path = Path(spec.outputs.workdir) / "model.pt"
    save_segmenter(model_path, cfg, result.state_dict, stage="train-proposals", round=int(params["round"]),
                   steps=result.steps)
    metrics = {f"train/{k}": v for k, v in result.metrics.items() if k.startswith("loss")}
    metrics["time/train_s"] = time.perf_counter() - t_start
    return StageResult(metrics=metrics, model_path=str(model_path), steps=result.steps)
