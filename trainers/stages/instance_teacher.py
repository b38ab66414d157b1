"""Stage ``instance-teacher``: the object instance segmentation model E + D^o (PartDistillation sec. 4.1).

Trained through the engine (DeepSpeed, ZeRO from the spec) on the object labels of ``inputs.datasets.train``, or
imported (``inputs.models.import_from`` or ``params.import_from``; then nothing trains). Either way it is evaluated
by pycocotools COCOeval (segm) on the objects of ``inputs.datasets.eval`` when given
(``trainers.evaluation.instances``) and written as a segmenter file ``<workdir>/model.pt``. The paper imports a
Detic-trained Mask2Former; PartWorld trains its own. Params: ``python -m trainers instance-teacher --help``.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch.distributed as dist

from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import barrier, init_distributed, on_gpu
from trainers.data import shards
from trainers.data.batches import InputSize, ToTrainSample, at_input_size, category_labels, collate, object_targets
from trainers.data.panoptic import entity_record, stuff_categories
from trainers.data.pseudo_labels import training_targets
from trainers.engine import fit
from trainers.evaluation.instances import evaluate_instances
from trainers.inputs import StageInputError, dataset_input, fetch_model_file, log_metrics, model_input_path
from trainers.models.encoder import PretrainedWeightsError, with_pretrained
from trainers.models.init import init_from
from trainers.models.io import load_segmenter, read_segmenter_file, save_segmenter
from trainers.models.losses import set_loss
from trainers.models.presets import teacher_config
from trainers.models.segmenter import Segmenter
from trainers.stages import StageResult

log = logging.getLogger(__name__)


def import_source(spec: StageSpec, p) -> tuple[str, str] | None:
    """(reference, what) of the teacher to import: the model input ``import_from`` or ``params.import_from``."""
    if "import_from" in spec.inputs.models:
        return spec.inputs.models["import_from"].uri, "inputs.models.import_from"
    return (p.import_from, "params.import_from") if p.import_from else None


def encoder_source(spec: StageSpec, p) -> tuple[str, str] | None:
    """(local file or timm hub name, what) of the pretrained encoder: the model input ``encoder`` or ``params.encoder``."""
    if "encoder" in spec.inputs.models:
        source = (str(model_input_path(spec, "encoder")), "inputs.models.encoder")
    elif p.encoder is None:
        return None
    elif p.encoder.startswith("stage:"):
        raise StageInputError(f"params.encoder ({p.encoder}): a stage reference is resolved by the pipeline; give it as the "
                              "model input encoder (models: {encoder: " + p.encoder + "})")
    elif p.encoder == "timm" or p.encoder.startswith("timm:"):
        source = (p.encoder, "params.encoder")
    else:
        source = (str(fetch_model_file(p.encoder, spec, "params.encoder")), "params.encoder")
    if "init" in spec.inputs.models:
        raise StageInputError(f"{source[1]} and inputs.models.init both initialise the encoder: give one")
    return source


def _pretrained_encoder(cfg, source: str, what: str):
    try:
        out = with_pretrained(cfg, source)
    except PretrainedWeightsError as e:
        raise StageInputError(f"{what}: {e}") from e
    log.info("encoder %s initialised from %s (%s)", out.backbone, source, what)
    return out


def run(spec: StageSpec) -> StageResult | None:
    """Train (or import) the instance teacher, evaluate mask AP, write ``<workdir>/model.pt``; rank 0 returns the result."""
    p = params_of(spec)
    model_path = Path(spec.outputs.workdir) / "model.pt"
    t_start = time.perf_counter()
    source = import_source(spec, p)
    if source:
        d = init_distributed(on_gpu(spec))
        try:
            model = load_segmenter(fetch_model_file(source[0], spec, source[1]))
        except (FileNotFoundError, ValueError) as e:
            raise StageInputError(f"{source[1]}: {e}") from e
        cfg, state_dict, steps, train_metrics = model.cfg, model.state_dict(), 0, {}
        model = model.to(d.device)
    else:
        labels = category_labels(dataset_input(spec, "train"))
        cfg = teacher_config(p.model, 1 if p.class_agnostic else len(labels))
        encoder = encoder_source(spec, p)
        if encoder is not None:
            cfg = cfg.model_copy(update={"encoder": _pretrained_encoder(cfg.encoder, *encoder)})
        if p.entities and p.targets == "objects":  # CaSP sec. 3.3: things and stuff, one class-free entity each
            targets = functools.partial(entity_targets, labels=_entity_labels(dataset_input(spec, "train")))
        elif p.targets == "objects" and not p.class_agnostic:
            targets = functools.partial(object_targets, labels=labels)
        else:  # CaSP: alpha(.) and/or pseudo-labels (never ground truth)
            targets = training_targets(p.targets, labels, p.class_agnostic)
        build = functools.partial(_initialised, cfg, spec, p) if "init" in spec.inputs.models else lambda: Segmenter(cfg)
        result = fit(spec, p, build_model=build, loss_fn=set_loss,
                     transform=ToTrainSample(targets, p.flip_prob, InputSize.of(p)), collate=collate)
        d, steps, state_dict = result.dist, result.steps, result.state_dict
        train_metrics = {f"train/{k}": v for k, v in result.metrics.items() if k.startswith("loss")}
        holder = [state_dict]
        if d.world_size > 1:
            dist.broadcast_object_list(holder, src=0)  # every rank evaluates its share with the full weights
        model = Segmenter(cfg)
        model.load_state_dict(holder[0])
        model = model.to(d.device).eval()

    if d.is_main:  # the segmenter file replaces the engine's plain state_dict export
        casp = {"class_agnostic": True, **({"entities": True} if p.entities else {})} if p.class_agnostic else {}
        save_segmenter(model_path, cfg, state_dict, stage="instance-teacher", steps=steps, **casp)
    metrics = dict(train_metrics)
    metrics["time/train_s"] = time.perf_counter() - t_start
    if "eval" in spec.inputs.datasets:
        metrics.update(_evaluate(spec, p, model, cfg, d, steps))
    barrier()
    if not d.is_main:
        return None
    return StageResult(metrics=metrics, model_path=str(model_path), steps=steps)


def entity_targets(record: dict, labels: dict[int, int]) -> dict:
    """Targets of a record's entities (its objects and its stuff regions) under alpha: ``labels`` maps every id to 0."""
    return object_targets(entity_record(record), labels)


