"""CaSP's entity labels (sec. 3.3): the labeling detector's targets are things and stuff as one class-free entity, its
file is marked so; detect-pseudo-label with entities keeps every entity and copies no ground truth (neither objects nor
stuff); a detector trained the other way, or entities on data without stuff, is a named error."""
from __future__ import annotations

import pytest

from trainers.data import shards
from trainers.data.partworld import category_table, generate
from trainers.inputs import StageInputError
from trainers.models.io import read_segmenter_file

from stage_helpers import TINY_MODEL, WORLD64, stage_spec, tiny_segmenter_file, write_world64

STUFF64 = WORLD64.model_copy(update={"stuff_classes": 3})


def _stuff_world(out, start: int, count: int, strip: bool = False):
    def samples():
        for key, image, record in generate(STUFF64, "train", start, count):
            if strip:  # an unlabeled split: images only
                record = {**{k: v for k, v in record.items() if k not in ("stuff", "parts")}, "objects": []}
            yield key, image, record

    shards.write_dataset(samples(), out, name="stuff64", split="train", categories=category_table(STUFF64),
                         shard_size=count)
    return out


def test_entity_training_targets_are_every_thing_and_stuff_region_as_one_class(tmp_path):
    """What instance-teacher feeds the engine with entities: true (the DeepSpeed loop itself is the engine's tests')."""
    import functools

    from trainers.data.batches import ToTrainSample
    from trainers.stages.instance_teacher import _entity_labels, entity_targets

    labeled = _stuff_world(tmp_path / "labeled", 0, 4)
    labels = _entity_labels(str(labeled))
    assert labels == {c["id"]: 0 for c in category_table(STUFF64)}  # things and stuff alike
    transform = ToTrainSample(functools.partial(entity_targets, labels=labels), flip_prob=0.0)
    for sample in shards.iter_samples(labeled):
        image, target = transform(sample)
        n = len(sample[2]["objects"]) + len(sample[2]["stuff"])
        assert len(sample[2]["stuff"]) > 0 and target["labels"].tolist() == [0] * n
        assert tuple(target["masks"].shape) == (n, 64, 64) and tuple(image.shape) == (3, 64, 64)


def test_an_entity_detector_is_marked_and_its_pseudo_labels_keep_entities_only(tmp_path, one_rank):
    from trainers.stages.detect_pseudo_label import run as label
    from trainers.stages.instance_teacher import run as teacher

    # an imported detector declared an entity detector (training marks it the same way: instance_teacher.run)
    source = tiny_segmenter_file(tmp_path / "h_L.pt", num_classes=1)
    spec = stage_spec("instance-teacher", tmp_path / "work", nproc=1,
                      params={"import_from": str(source), "class_agnostic": True, "entities": True})
    res = teacher(spec)
    blob = read_segmenter_file(res.model_path)
    assert blob["entities"] is True and blob["class_agnostic"] is True and blob["config"]["decoder"]["num_classes"] == 1

    unlabeled = _stuff_world(tmp_path / "unlabeled", 4, 4, strip=True)
    with_gt = _stuff_world(tmp_path / "with-gt", 4, 4)
    for images, out in ((unlabeled, "pseudo"), (with_gt, "pseudo-gt")):
        spec = stage_spec("detect-pseudo-label", tmp_path / f"work-{out}", datasets={"images": images},
                          models={"detector": res.model_path}, dataset_out=tmp_path / out, nproc=1,
                          params={"delta": 0.0, "entities": True})
        m = label(spec).metrics
        records = [r for _, _, r in shards.iter_samples(tmp_path / out)]
        assert m["pseudo/images"] == 4 and records and all(r["proposals"] for r in records)
        assert all(r["objects"] == [] and "stuff" not in r and "category_id" not in r["proposals"][0] for r in records)
    gt = [r for _, _, r in generate(STUFF64, "train", 4, 4)]
    assert m["pseudo/gt_objects_dropped"] == sum(len(r["objects"]) + len(r["stuff"]) for r in gt)

    objects_mode = stage_spec("detect-pseudo-label", tmp_path / "work-objects", datasets={"images": unlabeled},
                              models={"detector": res.model_path}, dataset_out=tmp_path / "objects", nproc=1,
                              params={"delta": 0.0})
    with pytest.raises(StageInputError, match=r"trained on entities \(things and stuff\) but params.entities is false"):
        label(objects_mode)


def test_entities_need_a_detector_trained_on_them_and_data_with_stuff(tmp_path, one_rank):
    from trainers.stages.detect_pseudo_label import run as label
    from trainers.stages.instance_teacher import run as train

    images = write_world64(tmp_path / "plain", "train", 2, shard_size=2)
    spec = stage_spec("detect-pseudo-label", tmp_path / "work", datasets={"images": images},
                      models={"detector": tiny_segmenter_file(tmp_path / "det.pt", num_classes=1)},
                      dataset_out=tmp_path / "pseudo", nproc=1, params={"entities": True})
    with pytest.raises(StageInputError, match=r"trained on objects only but params.entities is true"):
        label(spec)
    spec = stage_spec("instance-teacher", tmp_path / "work2", datasets={"train": images}, nproc=1,
                      params={"steps": 1, "class_agnostic": True, "entities": True, "model": TINY_MODEL})
    with pytest.raises(StageInputError, match=r"has no stuff category \(isthing 0\)"):
        train(spec)
