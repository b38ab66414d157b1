"""The local executor runs a checked-in manifest from manifests/ (its PVCs mapped to local folders, the cluster's
MLflow Service played by a local ``mlflow server``): the whole stage job, trainer and registration, changed only
in where MLflow is and in a shorter schedule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.executors.local import LocalExecutor
from pipelines.render import load_manifest
from trainers.data import partworld, shards
from trainers.models.io import load_segmenter

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "manifests" / "pipeline" / "00-instance-teacher.yaml"


@pytest.mark.slow
def test_local_executor_runs_the_first_stage_manifest(tmp_path: Path, mlflow_server: str) -> None:
    job = load_manifest(MANIFEST)
    env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    var = next(e for e in env if e["name"] == "SELFTRAIN_SPEC")
    spec = json.loads(var["value"])
    spec["tracking"]["mlflow_uri"] = mlflow_server  # where the MLflow Service is
    spec["params"]["steps"] = 30  # and a short schedule (the demo's 400 steps are the benchmark's business)
    var["value"] = json.dumps(spec)
    # the PVC contents a cluster would hold: a (small) PartWorld under the paths the manifest names
    data, ckpt = tmp_path / "pvc-data", tmp_path / "pvc-checkpoints"
    cfg = partworld.PartWorldConfig(image_size=64, num_classes=3, num_part_types=8, train_images=16, eval_images=8)
    for split, key in (("train", "train"), ("eval", "eval")):
        rel = Path(spec["inputs"]["datasets"][key]["path"]).relative_to("/data")
        shards.write_dataset(partworld.generate(cfg, split), data / rel, name=f"pw-{split}", split=split,
                             categories=partworld.category_table(cfg),
                             part_categories=partworld.part_category_table(cfg) if split == "eval" else None)

    LocalExecutor(volumes={"selftrain-data": data, "selftrain-checkpoints": ckpt}).run(job, log_dir=tmp_path / "logs")

    workdir = ckpt / Path(spec["outputs"]["workdir"]).relative_to("/checkpoints")
    result = json.loads((workdir / "result.json").read_text())
    assert result["status"] == "succeeded" and result["steps"] > 0
    assert "eval/mask_AP" in result["metrics"]
    model = load_segmenter(workdir / "model.pt")
    assert isinstance(model(torch.zeros(1, 3, 64, 64)), dict)
    # the job registered its model itself, under the stage's run of pipeline run "demo"
    marker = json.loads((workdir / "stage.json").read_text())
    assert marker["status"] == "succeeded" and marker["model_version"]
    from mlflow import MlflowClient

    mv = MlflowClient(mlflow_server).get_model_version(spec["outputs"]["model"], marker["model_version"])
    assert mv.tags["selftrain.run"] == "demo" and mv.tags["selftrain.stage"] == spec["name"]
