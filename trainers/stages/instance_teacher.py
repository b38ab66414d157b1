"""Stage ``instance-teacher``: the object instance segmentation model E + D^o (PartDistillation sec. 4.1).

Trained through the engine (DeepSpeed, ZeRO from the spec) on the object labels of
``inputs.datasets.train``, or imported from ``params.import_from`` (then nothing trains). Either way
it is evaluated by pycocotools COCOeval (segm) on the objects of ``inputs.datasets.eval`` when given
(inference sharded across ranks, COCOeval on rank 0) and written as a segmenter file
``<workdir>/model.pt``. The paper imports a Detic-trained Mask2Former; PartWorld trains its own.

Params (besides the engine's ``TrainConfig``: steps, lr, warmup_steps, ...):
  model        overrides of :data:`MODEL_DEFAULTS` (a ``SegmenterConfig`` dict); ``decoder.num_classes``
               is always the number of categories of the train index. ``encoder.pretrained`` ("timm",
               a URL or a file) initialises the backbone before training.
  flip_prob    horizontal flip probability (augmentation), default 0.5.
  import_from  a segmenter file: local path, ``models:/<name>@<alias>`` or http(s) URL; skips training.
  eval_batch_size  images per inference batch, default 16.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from contract.spec import StageSpec
from trainers.data import shards
from trainers.engine import Dist, fit, init_distributed, on_gpu
from trainers.stages import StageResult
from trainers.stages.common import (
    StageInputError,
    ToTrainSample,
    category_labels,
    collate,
    dataset_input,
    images_to_tensor,
    iter_batches,
    log_metrics,
    object_targets,
    set_loss,
)

log = logging.getLogger(__name__)

# Sized for 2 shared CPU cores: on the demo PartWorld (112 px, 12 classes, 1500 images) 400 steps of 2 ranks x 4
# images take ~5 minutes plus ~10 s of evaluation and reach mask AP ~0.22 (AP50 ~0.46).
MODEL_DEFAULTS: dict = {
    "encoder": {"backbone": "convnext_atto", "pixel_dim": 64, "mask_dim": 64, "norm_groups": 8},
    "decoder": {"num_queries": 16, "hidden_dim": 64, "num_heads": 4, "dim_feedforward": 256, "num_layers": 3},
    # Mask2Former's weights (class 2, mask BCE 5, dice 5): the class term learns far faster than with 1/20/1
    "loss": {"num_points": 1024, "class_weight": 2.0, "mask_weight": 5.0, "dice_weight": 5.0},
    "top_k": 20,
}
PARAM_DEFAULTS: dict = {"steps": 400, "lr": 1e-3, "warmup_steps": 20, "checkpoint_every": 50, "flip_prob": 0.5,
                        "eval_batch_size": 16}


def deep_update(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in (override or {}).items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_config(params: dict, num_classes: int):
    """The teacher's SegmenterConfig: MODEL_DEFAULTS <- params.model, with num_classes from the data."""
    from trainers.models.config import SegmenterConfig

    cfg = deep_update(MODEL_DEFAULTS, params.get("model") or {})
    cfg = deep_update(cfg, {"decoder": {"num_classes": num_classes}})
    return SegmenterConfig.model_validate(cfg)


# -- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def predict_objects(model, dataset_dir: str, d: Dist, labels: dict[int, int], batch_size: int = 16,
                    desc: str | None = None) -> tuple[list[dict], list[dict]]:
    """This rank's share of ``dataset_dir``: (COCO images with their GT objects, COCO segm results)."""
    from tqdm.auto import tqdm

    index_to_cat = {i: c for c, i in labels.items()}
    images, results = [], []
    bar = tqdm(desc=desc, unit="img", disable=not d.is_main or os.environ.get("SELFTRAIN_PROGRESS", "1") == "0")
    for keys, imgs, records in iter_batches(dataset_dir, batch_size, rank=d.rank, world_size=d.world_size,
                                            allow_parts=True):
        preds = model.predict(images_to_tensor(imgs).to(d.device))
        for key, record, p in zip(keys, records, preds):
            images.append({"key": key, "height": int(record["height"]), "width": int(record["width"]),
                           "objects": [{k: o[k] for k in ("category_id", "segmentation", "iscrowd")}
                                       for o in record.get("objects", [])]})
            for rle, score, label in zip(p.to_rle(), p.scores.tolist(), p.labels.tolist()):
                results.append({"key": key, "category_id": index_to_cat.get(int(label), -1), "segmentation": rle,
                                "score": float(score)})
        bar.update(len(keys))
    bar.close()
    return images, results


