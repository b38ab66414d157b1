"""Stage ``mine-parts`` (PartDistillation sec. 4.2): k-means part proposals inside instances, as a map over shards."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime_helpers import run_stage
from stage_helpers import result, stage_spec, tiny_segmenter_file, write_world64
from trainers.data import shards
from trainers.models.io import load_segmenter
from contract.stages.mine_parts import MinePartsParams
from trainers.data.batches import images_to_tensor
from trainers.parts.mining import MiningStats, mine_batch
from trainers.stages.mine_parts import run
from trainers.structures import decode_mask, encode_mask


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine")
    return {"train": write_world64(root / "train", "train", 12, shard_size=4),
            "eval": write_world64(root / "eval", "eval", 6, shard_size=3),
            "teacher": tiny_segmenter_file(root / "teacher.pt")}


def mine(tmp_path, world, name="out", images="train", **params):
    spec = stage_spec("mine-parts", tmp_path / f"work-{name}", datasets={"images": world[images]},
                      models={"teacher": world["teacher"]}, dataset_out=tmp_path / name, nproc=1,
                      params={"objects": "gt", **params})
    res = run(spec)
    return res, list(shards.iter_samples(tmp_path / name, decode=False))


def test_proposals_partition_each_object_into_at_most_k_parts(tmp_path, world, one_rank):
    res, samples = mine(tmp_path, world, min_part_area=0.0, k=4)
    assert len(samples) == 12 and res.metrics["mine/images"] == 12
    assert res.metrics["mine/objects_mined"] > 0 and res.metrics["mine/proposals_too_small"] == 0
    for _, _, record in samples:
        assert "parts" not in record
        objects = {o["id"]: decode_mask(o["segmentation"]) for o in record["objects"]}
        for oid, mask in objects.items():
            props = [decode_mask(p["segmentation"]) for p in record["proposals"] if p["object_id"] == oid]
            if mask.sum() < 0.01 * mask.size:
                assert not props
                continue
            assert 1 <= len(props) <= 4
            stack = np.stack(props)
            assert (stack.sum(0) <= 1).all()                    # disjoint
            assert np.array_equal(stack.any(0), mask)           # their union is the object: a partition
        for p in record["proposals"]:
            assert p["label"] == 0 and 0 <= p["score"] <= 1 and p["area"] == decode_mask(p["segmentation"]).sum()


@pytest.mark.parametrize("refine", [False, True])
def test_every_proposal_lies_inside_its_object_and_covers_at_least_min_part_area(tmp_path, world, one_rank, refine):
    res, samples = mine(tmp_path, world, min_part_area=0.2, k=4, refine=refine)
    for _, _, record in samples:
        objects = {o["id"]: decode_mask(o["segmentation"]) for o in record["objects"]}
        for p in record["proposals"]:
            m, obj = decode_mask(p["segmentation"]), objects[p["object_id"]]
            assert not (m & ~obj).any()
            assert m.sum() >= 0.2 * obj.sum()
    assert res.metrics["mine/proposals"] == sum(len(r["proposals"]) for _, _, r in samples)


def test_records_without_objects_are_counted_and_still_written(tmp_path, world, one_rank):
    def no_objects(sample):
        key, image, record = sample
        return key, image, {**record, "objects": []}

    world = {**world, "empty": write_world64(tmp_path / "empty", "train", 4, records=no_objects)}
    res, samples = mine(tmp_path, world, images="empty")
    assert res.metrics["mine/images_without_objects"] == 4 and res.metrics["mine/proposals"] == 0
    assert len(samples) == 4 and all(r["proposals"] == [] for _, _, r in samples)


def test_images_without_detections_are_counted(tmp_path, world, one_rank):
    res, samples = mine(tmp_path, world, objects="detected", score_threshold=1.0)  # scores never exceed 1
    assert res.metrics["mine/images_without_objects"] == 12 and res.metrics["mine/objects"] == 0
    assert len(samples) == 12


def test_detected_instances_are_mined_inside_the_detection(tmp_path, world, one_rank):
    res, samples = mine(tmp_path, world, objects="detected", score_threshold=0.0, max_detections=2)
    assert res.metrics["mine/objects"] == 24 and res.metrics["mine/proposals"] > 0
    assert all(0 < p["object_score"] <= 1 and p["score"] <= p["object_score"] + 1e-6
               for _, _, r in samples for p in r["proposals"])


def _batch(world, count=2):
    samples = list(shards.iter_samples(world["train"]))[:count]
    return [s[0] for s in samples], images_to_tensor([s[1] for s in samples]), [s[2] for s in samples]


def test_masks_with_fewer_pixels_than_k_or_none_are_counted_not_fatal(world):
    keys, images, records = _batch(world)
    tiny = np.zeros((64, 64), dtype=bool)
    tiny[10, 10:13] = True  # 3 pixels < k
    records[0] = {**records[0], "objects": [{"id": 7, "category_id": 1, "segmentation": encode_mask(tiny)},
                                            {"id": 8, "category_id": 1, "segmentation": encode_mask(tiny & False)}]}
    stats = MiningStats()
    out = mine_batch(load_segmenter(world["teacher"]), keys, images, records,
                     MinePartsParams(objects="gt", min_object_area=0.0, min_part_area=0.0), stats)
    assert stats.objects_too_small == 1  # the empty mask
    assert stats.objects_fewer_points_than_k == 1
    props = [decode_mask(p["segmentation"]) for p in out[0]]
    assert 1 <= len(props) <= 3 and np.array_equal(np.stack(props).any(0), tiny)


def test_all_identical_features_give_one_proposal_per_object(world):
    model = load_segmenter(world["teacher"])
    with torch.no_grad():
        for p in model.encoder.pixel_decoder.parameters():
            p.zero_()  # every pixel feature is the zero vector
    keys, images, records = _batch(world)
    stats = MiningStats()
    out = mine_batch(model, keys, images, records, MinePartsParams(objects="gt", min_object_area=0.0), stats)
    n_objects = sum(len(r["objects"]) for r in records)
    assert stats.objects_degenerate_features + stats.objects_fewer_points_than_k == n_objects
    for props, record in zip(out, records):
        assert len(props) == len(record["objects"])
        for p, o in zip(props, record["objects"]):
            assert np.array_equal(decode_mask(p["segmentation"]), decode_mask(o["segmentation"]))


def test_a_restarted_stage_skips_its_complete_part(tmp_path, world, one_rank):
    first, _ = mine(tmp_path, world)
    part = shards.part_dir(tmp_path / "out", 0)
    stamp = {p.name: p.stat().st_mtime_ns for p in part.iterdir()}
    again, samples = mine(tmp_path, world)
    assert {p.name: p.stat().st_mtime_ns for p in part.iterdir()} == stamp
    assert again.metrics["mine/proposals"] == first.metrics["mine/proposals"] and len(samples) == 12


def _proposal_sets(path):
    return {key: sorted((p["object_id"], p["segmentation"]["counts"]) for p in r["proposals"])
            for key, _, r in shards.iter_samples(path, decode=False)}


@pytest.mark.slow
def test_two_ranks_mine_the_same_proposals_as_one(tmp_path, world):
    out = {}
    for nproc in (1, 2):
        spec = stage_spec("mine-parts", tmp_path / f"work{nproc}", datasets={"images": world["train"]},
                          models={"teacher": world["teacher"]}, dataset_out=tmp_path / f"mined{nproc}", nproc=nproc,
                          params={"objects": "gt", "batch_size": 2})
        run_stage(spec, nproc=nproc)
        out[nproc] = _proposal_sets(tmp_path / f"mined{nproc}")
        assert result(tmp_path / f"work{nproc}")["metrics"]["mine/images"] == 12
    assert len(shards.DatasetIndex.load(tmp_path / "mined2").shards) >= 2  # both ranks' parts are listed
    assert out[1] == out[2]
