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

SMALL_WORLD = {"image_size": 64, "num_classes": 3, "num_part_types": 8, "train_images": 24, "eval_images": 8, "val_images": 4}
CONFIG = {
    "pipeline": "partdistillation",
    "workspace": {"root": "ws", "data": "data"},
    "resources": {"replicas": 1, "nproc_per_node": 1},
    "deepspeed": {"zero_stage": 2, "train_micro_batch_size_per_gpu": 4},
    "partdistillation": {
        "train": "pw/train", "val": "pw/val", "eval": "pw/eval",
        "teacher": {"params": {"steps": 4, "checkpoint_every": 2}},
        "mining": {"k": 4, "objects": "gt"},
        "proposals": {"rounds": 1, "train": {"steps": 3}},
        # the val evaluations add stages; to keep this test's time, the baselines' stages are covered elsewhere: the
        # graph by the tests below, k-means and one-stage stages by tests/trainers/stages/test_cluster_pixels.py
        "ranking": {"rounds": 1, "train": {"steps": 3}, "one_stage_rounds": 0, "kmeans_baseline": False},
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
    for table_row in ("naive strips", "mined k-means", "round 1", "PartDistillation, round 1"):
        assert f"| {table_row} |" in out, table_row
    assert "part proposals: val picks round 1" in out
    report = tmp_path / "ws" / "runs" / "e2e" / "report"
    assert (report / "metrics_by_round.png").stat().st_size > 0
    assert (report / "purity" / "index.html").exists()

    # lineage: registered models with aliases, datasets versioned in the workspace's DVC repo
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ws' / 'mlflow' / 'mlflow.db'}")
    for name in ("partdistillation-instance-teacher", "partdistillation-part-proposals", "partdistillation-part-ranker"):
        assert client.search_model_versions(f"name='{name}'"), name
    teacher = client.get_model_version_by_alias("partdistillation-part-proposals", "teacher")
    assert str(teacher.version) == "1" and teacher.tags["promotion.teacher.decision"] == "promoted"

    # every evaluating stage wrote its predictions; the reported numbers come back from the files alone
    from trainers.evaluation.part_predictions import score_part_results
    from trainers.evaluation.proposals import score_proposal_results

    run_dir = tmp_path / "ws" / "runs" / "e2e"
    reported = json.loads((run_dir / "f1-evaluate" / "result.json").read_text())["metrics"]
    rescored = score_part_results(str(tmp_path / "data" / "pw" / "eval"), run_dir / "datasets" / "predictions-f1-evaluate")
    assert rescored == {k: reported[k] for k in rescored}
    reported = json.loads((run_dir / "r1-evaluate" / "result.json").read_text())["metrics"]
    rescored = score_proposal_results(str(tmp_path / "data" / "pw" / "eval"), run_dir / "datasets" / "predictions-r1-evaluate")
    assert rescored == {k: reported[k] for k in rescored}
    assert (run_dir / "datasets" / "predictions-r1-val.dvc").exists()
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
    assert stages >= 12 and again.count("] skipped: outputs exist") == stages and "] running " not in again


def _config(tmp_path: Path, **selection):
    from pipelines.config import config_from_dict
    from pipelines.partdistillation import PartDistillationConfig

    data = {**CONFIG, "partdistillation": {**CONFIG["partdistillation"], "selection": selection,
                                           "proposals": {"rounds": 2, "train": {"steps": 3}},
                                           "ranking": {**CONFIG["partdistillation"]["ranking"], "rounds": 2,
                                                       "one_stage_rounds": 1, "kmeans_baseline": True}}}
    return config_from_dict(data, base_dir=tmp_path, model=PartDistillationConfig)


def _datasets_feeding(specs, spec) -> set[str]:
    """Every dataset path ``spec`` reads, directly or through the stages that wrote the datasets it reads."""
    writer = {s.outputs.dataset: s for s in specs if s.outputs.dataset}
    seen, todo = set(), [d.path for d in spec.inputs.datasets.values()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path in writer:
            todo += [d.path for d in writer[path].inputs.datasets.values()]
    return seen


def test_promotion_never_reads_the_reported_split(tmp_path: Path) -> None:
    cfg = _config(tmp_path, criterion="val", holdout="pw-holdout/holdout", compare=True)
    specs = cfg.stage_specs("t")
    evaluated = str(tmp_path / "data" / "pw" / "eval")
    promoting = [s for s in specs if s.promotion is not None]
    assert {s.name for s in promoting} == {"r1-val", "r2-val", "f1-val", "f2-val", "one-stage-r1-val"}
    for s in promoting:
        assert s.inputs.datasets["eval"].path == str(tmp_path / "data" / "pw" / "val"), s.name
        assert evaluated not in _datasets_feeding(specs, s), s.name
    # the reporting evaluations carry no promotion rule; every model line is reported on eval
    assert all(s.promotion is None for s in specs if s.inputs.datasets.get("eval") and s.inputs.datasets["eval"].path == evaluated)
    assert {"r1-evaluate", "r2-evaluate", "f1-evaluate", "f2-evaluate", "one-stage-r1-evaluate"} <= {s.name for s in specs}


def test_label_free_selection_reads_no_part_labels(tmp_path: Path) -> None:
    cfg = _config(tmp_path, criterion="label_free", holdout="pw-holdout/holdout")
    specs = cfg.stage_specs("t")
    labelled = {str(tmp_path / "data" / "pw" / split) for split in ("val", "eval")}
    promoting = [s for s in specs if s.promotion is not None]
    assert {s.name for s in promoting} == {"r1-holdout", "r2-holdout", "f1-holdout", "f2-holdout", "one-stage-r1-holdout"}
    for s in promoting:
        assert s.params["reference"] == "pseudo_labels", s.name
        feeding = _datasets_feeding(specs, s)
        assert str(tmp_path / "data" / "pw-holdout" / "holdout") in feeding, s.name
        assert not feeding & labelled, (s.name, feeding & labelled)
    assert not any(s.name.endswith("-val") for s in specs)  # no val split needed (none compared)
    # training stages, and the labelling stages that make their targets, read the train split or what the run wrote
    # from it, never a labelled split; a labeller that reads one (allow_parts: the labels' own quality, measured) feeds
    # only reporting evaluations
    measured = {s.outputs.dataset for s in specs if s.params.get("allow_parts")}
    for s in specs:
        if s.stage in ("train-proposals", "train-ranker", "pseudo-label", "rank-parts", "rank-pseudo-label") \
                and not s.params.get("allow_parts"):
            assert not _datasets_feeding(specs, s) & labelled, s.name
        if _datasets_feeding(specs, s) & measured:
            assert s.stage in ("evaluate-proposals", "evaluate-parts") and s.promotion is None, s.name


def test_each_rounds_pseudo_labels_are_measured_as_the_next_rounds_targets(tmp_path: Path) -> None:
    """r1-pseudo-label-eval is r1-pseudo-label on the eval images (same labeller, same filters), then evaluated; the
    stage-1 table has its row between round 1 and round 2."""
    from pipelines.partdistillation import graph

    cfg = _config(tmp_path, criterion="val")
    specs = {s.name: s for s in cfg.stage_specs("t")}
    train, measured = specs["r1-pseudo-label"], specs["r1-pseudo-label-eval"]
    assert measured.params == {**train.params, "allow_parts": True}
    assert {k: m.uri for k, m in measured.inputs.models.items()} == {k: m.uri for k, m in train.inputs.models.items()}
    assert measured.inputs.datasets["images"].path == str(tmp_path / "data" / "pw" / "eval")
    assert specs[graph.labels_evaluate(1)].inputs.datasets["proposals"].path == measured.outputs.dataset
    assert "r2-pseudo-label-eval" not in specs  # the last round makes no labels
    names = [name for _, name in graph.proposal_rows(cfg)]
    assert names.index("r1-evaluate") < names.index(graph.labels_evaluate(1)) < names.index("r2-evaluate")
    order = list(specs)  # the labeller's alias must not move between the two labelling stages
    assert order.index("r1-pseudo-label") < order.index("r1-pseudo-label-eval") < order.index("r2-train-proposals")
    cfg.partdistillation.proposals.measure_labels = False
    assert not any("pseudo-label-eval" in s.name for s in cfg.stage_specs("t"))


def test_self_training_students_and_their_labels_follow_the_rounds_settings(tmp_path: Path) -> None:
    """later_rounds_augment reaches rounds 2.. only (round 1 learns the mined proposals); proposals.objects sets the
    instances the pseudo-labels are kept in, defaulting to mining.objects; a train param of the user's wins."""
    cfg = _config(tmp_path, criterion="val")
    specs = {s.name: s for s in cfg.stage_specs("t")}
    assert "augment" not in specs["r1-train-proposals"].params and "augment" not in specs["r2-train-proposals"].params
    assert specs["r1-pseudo-label"].params["objects"] == "gt"  # mining.objects of CONFIG
    cfg.partdistillation.mining.objects = "detected"
    cfg.partdistillation.proposals.later_rounds_augment = "strong"
    specs = {s.name: s for s in cfg.stage_specs("t")}
    assert specs["r1-pseudo-label"].params["objects"] == "detected" == specs["r1-pseudo-label-eval"].params["objects"]
    assert "augment" not in specs["r1-train-proposals"].params and specs["r2-train-proposals"].params["augment"] == "strong"
    cfg.partdistillation.proposals.objects = "gt"
    cfg.partdistillation.proposals.train = {"augment": "flip", "steps": 3}
    specs = {s.name: s for s in cfg.stage_specs("t")}
    assert specs["r1-pseudo-label"].params["objects"] == "gt" and specs["mine-train"].params["objects"] == "detected"
    assert specs["r2-train-proposals"].params["augment"] == "flip"


def test_label_free_selection_needs_held_out_images(tmp_path: Path) -> None:
    from pipelines.config import SpecError

    with pytest.raises((SpecError, ValueError), match="selection.holdout"):
        _config(tmp_path, criterion="label_free")


def test_one_stage_baseline_has_partdistillations_decoder_and_rounds(tmp_path: Path) -> None:
    """Item 3: like for like: PartDistillation's query count and top_k, proposals.rounds + ranking.rounds rounds;
    AR@k only up to the query count; the k-means baseline applies the train split's fit to the eval images."""
    data = {**CONFIG, "partdistillation": {**CONFIG["partdistillation"], "proposals": {"rounds": 2},
                                           "ranking": {"rounds": 1, "kmeans_baseline": True}}}
    from pipelines.config import config_from_dict
    from pipelines.partdistillation import PartDistillationConfig

    specs = {s.name: s for s in config_from_dict(data, base_dir=tmp_path, model=PartDistillationConfig).stage_specs("t")}
    trains = [n for n in specs if n.startswith("one-stage-r") and n.endswith("-train")]
    assert trains == ["one-stage-r1-train", "one-stage-r2-train", "one-stage-r3-train"]
    model = specs["one-stage-r1-train"].params["model"]
    assert model["decoder"]["num_queries"] == 40 and model["top_k"] == 40
    assert specs["r1-evaluate"].params["max_dets"] == [1, 10, 40]
    assert specs["f1-evaluate"].params["max_dets"] == [1, 10, 40] == specs["kmeans-evaluate"].params["max_dets"]
    kmeans = specs["kmeans-eval"]
    assert kmeans.inputs.datasets["centroids"].path == specs["one-stage-cluster"].outputs.dataset
    assert specs["one-stage-cluster"].inputs.datasets["images"].path == str(tmp_path / "data" / "pw" / "train")
    # without GT objects (Table 3's "no" rows): the same fit on the teacher's detections, scored in the pred setting
    detected = specs["kmeans-eval-detected"]
    assert detected.params["objects"] == "detected" and detected.inputs.datasets["centroids"].path == kmeans.inputs.datasets["centroids"].path
    assert specs["kmeans-detected-evaluate"].params["settings"] == ["pred"]
    # the same deduplicated detections for the k-means baseline and every model's "no GT object" evaluation
    assert detected.params["object_nms_iou"] == 0.5 == specs["f1-evaluate"].params["object_nms_iou"]
    assert specs["one-stage-r1-evaluate"].params["object_nms_iou"] == 0.5
    assert specs["kmeans-detected-evaluate"].inputs.datasets["labels"].path == detected.outputs.dataset


def test_every_table_row_is_a_valid_mlflow_metric_name(tmp_path: Path) -> None:
    from mlflow.utils.validation import _validate_metric_name

    from pipelines.config import config_from_dict
    from pipelines.partdistillation import PartDistillationConfig, graph
    from pipelines.partdistillation.report import _metric_name

    data = {**CONFIG, "partdistillation": {**CONFIG["partdistillation"],
                                           "ranking": {"kmeans_baseline": True, "kmeans_transductive": True}}}
    cfg = config_from_dict(data, base_dir=tmp_path, model=PartDistillationConfig)
    labels = [label for label, _ in graph.part_rows(cfg) + graph.proposal_rows(cfg)]
    assert any("transductive" in label for label in labels)
    for label in labels:
        _validate_metric_name(f"parts.{_metric_name(label)}.gt.nmi")
