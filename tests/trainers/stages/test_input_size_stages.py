"""Stages at an input size (issue 11 item 5): 256 px images enter the models at 64 px; predictions, metrics and written
masks are at 256 px."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from stage_helpers import stage_spec, tiny_segmenter_file
from trainers.data import shards
from trainers.data.partworld import PartWorldConfig, category_table, generate, part_category_table
from trainers.evaluation.proposals import score_proposal_results
from trainers.structures import decode_mask

WORLD256 = PartWorldConfig(image_size=256, num_classes=3, num_part_types=4, min_parts=2, max_parts=3, max_instances=2,
                           min_object_area=512, max_distractors=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("size256")
    shards.write_dataset(generate(WORLD256, "eval", 0, 4), root / "eval", name="world256", split="eval",
                         categories=category_table(WORLD256), part_categories=part_category_table(WORLD256), shard_size=4)
    return {"eval": root / "eval", "model": tiny_segmenter_file(root / "model.pt", num_classes=1)}


def test_evaluate_proposals_at_min_size_64_writes_and_scores_masks_at_256(tmp_path, world, one_rank):
    from trainers.stages.evaluate_proposals import run

    spec = stage_spec("evaluate-proposals", tmp_path / "work", datasets={"eval": world["eval"]},
                      models={"parts": world["model"]}, nproc=1, dataset_out=tmp_path / "pred",
                      params={"min_size": 64, "top_k": 8, "max_dets": [1, 8], "coco": False})
    metrics = run(spec).metrics
    doc = json.loads((tmp_path / "pred" / "images.json").read_text())
    results = json.loads((tmp_path / "pred" / "proposals.json").read_text())
    assert [(im["height"], im["width"]) for im in doc["images"]] == [(256, 256)] * 4
    assert results and {tuple(r["segmentation"]["size"]) for r in results} == {(256, 256)}
    rescored = score_proposal_results(str(world["eval"]), tmp_path / "pred")
    assert rescored["eval/AR_8"] == pytest.approx(metrics["eval/AR_8"])

    # `selftrain predict --min-size` of the model as train-proposals saves it gives the stage's files
    from trainers.models.io import read_segmenter_file, save_segmenter
    from trainers.models.segmenter import SegmenterConfig

    blob = read_segmenter_file(world["model"])
    proposals_model = save_segmenter(tmp_path / "proposals.pt", SegmenterConfig(**blob["config"]), blob["state_dict"],
                                     stage="train-proposals")
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", str(proposals_model), str(world["eval"]),
                           "-o", str(tmp_path / "cli"), "--min-size", "64", "--top-k", "8"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "cli" / "proposals.json").read_bytes() == (tmp_path / "pred" / "proposals.json").read_bytes()


def test_mine_parts_at_min_size_64_partitions_the_256_px_objects(tmp_path, world, one_rank):
    from trainers.stages.mine_parts import run

    teacher = tiny_segmenter_file(tmp_path / "teacher.pt")
    spec = stage_spec("mine-parts", tmp_path / "work", datasets={"images": world["eval"]}, models={"teacher": teacher},
                      dataset_out=tmp_path / "mined", nproc=1,
                      params={"objects": "gt", "allow_parts": True, "min_size": 64, "min_part_area": 0.0})
    assert run(spec).metrics["mine/objects_mined"] > 0
    for _, _, record in shards.iter_samples(tmp_path / "mined", decode=False):
        for obj in record["objects"]:
            props = [decode_mask(p["segmentation"]) for p in record["proposals"] if p["object_id"] == obj["id"]]
            if props:  # every pixel of the 256 px object in exactly one proposal: assigned at full resolution
                stack = np.stack(props)
                assert stack.shape[1:] == (256, 256) and (stack.sum(0) <= 1).all()
                assert np.array_equal(stack.any(0), decode_mask(obj["segmentation"]))
