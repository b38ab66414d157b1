"""Stage ``instance-teacher``: trains (or imports) the object instance segmenter, reports COCOeval mask AP."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainers.models.io import load_segmenter, read_segmenter_file
from contract.stages.instance_teacher import InstanceTeacherParams
from trainers.evaluation.instances import coco_mask_ap
from trainers.models.presets import teacher_config
from trainers.structures import encode_mask

from runtime_helpers import REPO, run_stage
from stage_helpers import TINY_MODEL, mlflow_run, result, stage_spec, tiny_segmenter_file


def _record(key, objects):
    return {"key": key, "height": 8, "width": 8, "objects": objects}


def _square(x0, y0, x1, y1):
    m = np.zeros((8, 8), dtype=bool)
    m[y0:y1, x0:x1] = True
    return encode_mask(m)


CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def test_coco_mask_ap_is_one_for_the_ground_truth_itself():
    images = [_record("k0", [{"category_id": 1, "segmentation": _square(0, 0, 4, 4), "iscrowd": 0},
                             {"category_id": 2, "segmentation": _square(4, 4, 8, 8), "iscrowd": 0}])]
    results = [{"key": "k0", "category_id": o["category_id"], "segmentation": o["segmentation"], "score": 0.9}
               for o in images[0]["objects"]]
    m = coco_mask_ap(images, results, CATEGORIES)
    assert m["eval/mask_AP"] == pytest.approx(1.0) and m["eval/mask_AP_agnostic"] == pytest.approx(1.0)
    assert m["eval/objects"] == 2 and m["eval/images"] == 1


def test_coco_mask_ap_counts_a_wrong_class_only_against_the_class_aware_ap():
    images = [_record("k0", [{"category_id": 1, "segmentation": _square(0, 0, 4, 4), "iscrowd": 0}])]
    results = [{"key": "k0", "category_id": 2, "segmentation": _square(0, 0, 4, 4), "score": 0.9}]
    m = coco_mask_ap(images, results, CATEGORIES)
    assert m["eval/mask_AP"] == 0.0 and m["eval/mask_AP_agnostic"] == pytest.approx(1.0)


def test_coco_mask_ap_without_predictions_is_zero_not_an_error():
    images = [_record("k0", [{"category_id": 1, "segmentation": _square(0, 0, 4, 4), "iscrowd": 0}])]
    assert coco_mask_ap(images, [], CATEGORIES)["eval/mask_AP"] == 0.0


def test_model_config_takes_num_classes_from_the_data():
    cfg = teacher_config(InstanceTeacherParams(model={"decoder": {"num_classes": 99, "num_queries": 7}}).model, num_classes=3)
    assert cfg.decoder.num_classes == 3 and cfg.decoder.num_queries == 7


@pytest.mark.slow
def test_trains_under_torchrun_zero2_and_writes_a_segmenter_file_with_coco_metrics(tmp_path, tiny_partworld):
    uri, run_id, client = mlflow_run(tmp_path)
    spec = stage_spec("instance-teacher", tmp_path / "work", datasets=tiny_partworld, mlflow_uri=uri, run_id=run_id,
                      params={"steps": 4, "lr": 0.003, "checkpoint_every": 2, "model": TINY_MODEL})
    run_stage(spec)

    res = result(tmp_path / "work")
    assert res["status"] == "succeeded" and res["steps"] == 4
    assert res["model_path"] == str(tmp_path / "work" / "model.pt")
    model = load_segmenter(res["model_path"])
    assert model.cfg.decoder.num_classes == 3  # TINY_WORLD's categories
    assert read_segmenter_file(res["model_path"])["stage"] == "instance-teacher"
    for key in ("eval/mask_AP", "eval/mask_AP50", "eval/mask_AP75", "eval/mask_AP_agnostic"):
        assert 0.0 <= res["metrics"][key] <= 1.0
    assert res["metrics"]["eval/images"] == 16  # every eval image, from both ranks
    logged = client.get_run(run_id).data.metrics
    assert "eval/mask_AP" in logged and "train/loss" in logged
    assert (tmp_path / "work" / "checkpoints").is_dir()


@pytest.mark.slow
def test_import_from_a_segmenter_file_skips_training(tmp_path, tiny_partworld):
    source = tiny_segmenter_file(tmp_path / "imported.pt")
    spec = stage_spec("instance-teacher", tmp_path / "work", datasets={"eval": tiny_partworld["eval"]},
                      params={"import_from": str(source)}, nproc=1)
    path = spec.write(tmp_path / "spec.yaml")
    proc = subprocess.run([sys.executable, "-m", "trainers", "instance-teacher", "--spec", str(path)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1",
                                                              "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]

    res = result(tmp_path / "work")
    assert res["steps"] == 0 and not (tmp_path / "work" / "checkpoints").exists()
    imported, written = load_segmenter(source), load_segmenter(res["model_path"])
    for (k, a), b in zip(imported.state_dict().items(), written.state_dict().values()):
        assert torch.equal(a, b), k
    assert 0.0 <= res["metrics"]["eval/mask_AP"] <= 1.0


def test_missing_train_dataset_is_named_in_the_error(tmp_path):
    from trainers.inputs import StageInputError
    from trainers.stages.instance_teacher import run

    spec = stage_spec("instance-teacher", tmp_path / "work", datasets={"train": tmp_path / "nowhere"}, nproc=1)
    with pytest.raises(StageInputError, match="inputs.datasets.train"):
        run(spec)
