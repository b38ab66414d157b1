"""Stage ``rank-parts`` (PartDistillation sec. 4.3): candidates per object class, k-means over ranks, cluster-id labels."""
from __future__ import annotations

from pathlib import Path

import json

import numpy as np
import pytest
import torch

from runtime_helpers import run_stage
from stage_helpers import result, stage_spec, tiny_segmenter_file, write_world64
from trainers.data import shards
from trainers.parts.class_clusters import spill_counts
from trainers.parts import candidates
from trainers.parts.assignment import object_segments, pixel_owners
from trainers.parts.candidates import RankPartsStats
from trainers.stages.rank_parts import run
from trainers.structures import decode_mask

PARAMS = {"k": 3, "score_threshold": 0.0, "batch_size": 8}  # a random-init part model scores about 0.3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank")
    return {"train": write_world64(root / "train", "train", 16, shard_size=4),
            "parts": tiny_segmenter_file(root / "parts.pt", num_classes=1, seed=1)}


def rank(tmp_path, world, name="out", images="train", nproc=1, **params):
    return stage_spec("rank-parts", tmp_path / f"work-{name}", datasets={"images": world[images]},
                      models={"parts": world["parts"]}, dataset_out=tmp_path / name, nproc=nproc,
                      params={**PARAMS, **params})


def labelled(out):
    return list(shards.iter_samples(out, decode=False))


def check_labels(out, k):
    """Every written part: a cluster id below its class's k_c, inside its object; the label map is consistent."""
    lmap = json.loads((out / "label_map.json").read_text())
    kc = {c["category_id"]: c["num_clusters"] for c in lmap["classes"]}
    offsets = [c["offset"] for c in lmap["classes"]]
    assert offsets == list(np.cumsum([0] + [c["num_clusters"] for c in lmap["classes"]])[:-1])
    assert lmap["num_labels"] == sum(kc.values()) and all(n <= k for n in kc.values())
    seen: dict[int, set] = {}
    for _, _, record in labelled(out):
        objects = {o["id"]: o for o in record["objects"]}
        for p in record["proposals"]:
            obj = objects[p["object_id"]]
            assert p["category_id"] == obj["category_id"]
            assert 0 <= p["label"] < kc[p["category_id"]]
            assert 0 < p["score"] <= 1 and p["part_score"] > PARAMS["score_threshold"] - 1e-9
            m = decode_mask(p["segmentation"])
            assert m.sum() == p["area"] and not (m & ~decode_mask(obj["segmentation"])).any()
            seen.setdefault(p["category_id"], set()).add(p["label"])
    for c, labels in seen.items():  # the labels used are the class's clusters
        assert labels <= set(range(kc[c]))
    return lmap


def test_pixels_go_to_the_most_confident_part_of_the_object_of_highest_iou():
    obj = torch.zeros(2, 4, 8, dtype=torch.bool)
    obj[0, :, :4] = True
    obj[1, :, 4:] = True
    parts = torch.zeros(3, 4, 8, dtype=torch.bool)
    parts[0, :, :3] = True          # object 0
    parts[1, :, 1:4] = True         # object 0, higher score: wins the overlap
    parts[2, :, 3:8] = True         # IoU higher with object 1 (eq. 1): never owns object 0's pixels
    owners = pixel_owners(parts, torch.tensor([0.5, 0.9, 0.99]), obj)
    assert (owners[0, :, 0] == 0).all() and (owners[0, :, 1:4] == 1).all() and (owners[0, :, 4:] == -1).all()
    assert (owners[1, :, 4:] == 2).all() and (owners[1, :, :4] == -1).all()
    stats = RankPartsStats()
    segs = object_segments(parts, torch.tensor([0.5, 0.9, 0.2]), obj, score_threshold=0.3, min_part_area=0.3,
                           stats=stats)
    assert [i for i, _ in segs[0]] == [1]       # part 0 keeps 4 of 16 pixels (25% < 30%)
    assert segs[1] == [] and stats.dropped_small == 1 and stats.dropped_low_score == 1


