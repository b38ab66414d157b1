"""CaSP end to end through the real machinery (local executor, DeepSpeed, MLflow SQLite, DVC) on a tiny PartWorld
split by `selftrain data split`, and `selftrain render configs/casp-demo.yaml`.

Few steps of a tiny model: the assertions are on real values (a finetuned class-agnostic AP above 0, the aliases moved
by the val metric, the table rows with finite values, the pseudo-labels free of ground truth), not on the method's
quality (the demo in BENCHMARKS.md measures that).
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
SMALL_WORLD = {"image_size": 64, "num_classes": 3, "num_part_types": 8, "train_images": 48, "val_images": 8, "eval_images": 8}
TINY = {"model": {"encoder": {"backbone": "test_convnext", "pixel_dim": 16, "mask_dim": 16, "norm_groups": 4},
                  "decoder": {"num_queries": 8, "hidden_dim": 16, "num_heads": 2, "dim_feedforward": 32, "num_layers": 2},
                  "loss": {"num_points": 0}},
        "checkpoint_every": 1000, "warmup_steps": 2, "lr": 3e-3}
CONFIG = {
    "pipeline": "casp",
    "workspace": {"root": "ws", "data": "data"},
    "resources": {"replicas": 1, "nproc_per_node": 1},
    "deepspeed": {"zero_stage": 0, "train_micro_batch_size_per_gpu": 4},
    "casp": {
        "labeled": "semi/labeled", "unlabeled": "semi/unlabeled", "val": "pw/val", "eval": "pw/eval",
        "delta": 0.1,
        "early_pretrain": {"params": {**TINY, "steps": 40}},
        "late_pretrain": {"params": {**TINY, "steps": 40}},
        "finetune": {"params": {**TINY, "steps": 40}},
        "baselines": ["no_pretraining"],
    },
}


def selftrain(cwd: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"selftrain {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_the_demo_config_renders(tmp_path: Path) -> None:
    selftrain(REPO, "render", "configs/casp-demo.yaml", "-o", str(tmp_path / "m"), "--run", "demo")
    names = sorted(p.name for p in (tmp_path / "m").glob("*.yaml"))
    assert names[:3] == ["00-early-pretrain.yaml", "01-pseudo-label.yaml", "02-late-pretrain.yaml"]
    assert {"06-finetune-val.yaml", "07-finetune-eval.yaml"} <= set(names)
    job = yaml.safe_load((tmp_path / "m" / "06-finetune-val.yaml").read_text())
    spec = json.loads(next(e["value"] for c in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
                           for e in c.get("env", []) if e["name"] == "SELFTRAIN_SPEC"))
    assert spec["promotion"]["metric"] == "mask_AP_agnostic" and spec["inputs"]["datasets"]["eval"]["path"].endswith("partworld-demo/val")


@pytest.mark.slow
def test_casp_runs_end_to_end_and_promotes_on_val(tmp_path: Path) -> None:
    (tmp_path / "pw.yaml").write_text(yaml.safe_dump(SMALL_WORLD))
    (tmp_path / "casp.yaml").write_text(yaml.safe_dump(CONFIG))
    selftrain(tmp_path, "data", "generate", "-c", "pw.yaml", "-o", "data/pw", "--no-version")
    selftrain(tmp_path, "data", "split", "data/pw/train", "--fractions", "labeled=0.25,unlabeled=0.75", "--seed", "0",
              "--strip-labels", "unlabeled", "-o", "data/semi")

    out = " ".join(selftrain(tmp_path, "run", "casp.yaml", "--run", "e2e").split())
    assert "| none (random init) |" in out and "| Objects(P,A) = CaSP |" in out
    run_dir = tmp_path / "ws" / "runs" / "e2e"
    table = json.loads((run_dir / "report" / "summary.json").read_text())["table2"]
    casp = table["Objects(P,A) = CaSP"]
    assert all(math.isfinite(v) for row in table.values() for k, v in row.items() if k.startswith("finetuned"))
    assert math.isfinite(casp["pretrained AP^seg-a"]) and casp["finetuned AP^seg-a"] > 0
    assert (run_dir / "report" / "table2.png").stat().st_size > 0

    def metrics(stage: str) -> dict:
        return json.loads((run_dir / stage / "result.json").read_text())["metrics"]

    # the pseudo-labels: scores above delta, no ground truth, images without a pseudo-label left out
    from trainers.data.shards import iter_samples

    pseudo = metrics("pseudo-label")
    records = [r for _, _, r in iter_samples(run_dir / "datasets" / "pseudo-labels")]
    assert len(records) == pseudo["pseudo/images"] - pseudo["pseudo/images_without_labels"] > 0
    assert all(r["objects"] == [] and r["proposals"] and min(p["score"] for p in r["proposals"]) > 0.1 for r in records)

    # promotion read the val split's metric, never the reported split's
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ws' / 'mlflow' / 'mlflow.db'}")
    for model, stage in (("casp-finetuned", "finetune"), ("casp-pretrained", "late-pretrain")):
        holder = client.get_model_version_by_alias(model, "teacher")
        assert holder.tags["promotion.teacher.decision"] == "promoted"
        assert float(holder.tags["promotion.teacher.candidate_value"]) == pytest.approx(metrics(f"{stage}-val")["eval/mask_AP_agnostic"])
    assert client.search_model_versions("name='casp-labeling-detector'") and client.search_model_versions("name='casp-baselines'")

    # predictions as COCO results files, versioned with DVC
    preds = run_dir / "datasets" / "predictions-finetune-eval"
    results = json.loads((preds / "results.json").read_text())
    assert len(results) == metrics("finetune-eval")["eval/predictions"] > 0
    assert yaml.safe_load(preds.with_name("predictions-finetune-eval.dvc").read_text())["outs"][0]["md5"].endswith(".dir")


def test_the_delta_sweep_adds_one_chain_per_delta_and_reuses_the_main_one(tmp_path: Path) -> None:
    """Table 7: configs/casp-delta-sweep.yaml builds a pseudo-label -> late-pretrain -> eval chain per delta from the
    one labeling detector; the main chain's delta is not run twice; the report's table reads each chain's stages."""
    from types import SimpleNamespace

    from pipelines.casp import graph, report
    from pipelines.config import load_config

    cfg = load_config(REPO / "configs" / "casp-delta-sweep.yaml")
    specs = {s.name: s for s in cfg.stage_specs("sweep")}
    chains = graph.sweep_stages(cfg)
    assert [d for d, _, _ in chains] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert chains[1] == (0.2, graph.PSEUDO, graph.LATE)
    assert "pseudo-label-delta20" not in specs and "late-pretrain-delta20" not in specs
    for delta, pseudo, late in chains:
        assert specs[pseudo].params["delta"] == delta and specs[pseudo].inputs.models["detector"].uri == f"stage:{graph.EARLY}"
        assert specs[late].inputs.datasets["train"].path == specs[pseudo].outputs.dataset
        if late != graph.LATE:  # the sweep's models are scored on eval and never promoted
            assert specs[graph.eval_stage(late)].promotion is None and graph.val_stage(late) not in specs

    outcomes = [SimpleNamespace(name=pseudo, result={"metrics": {"pseudo/labels": 10 * i, "pseudo/images": 20,
                                                                  "pseudo/images_without_labels": i}})
                for i, (_, pseudo, _) in enumerate(chains)]
    outcomes += [SimpleNamespace(name=graph.eval_stage(late), result={"metrics": {"eval/mask_AP_agnostic": 0.1 * i}})
                 for i, (_, _, late) in enumerate(chains)]
    rows = report.sweep_table(outcomes, cfg)
    assert [r["images kept"] for r in rows] == [20, 19, 18, 17, 16]
    text = report.format_sweep(rows)
    assert "| late-pretraining AP^seg-a (%) | 0.0 | 10.0 | 20.0 | 30.0 | 40.0 |" in text
    assert report.plot_sweep(rows, tmp_path / "t7.png").stat().st_size > 0


