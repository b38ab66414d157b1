"""Stage ``pseudo-label``: the part model's predictions, filtered and clipped to instances, as the next round's proposals."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from trainers.data import shards
from contract.stages.pseudo_label import DEFINITION, PseudoLabelParams
from trainers.parts.filters import PseudoLabelStats, filter_parts
from trainers.structures import decode_mask

from runtime_helpers import REPO, run_stage
from stage_helpers import result, stage_spec, tiny_segmenter_file, write_world64


def _box(x0, y0, x1, y1, size=16):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


OBJECTS = torch.stack([_box(0, 0, 8, 8), _box(8, 8, 16, 16)])
CFG = PseudoLabelParams(score_threshold=0.5, min_overlap=0.5, min_part_area=0.05, duplicate_iou=0.7)


def _filter(parts, scores, cfg=CFG):
    stats = PseudoLabelStats()
    out = filter_parts(torch.stack(parts), torch.tensor(scores), OBJECTS, ["a", "b"], cfg, stats)
    return out, stats


def test_a_part_inside_an_instance_is_kept_with_its_object_id():
    out, stats = _filter([_box(0, 0, 4, 4)], [0.9])
    assert [p["object_id"] for p in out] == ["a"] and out[0]["area"] == 16 and out[0]["label"] == 0
    assert stats.kept == 1 and stats.predicted == 1


def test_a_part_sticking_out_of_its_instance_is_clipped_to_it():
    out, _ = _filter([_box(4, 0, 10, 4)], [0.9])  # 4 of its 6 columns inside object a
    mask = decode_mask(out[0]["segmentation"])
    assert out[0]["object_id"] == "a" and mask.sum() == 16 and not mask[:, 8:].any()


def test_low_scores_parts_outside_instances_tiny_parts_and_duplicates_are_dropped_and_counted():
    parts = [_box(0, 0, 4, 4), _box(0, 0, 4, 4), _box(0, 8, 8, 16), _box(0, 0, 1, 1), _box(0, 0, 4, 5),
             _box(9, 9, 15, 15)]
    scores = [0.4, 0.95, 0.9, 0.9, 0.8, 0.7]
    out, stats = _filter(parts, scores)
    assert stats.dropped_low_score == 1  # 0.4
    assert stats.dropped_outside_objects == 1  # the box in the empty quadrant
    assert stats.dropped_small == 1  # 1 px < 5% of 64 px
    assert stats.dropped_duplicate == 1  # 4x5 box vs the kept 4x4 box: IoU 0.8
    assert stats.kept == 2 and [p["object_id"] for p in out] == ["a", "b"]
    assert all(p["score"] > CFG.score_threshold for p in out)


def test_no_instances_drops_every_part_as_outside():
    stats = PseudoLabelStats()
    out = filter_parts(torch.stack([_box(0, 0, 4, 4)]), torch.tensor([0.9]), torch.zeros(0, 16, 16, dtype=torch.bool),
                       [], CFG, stats)
    assert out == [] and stats.dropped_outside_objects == 1


def test_objects_must_be_detected_or_gt():
    with pytest.raises(ValueError, match="objects"):
        DEFINITION.parse({"objects": "both"})


def _drop_objects_of_every_third(sample):
    key, image, record = sample
    if int(record["image_id"]) % 3 == 0:
        record = {**record, "objects": []}
    return key, image, record


def _inside_own_object(record) -> bool:
    objects = {o["id"]: decode_mask(o["segmentation"]) for o in record["objects"]}
    return all(not (decode_mask(p["segmentation"]) & ~objects[p["object_id"]]).any() for p in record["proposals"])


@pytest.mark.slow
def test_gt_objects_two_ranks_write_proposals_inside_instances_and_a_rerun_skips(tmp_path):
    images = write_world64(tmp_path / "images", "train", 24, shard_size=6, records=_drop_objects_of_every_third)
    parts = tiny_segmenter_file(tmp_path / "parts.pt", num_classes=1)
    out = tmp_path / "pseudo"
    spec = stage_spec("pseudo-label", tmp_path / "work", datasets={"images": images}, models={"parts": parts},
                      dataset_out=out, params={"objects": "gt", "score_threshold": 0.05, "min_part_area": 0.0,
                              "min_overlap": 0.0})  # an untrained model: keep whatever touches an object
    run_stage(spec)

    metrics = result(tmp_path / "work")["metrics"]
    assert metrics["pseudo_label/images"] == 24 and metrics["pseudo_label/images_without_objects"] == 8
    records = [r for _, _, r in shards.iter_samples(out)]
    assert len(records) == 24 and len(shards.verify(out).shards) == 2  # one part per rank
    assert sum(len(r["proposals"]) for r in records) == metrics["pseudo_label/kept"] > 0
    assert all(not r["proposals"] for r in records if not r["objects"])
    assert all(p["score"] > 0.05 for r in records for p in r["proposals"])
    assert all(_inside_own_object(r) for r in records)

    index_before = (out / "index.json").read_text()
    proc = run_stage(spec)
    assert "already holds this share" in proc.stdout + proc.stderr
    assert (out / "index.json").read_text() == index_before
    assert result(tmp_path / "work")["metrics"] == metrics


@pytest.mark.slow
def test_images_without_detections_are_counted_not_an_error(tmp_path):
    images = write_world64(tmp_path / "images", "train", 6, shard_size=6)
    spec = stage_spec("pseudo-label", tmp_path / "work", datasets={"images": images},
                      models={"parts": tiny_segmenter_file(tmp_path / "parts.pt", num_classes=1),
                              "instance_teacher": tiny_segmenter_file(tmp_path / "teacher.pt")},
                      dataset_out=tmp_path / "pseudo", nproc=1,
                      params={"objects": "detected", "object_score_threshold": 1.0, "score_threshold": 0.0})
    path = spec.write(tmp_path / "spec.yaml")
    proc = subprocess.run([sys.executable, "-m", "trainers", "pseudo-label", "--spec", str(path)], cwd=REPO,
                          capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = result(tmp_path / "work")["metrics"]
    assert metrics["pseudo_label/images_without_objects"] == 6 == metrics["pseudo_label/images_without_proposals"]
    assert metrics["pseudo_label/kept"] == 0 and metrics["pseudo_label/dropped_outside_objects"] > 0
    assert all(r["proposals"] == [] for _, _, r in shards.iter_samples(tmp_path / "pseudo"))


def test_missing_output_dataset_is_an_error(tmp_path):
    from trainers.inputs import StageInputError
    from trainers.stages.pseudo_label import run

    spec = stage_spec("pseudo-label", tmp_path / "work", datasets={"images": tmp_path}, nproc=1)
    with pytest.raises(StageInputError, match="outputs.dataset"):
        run(spec)