def test_soft_ownership_leaves_no_pixel_of_an_object_with_parts_uncovered():
    """evaluate-parts' pixel_assignment soft: M_i(x) is the mask probability, so the pixel the binary masks leave
    uncovered goes to the part most likely there; the assignment of parts to objects is the binary one (eq. 1)."""
    obj = torch.zeros(2, 4, 8, dtype=torch.bool)
    obj[0, :, :4] = True
    obj[1, :, 4:] = True
    parts = torch.zeros(2, 4, 8, dtype=torch.bool)
    parts[0, :, :2] = True  # object 0; column 2-3 covered by no binary mask
    parts[1, :, 5:] = True  # object 1; column 4 uncovered
    probs = parts.float() * 0.9 + 0.05
    probs[0, :, 2] = 0.4  # part 0 is likelier than part 1 there (part 1 belongs to object 1 anyway)
    binary = pixel_owners(parts, torch.tensor([0.8, 0.7]), obj)
    assert (binary[0, :, 2:4] == -1).all() and (binary[1, :, 4] == -1).all()
    soft = pixel_owners(parts, torch.tensor([0.8, 0.7]), obj, probs)
    assert (soft[0][obj[0]] == 0).all() and (soft[1][obj[1]] == 1).all()
    assert (soft[0][~obj[0]] == -1).all() and (soft[1][~obj[1]] == -1).all()


def test_labels_are_cluster_ids_below_k_c_of_each_class(tmp_path, world, one_rank):
    res = run(rank(tmp_path, world))
    m = res.metrics
    assert m["rank_parts/images"] == 16 and m["rank_parts/candidates"] > 0
    assert m["rank_parts/labelled"] == m["rank_parts/candidates"] - m["rank_parts/dropped_bad_feature"]
    assert sum(spill_counts(tmp_path / "work-out" / "spill").values()) == m["rank_parts/candidates"]
    lmap = check_labels(tmp_path / "out", k=3)
    written = sum(len(r["proposals"]) for _, _, r in labelled(tmp_path / "out"))
    assert written == m["rank_parts/labelled"]
    assert m["rank_parts/clusters"] == lmap["num_labels"] > 0
    # every candidate traces back to (image, object, query) through its spill key
    keys = np.concatenate([np.load(p) for p in (tmp_path / "work-out" / "spill").glob("class-*/*.keys.npy")])
    by_seq = {int(r[1]): r for r in keys}
    for _, _, record in labelled(tmp_path / "out"):
        for p in record["proposals"]:
            r = by_seq[p["candidate"][1]]
            assert (r[2], r[3], r[4]) == (record["image_id"], p["object_id"], p["query"])


def test_a_class_with_fewer_candidates_than_k_gets_fewer_clusters(tmp_path, world, one_rank):
    res = run(rank(tmp_path, world, k=50))
    counts = spill_counts(tmp_path / "work-out" / "spill")
    lmap = check_labels(tmp_path / "out", k=50)
    for c in lmap["classes"]:
        if counts.get(c["category_id"], 0):
            assert 0 < c["num_clusters"] <= counts[c["category_id"]] < 50
    assert res.metrics["rank_parts/classes_fewer_clusters_than_k"] == res.metrics["rank_parts/classes_with_candidates"]


def test_a_class_without_candidates_is_reported_and_gets_no_labels(tmp_path, world, one_rank):
    def no_class_1(sample):
        key, image, record = sample
        record["objects"] = [o for o in record["objects"] if o["category_id"] != 1]
        return key, image, record

    world = {**world, "no1": write_world64(tmp_path / "no1", "train", 16, shard_size=4, records=no_class_1)}
    res = run(rank(tmp_path, world, images="no1"))
    assert res.metrics["rank_parts/classes_without_candidates"] >= 1
    lmap = check_labels(tmp_path / "out", k=3)
    assert {c["category_id"]: c["num_clusters"] for c in lmap["classes"]}[1] == 0
    assert all(p["category_id"] != 1 for _, _, r in labelled(tmp_path / "out") for p in r["proposals"])


