"""Stage ``evaluate-representation``: the dense-representation protocol of ``trainers.dense.segmentation`` on one split.

The representation is ``inputs.models.candidate`` (a representation file, ``trainers.dense.io``) or, without one,
``params.backbone`` at random init (the baseline every learned representation must beat). Every rank infers its
share; rank 0 scores, writes ``<workdir>/evaluation.json`` (every metric, per-category IoU, cluster mappings) and
``<workdir>/concepts.html`` (SlotCon supplement A.4), and logs both to the stage's MLflow run.
Params: ``python -m trainers evaluate-representation --help``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from contract.io import write_json
from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import all_gather, barrier, init_distributed, on_gpu
from trainers.data import shards
from trainers.dense.backbone import DenseBackbone
from trainers.dense.io import RepresentationFileError, read_representation
from trainers.dense.segmentation import EvalSettings, Representation, evaluate
from trainers.evaluation.concepts import write_concepts_html
from trainers.inputs import StageInputError, dataset_input, log_metrics, model_input_path
from trainers.stages import StageResult

log = logging.getLogger(__name__)


def _representation(spec: StageSpec, p) -> Representation:
    if "candidate" in spec.inputs.models:
        path = model_input_path(spec, "candidate")
        try:
            return Representation.from_blob(read_representation(path))
        except RepresentationFileError as e:
            raise StageInputError(f"inputs.models.candidate: {e}") from e
    if not p.backbone:
        raise StageInputError("evaluate-representation needs inputs.models.candidate or params.backbone (a random-init baseline)")
    torch.manual_seed(p.seed)
    kwargs = {} if p.output_stride is None else {"output_stride": p.output_stride}
    return Representation(DenseBackbone(p.backbone, kwargs, p.weights).eval(), stage=f"{p.backbone} ({p.weights or 'random init'})")


def run(spec: StageSpec) -> StageResult | None:
    p = params_of(spec)
    d = init_distributed(on_gpu(spec))
    t0 = time.perf_counter()
    eval_path = dataset_input(spec, "eval")
    probe_path = dataset_input(spec, "probe") if "probe" in spec.inputs.datasets else None
    rep = _representation(spec, p)
    settings = EvalSettings(**{f: getattr(p, f) for f in EvalSettings.__dataclass_fields__})
    out = evaluate(rep, eval_path, d, settings, probe_path)
    workdir = Path(spec.outputs.workdir)
    needed = set()
    if out is not None and settings.concepts_top_k:
        concepts = out.concepts.top_segments(out.concept_prototypes, settings.concepts_top_k)
        needed = {s.key for segs in concepts.values() for _, s in segs}
    needed = set().union(*all_gather(needed))
    images = {k: im for k, im, _ in shards.iter_samples(eval_path, rank=d.rank, world_size=d.world_size, allow_parts=True)
              if k in needed}
    images = {k: v for part in all_gather(images) for k, v in part.items()}
    if out is None:
        barrier()
        return None
    metrics = dict(out.metrics)
    metrics["time/eval_s"] = time.perf_counter() - t0
    write_json(workdir / "evaluation.json", {"representation": rep.stage, "metrics": metrics, "details": out.details})
    if settings.concepts_top_k:
        write_concepts_html(workdir / "concepts.html", concepts, images, f"{spec.name}: visual concepts of {rep.stage}")
    log_metrics(spec, metrics)
    _log_artifacts(spec, workdir)
    log.info("%s (%s): k-means mIoU %.3f, overclustering mIoU %.3f, community mIoU %.3f%s", spec.name, rep.stage,
             metrics["eval/kmeans/miou"], metrics["eval/overcluster/miou"], metrics["eval/community/miou"],
             f", prototypes mIoU {metrics['eval/prototypes/miou']:.3f}" if "eval/prototypes/miou" in metrics else "")
    barrier()
    return StageResult(metrics=metrics)


def _log_artifacts(spec: StageSpec, workdir: Path) -> None:
    if spec.tracking.run_id is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=spec.tracking.mlflow_uri)
    for name in ("evaluation.json", "concepts.html"):
        if (workdir / name).is_file():
            client.log_artifact(spec.tracking.run_id, str(workdir / name), "representation")
