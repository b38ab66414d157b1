"""Stage ``cluster-pixels`` (PartDistillation sec. 5, baseline (2)): per-class k-means over instance pixels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime_helpers import run_stage
from stage_helpers import result, stage_spec, tiny_segmenter_file, write_world64
from trainers.data import shards
from trainers.models.io import load_segmenter, read_segmenter_file, save_segmenter
from trainers.stages.cluster_pixels import run
from trainers.parts.label_map import LabelMap
from trainers.parts.ranking import RankerTargets
from trainers.structures import decode_mask


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-pixels")
    return {"train": write_world64(root / "train", "train", 12, shard_size=4),
            "teacher": tiny_segmenter_file(root / "teacher.pt"), "root": root}


def broken_teacher(world, name: str, value: float):
    """The tiny teacher with every pixel-decoder weight set to ``value`` (0: zero features, nan: NaN features)."""
    model = load_segmenter(world["teacher"])
    with torch.no_grad():
        for p in model.encoder.pixel_decoder.parameters():
            p.fill_(value)
    blob = read_segmenter_file(world["teacher"])
    return save_segmenter(world["root"] / f"{name}.pt", model.cfg, model.state_dict(),
                          **{k: v for k, v in blob.items() if k not in ("format", "config", "state_dict")})


def cluster(tmp_path, world, name="out", teacher="teacher", **params):
    spec = stage_spec("cluster-pixels", tmp_path / f"work-{name}", datasets={"images": world["train"]},
                      models={"teacher": world[teacher] if isinstance(teacher, str) else teacher},
                      dataset_out=tmp_path / name, nproc=1, params={"objects": "gt", **params})
    res = run(spec)
    return res.metrics, list(shards.iter_samples(tmp_path / name, decode=False)), LabelMap.load(tmp_path / name)


def check_labels(samples, lmap: LabelMap, k: int):
    """Every object is partitioned by its proposals; labels are cluster ids < k_c of the object's class."""
    for _, _, record in samples:
        for obj in record["objects"]:
            props = [p for p in record["proposals"] if p["object_id"] == obj["id"]]
            assert props, "every object of a clustered class gets proposals"
            assert {p["category_id"] for p in props} == {obj["category_id"]}
            assert all(0 <= p["label"] < lmap.num_clusters[obj["category_id"]] <= k for p in props)
            assert len({p["label"] for p in props}) == len(props)  # one proposal per cluster id present
            masks = np.stack([decode_mask(p["segmentation"]) for p in props])
            assert (masks.sum(0) <= 1).all() and np.array_equal(masks.any(0), decode_mask(obj["segmentation"]))


def test_every_instance_pixel_gets_a_cluster_of_its_class(tmp_path, world, one_rank):
    m, samples, lmap = cluster(tmp_path, world, k=4)
    assert len(samples) == 12 and m["cluster/images"] == 12 and m["cluster/classes"] == 3
    assert m["cluster/classes_empty"] == 0 and m["cluster/objects_unclustered"] == 0
    check_labels(samples, lmap, k=4)
    assert m["cluster/proposals"] == sum(len(r["proposals"]) for _, _, r in samples)
    assert all("parts" not in r for _, _, r in samples)
    targets = RankerTargets(lmap)(samples[0][2])  # train-ranker reads the labels as they are
    assert len(targets["labels"]) == len(samples[0][2]["proposals"])


def test_classes_with_fewer_pixels_than_k_get_fewer_clusters(tmp_path, world, one_rank):
    m, samples, lmap = cluster(tmp_path, world, k=8, pixels_per_instance=1)
    objects = {}
    for _, _, r in samples:
        for o in r["objects"]:
            objects[o["category_id"]] = objects.get(o["category_id"], 0) + 1
    assert all(lmap.num_clusters[c] <= n for c, n in objects.items())
    assert m["cluster/classes_fewer_than_k"] == sum(1 for n in objects.values() if n < 8) > 0
    check_labels(samples, lmap, k=8)


