"""Final self-training (PartDistillation sec. 4.3): ``train-ranker`` on cluster-id labels, ``rank-pseudo-label``,
and :func:`predict_part_labels` for the evaluation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from runtime_helpers import free_port, run_stage
from stage_helpers import mlflow_run, result, stage_spec, tiny_segmenter_file, write_world64
from trainers.data import shards
from trainers.evaluation.clustering import PartClusteringEvaluator
from trainers.data.batches import images_to_tensor
from trainers.models.io import load_ranker
from trainers.parts.label_map import LabelMap
from trainers.parts.ranking import RankerTargets, class_conditioned_parts, predict_part_labels
from trainers.stages import rank_parts
from trainers.stages.rank_pseudo_label import run as run_relabel
from trainers.stages.train_ranker import run
from trainers.structures import decode_mask


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """A rank-parts dataset (random-init part model, k=3) written in a one-rank world of its own."""
    import os

    root = tmp_path_factory.mktemp("ranker")
    train = write_world64(root / "train", "train", 16, shard_size=4)
    parts = tiny_segmenter_file(root / "parts.pt", num_classes=1, seed=1)
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "TQDM_DISABLE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        rank_parts.run(stage_spec("rank-parts", root / "work-rank", datasets={"images": train},
                                  models={"parts": parts}, dataset_out=root / "ranked", nproc=1,
                                  params={"k": 3, "score_threshold": 0.0}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {"train": train, "parts": parts, "ranked": root / "ranked",
            "eval": write_world64(root / "eval", "eval", 4, shard_size=4)}


def ranker_spec(workdir, ranked, steps, nproc=1, mlflow=("sqlite:///unused.db", None), models=None, **params):
    uri, run_id = mlflow
    return stage_spec("train-ranker", workdir, datasets={"ranked_parts": ranked["ranked"]},
                      models={"parts": ranked["parts"], **(models or {})}, nproc=nproc, zero=0, micro=4,
                      mlflow_uri=uri, run_id=run_id,
                      params={"steps": steps, "lr": 3e-3, "warmup_steps": 0, "checkpoint_every": steps,
                              "flip_prob": 0.0, **params})


@pytest.fixture(scope="module")
def ranker(ranked, tmp_path_factory):
    """One round of train-ranker (torchrun, one rank: DeepSpeed trains once per process), with its loss history."""
    root = tmp_path_factory.mktemp("ranker-train")
    uri, run_id, client = mlflow_run(root)
    run_stage(ranker_spec(root / "work", ranked, 30, mlflow=(uri, run_id), log_every=1), nproc=1)
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
    return {"model": result(root / "work")["model_path"], "losses": losses}


def test_targets_are_class_specific_labels():
    lmap = LabelMap.from_doc({"classes": [{"category_id": 1, "num_clusters": 2, "offset": 0},
                                          {"category_id": 2, "num_clusters": 0, "offset": 2},
                                          {"category_id": 3, "num_clusters": 3, "offset": 2}]})
    assert lmap.num_labels == 5 and lmap.label(3, 2) == 4 and lmap.label(1, 1) == 1
    assert lmap.label(2, 0) is None and lmap.label(3, 3) is None
    rle = {"size": [2, 2], "counts": "04"}  # all ones
    record = {"height": 2, "width": 2, "proposals": [{"category_id": 3, "label": 1, "segmentation": rle},
                                                     {"category_id": 2, "label": 0, "segmentation": rle},
                                                     {"category_id": 1, "label": 0, "segmentation": rle}]}
    t = RankerTargets(lmap)(record)
    assert t["labels"].tolist() == [3, 0] and t["masks"].shape == (2, 2, 2) and t["masks"].all()


def test_scores_are_conditioned_on_the_object_class():
    lmap = LabelMap.from_doc({"classes": [{"category_id": 1, "num_clusters": 2, "offset": 0},
                                          {"category_id": 2, "num_clusters": 2, "offset": 2}]})
    logits = torch.tensor([[5.0, 0.0, 0.0, 9.0, 0.0]])  # best overall: class 2's cluster 1; within class 1: cluster 0
    mask_logits = torch.full((1, 4, 4), 10.0)
    objects = torch.ones(1, 4, 4, dtype=torch.bool)
    _, scores, clusters = class_conditioned_parts(logits, mask_logits, objects, [1], lmap)
    assert clusters.tolist() == [0] and scores[0] > 0.9
    _, _, clusters = class_conditioned_parts(logits, mask_logits, objects, [2], lmap)
    assert clusters.tolist() == [1]


def test_the_ranker_loss_falls_on_cluster_id_labels(ranker):
    losses = ranker["losses"]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_predict_part_labels_gives_cluster_ids_of_the_objects_class(ranked, ranker):
    model, lmap = load_ranker(ranker["model"])
    assert lmap == LabelMap.load(ranked["ranked"]) and model.cfg.decoder.num_classes == lmap.num_labels
    assert model.cfg.freeze_encoder
    parts = torch.load(ranked["parts"], weights_only=True)["state_dict"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in parts.items() if k.startswith("encoder."))

    samples = list(shards.iter_samples(ranked["eval"], allow_parts=True))
    images = images_to_tensor([im for _, im, _ in samples])
    masks = [torch.from_numpy(np.stack([decode_mask(o["segmentation"]) for o in r["objects"]])) for _, _, r in samples]
    classes = [[o["category_id"] for o in r["objects"]] for _, _, r in samples]
    maps = predict_part_labels(model, images, masks, classes, lmap)
    evaluator = PartClusteringEvaluator()
    labelled = 0
    for m, om, cs, (_, _, record) in zip(maps, masks, classes, samples):
        assert m.shape == (64, 64) and m.dtype == np.int64
        inside = om.any(0).numpy()
        assert (m[~inside] == -1).all()
        for obj, c in zip(om.numpy(), cs):
            values = set(np.unique(m[obj]).tolist()) - {-1}
            assert values <= set(range(lmap.num_clusters[c]))
            labelled += len(values)
        evaluator.process(record, m)
    assert labelled > 0
    assert all(0 <= v["nmi"] <= 1 for v in evaluator.per_class().values())


def test_rank_pseudo_label_writes_the_next_rounds_labels(tmp_path, ranked, ranker, one_rank):
    spec = stage_spec("rank-pseudo-label", tmp_path / "work-relabel", datasets={"images": ranked["train"]},
                      models={"ranker": ranker["model"]}, dataset_out=tmp_path / "relabelled", nproc=1,
                      params={"score_threshold": 0.0})
    m = run_relabel(spec).metrics
    lmap = LabelMap.load(tmp_path / "relabelled")
    assert lmap == LabelMap.load(ranked["ranked"])
    samples = list(shards.iter_samples(tmp_path / "relabelled", decode=False))
    assert len(samples) == 16 and m["rank_pseudo_label/labelled"] == sum(len(r["proposals"]) for _, _, r in samples)
    for _, _, record in samples:
        objects = {o["id"]: o for o in record["objects"]}
        for p in record["proposals"]:
            assert p["category_id"] == objects[p["object_id"]]["category_id"]
            assert 0 <= p["label"] < lmap.num_clusters[p["category_id"]]
            assert decode_mask(p["segmentation"]).sum() >= 0.05 * objects[p["object_id"]]["area"]
    written = (shards.part_dir(tmp_path / "relabelled", 0) / "index.json").stat().st_mtime_ns
    again = run_relabel(spec).metrics  # a rerun for the same inputs keeps the complete part
    assert (shards.part_dir(tmp_path / "relabelled", 0) / "index.json").stat().st_mtime_ns == written
    assert again["rank_pseudo_label/labelled"] == m["rank_pseudo_label/labelled"]


@pytest.mark.slow
def test_a_second_round_on_two_ranks_starts_from_the_previous_ranker(tmp_path, ranked, ranker):
    spec = ranker_spec(tmp_path / "r2", ranked, 1, nproc=2, models={"init": ranker["model"]}, lr=1e-12, round=2)
    run_stage(spec, nproc=2)
    a = torch.load(ranker["model"], weights_only=True)
    b = torch.load(result(tmp_path / "r2")["model_path"], weights_only=True)
    assert b["round"] == 2 and b["label_map"] == a["label_map"]
    head = "decoder.class_embed.weight"
    assert head in a["state_dict"] and torch.allclose(a["state_dict"][head], b["state_dict"][head], atol=1e-6)


def test_a_dataset_without_any_cluster_is_refused_with_its_name(tmp_path, ranked, one_rank):
    import shutil

    from trainers.inputs import StageInputError

    empty = tmp_path / "empty"
    shutil.copytree(ranked["ranked"], empty)
    doc = json.loads((empty / "label_map.json").read_text())
    for c in doc["classes"]:
        c["num_clusters"] = 0
    (empty / "label_map.json").write_text(json.dumps(doc))
    with pytest.raises(StageInputError, match="no object class has a cluster"):
        run(ranker_spec(tmp_path / "work", {**ranked, "ranked": empty}, 1))
