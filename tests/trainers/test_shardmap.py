"""The shard-map skeleton every labelling stage runs: skip a finished part, redo it for changed params, never
publish a part that died half-way."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from contract.spec import StageSpec
from contract.stages.pseudo_label import PseudoLabelParams
from runtime_helpers import write_partworld
from trainers.comm import Stats
from trainers.data import shards
from trainers.shardmap import MARKER_DIR, PIPELINE_DEPTH, ShardMap, background, fingerprint


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


def test_background_keeps_the_order_bounds_its_lead_and_stops_with_the_consumer():
    pulled = []

    def items():
        for i in range(100):
            pulled.append(i)
            yield i

    before = threading.active_count()
    it = background(items(), name="t")
    assert next(it) == 0
    time.sleep(0.2)  # room for a producer that ignored its bound to run ahead
    assert len(pulled) <= PIPELINE_DEPTH + 2  # the one handed over, the queue, the one waiting to be put
    assert list(zip(range(3), it)) == [(0, 1), (1, 2), (2, 3)]
    it.close()  # the consumer stops early: the producer stops and is joined
    assert threading.active_count() == before and len(pulled) < 100

    def failing():
        yield "a"
        raise KeyError("b")

    got = []
    with pytest.raises(KeyError) as err:
        got.extend(background(failing(), name="loader"))
    assert got == ["a"] and any("loader thread" in n for n in err.value.__notes__)
    assert threading.active_count() == before


def test_an_error_in_any_thread_of_the_map_names_its_samples_and_publishes_nothing(tmp_path, images, one_rank):
    spec, before = spec_for(tmp_path, images), threading.active_count()
    keys = [k for k, _, _ in shards.iter_samples(images, decode=False)]

    def bad(where):
        def prepare(key, image):
            if where == "prepare" and key == keys[6]:
                raise ValueError("cannot augment")
            return image

        def label(keys_, images_, records, stats):
            if where == "label" and keys[6] in keys_:
                raise RuntimeError("forward failed")
            return [[] for _ in keys_]

        def finish(key, blob, image, record, out):
            if where == "finish" and key == keys[6]:
                raise ValueError("cannot encode")
            return key, blob, record

        sm = ShardMap(spec, PseudoLabelParams(batch_size=4, shard_size=2), name="t")
        return lambda: sm.write_part(lambda: sm.labelled(label, Counted(), prepare=prepare, finish=finish), Counted())

    for where, note in [("prepare", f"preparing sample {keys[6]!r}"), ("label", f"labelling sample(s) {keys[4]!r}"),
                        ("finish", f"finishing sample {keys[6]!r}")]:
        with pytest.raises((ValueError, RuntimeError)) as err:
            bad(where)()
        assert any(note in n for n in err.value.__notes__), (where, err.value.__notes__)
        with pytest.raises(shards.DataError):
            shards.DatasetIndex.load(shards.part_dir(tmp_path / "out", 0))
        assert threading.active_count() == before, where  # every thread of the map stopped and joined
    bad("nothing")()
    assert [k for k, _, _ in shards.iter_samples(shards.part_dir(tmp_path / "out", 0), decode=False)] == keys  # in order