def _entity_labels(train: str) -> dict[int, int]:
    """alpha over things and stuff (every category id -> entity 0); a train set without stuff categories is refused."""
    categories = shards.DatasetIndex.load(train).categories
    if not stuff_categories(categories):
        raise StageInputError(f"entities: true, but inputs.datasets.train ({train}) has no stuff category (isthing 0): "
                              "entity labels need stuff regions (PartWorld with stuff_classes > 0, or selftrain data "
                              "import panoptic)")
    return {int(c["id"]): 0 for c in categories}


def _initialised(cfg, spec: StageSpec, p) -> Segmenter:
    """A Segmenter of ``cfg`` starting from the weights of model input ``init`` (class head: ``p.head_init``)."""
    model = Segmenter(cfg)
    try:
        source = read_segmenter_file(model_input_path(spec, "init"))["state_dict"]
        counts = init_from(model, source, p.head_init, p.init_parts)
    except StageInputError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise StageInputError(f"inputs.models.init: {e}") from e
    log.info("initialised from inputs.models.init (%s): %d weights copied, %d left at random init, class head %s",
             "+".join(p.init_parts), counts["copied"], counts["kept_random"],
             "from the class-agnostic channel" if counts["head_from_agnostic"] else "copied or random")
    return model


def _evaluate(spec: StageSpec, p, model, cfg, d, steps: int) -> dict[str, float]:
    """Mask AP on ``inputs.datasets.eval`` (every rank infers its share; the metrics on rank 0)."""
    t_eval = time.perf_counter()
    eval_path = dataset_input(spec, "eval")
    labels = category_labels(eval_path)
    if len(labels) != cfg.decoder.num_classes:
        log.warning("teacher has %d classes, %s has %d: class-aware AP is not meaningful, see mask_AP_agnostic",
                    cfg.decoder.num_classes, eval_path, len(labels))
    metrics = evaluate_instances(at_input_size(model, p), eval_path, d, labels, shards.DatasetIndex.load(eval_path).categories,
                                 p.eval_batch_size, desc=f"{spec.name} eval")
    if d.is_main:
        log_metrics(spec, metrics, steps)
        log.info("instance teacher: mask AP %.3f, AP50 %.3f (class-agnostic AP %.3f) on %d images",
                 metrics["eval/mask_AP"], metrics["eval/mask_AP50"], metrics["eval/mask_AP_agnostic"],
                 int(metrics["eval/images"]))
    metrics["time/eval_s"] = time.perf_counter() - t_eval
    return metrics
