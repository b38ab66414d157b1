"""Stage ``evaluate-parts`` (PartDistillation sec. 5.1): NMI, ARI, mIoU and AR@200, with and without GT objects."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from runtime_helpers import run_stage
from stage_helpers import TINY_MODEL, WORLD64, mlflow_run, result, stage_spec, tiny_segmenter_file, write_world64
from trainers.data import shards
from trainers.data.partworld import category_table, generate
from trainers.models.config import DecoderConfig, EncoderConfig, SegmenterConfig
from trainers.models.io import save_segmenter
from trainers.models.segmenter import Segmenter
from trainers.evaluation.part_predictions import read_part_results, score_part_results
from trainers.inputs import StageInputError
from trainers.stages.evaluate_parts import run

KEYS = ("nmi", "ari", "miou", "miou_parts", "miou_hungarian", "miou_hungarian_parts", "AR_200")


def gt_labels(samples, shuffle: bool = False, seed: int = 0):
    """Eval samples whose GT parts become labelled proposals: cluster id = the part type permuted per class (or, with
    ``shuffle``, a random cluster per proposal)."""
    rng = np.random.default_rng(seed)
    perm = {c: rng.permutation(WORLD64.num_part_types + 1) for c in range(1, WORLD64.num_classes + 1)}
    for key, image, record in samples:
        classes = {o["id"]: o["category_id"] for o in record["objects"]}
        parts = record.pop("parts")
        record["proposals"] = [
            {"object_id": p["object_id"], "segmentation": p["segmentation"], "score": 1.0, "area": p["area"],
             "category_id": classes[p["object_id"]],
             "label": int(rng.integers(3)) if shuffle else int(perm[classes[p["object_id"]]][p["category_id"]])}
            for p in parts]
        yield key, image, record


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-parts")
    out = {"eval": write_world64(root / "eval", "eval", 8, shard_size=3)}
    for name, shuffle in (("labels", False), ("shuffled", True)):
        shards.write_dataset(gt_labels(generate(WORLD64, "eval", 0, 8), shuffle), root / name, name=name,
                             split="eval-labels", categories=category_table(WORLD64), shard_size=4)
        out[name] = root / name
    lmap = {"k": 3, "num_labels": 9, "classes": [{"category_id": c, "num_clusters": 3, "offset": 3 * (c - 1)}
                                                 for c in range(1, 4)]}
    torch.manual_seed(0)
    cfg = SegmenterConfig(encoder=EncoderConfig(**TINY_MODEL["encoder"]),
                          decoder=DecoderConfig(num_classes=9, **TINY_MODEL["decoder"]))
    out["ranker"] = save_segmenter(root / "ranker.pt", cfg, Segmenter(cfg).state_dict(), label_map=lmap)
    out["teacher"] = tiny_segmenter_file(root / "teacher.pt")
    return out


def evaluate(tmp_path, world, name="w", datasets=None, models=None, **params):
    spec = stage_spec("evaluate-parts", tmp_path / name, datasets={"eval": world["eval"], **(datasets or {})},
                      models=models, nproc=1, params=params, dataset_out=tmp_path / f"{name}-predictions")
    return run(spec).metrics


def test_labels_equal_to_the_gt_parts_score_one_in_both_settings(tmp_path, world, one_rank):
    m = evaluate(tmp_path, world, datasets={"labels": world["labels"]})
    for s in ("gt", "pred"):
        for k in KEYS:
            assert m[f"eval/{s}/{k}"] == pytest.approx(1.0), (s, k)
        assert m[f"eval/{s}/num_classes"] == 3
    per_class = json.loads((tmp_path / "w" / "per_class.json").read_text())
    assert set(per_class) == {"gt", "pred"} and set(per_class["gt"]) == {"1", "2", "3"}
    assert all(v["nmi"] == pytest.approx(1.0) and v["name"] for v in per_class["gt"].values())


def test_metrics_and_per_class_values_go_to_the_stage_run(tmp_path, world, one_rank):
    uri, run_id, client = mlflow_run(tmp_path)
    spec = stage_spec("evaluate-parts", tmp_path / "w", datasets={"eval": world["eval"], "labels": world["labels"]},
                      nproc=1, params={"settings": ["gt"]}, mlflow_uri=uri, run_id=run_id,
                      dataset_out=tmp_path / "predictions")
    run(spec)
    logged = client.get_run(run_id).data.metrics
    assert logged["eval/gt/miou"] == pytest.approx(1.0) and "eval/gt/AR_200" in logged
    assert [a.path for a in client.list_artifacts(run_id)] == ["per_class.json", "predictions"]
    assert {a.path for a in client.list_artifacts(run_id, "predictions")} == {"predictions/images.json",
                                                                              "predictions/results-gt.json"}


def test_shuffled_cluster_ids_score_lower(tmp_path, world, one_rank):
    m = evaluate(tmp_path, world, datasets={"labels": world["shuffled"]})
    for s in ("gt", "pred"):
        assert m[f"eval/{s}/nmi"] < 0.6 and m[f"eval/{s}/ari"] < 0.6 and m[f"eval/{s}/miou"] < 0.8
        assert m[f"eval/{s}/miou_hungarian"] <= m[f"eval/{s}/miou"] + 1e-9
        assert m[f"eval/{s}/AR_200"] == pytest.approx(1.0)  # the masks are still the GT parts: AR ignores labels


def test_a_ranker_model_is_evaluated_with_and_without_gt_objects(tmp_path, world, one_rank):
    m = evaluate(tmp_path, world, models={"candidate": world["ranker"], "instance_teacher": world["teacher"]},
                 object_score_threshold=0.0, max_detections=2)
    for s in ("gt", "pred"):
        for k in KEYS:
            assert (-1.0 if k == "ari" else 0.0) <= m[f"eval/{s}/{k}"] <= 1.0, (s, k)  # ARI lies in [-1, 1]
        assert m[f"eval/{s}/num_parts"] > 0
    assert m["eval/num_images"] == 8 and m["eval/pred/objects_per_image"] == 2


def test_a_model_without_an_instance_teacher_needs_settings_gt(tmp_path, world, one_rank):
    with pytest.raises(StageInputError, match="instance_teacher"):
        evaluate(tmp_path, world, models={"candidate": world["ranker"]})
    m = evaluate(tmp_path, world, name="gt-only", models={"candidate": world["ranker"]}, settings=["gt"])
    assert "eval/gt/miou" in m and not any(k.startswith("eval/pred/") for k in m)


def test_exactly_one_source_of_predictions(tmp_path, world, one_rank):
    with pytest.raises(StageInputError, match="exactly one"):
        evaluate(tmp_path, world)


@pytest.mark.slow
def test_two_ranks_give_the_metrics_of_one(tmp_path, world):
    out = {}
    for nproc in (1, 2):
        spec = stage_spec("evaluate-parts", tmp_path / f"work{nproc}",
                          datasets={"eval": world["eval"], "labels": world["shuffled"]}, nproc=nproc,
                          dataset_out=tmp_path / f"predictions{nproc}")
        run_stage(spec, nproc=nproc)
        out[nproc] = result(tmp_path / f"work{nproc}")["metrics"]
    assert out[1].keys() == out[2].keys()
    for k in out[1]:
        assert out[2][k] == pytest.approx(out[1][k]), k


@pytest.mark.parametrize("source", ["model", "labels"])
def test_the_written_results_files_rescore_to_the_reported_metrics(tmp_path, world, one_rank, source):
    """Item 2 of the issue: the metrics are reproducible from the predictions file alone, with the same evaluator."""
    if source == "model":
        m = evaluate(tmp_path, world, models={"candidate": world["ranker"], "instance_teacher": world["teacher"]},
                     object_score_threshold=0.0, max_detections=2)
    else:
        m = evaluate(tmp_path, world, datasets={"labels": world["shuffled"]})
    out = tmp_path / "w-predictions"
    doc, preds = read_part_results(out)
    assert len(doc["images"]) == 8 and set(preds) == {"gt", "pred"}
    segments = json.loads((out / "results-gt.json").read_text())
    assert segments and {"image_id", "category_id", "segmentation", "score", "object_class", "cluster", "object"} <= set(segments[0])
    assert {c["id"] for c in doc["categories"]} >= {s["category_id"] for s in segments}
    rescored = score_part_results(world["eval"], out)
    reported = {k: v for k, v in m.items() if k.startswith(("eval/gt/", "eval/pred/")) and k != "eval/pred/objects_per_image"}
    assert rescored == reported
    assert json.loads((out / "metrics.json").read_text()) == m


def test_the_pseudo_label_reference_reads_no_part_labels(tmp_path, world, one_rank):
    """The label-free criterion: agreement with a pseudo-labeller's clusters on images without part labels."""
    with pytest.raises(StageInputError, match="has part labels"):
        evaluate(tmp_path, world, datasets={"labels": world["labels"]}, reference="pseudo_labels")
    same = evaluate(tmp_path, {"eval": world["labels"]}, name="same", datasets={"labels": world["labels"]},
                    reference="pseudo_labels", settings=["gt"])
    other = evaluate(tmp_path, {"eval": world["labels"]}, name="other", datasets={"labels": world["shuffled"]},
                     reference="pseudo_labels", settings=["gt"])
    assert same["eval/gt/nmi"] == pytest.approx(1.0) and other["eval/gt/nmi"] < 0.6


