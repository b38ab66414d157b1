"""Stage ``train-ranker``: final self-training with cluster ids as labels (PartDistillation sec. 4.3 "Final self training").

The class-specific part model ("part ranker", ``trainers.parts.ranking``): a Segmenter whose part decoder D^p
predicts one label per (object class c, cluster k) of ``rank-parts``, the label ``offset[c] + k`` of the dataset's
``label_map.json`` (``trainers.parts.label_map``). The encoder is the part model's (``inputs.models.parts``), frozen
(sec. 4.1); the decoder starts from the part model's D^p wherever shapes agree (everything but the class head), or
from the previous round's ranker (``inputs.models.init``). Trained with the SetCriterion (Hungarian matching, CE
over the labels + no-object, mask BCE + dice). One call is one round; the pipeline loops R' rounds with promotion,
relabelling between rounds with ``rank-pseudo-label``. Writes ``<workdir>/model.pt``: a segmenter file with
``label_map`` (read back by ``trainers.models.io.load_ranker``). Params: ``python -m trainers train-ranker --help``.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from contract.spec import StageSpec
from contract.stages import params_of
from trainers.data.batches import InputSize, StrongAugment, ToTrainSample, collate
from trainers.engine import fit
from trainers.inputs import StageInputError, dataset_input, load_model_input, model_input_path
from trainers.models.io import read_segmenter_file, save_segmenter
from trainers.models.losses import set_loss
from trainers.models.presets import ranker_config
from trainers.models.segmenter import Segmenter
from trainers.parts.label_map import LabelMap
from trainers.parts.ranking import RankerTargets, initial_state
from trainers.stages import StageResult


def run(spec: StageSpec) -> StageResult | None:
    """Train one round of the class-specific part model; rank 0 writes model.pt (with the label map)."""
    p = params_of(spec)
    t_start = time.perf_counter()
    data = dataset_input(spec, "ranked_parts")
    lmap = LabelMap.load(data)
    if lmap.num_labels == 0:
        raise StageInputError(f"inputs.datasets.ranked_parts ({data}): no object class has a cluster (no candidates)")
    parts = load_model_input(spec, "parts", torch.device("cpu"))
    cfg = ranker_config(parts.cfg, lmap.num_labels, p.model)
    source = parts.state_dict()
    del parts
    if "init" in spec.inputs.models:
        path = model_input_path(spec, "init")
        blob = read_segmenter_file(path)
        if LabelMap.from_doc(blob.get("label_map") or {"classes": []}) != lmap:
            raise StageInputError(f"inputs.models.init ({path}): its label map differs from the dataset's")
        source = {**source, **blob["state_dict"]}

    def build_model():
        model = Segmenter(cfg)
        model.load_state_dict(initial_state(model, source), strict=False)
        return model

    targets = RankerTargets(lmap, min_score=p.min_density_score)
    transform = ToTrainSample(targets, p.flip_prob, InputSize.of(p)) if p.augment == "flip" else \
        StrongAugment(targets, p.flip_prob, p.crop_scale, brightness=p.color_jitter, contrast=p.color_jitter,
                      saturation=p.color_jitter, size=InputSize.of(p))
    result = fit(spec, p, build_model=build_model, loss_fn=set_loss, transform=transform, collate=collate,
                 dataset="ranked_parts")
    if not result.dist.is_main:
        return None
    model_path = Path(spec.outputs.workdir) / "model.pt"
    save_segmenter(model_path, cfg, result.state_dict, stage="train-ranker", round=p.round, steps=result.steps,
                   label_map=lmap.doc)
    metrics = {f"train/{k}": v for k, v in result.metrics.items() if k.startswith("loss")}
    metrics["ranker/num_labels"] = float(lmap.num_labels)
    metrics["time/train_s"] = time.perf_counter() - t_start
    return StageResult(metrics=metrics, model_path=str(model_path), steps=result.steps)
