"""Stage ``train-proposals``: the class-agnostic part decoder D^p on part proposals (PartDistillation sec. 4.2).

A single-class query-based segmenter whose encoder is the frozen instance teacher's E (``inputs.models.teacher``;
only D^p trains) learns from the proposals of ``inputs.datasets.proposals`` (mined parts in round 1, the previous
round's pseudo-labels later): every proposal of an image is a target of class 0 (part), and the loss is
Mask2Former's part/no-part CE + mask BCE + dice. The decoder may start from the previous round's part model
(``inputs.models.init``). Writes ``<workdir>/model.pt``, a segmenter file holding E too, so later stages need only
this file. Params: ``python -m trainers train-proposals --help``.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from contract.spec import StageSpec
from contract.stages import params_of
from trainers.data.batches import InputSize, StrongAugment, ToTrainSample, collate, proposal_targets
from trainers.engine import fit
from trainers.inputs import StageInputError, dataset_input, load_model_input
from trainers.models.io import save_segmenter
from trainers.models.losses import set_loss
from trainers.models.presets import part_config
from trainers.models.segmenter import Segmenter
from trainers.stages import StageResult


def decoder_state(model) -> dict[str, torch.Tensor]:
    """The decoder's weights of a Segmenter, keyed as in the Segmenter's state_dict."""
    return {f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}


def run(spec: StageSpec) -> StageResult | None:
    """Train D^p on the proposals with the teacher's frozen E; rank 0 writes model.pt and returns the result."""
    p = params_of(spec)
    t_start = time.perf_counter()
    dataset_input(spec, "proposals")
    cpu = torch.device("cpu")
    teacher = load_model_input(spec, "teacher", cpu)
    cfg = part_config(p.model, teacher.cfg.encoder)
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

    transform = ToTrainSample(proposal_targets, p.flip_prob, InputSize.of(p)) if p.augment == "flip" else \
        StrongAugment(proposal_targets, p.flip_prob, p.crop_scale, brightness=p.color_jitter, contrast=p.color_jitter,
                      saturation=p.color_jitter, size=InputSize.of(p))
    result = fit(spec, p, build_model=build_model, loss_fn=set_loss, transform=transform, collate=collate,
                 dataset="proposals")
    if not result.dist.is_main:
        return None
    model_path = Path(spec.outputs.workdir) / "model.pt"
    save_segmenter(model_path, cfg, result.state_dict, stage="train-proposals", round=p.round, steps=result.steps)
    metrics = {f"train/{k}": v for k, v in result.metrics.items() if k.startswith("loss")}
    metrics["time/train_s"] = time.perf_counter() - t_start
    return StageResult(metrics=metrics, model_path=str(model_path), steps=result.steps)
