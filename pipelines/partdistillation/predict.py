"""``selftrain predict``: a registered model's predictions on a dataset as the COCO results files its evaluating stage
writes (issue "PartDistillation measured honestly", item 2), re-scorable outside the project.

The control plane resolves ``models:/`` URIs in the config's MLflow registry and runs the data-plane predictor
(``python -m trainers.evaluation.part_predictions``) in a child process: the control plane never imports torch.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from contract.models import resolve_model


def predict(model: str, dataset: Path, output: Path, config: Path | None = None, instance_teacher: str | None = None,
            top_k: int | None = None, min_size: int | None = None, max_size: int | None = None,
            pixel_assignment: str = "soft") -> dict[str, str]:
    """Write ``model``'s predictions on ``dataset`` into the folder ``output``; returns file name -> path. ``min_size`` /
    ``max_size``: the input size the model sees (as the stages' params; predictions at the dataset's resolution);
    ``pixel_assignment``: a part ranker's cluster map (evaluate-parts' param of that name)."""
    tracking_uri = None
    registered = any(str(m).startswith("models:/") for m in (model, instance_teacher) if m)
    if registered and config is not None:
        from pipelines.config import load_config

        tracking_uri = load_config(config).tracking_uri()
    if not (Path(dataset) / "index.json").is_file():
        raise FileNotFoundError(f"{dataset}: not a dataset (no index.json)")
    with tempfile.TemporaryDirectory(prefix="selftrain-predict-") as tmp:
        path = resolve_model(model, tracking_uri, dst=Path(tmp) / "model")
        cmd = [sys.executable, "-m", "trainers.evaluation.part_predictions", str(path), str(dataset), "-o", str(output)]
        if instance_teacher:
            cmd += ["--instance-teacher", str(resolve_model(instance_teacher, tracking_uri, dst=Path(tmp) / "teacher"))]
        if top_k:
            cmd += ["--top-k", str(top_k)]
        cmd += ["--pixel-assignment", pixel_assignment]
        for flag, v in (("--min-size", min_size), ("--max-size", max_size)):
            cmd += [flag, str(v)] if v else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValueError(f"predicting {model} on {dataset} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