def test_nan_and_zero_features_are_dropped_and_counted(tmp_path, world, one_rank, monkeypatch):
    original = candidates.part_predictions

    def broken(model, images):
        preds = original(model, images)
        for p in preds:  # a third of the parts NaN, a third zero
            p.query_features[0::3] = float("nan")
            p.query_features[1::3] = 0.0
        return preds

    monkeypatch.setattr(candidates, "part_predictions", broken)
    m = run(rank(tmp_path, world)).metrics
    bad = m["rank_parts/nan_features"] + m["rank_parts/zero_features"]
    assert m["rank_parts/nan_features"] > 0 and m["rank_parts/zero_features"] > 0
    assert m["rank_parts/dropped_bad_feature"] == bad
    assert m["rank_parts/labelled"] == m["rank_parts/candidates"] - bad
    assert sum(len(r["proposals"]) for _, _, r in labelled(tmp_path / "out")) == m["rank_parts/labelled"] > 0
    check_labels(tmp_path / "out", k=3)


def test_a_rerun_reuses_the_spill_and_reclusters_only_a_deleted_class(tmp_path, world, one_rank):
    spec = rank(tmp_path, world)
    first = run(spec).metrics
    before = [(k, r["proposals"]) for k, _, r in labelled(tmp_path / "out")]
    clusters = tmp_path / "work-out" / "clusters"
    done = sorted(clusters.glob("class-*.npz"))
    done[-1].unlink()
    (Path(spec.outputs.workdir) / "shardmap" / "rank-00000.json").unlink()  # the labels are redone too
    second = run(spec).metrics
    assert second["rank_parts/reused_spill_ranks"] == 1
    assert second["rank_parts/classes_resumed"] == len(done) - 1
    assert second["rank_parts/candidates"] == first["rank_parts/candidates"]
    assert [(k, r["proposals"]) for k, _, r in labelled(tmp_path / "out")] == before


def test_changed_params_discard_the_old_spill(tmp_path, world, one_rank):
    run(rank(tmp_path, world))
    m = run(rank(tmp_path, world, min_part_area=0.2)).metrics
    assert m["rank_parts/reused_spill_ranks"] == 0 and m["rank_parts/classes_resumed"] == 0
    for _, _, record in labelled(tmp_path / "out"):
        areas = {o["id"]: o["area"] for o in record["objects"]}
        assert all(p["area"] >= 0.2 * areas[p["object_id"]] for p in record["proposals"])


def test_detected_objects_bring_the_instance_teachers_classes(tmp_path, world, one_rank):
    teacher = tiny_segmenter_file(tmp_path / "teacher.pt", num_classes=3, seed=2)
    spec = stage_spec("rank-parts", tmp_path / "work-out", datasets={"images": world["train"]},
                      models={"parts": world["parts"], "instance_teacher": teacher}, dataset_out=tmp_path / "out",
                      nproc=1, params={**PARAMS, "objects": "detected", "object_score_threshold": 0.0,
                                       "max_detections": 3})
    m = run(spec).metrics
    assert m["rank_parts/objects"] == 16 * 3 and m["rank_parts/candidates"] > 0
    lmap = json.loads((tmp_path / "out" / "label_map.json").read_text())
    kc = {c["category_id"]: c["num_clusters"] for c in lmap["classes"]}
    proposals = [p for _, _, r in labelled(tmp_path / "out") for p in r["proposals"]]
    assert len(proposals) == m["rank_parts/labelled"]
    assert all(p["category_id"] in (1, 2, 3) and 0 <= p["label"] < kc[p["category_id"]] for p in proposals)


@pytest.mark.slow
def test_two_ranks_cluster_every_class_exactly_once(tmp_path, world):
    spec = rank(tmp_path, world, nproc=2)
    run_stage(spec, nproc=2)
    summary = json.loads((tmp_path / "work-out" / "rank_parts_summary.json").read_text())
    per_rank = summary["rank_classes"]
    assert len(per_rank) == 2 and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [1, 2, 3]
    assert {p.name for p in (tmp_path / "work-out" / "spill" / "_writers").glob("*.json")} == {"0.json", "1.json"}
    check_labels(tmp_path / "out", k=3)
    assert result(tmp_path / "work-out")["metrics"]["rank_parts/images"] == 16
    assert len(labelled(tmp_path / "out")) == 16
