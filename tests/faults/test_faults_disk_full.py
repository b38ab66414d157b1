"""Issue 16 item 4: a full disk (a real tmpfs, ``mount -t tmpfs``: ENOSPC) while writing shards and checkpoints.

The error names the path and says the disk is full (a ``WriteError``/``CheckpointError``, not a bare errno);
no partial shard, index or checkpoint is visible; once space is freed the stage resumes and its outputs equal
an unfaulted run's. The suite runs as root (CI's container); ``mount`` must work there.
"""
from __future__ import annotations

import shutil

import pytest

import harness
from conftest import assert_trial
from runtime_helpers import TINY_WORLD
from trainers.data import shards
from trainers.data.partworld import category_table, generate


@pytest.fixture
def disk(tmp_path):
    why = harness.can_mount_tmpfs(tmp_path)
    assert why is None, f"the disk-full tests need `mount -t tmpfs` (run as root): {why}"
    with harness.tmpfs(tmp_path / "disk", "2m") as d:
        yield d


def _samples(n=24):
    return generate(TINY_WORLD, "train", 0, n)


def test_write_dataset_on_a_full_disk_names_the_file_and_leaves_the_old_dataset(disk, tmp_path):
    out = disk / "data"
    old = shards.write_dataset(_samples(4), out, name="old", split="train", categories=category_table(TINY_WORLD),
                               shard_size=2)
    reference = tmp_path / "reference"
    shards.write_dataset(_samples(), reference, name="new", split="train", categories=category_table(TINY_WORLD),
                         shard_size=4)
    size = sum(p.stat().st_size for p in reference.iterdir())
    for leave in (size // 5, size // 2, size - 2000):  # the disk fills in the first, a middle and the last shard
        filler = harness.fill(disk, leave)
        with pytest.raises(shards.WriteError, match="disk full") as e:
            shards.write_dataset(_samples(), out, name="new", split="train", categories=category_table(TINY_WORLD),
                                 shard_size=4)
        assert str(out) in str(e.value)  # names the file it was writing
        assert shards.verify(out) == old  # the previous dataset is still the published one, intact
        assert sorted(p.name for p in out.iterdir()) == sorted([shards.INDEX_FILE] + [s["name"] for s in old.shards])
        filler.unlink()
    new = shards.write_dataset(_samples(), out, name="new", split="train", categories=category_table(TINY_WORLD),
                               shard_size=4)
    assert [s["sha256"] for s in new.shards] == [s["sha256"] for s in shards.verify(reference).shards]


def test_an_index_that_cannot_be_written_is_a_write_error_naming_it(disk):
    out = disk / "data"
    out.mkdir()
    filler = harness.fill(disk, 0)
    index = shards.DatasetIndex(name="x", split="train", num_samples=0, categories=[], part_categories=None,
                                has_parts=False, shards=[])
    with pytest.raises(shards.WriteError, match="disk full") as e:
        index.save(out)
    assert str(out / shards.INDEX_FILE) in str(e.value) or str(out) in str(e.value)
    assert not list(out.iterdir())  # no temp file left behind
    filler.unlink()
    shutil.rmtree(out)


@pytest.mark.slow
def test_a_training_stage_on_a_full_disk_fails_naming_the_checkpoint_and_resumes_once_freed(world, rng, tmp_path):
    assert harness.can_mount_tmpfs(tmp_path) is None
    assert_trial(harness.trial_disk_full_checkpoint(world, rng, tmp_path))


@pytest.mark.slow
def test_a_labelling_stage_on_a_full_disk_fails_naming_the_shard_and_reruns_to_identical_bytes(world, rng, tmp_path):
    assert harness.can_mount_tmpfs(tmp_path) is None
    assert_trial(harness.trial_disk_full_shards(world, rng, tmp_path))