def test_selftrain_predict_writes_the_files_the_stage_writes(tmp_path, world, one_rank):
    """``selftrain predict MODEL DATASET -o DIR``: the same files as the evaluating stage, re-scored to its numbers."""
    import subprocess
    import sys

    from trainers.models.io import read_segmenter_file

    cfg = read_segmenter_file(world["ranker"])["config"]
    k = int(cfg.get("top_k") or cfg["decoder"]["num_queries"])
    m = evaluate(tmp_path, world, models={"candidate": world["ranker"], "instance_teacher": world["teacher"]},
                 max_dets=[1, 10, k])
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", str(world["ranker"]), str(world["eval"]),
                           "-o", str(tmp_path / "predicted"), "--instance-teacher", str(world["teacher"])],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "results-gt.json" in proc.stdout and "results-pred.json" in proc.stdout
    names = {f.name for f in (tmp_path / "predicted").iterdir()}
    assert names == {f.name for f in (tmp_path / "w-predictions").iterdir()} - {"metrics.json"}
    for name in names:
        assert (tmp_path / "predicted" / name).read_bytes() == (tmp_path / "w-predictions" / name).read_bytes(), name
    rescored = score_part_results(world["eval"], tmp_path / "predicted")
    assert rescored == {k_: v for k_, v in m.items() if k_ in rescored}