STAT_NAMES = ("mask_AP", "mask_AP50", "mask_AP75", "mask_APs", "mask_APm", "mask_APl",
              "mask_AR1", "mask_AR10", "mask_AR100", "mask_ARs", "mask_ARm", "mask_ARl")


def coco_mask_ap(images: list[dict], results: list[dict], categories: list[dict]) -> dict[str, float]:
    """Instance mask AP by pycocotools COCOeval (iouType segm): ``eval/mask_AP``, ``..._AP50``, ... and the
    class-agnostic ``eval/mask_AP_agnostic`` (what part mining needs from the teacher: its masks)."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {im["key"]: i + 1 for i, im in enumerate(images)}
    annotations = []
    for im in images:
        for o in im["objects"]:
            annotations.append({"id": len(annotations) + 1, "image_id": ids[im["key"]], "category_id": int(o["category_id"]),
                                "segmentation": o["segmentation"], "area": float(mask_utils.area(_pycoco(o["segmentation"]))),
                                "bbox": [float(v) for v in mask_utils.toBbox(_pycoco(o["segmentation"]))],
                                "iscrowd": int(o.get("iscrowd", 0))})
    out = {f"eval/{n}": 0.0 for n in STAT_NAMES}
    out["eval/mask_AP_agnostic"] = 0.0
    out["eval/images"] = float(len(images))
    out["eval/objects"] = float(len(annotations))
    if not annotations or not results:
        return out
    dts = [{"image_id": ids[r["key"]], "category_id": r["category_id"], "segmentation": r["segmentation"],
            "score": r["score"]} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        gt = COCO()
        gt.dataset = {"images": [{"id": ids[im["key"]], "height": im["height"], "width": im["width"]} for im in images],
                      "annotations": annotations, "categories": [{"id": int(c["id"]), "name": c["name"]} for c in categories]}
        gt.createIndex()
        dt = gt.loadRes(dts)
        for use_cats in (1, 0):
            ev = COCOeval(gt, dt, iouType="segm")
            ev.params.useCats = use_cats
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            if use_cats:
                out.update({f"eval/{n}": float(max(v, 0.0)) for n, v in zip(STAT_NAMES, ev.stats)})
            else:
                out["eval/mask_AP_agnostic"] = float(max(ev.stats[0], 0.0))
                out["eval/mask_AP50_agnostic"] = float(max(ev.stats[1], 0.0))
    return out


def _pycoco(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def evaluate(model, spec: StageSpec, d: Dist, labels: dict[int, int], categories: list[dict]) -> dict[str, float]:
    """Inference on every rank's share of ``inputs.datasets.eval``, gathered to rank 0, COCOeval there ({} elsewhere)."""
    path = dataset_input(spec, "eval")
    images, results = predict_objects(model, path, d, labels, int(spec.params.get("eval_batch_size", 16)),
                                      desc=f"{spec.name} eval")
    if dist.is_initialized() and d.world_size > 1:
        gathered = [None] * d.world_size
        dist.gather_object((images, results), gathered if d.is_main else None, dst=0)
        if d.is_main:
            images = [im for g in gathered for im in g[0]]
            results = [r for g in gathered for r in g[1]]
    return coco_mask_ap(images, results, categories) if d.is_main else {}


# -- import -----------------------------------------------------------------------------------


