"""CaSP's joint self-training baseline: join-datasets writes both inputs as one dataset (categories must match, keys
must differ); instance-teacher's ``joint`` targets train a record on its ground truth when it has any, else on its
pseudo-labels."""
from __future__ import annotations

import pytest
import torch

from trainers.data import shards
from trainers.data.pseudo_labels import training_targets
from trainers.inputs import StageInputError

from stage_helpers import stage_spec, write_world64


def _pseudo_labeled(record: dict) -> dict:
    """A labeled record turned into a detect-pseudo-label record: objects emptied, each object a class-specific proposal."""
    out = {k: v for k, v in record.items() if k != "parts"}
    out["proposals"] = [{"segmentation": o["segmentation"], "score": 0.9, "area": o["area"], "label": 0,
                         "category_id": o["category_id"]} for o in record["objects"]]
    out["objects"] = []
    return out


def _pseudo_dataset(path, count: int):
    def rekey(sample):
        key, image, record = sample
        return f"u-{key}", image, _pseudo_labeled(record)
    return write_world64(path, "train", count, shard_size=4, records=rekey)


def test_join_writes_every_sample_of_both_inputs_unchanged(tmp_path, one_rank):
    from trainers.stages.join_datasets import run

    labeled = write_world64(tmp_path / "labeled", "train", 5, shard_size=4)
    pseudo = _pseudo_dataset(tmp_path / "pseudo", 7)
    spec = stage_spec("join-datasets", tmp_path / "work", datasets={"images": labeled, "extra": pseudo},
                      dataset_out=tmp_path / "joint", nproc=1)
    res = run(spec)
    assert res.metrics["join/images"] == 5 and res.metrics["join/extra"] == 7
    joined = {k: r for k, _, r in shards.iter_samples(tmp_path / "joint")}
    inputs = {k: r for path in (labeled, pseudo) for k, _, r in shards.iter_samples(path)}
    assert joined == inputs and len(joined) == 12
    assert shards.DatasetIndex.load(tmp_path / "joint").categories == shards.DatasetIndex.load(labeled).categories


def test_a_key_in_both_inputs_is_named_and_nothing_is_published(tmp_path, one_rank):
    from trainers.stages.join_datasets import run

    labeled = write_world64(tmp_path / "labeled", "train", 3, shard_size=4)
    spec = stage_spec("join-datasets", tmp_path / "work", datasets={"images": labeled, "extra": labeled},
                      dataset_out=tmp_path / "joint", nproc=1)
    with pytest.raises(StageInputError, match="is in both inputs.datasets.images"):
        run(spec)
    assert not (tmp_path / "joint" / "index.json").exists()


def test_joint_targets_use_ground_truth_where_present_and_pseudo_labels_elsewhere(tmp_path):
    labeled = write_world64(tmp_path / "labeled", "train", 2, shard_size=4)
    (_, _, gt), = [s for s in shards.iter_samples(labeled)][:1]
    labels = {int(c["id"]): i for i, c in enumerate(shards.DatasetIndex.load(labeled).categories)}
    targets = training_targets("joint", labels, class_agnostic=False)
    with_gt = {**gt, "proposals": [{"segmentation": gt["objects"][0]["segmentation"], "score": 0.9, "area": 1, "label": 0,
                                    "category_id": gt["objects"][0]["category_id"]}] * 3}
    t = targets(with_gt)  # ground truth wins: the 3 proposals are not read
    assert t["labels"].tolist() == [labels[o["category_id"]] for o in gt["objects"]]
    t = targets(_pseudo_labeled(gt))
    assert t["labels"].tolist() == [labels[o["category_id"]] for o in gt["objects"]] and t["masks"].shape[0] == len(gt["objects"])
    agnostic = training_targets("joint", labels, class_agnostic=True)
    assert torch.equal(agnostic(_pseudo_labeled(gt))["labels"], torch.zeros(len(gt["objects"]), dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown targets"):
        training_targets("objectz", labels, class_agnostic=False)