@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_zero_or_nan_features_are_counted_and_leave_classes_empty(tmp_path, world, one_rank, value):
    teacher = broken_teacher(world, f"broken-{value}", value)
    m, samples, lmap = cluster(tmp_path, world, teacher=teacher, k=4)
    bad = m["cluster/features_zero"] if value == 0 else m["cluster/features_nan"]
    assert bad == m["cluster/pixels_spilled"] > 0
    assert m["cluster/classes_empty"] == 3 and m["cluster/objects_unclustered"] == m["cluster/objects"]
    assert len(samples) == 12 and all(r["proposals"] == [] for _, _, r in samples)
    assert lmap.num_labels == 0


def test_a_restarted_stage_reuses_its_spill_clusters_and_part(tmp_path, world, one_rank):
    first, _, _ = cluster(tmp_path, world, k=4)
    part = shards.part_dir(tmp_path / "out", 0)
    stamp = {p.name: p.stat().st_mtime_ns for p in part.iterdir()}
    again, samples, _ = cluster(tmp_path, world, k=4)
    assert {p.name: p.stat().st_mtime_ns for p in part.iterdir()} == stamp
    assert again["cluster/proposals"] == first["cluster/proposals"] and len(samples) == 12


def test_an_eval_split_is_clustered_with_allow_parts_and_evaluated_as_a_labels_dataset(tmp_path, world, one_rank):
    from trainers.stages.evaluate_parts import run as evaluate

    world = {**world, "eval": write_world64(tmp_path / "eval", "eval", 6, shard_size=3)}
    with pytest.raises(shards.PartsNotAllowedError):  # without allow_parts an eval split is refused
        run(stage_spec("cluster-pixels", tmp_path / "w0", datasets={"images": world["eval"]},
                       models={"teacher": world["teacher"]}, dataset_out=tmp_path / "refused", nproc=1,
                       params={"objects": "gt"}))
    spec = stage_spec("cluster-pixels", tmp_path / "w1", datasets={"images": world["eval"]},
                      models={"teacher": world["teacher"]}, dataset_out=tmp_path / "kmeans", nproc=1,
                      params={"objects": "gt", "k": 4, "allow_parts": True})
    run(spec)
    samples = list(shards.iter_samples(tmp_path / "kmeans", decode=False))  # no part labels: readable by training
    assert len(samples) == 6 and all("parts" not in r for _, _, r in samples)
    m = evaluate(stage_spec("evaluate-parts", tmp_path / "w2", nproc=1, params={"settings": ["gt"]},
                            datasets={"eval": world["eval"], "labels": tmp_path / "kmeans"},
                            dataset_out=tmp_path / "predictions")).metrics
    assert 0 < m["eval/gt/miou"] <= 1 and m["eval/gt/num_classes"] == 3 and m["eval/images_without_labels"] == 0


@pytest.mark.slow
def test_two_ranks_cluster_every_class_once(tmp_path, world):
    spec = stage_spec("cluster-pixels", tmp_path / "work", datasets={"images": world["train"]},
                      models={"teacher": world["teacher"]}, dataset_out=tmp_path / "out", nproc=2,
                      params={"objects": "gt", "k": 4, "batch_size": 2})
    run_stage(spec, nproc=2)
    m = result(tmp_path / "work")["metrics"]
    assert m["cluster/classes"] == 3 and m["cluster/images"] == 12  # summed over ranks: each class on one rank
    samples = list(shards.iter_samples(tmp_path / "out", decode=False))
    assert len(samples) == 12 and len(shards.DatasetIndex.load(tmp_path / "out").shards) >= 2
    lmap = LabelMap.load(tmp_path / "out")
    assert sorted(lmap.num_clusters) == [1, 2, 3]
    check_labels(samples, lmap, k=4)
    work = next((tmp_path / "work").glob("cluster-pixels-*"))
    assert sorted(p.name for p in (work / "clusters").glob("class-*.npz")) == [f"class-{c}.npz" for c in (1, 2, 3)]


