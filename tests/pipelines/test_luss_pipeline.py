"""PASS/LUSS end to end through the real machinery (local executor, DeepSpeed, MLflow SQLite, DVC) on a tiny PartWorld,
and `selftrain render configs/luss-demo.yaml` checked against the training operator's PyTorchJob CRD.

Few steps of a tiny backbone: the assertions are on real values (the LUSS metrics of every row computed, the aliases
moved by the val metric, the generated labels free of ground truth, predictions readable in ImageNet-S's encoding),
not on the method's quality (the demo in BENCHMARKS.md measures that).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]
SMALL_WORLD = {"image_size": 64, "num_classes": 3, "num_part_types": 8, "train_images": 32, "val_images": 6, "eval_images": 6}
TINY = {"backbone": "test_convnext", "checkpoint_every": 1000, "warmup_steps": 0}
CONFIG = {
    "pipeline": "luss",
    "workspace": {"root": "ws", "data": "data"},
    "resources": {"replicas": 1, "nproc_per_node": 1},
    "deepspeed": {"zero_stage": 2, "train_micro_batch_size_per_gpu": 8},
    "luss": {
        "train": "luss/unlabeled", "val": "pw/val", "eval": "pw/eval", "labeled": "few/few", "k": 3,
        "represent": {"params": {**TINY, "steps": 3, "global_size": 64, "local_size": 32, "local_count": 2, "grid_size": 4,
                                 "num_prototypes": 16, "hidden_dim": 32, "feat_dim": 16, "queue_length": 16}},
        "pixel_attention": {"params": {"steps": 2, "global_size": 64, "checkpoint_every": 1000}},
        "generate_labels": {"threshold": "otsu", "params": {"batch_size": 16}},
        "finetune": {"params": {"steps": 3, "crop_size": 64, "checkpoint_every": 1000}},
        "baselines": ["kmeans_random"],  # the pretrained baseline and the sweep of K run the same stages (the demo has them)
        "protocols": ["distance_matching"],
    },
}


def selftrain(cwd: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"selftrain {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_the_demo_config_renders_jobs_the_pytorchjob_crd_accepts(tmp_path: Path) -> None:
    from test_render import _check, _crd_schema

    selftrain(REPO, "render", "configs/luss-demo.yaml", "-o", str(tmp_path / "m"), "--run", "demo")
    files = sorted((tmp_path / "m").glob("*.yaml"))
    names = [p.name.split("-", 1)[1] for p in files]
    assert names[:4] == ["represent.yaml", "random-init.yaml", "pixel-attention.yaml", "labels-k12.yaml"]
    schema = _crd_schema()
    specs = {}
    for p in files:
        job = yaml.safe_load(p.read_text())
        assert _check(json.loads(json.dumps(job)), schema) == [], p.name
        env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
        specs[p.stem.split("-", 1)[1]] = json.loads(next(e["value"] for e in env if e["name"] == "SELFTRAIN_SPEC"))
    val = specs["finetune-val"]
    assert val["promotion"]["metric"] == "luss/miou" and val["inputs"]["datasets"]["eval"]["path"].endswith("partworld-demo/val")
    assert specs["finetune-eval"]["promotion"] is None
    assert all(s["promotion"] is None for n, s in specs.items() if n != "finetune-val")


@pytest.mark.slow
def test_luss_runs_end_to_end_and_promotes_on_val(tmp_path: Path) -> None:
    (tmp_path / "pw.yaml").write_text(yaml.safe_dump(SMALL_WORLD))
    (tmp_path / "luss.yaml").write_text(yaml.safe_dump(CONFIG))
    selftrain(tmp_path, "data", "generate", "-c", "pw.yaml", "-o", "data/pw", "--no-version")
    selftrain(tmp_path, "data", "split", "data/pw/train", "--fractions", "unlabeled=1", "--strip-labels", "unlabeled", "-o", "data/luss")
    selftrain(tmp_path, "data", "split", "data/pw/train", "--fractions", "few=0.25,rest=0.75", "--seed", "1", "-o", "data/few")

    out = " ".join(selftrain(tmp_path, "run", "luss.yaml", "--run", "e2e").split())
    assert "| PASS fine-tuned (K=3) |" in out and "| k-means K+1=4, random init |" in out
    run_dir = tmp_path / "ws" / "runs" / "e2e"
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    for row in summary["table"].values():  # every row scored on both splits, fractions in [0, 1]
        for col in ("mIoU val", "mIoU eval", "b-mIoU eval", "Img-Acc eval", "Fβ eval"):
            assert 0 <= row[col] <= 1, (row, col)
    assert set(summary["miou_vs_k"]["PASS labels"]) == {"3"}
    assert all(math.isfinite(v) for row in summary["other_protocols"].values() for v in row.values())
    assert (run_dir / "report" / "miou_vs_k.png").stat().st_size > 0

    def result(stage: str) -> dict:
        return json.loads((run_dir / stage / "result.json").read_text())

    # the generated labels: no ground truth copied, every image labelled, the rule beside them
    from trainers.data.shards import iter_samples
    from trainers.luss.labels import LabelRule

    labels = result("labels-k3")["metrics"]
    records = [r for _, _, r in iter_samples(run_dir / "datasets" / "labels-k3")]
    assert len(records) == labels["labels/images"] == 32 and labels["labels/objects_dropped"] == 0  # stripped images
    assert not any("objects" in r for r in records)
    assert sum(len(r["proposals"]) for r in records) == labels["labels/proposals"]
    rule, centroids = LabelRule.load(run_dir / "datasets" / "labels-k3")
    assert rule.k == 3 and centroids.shape[0] == 3 and 0 < rule.threshold < 1
    # the label-free polarity check ran (polarity: auto) and the rule records what it decided
    assert rule.attention_flipped == (labels["labels/border_contrast"] < 0) == bool(labels["labels/attention_flipped"])

    # promotion read the val split's metric, never the reported split's
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ws' / 'mlflow' / 'mlflow.db'}")
    holder = client.get_model_version_by_alias("luss-segmentation", "teacher")
    assert holder.tags["promotion.teacher.decision"] == "promoted"
    assert float(holder.tags["promotion.teacher.candidate_value"]) == pytest.approx(result("finetune-val")["metrics"]["luss/miou"])

    # predictions in ImageNet-S's encoding: raw generated ids, and matched ones in category ids
    from trainers.data.imagenet_s import decode_label_png

    preds = run_dir / "datasets" / "predictions-finetune-eval"
    raw = [decode_label_png(p) for p in sorted((preds / "predictions").rglob("*.png"))]
    assert len(raw) == 6 and max(int(r.max()) for r in raw) <= 3
    match = json.loads((preds / "match.json").read_text())
    assert match["mapping"]["0"] == 0 and match["protocol"] == "fully_unsupervised"
    assert {int(v) for r in (decode_label_png(p) for p in (preds / "matched").rglob("*.png")) for v in np.unique(r)} <= {0, 1, 2, 3}