def test_a_delta_sweep_with_deltas_that_share_a_stage_name_is_refused(tmp_path: Path) -> None:
    cfg = yaml.safe_load((REPO / "configs" / "casp-delta-sweep.yaml").read_text())
    cfg["casp"]["delta_sweep"] = [0.2, 0.201]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "render", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "m")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "delta_sweep" in proc.stderr + proc.stdout


def test_joint_self_training_joins_the_labeled_split_with_class_specific_pseudo_labels(tmp_path: Path) -> None:
    """Table 6's self-training row: the no-pretraining model's class-specific pseudo-labels joined with D^t, one model
    trained from random init with targets joint, scored on eval only (never promoted)."""
    from pipelines.casp import graph
    from pipelines.config import load_config

    cfg = yaml.safe_load((REPO / "configs" / "casp-demo.yaml").read_text())
    cfg["casp"]["baselines"] = ["joint_self_training"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_config(tmp_path / "c.yaml")
    specs = {s.name: s for s in loaded.stage_specs("j")}
    pseudo = specs[graph.SPECIFIC_PSEUDO]
    assert pseudo.params["class_agnostic"] is False and pseudo.inputs.models["detector"].uri == f"stage:{graph.NO_PRETRAINING}"
    join = specs[graph.JOINT_DATA]
    assert join.stage == "join-datasets" and join.inputs.datasets["extra"].path == pseudo.outputs.dataset
    assert join.inputs.datasets["images"].path.endswith("casp-demo/labeled")
    joint = specs[graph.JOINT]
    assert joint.params["targets"] == "joint" and joint.inputs.datasets["train"].path == join.outputs.dataset
    assert not joint.inputs.models and graph.val_stage(graph.JOINT) not in specs and graph.eval_stage(graph.JOINT) in specs
    assert graph.SPECIFIC_PRETRAIN not in specs  # the (P,S) pretraining row is its own baseline
    assert ("self-training: D^t + (P,S)", None, graph.JOINT) in graph.table_rows(loaded)
