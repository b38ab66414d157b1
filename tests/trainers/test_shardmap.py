"""The shard-map skeleton every labelling stage runs: skip a finished part, redo it for changed params, never
publish a part that died half-way."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from contract.spec import StageSpec
from contract.stages.pseudo_label import PseudoLabelParams
from runtime_helpers import write_partworld
from trainers.comm import Stats
from trainers.data import shards
from trainers.shardmap import MARKER_DIR, ShardMap, fingerprint


@dataclass
class Counted(Stats):
    prefix = "test/"

    images: int = 0
    proposals: int = 0


@pytest.fixture
def images(tmp_path):
    return write_partworld(tmp_path / "images", "train", 10, shard_size=4)


def spec_for(tmp_path, images) -> StageSpec:
    return StageSpec.model_validate({"stage": "pseudo-label", "name": "t", "outputs": {"workdir": str(tmp_path / "w"),
                                     "dataset": str(tmp_path / "out")}, "inputs": {"datasets": {"images": {"path": str(images)}}}})


def run(spec, params, calls, crash_after=None):
    def labeller(d):
        def label(keys, images, records, stats):
            calls.append(len(keys))
            if crash_after is not None and len(calls) > crash_after:
                raise RuntimeError("simulated crash")
            stats.images += len(keys)
            stats.proposals += 2 * len(keys)
            return [[] for _ in keys]

        return label

    return ShardMap(spec, params, name="t").run(labeller, Counted())


def test_a_rerun_skips_the_finished_part_and_changed_params_redo_it(tmp_path, images, one_rank):
    spec, calls = spec_for(tmp_path, images), []
    first = run(spec, PseudoLabelParams(batch_size=4), calls)
    assert first.metrics == {"test/images": 10.0, "test/proposals": 20.0} and calls == [4, 4, 2]
    part = shards.part_dir(tmp_path / "out", 0)
    stamp = {p.name: p.stat().st_mtime_ns for p in part.iterdir()}
    again = run(spec, PseudoLabelParams(batch_size=4), calls)
    assert calls == [4, 4, 2] and again.metrics == first.metrics  # skipped: the saved counts
    assert {p.name: p.stat().st_mtime_ns for p in part.iterdir()} == stamp
    changed = run(spec, PseudoLabelParams(batch_size=5), calls)
    assert calls[3:] == [5, 5] and changed.metrics == first.metrics
    assert len(list(shards.iter_samples(tmp_path / "out", decode=False))) == 10


def test_a_crash_mid_write_publishes_nothing_and_the_rerun_completes(tmp_path, images, one_rank):
    spec, calls = spec_for(tmp_path, images), []
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(spec, PseudoLabelParams(batch_size=4, shard_size=2), calls, crash_after=2)
    part = shards.part_dir(tmp_path / "out", 0)
    with pytest.raises(shards.DataError):
        shards.DatasetIndex.load(part)  # no index: readers never see the half-written part
    assert not (tmp_path / "w" / MARKER_DIR / f"{part.name}.json").exists()
    with pytest.raises(shards.DataError):
        shards.DatasetIndex.load(tmp_path / "out")
    result = run(spec, PseudoLabelParams(batch_size=4, shard_size=2), calls)
    assert result.metrics["test/images"] == 10.0 and len(shards.verify(tmp_path / "out").shards) == 5


def test_the_done_marker_lives_in_the_workdir_so_the_dataset_holds_no_timings(tmp_path, images, one_rank):
    spec = spec_for(tmp_path, images)
    run(spec, PseudoLabelParams(batch_size=5), [])
    part = shards.part_dir(tmp_path / "out", 0)
    marker = tmp_path / "w" / MARKER_DIR / f"{part.name}.json"
    assert marker.is_file() and str(part) in marker.read_text()
    assert not any("fingerprint" in f.read_text() or "seconds" in f.read_text()
                   for f in (tmp_path / "out").rglob("*.json")), "dataset files must not depend on the run"


def test_the_fingerprint_covers_inputs_params_with_defaults_and_world_size(tmp_path, images):
    spec = spec_for(tmp_path, images)
    base = fingerprint(spec, PseudoLabelParams(), 1)
    assert base == fingerprint(spec, PseudoLabelParams(batch_size=16), 1)  # a default spelt out changes nothing
    assert base != fingerprint(spec, PseudoLabelParams(batch_size=8), 1)
    assert base != fingerprint(spec, PseudoLabelParams(), 2)
    other = spec.model_copy(deep=True)
    other.inputs.datasets["images"].dvc_hash = "abc"
    assert base != fingerprint(other, PseudoLabelParams(), 1)


def test_a_pinned_dataset_enters_the_fingerprint_by_content_not_by_its_mount_path(tmp_path, images):
    spec = spec_for(tmp_path, images)
    spec.inputs.datasets["images"].dvc_hash = "0123.dir"
    moved = spec.model_copy(deep=True)
    moved.inputs.datasets["images"].path = "/data/somewhere/else"  # the same version where a cluster mounts it
    assert fingerprint(spec, PseudoLabelParams(), 1) == fingerprint(moved, PseudoLabelParams(), 1)
    moved.inputs.datasets["images"].dvc_hash = "4567.dir"
    assert fingerprint(spec, PseudoLabelParams(), 1) != fingerprint(moved, PseudoLabelParams(), 1)


def test_counters_add_and_become_metrics():
    a, b = Counted(images=1, proposals=2), Counted(images=3, proposals=4)
    a.add(b)
    assert a.as_metrics() == {"test/images": 4.0, "test/proposals": 6.0}
    assert Counted.from_dict(a.to_dict()) == a
