"""Issue 16 item 1: kill -9 of a random rank at a random point of a training and of a labelling stage, then rerun.

The stage finishes, at most one checkpoint interval is lost, no published shard fails its index checksum, and
the outputs equal an unfaulted run's (weights within 1e-5; shards and indexes byte for byte). One trial each
here; ``python benchmarks/faults.py --trials N`` runs more.
"""
from __future__ import annotations

import pytest

import harness
from conftest import assert_trial


@pytest.mark.slow
def test_a_killed_training_rank_resumes_and_ends_with_the_unfaulted_weights(world, rng, tmp_path):
    assert_trial(harness.trial_kill_training(world, rng, tmp_path))


@pytest.mark.slow
def test_a_killed_shard_map_rank_reruns_to_byte_identical_shards(world, rng, tmp_path):
    assert_trial(harness.trial_kill_shardmap(world, rng, tmp_path))
