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
                      models=models, nproc=1, params=params)
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
                      nproc=1, params={"settings": ["gt"]}, mlflow_uri=uri, run_id=run_id)
    run(spec)
    logged = client.get_run(run_id).data.metrics
    assert logged["eval/gt/miou"] == pytest.approx(1.0) and "eval/gt/AR_200" in logged
    assert [a.path for a in client.list_artifacts(run_id)] == ["per_class.json"]


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
            assert 0.0 <= m[f"eval/{s}/{k}"] <= 1.0, (s, k)
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
                          datasets={"eval": world["eval"], "labels": world["shuffled"]}, nproc=nproc)
        run_stage(spec, nproc=nproc)
        out[nproc] = result(tmp_path / f"work{nproc}")["metrics"]
    assert out[1].keys() == out[2].keys()
    for k in out[1]:
        assert out[2][k] == pytest.approx(out[1][k]), k