@pytest.mark.slow
def test_the_one_stage_baseline_self_trains_on_the_labels_and_is_evaluated(tmp_path, world, one_rank):
    """Sec. 5 baseline (2) end to end: cluster-pixels -> train-ranker (from the instance teacher) -> evaluate-parts."""
    from trainers.stages.evaluate_parts import run as evaluate

    cluster(tmp_path, world, name="labels", k=3)
    run_stage(stage_spec("train-ranker", tmp_path / "w-train", datasets={"ranked_parts": tmp_path / "labels"},
                         models={"parts": world["teacher"]}, nproc=1, zero=0, micro=4,
                         params={"steps": 4, "lr": 1e-3, "warmup_steps": 0, "checkpoint_every": 4}), nproc=1)
    model = result(tmp_path / "w-train")["model_path"]
    eval_split = write_world64(tmp_path / "eval", "eval", 4, shard_size=2)
    m = evaluate(stage_spec("evaluate-parts", tmp_path / "w-eval", datasets={"eval": eval_split},
                            models={"candidate": model, "instance_teacher": world["teacher"]}, nproc=1,
                            params={"object_score_threshold": 0.0, "max_detections": 2},
                            dataset_out=tmp_path / "predictions")).metrics
    assert all(0.0 <= m[f"eval/{s}/{k}"] <= 1.0 for s in ("gt", "pred") for k in ("nmi", "ari", "miou", "AR_200"))
    assert (tmp_path / "w-eval" / "per_class.json").exists()


def test_the_train_fit_labels_held_out_images_without_refitting(tmp_path, world, one_rank):
    """Issue 11 item 3: the k-means baseline fitted on the train split and applied to the eval split."""
    _, fitted, lmap = cluster(tmp_path, world, name="fit", k=4)
    assert sorted(p.name for p in (tmp_path / "fit" / "clusters").glob("class-*.npz")) == [f"class-{c}.npz" for c in (1, 2, 3)]
    eval_split = write_world64(tmp_path / "eval", "eval", 6, shard_size=3)
    spec = stage_spec("cluster-pixels", tmp_path / "w-apply", datasets={"images": eval_split, "centroids": tmp_path / "fit"},
                      models={"teacher": world["teacher"]}, dataset_out=tmp_path / "applied", nproc=1,
                      params={"objects": "gt", "k": 4, "allow_parts": True})
    m = run(spec).metrics
    samples = list(shards.iter_samples(tmp_path / "applied", decode=False))
    assert len(samples) == 6 and m["cluster/dataset_samples"] == 6 and m["cluster/pixels_spilled"] == 0  # no new k-means
    assert LabelMap.load(tmp_path / "applied") == lmap
    check_labels(samples, lmap, k=4)
    # the same images labelled by the fit and by the stage applied to them agree pixel for pixel
    spec = stage_spec("cluster-pixels", tmp_path / "w-self", datasets={"images": world["train"], "centroids": tmp_path / "fit"},
                      models={"teacher": world["teacher"]}, dataset_out=tmp_path / "self", nproc=1,
                      params={"objects": "gt", "k": 4})
    run(spec)
    again = list(shards.iter_samples(tmp_path / "self", decode=False))
    assert [r["proposals"] for _, _, r in again] == [r["proposals"] for _, _, r in fitted]


def test_a_dataset_without_a_fit_is_refused_as_centroids(tmp_path, world, one_rank):
    from trainers.inputs import StageInputError

    with pytest.raises(StageInputError, match="not a cluster-pixels dataset"):
        run(stage_spec("cluster-pixels", tmp_path / "w", datasets={"images": world["train"], "centroids": world["train"]},
                       models={"teacher": world["teacher"]}, dataset_out=tmp_path / "out", nproc=1, params={"objects": "gt"}))
