"""PartDistillation end to end through the real machinery: local executor, DeepSpeed, MLflow SQLite, DVC.

Tiny data and few steps: this checks that every stage runs, hands its outputs to the next, is
versioned and registered, and that the report is produced -- not the method's quality (the demo
run in the README measures that).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

SMALL_WORLD = {"image_size": 64, "num_classes": 3, "num_part_types": 8, "train_images": 24, "eval_images": 8}
CONFIG = {
    "pipeline": "partdistillation",
    "workspace": {"root": "ws", "data": "data"},
    "resources": {"replicas": 1, "nproc_per_node": 1},
    "deepspeed": {"zero_stage": 2, "train_micro_batch_size_per_gpu": 4},
    "partdistillation": {
        "train": "pw/train", "eval": "pw/eval",
        "teacher": {"params": {"steps": 4, "checkpoint_every": 2}},
        "mining": {"k": 4, "objects": "gt"},
        "proposals": {"rounds": 1, "train": {"steps": 3}},
        "ranking": {"rounds": 1, "train": {"steps": 3}, "one_stage_rounds": 1, "kmeans_baseline": True},
    },
}


def selftrain(cwd: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"selftrain {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.slow
def test_partdistillation_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    (tmp_path / "pw.yaml").write_text(yaml.safe_dump(SMALL_WORLD))
    (tmp_path / "pd.yaml").write_text(yaml.safe_dump(CONFIG))
    selftrain(tmp_path, "data", "generate", "-c", "pw.yaml", "-o", "data/pw", "--no-version")

    out = " ".join(selftrain(tmp_path, "run", "pd.yaml", "--run", "e2e").split())
    for table_row in ("naive strips", "mined k-means", "round 1", "one-stage, round 1", "PartDistillation, round 1", "k-means (pixels, per class)"):
        assert f"| {table_row} |" in out, table_row
    report = tmp_path / "ws" / "runs" / "e2e" / "report"
    assert (report / "metrics_by_round.png").stat().st_size > 0
    assert (report / "purity" / "index.html").exists()

    # lineage: registered models with aliases, datasets versioned in the workspace's DVC repo
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ws' / 'mlflow' / 'mlflow.db'}")
    for name in ("partdistillation-instance-teacher", "partdistillation-part-proposals", "partdistillation-part-ranker"):
        assert client.search_model_versions(f"name='{name}'"), name
    assert str(client.get_model_version_by_alias("partdistillation-part-proposals", "teacher").version) == "1"
    mined = tmp_path / "ws" / "runs" / "e2e" / "datasets" / "mined-train"
    assert yaml.safe_load(mined.with_name("mined-train.dvc").read_text())["outs"][0]["md5"].endswith(".dir")
    assert any((tmp_path / "ws" / "dvc-remote").rglob("*")), "datasets were pushed to the DVC remote"

    # the mined proposals never carry part labels
    from trainers.data.shards import iter_samples

    for _, _, record in iter_samples(mined):
        assert "parts" not in record and record["proposals"]

    # re-running the same run skips every stage
    stages = out.count("] running ")
    again = selftrain(tmp_path, "run", "pd.yaml", "--run", "e2e")
    marker = json.loads((tmp_path / "ws" / "runs" / "e2e" / "instance-teacher" / "stage.json").read_text())
    assert marker["status"] == "succeeded"
    assert stages >= 15 and again.count("] skipped: outputs exist") == stages and "] running " not in again
