"""Stage ``evaluate-instances``: mask AP of an instance model on one split, and its predictions as COCO files.

Every rank predicts its share of ``inputs.datasets.eval`` with ``inputs.models.candidate``
(``trainers.evaluation.instances``); rank 0 gathers them, scores them by COCOeval (segm) per class
(``eval/mask_AP``, ...) and over one category (``eval/mask_AP_agnostic``, CaSP's AP^seg-a), and writes
``outputs.dataset``: ``results.json`` (COCO results: image_id, category_id, RLE segmentation, score),
``images.json`` (image ids -> dataset keys, the categories) and ``metrics.json``; the runner versions that folder
with DVC, and the results file is logged on the stage's MLflow run. Images with no prediction above
``score_threshold`` are counted (``eval/images_without_predictions``).
Params: ``python -m trainers evaluate-instances --help``.
"""
from __future__ import annotations

import logging
import time

from contract.io import write_json
from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import barrier, init_distributed, on_gpu
from trainers.data import shards
from trainers.data.batches import category_labels
from trainers.evaluation.instances import coco_mask_ap, coco_results, gather_predictions, one_category_mask_ap, predict_objects
from trainers.inputs import dataset_input, load_model_input, log_metrics, output_dataset
from trainers.stages import StageResult

log = logging.getLogger(__name__)


def run(spec: StageSpec) -> StageResult | None:
    p = params_of(spec)
    d = init_distributed(on_gpu(spec))
    t0 = time.perf_counter()
    path = dataset_input(spec, "eval")
    out = output_dataset(spec)
    model = load_model_input(spec, "candidate", d.device)
    categories = shards.DatasetIndex.load(path).categories
    images, results = predict_objects(model, path, d, category_labels(path), p.batch_size, desc=spec.name)
    results = [r for r in results if r["score"] > p.score_threshold]
    images, results = gather_predictions(images, results, d)
    if not d.is_main:
        barrier()
        return None
    metrics = coco_mask_ap(images, results, categories)
    metrics.pop("eval/mask_AP50_agnostic", None)  # pooled useCats=0 figures: replaced by one-category COCOeval
    metrics.update(one_category_mask_ap(images, results))
    predicted = {r["key"] for r in results}
    metrics["eval/images_without_predictions"] = float(sum(im["key"] not in predicted for im in images))
    metrics["eval/predictions"] = float(len(results))
    metrics["time/eval_s"] = time.perf_counter() - t0
    doc, res = coco_results(images, results, categories)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "images.json", doc, indent=None)
    write_json(out / "results.json", res, indent=None)
    write_json(out / "metrics.json", metrics)
    log_metrics(spec, metrics)
    _log_artifact(spec, out / "results.json")
    if metrics["eval/images_without_predictions"]:
        log.warning("%s: %d of %d image(s) without a prediction above %g", spec.name,
                    int(metrics["eval/images_without_predictions"]), len(images), p.score_threshold)
    log.info("%s: mask AP %.3f (class-agnostic %.3f) on %d images", spec.name, metrics["eval/mask_AP"],
             metrics["eval/mask_AP_agnostic"], len(images))
    barrier()
    return StageResult(metrics=metrics, dataset_path=str(out))


def _log_artifact(spec: StageSpec, path) -> None:
    if spec.tracking.run_id is None:
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=spec.tracking.mlflow_uri).log_artifact(spec.tracking.run_id, str(path), "predictions")
