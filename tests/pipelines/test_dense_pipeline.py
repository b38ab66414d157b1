"""The dense pipeline end to end through the real machinery (local executor, DeepSpeed, MLflow SQLite, DVC) on a tiny
PartWorld: slotcon trained a few steps, evaluated on val (promotion) and eval beside its backbone at random init, plus
an extra representation file as a further row (how a PASS representation enters the table). Leopart's stage runs in
tests/trainers/stages/test_leopart.py; here it would double the run time (each stage is a process with DeepSpeed).

Few steps of test-sized timm models: the assertions are on real values (finite metrics, the table matching the stages'
results, the alias moved by the val metric), not on the methods' quality (BENCHMARKS.md measures that).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]
SMALL_WORLD = {"image_size": 64, "num_classes": 3, "num_part_types": 6, "train_images": 24, "val_images": 8, "eval_images": 8}
COMMON = {"num_prototypes": 4, "dim": 16, "hidden_dim": 32, "steps": 4, "lr": 3e-3, "warmup_steps": 1, "checkpoint_every": 100}
CONFIG = {
    "pipeline": "dense",
    "workspace": {"root": "ws", "data": "data"},
    "resources": {"replicas": 1, "nproc_per_node": 1},
    "deepspeed": {"zero_stage": 2, "train_micro_batch_size_per_gpu": 4},
    "dense": {
        "train": "pw/train", "val": "pw/val", "eval": "pw/eval", "probe": "pw/train", "methods": ["slotcon"],
        "slotcon": {"params": {**COMMON, "backbone": "test_convnext", "output_stride": 8, "crop_size": 48}},
        "leopart": {"params": {**COMMON, "backbone": "test_vit", "global_size": 64, "local_size": 32, "num_local": 1}},
        "evaluation": {"params": {"fit_pixels": 1000, "probe_pixels": 1000, "probe_epochs": 10, "overcluster_k": 6,
                                  "concepts_top_k": 2, "batch_size": 8}},
    },
}


def selftrain(cwd: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"selftrain {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_the_demo_config_renders(tmp_path: Path) -> None:
    selftrain(REPO, "render", "configs/dense-demo.yaml", "-o", str(tmp_path / "m"), "--run", "demo")
    names = sorted(p.name for p in (tmp_path / "m").glob("*.yaml"))
    assert names == ["00-slotcon.yaml", "01-slotcon-val.yaml", "02-slotcon-eval.yaml", "03-slotcon-random-init-eval.yaml",
                     "04-leopart.yaml", "05-leopart-val.yaml", "06-leopart-eval.yaml", "07-leopart-random-init-eval.yaml"]
    job = yaml.safe_load((tmp_path / "m" / "01-slotcon-val.yaml").read_text())
    spec = json.loads(next(e["value"] for c in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
                           for e in c.get("env", []) if e["name"] == "SELFTRAIN_SPEC"))
    assert spec["promotion"]["metric"] == "kmeans/miou" and spec["inputs"]["datasets"]["eval"]["path"].endswith("partworld-demo/val")


@pytest.mark.slow
def test_dense_runs_end_to_end_and_compares_every_representation(tmp_path: Path) -> None:
    import torch

    from trainers.dense.backbone import DenseBackbone
    from trainers.dense.io import read_representation, save_representation

    torch.manual_seed(1)
    extra = save_representation(tmp_path / "pass.pt", "test_convnext", DenseBackbone("test_convnext", {"output_stride": 8}).model.state_dict(),
                                "represent", extra={"model_kwargs": {"output_stride": 8}})
    config = {**CONFIG, "dense": {**CONFIG["dense"], "representations": {"PASS": str(extra)}}}
    (tmp_path / "pw.yaml").write_text(yaml.safe_dump(SMALL_WORLD))
    (tmp_path / "dense.yaml").write_text(yaml.safe_dump(config))
    selftrain(tmp_path, "data", "generate", "-c", "pw.yaml", "-o", "data/pw", "--no-version")

    out = " ".join(selftrain(tmp_path, "run", "dense.yaml", "--run", "e2e", "--max-parallel", "2").split())
    assert "| SlotCon |" in out and "| PASS |" in out
    run_dir = tmp_path / "ws" / "runs" / "e2e"
    table = json.loads((run_dir / "report" / "summary.json").read_text())["table"]

    def metrics(stage: str) -> dict:
        return json.loads((run_dir / stage / "result.json").read_text())["metrics"]

    assert list(table) == ["SlotCon backbone, random init", "SlotCon", "PASS"]
    for label, stage in (("SlotCon", "slotcon-eval"), ("PASS", "PASS-eval")):
        assert table[label]["k-means mIoU"] == metrics(stage)["eval/kmeans/miou"] and 0 < table[label]["k-means mIoU"] <= 1
        assert 0 < table[label]["linear probe mIoU"] <= 1
    assert table["SlotCon"]["gain over random init (k-means mIoU)"] == pytest.approx(
        metrics("slotcon-eval")["eval/kmeans/miou"] - metrics("slotcon-random-init-eval")["eval/kmeans/miou"])
    assert math.isfinite(table["SlotCon"]["prototypes mIoU"]) and math.isnan(table["PASS"]["prototypes mIoU"])
    assert (run_dir / "slotcon-eval" / "concepts.html").stat().st_size > 0

    # every trained model is a representation file; the aliases moved on the val split's metric, never eval's
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ws' / 'mlflow' / 'mlflow.db'}")
    for model, stage in (("dense-slotcon", "slotcon"),):
        assert read_representation(run_dir / stage / "model.pt")["stage"] == stage
        holder = client.get_model_version_by_alias(model, "champion")
        assert holder.tags["promotion.champion.decision"] == "promoted"
        assert float(holder.tags["promotion.champion.candidate_value"]) == pytest.approx(metrics(f"{stage}-val")["eval/kmeans/miou"])