def import_teacher(source: str, spec: StageSpec) -> Path:
    """Local file of ``params.import_from``: a path, a ``models:/`` URI or an http(s) URL (downloaded to the workdir)."""
    if source.startswith(("http://", "https://")):
        dst = Path(spec.outputs.workdir) / "imported" / Path(source.split("?")[0]).name
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
            torch.hub.download_url_to_file(source, str(tmp), progress=False)
            os.replace(tmp, dst)
        return dst
    from contract.models import resolve_model

    try:
        return Path(resolve_model(source, spec.tracking.mlflow_uri))
    except Exception as e:
        raise StageInputError(f"params.import_from ({source}): {e}") from e


# -- the stage --------------------------------------------------------------------------------


def run(spec: StageSpec) -> StageResult | None:
    """Train (or import) the instance teacher, evaluate mask AP, write ``<workdir>/model.pt``; rank 0 returns the result."""
    from trainers.models.io import load_segmenter, save_segmenter
    from trainers.models.segmenter import Segmenter

    params = {**PARAM_DEFAULTS, **spec.params}
    spec = spec.model_copy(update={"params": params})
    workdir = Path(spec.outputs.workdir)
    model_path = workdir / "model.pt"
    source = params.get("import_from")
    t_start = time.perf_counter()

    if source:
        d = init_distributed(on_gpu(spec))
        path = import_teacher(str(source), spec)
        try:
            model = load_segmenter(path)
        except (FileNotFoundError, ValueError) as e:
            raise StageInputError(f"params.import_from: {e}") from e
        cfg, state_dict, steps, train_metrics = model.cfg, model.state_dict(), 0, {}
        model = model.to(d.device)
    else:
        train_path = dataset_input(spec, "train")
        labels = category_labels(train_path)
        cfg = model_config(params, len(labels))
        targets = functools.partial(object_targets, labels=labels)
        result = fit(spec, build_model=lambda: Segmenter(cfg), loss_fn=set_loss,
                     transform=ToTrainSample(targets, float(params["flip_prob"])), collate=collate)
        d, steps, state_dict = result.dist, result.steps, result.state_dict
        train_metrics = {f"train/{k}": v for k, v in result.metrics.items() if k.startswith("loss")}
        holder = [state_dict]
        if d.world_size > 1:
            dist.broadcast_object_list(holder, src=0)  # every rank evaluates its share with the full weights
        model = Segmenter(cfg)
        model.load_state_dict(holder[0])
        model = model.to(d.device).eval()

    if d.is_main:  # the segmenter file replaces the engine's plain state_dict export
        save_segmenter(model_path, cfg, state_dict, stage="instance-teacher", steps=steps)

    metrics = dict(train_metrics)
    metrics["time/train_s"] = time.perf_counter() - t_start
    t_eval = time.perf_counter()
    if "eval" in spec.inputs.datasets:
        eval_path = dataset_input(spec, "eval")
        categories = shards.DatasetIndex.load(eval_path).categories
        labels = category_labels(eval_path)
        if len(labels) != cfg.decoder.num_classes:
            log.warning("teacher has %d classes, %s has %d: class-aware AP is not meaningful, see mask_AP_agnostic",
                        cfg.decoder.num_classes, eval_path, len(labels))
        eval_metrics = evaluate(model, spec, d, labels, categories)
        metrics.update(eval_metrics)
        if d.is_main:
            log_metrics(spec, eval_metrics, steps)
            log.info("instance teacher: mask AP %.3f, AP50 %.3f (class-agnostic AP %.3f) on %d images",
                     eval_metrics["eval/mask_AP"], eval_metrics["eval/mask_AP50"],
                     eval_metrics["eval/mask_AP_agnostic"], int(eval_metrics["eval/images"]))
        metrics["time/eval_s"] = time.perf_counter() - t_eval
    if dist.is_initialized():
        dist.barrier()
    if not d.is_main:
        return None
    return StageResult(metrics=metrics, model_path=str(model_path), steps=steps)
