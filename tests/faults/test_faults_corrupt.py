"""Issue 16 item 5: corrupt state. A damaged ``index.json``, a corrupt record inside an otherwise valid shard, a
truncated or unloadable checkpoint, a NaN or infinite loss: each is a clear error naming the file, sample or step,
or (checkpoints) a logged fallback to the previous good one; never a silent run on bad state.
"""
from __future__ import annotations

import io
import json
import random
import tarfile

import pytest

import harness
from conftest import assert_trial
from runtime_helpers import TINY_WORLD
from trainers.data import shards
from trainers.data.partworld import category_table, generate


@pytest.fixture
def dataset(tmp_path):
    out = tmp_path / "data"
    shards.write_dataset(generate(TINY_WORLD, "train", 0, 8), out, name="d", split="train",
                         categories=category_table(TINY_WORLD), shard_size=4)
    return out


def _read_all(path):
    shards.verify(path)
    return list(shards.iter_samples(path, decode=True))


def _damaged_indexes(raw: dict, rng: random.Random):
    text = json.dumps(raw, indent=1)
    yield "truncated", text[:rng.randint(0, len(text) - 1)]
    yield "bytes flipped", "".join(c if rng.random() > 0.02 else chr(rng.randint(32, 126)) for c in text)
    yield "empty", ""
    yield "a list", "[]"
    for field, value in [("shards", {}), ("shards", [1]), ("num_samples", "8"), ("num_samples", 9), ("categories", [None]),
                         ("has_parts", "no"), ("format_version", 2), ("name", None)]:
        yield f"{field}={value!r}", json.dumps({**raw, field: value})
    shard = dict(raw["shards"][0])
    for field, value in [("name", "../../etc/passwd"), ("name", None), ("bytes", -1), ("num_samples", 1.5),
                         ("sha256", 7)]:
        yield f"shards[0].{field}={value!r}", json.dumps({**raw, "shards": [{**shard, field: value}] + raw["shards"][1:]})
    yield "a shard dropped", json.dumps({**raw, "shards": raw["shards"][1:]})
    yield "a field missing", json.dumps({k: v for k, v in raw.items() if k != "split"})


def test_a_damaged_index_is_a_data_error_naming_it(dataset, tmp_path):
    index = dataset / shards.INDEX_FILE
    raw = json.loads(index.read_text())
    rng = random.Random(16)
    for what, text in _damaged_indexes(raw, rng):
        index.write_text(text)
        try:
            _read_all(dataset)
        except shards.DataError as e:
            assert str(dataset) in str(e), f"{what}: {e}"
            continue
        except Exception as e:  # anything else is a raw traceback from inside the reader
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
        raise AssertionError(f"{what}: the damaged index was read without an error")


def _rewrite_record(shard, key: str, payload: bytes) -> None:
    """Replace the ``<key>.json`` member of a shard with ``payload`` of the same length (the shard size stays)."""
    data = bytearray(shard.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r:") as tar:
        member = tar.getmember(f"{key}.json")
        assert len(payload) == member.size
        data[member.offset_data:member.offset_data + member.size] = payload
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("garbage", [b"{", b"\xff", b"["])
def test_a_corrupt_record_in_a_valid_looking_shard_names_the_shard_and_the_sample(dataset, garbage):
    index = shards.DatasetIndex.load(dataset)
    shard = dataset / index.shards[1]["name"]
    key = [k for k, _, _ in shards.iter_samples(dataset, decode=False)][5]
    size = tarfile.open(shard).getmember(f"{key}.json").size
    _rewrite_record(shard, key, (garbage * size)[:size])
    with pytest.raises(shards.DataError, match="sha256 mismatch") as e:
        shards.verify(dataset)  # the index checksum catches it
    assert str(shard) in str(e.value)
    with pytest.raises(shards.DataError, match=f"sample {key}: bad JSON record") as e:
        list(shards.iter_samples(dataset))  # and so does the reader, naming the sample
    assert str(shard) in str(e.value)


def test_a_stage_reading_a_corrupt_record_fails_naming_shard_and_sample(dataset, tmp_path, monkeypatch):
    from contract.spec import StageSpec
    from contract.stages.pseudo_label import PseudoLabelParams
    from trainers.comm import Stats
    from trainers.shardmap import ShardMap

    index = shards.DatasetIndex.load(dataset)
    shard = dataset / index.shards[0]["name"]
    key = [k for k, _, _ in shards.iter_samples(dataset, decode=False)][2]
    size = tarfile.open(shard).getmember(f"{key}.json").size
    _rewrite_record(shard, key, b"}" * size)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(harness.free_port()), "TQDM_DISABLE": "1"}.items():
        monkeypatch.setenv(k, v)
    spec = StageSpec.model_validate({"stage": "pseudo-label", "name": "t", "outputs": {
        "workdir": str(tmp_path / "w"), "dataset": str(tmp_path / "out")},
        "inputs": {"datasets": {"images": {"path": str(dataset)}}}})
    import torch.distributed as dist

    try:
        with pytest.raises(shards.DataError, match=f"sample {key}: bad JSON record") as e:
            ShardMap(spec, PseudoLabelParams(batch_size=2), name="t").run(
                lambda d: (lambda keys, images, records, stats: [[] for _ in keys]), Stats())
        assert str(shard) in str(e.value)
        assert not (tmp_path / "out" / shards.INDEX_FILE).exists()
        assert not (shards.part_dir(tmp_path / "out", 0) / shards.INDEX_FILE).exists()  # nothing half-labelled published
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_an_unloadable_newest_checkpoint_falls_back_to_the_previous_one(world, rng, tmp_path):
    assert_trial(harness.trial_bad_checkpoint(world, rng, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_non_finite_loss_stops_naming_the_step_or_is_skipped_by_config(world, rng, tmp_path, mode):
    assert_trial(harness.trial_nonfinite_loss(world, rng, tmp_path, mode))
