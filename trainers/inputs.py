"""A stage's inputs and outputs as its spec names them: datasets, models, the output dataset, MLflow metrics.

Every error names the input (``inputs.datasets.<name>``, ``inputs.models.<name>``) so a failed stage
says which part of its spec is wrong.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from contract.spec import StageSpec
from trainers.data import shards


class StageInputError(ValueError):
    """A stage input named in the spec is missing or unreadable; the message names the input."""


def stage_device(spec: StageSpec) -> torch.device:
    """cuda:<LOCAL_RANK> when the spec asks for GPUs and one is visible, else cpu."""
    if spec.resources.gpus_per_replica > 0 and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def dataset_input(spec: StageSpec, name: str) -> str:
    """Path of ``spec.inputs.datasets[name]``; StageInputError when it is not in the spec or not a published dataset."""
    ref = spec.inputs.datasets.get(name)
    if ref is None:
        raise StageInputError(f"stage {spec.stage!r} needs inputs.datasets.{name} "
                              f"(the spec has: {sorted(spec.inputs.datasets) or 'none'})")
    try:
        shards.DatasetIndex.load(ref.path)
    except shards.DataError as e:
        raise StageInputError(f"inputs.datasets.{name}: {e}") from None
    return ref.path


def output_dataset(spec: StageSpec) -> Path:
    """``outputs.dataset``; StageInputError when the spec has none."""
    if not spec.outputs.dataset:
        raise StageInputError(f"stage {spec.stage!r} needs outputs.dataset (the directory of the dataset it writes)")
    return Path(spec.outputs.dataset)


def model_input_path(spec: StageSpec, name: str) -> Path:
    """Local file of ``spec.inputs.models[name]`` (a ``models:/`` URI is resolved through MLflow)."""
    from contract.models import resolve_model

    ref = spec.inputs.models.get(name)
    if ref is None:
        raise StageInputError(f"stage {spec.stage!r} needs inputs.models.{name} "
                              f"(the spec has: {sorted(spec.inputs.models) or 'none'})")
    try:
        return Path(resolve_model(ref.uri, spec.tracking.mlflow_uri))
    except Exception as e:  # FileNotFoundError, MLflow lookup errors
        raise StageInputError(f"inputs.models.{name} ({ref.uri}): {e}") from e


def load_model_input(spec: StageSpec, name: str, device: torch.device | None = None):
    """The Segmenter of ``spec.inputs.models[name]`` (a segmenter file, see ``trainers.models.io``), in eval mode on ``device``."""
    from trainers.models.io import load_segmenter

    path = model_input_path(spec, name)
    try:
        model = load_segmenter(path)
    except (FileNotFoundError, ValueError) as e:
        raise StageInputError(f"inputs.models.{name}: {e}") from e
    return model.to(device or stage_device(spec)).eval()


def log_metrics(spec: StageSpec, metrics: dict[str, float], step: int = 0) -> None:
    """Metrics to the stage's MLflow run (when the spec names one); call on rank 0 only (non-training stages)."""
    if spec.tracking.run_id is None or not metrics:
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    MlflowClient(tracking_uri=spec.tracking.mlflow_uri).log_batch(
        spec.tracking.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def fetch_model_file(source: str, spec: StageSpec, what: str) -> Path:
    """Local file of a model reference that is not a spec input (e.g. ``params.import_from``): a path, a
    ``models:/`` URI or an http(s) URL (downloaded once into ``<workdir>/imported``). Errors name ``what``."""
    if source.startswith(("http://", "https://")):
        from contract.io import write_atomic

        dst = Path(spec.outputs.workdir) / "imported" / Path(source.split("?")[0]).name
        if not dst.is_file():
            import urllib.request

            with urllib.request.urlopen(source) as r:  # noqa: S310 (a URL the spec names)
                write_atomic(dst, r.read())
        return dst
    from contract.models import resolve_model

    try:
        return Path(resolve_model(source, spec.tracking.mlflow_uri))
    except Exception as e:
        raise StageInputError(f"{what} ({source}): {e}") from e
