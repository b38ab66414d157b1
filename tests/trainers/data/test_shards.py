"""WebDataset shards: round trip, determinism, checksums, multi-rank splits, atomic writes, bad input."""
from __future__ import annotations

import glob
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from trainers.data import shards
from trainers.data.shards import BadSample, DataError, DatasetIndex, PartsNotAllowedError
from trainers.structures import annotation_from_mask, decode_mask

CATS = [{"id": 1, "name": "box"}, {"id": 5, "name": "disc"}]
PART_CATS = [{"id": 1, "name": "left"}, {"id": 2, "name": "right"}]


def make_samples(n: int, seed: int = 0, size: int = 24, parts: bool = False):
    """Random images with 1-2 rectangle objects (and their left/right halves as parts)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
        objects, part_list = [], []
        for oid in range(1, int(rng.integers(1, 3)) + 1):
            m = np.zeros((size, size + 4), bool)
            y, x = rng.integers(0, size // 2, 2)
            m[y:y + size // 2, x:x + size // 2] = True
            objects.append(annotation_from_mask(m, id=oid, category_id=int(rng.choice([1, 5])), iscrowd=0))
            half = x + size // 4
            for pc, sel in ((1, np.s_[:, :half]), (2, np.s_[:, half:])):
                pm = np.zeros_like(m)
                pm[sel] = m[sel]
                part_list.append(annotation_from_mask(pm, id=len(part_list) + 1, object_id=oid, category_id=pc))
        rec = {"image_id": 100 + i, "file_name": f"img/{i}.png", "height": size, "width": size + 4, "objects": objects}
        if parts:
            rec["parts"] = part_list
        out.append((f"s{i:05d}", img, rec))
    return out


def write(samples, d: Path, **kw):
    kw.setdefault("shard_size", 4)
    return shards.write_dataset(iter(samples), d, name="toy", split=kw.pop("split", "train"), categories=CATS, **kw)


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_round_trip_keeps_images_masks_and_records(tmp_path: Path) -> None:
    samples = make_samples(10)
    index = write(samples, tmp_path / "ds")
    assert index.num_samples == 10 and [s["num_samples"] for s in index.shards] == [4, 4, 2]
    got = list(shards.iter_samples(tmp_path / "ds"))
    assert [k for k, _, _ in got] == [k for k, _, _ in samples]
    for (_, img, rec), (_, img2, rec2) in zip(samples, got):
        assert img2.dtype == np.uint8 and np.array_equal(img, img2)
        assert rec2 == json.loads(json.dumps(rec))
        for a, b in zip(rec["objects"], rec2["objects"]):
            assert np.array_equal(decode_mask(a["segmentation"]), decode_mask(b["segmentation"]))


def test_jpeg_bytes_are_stored_unchanged_as_jpg(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=80)
    rec = {"image_id": 1, "height": 20, "width": 30, "objects": []}
    write([("a", buf.getvalue(), rec)], tmp_path / "ds")
    (key, raw, _), = shards.iter_samples(tmp_path / "ds", decode=False)
    assert raw == buf.getvalue()
    (shard,) = glob.glob(str(tmp_path / "ds" / "*.tar"))
    import tarfile
    assert sorted(tarfile.open(shard).getnames()) == ["a.jpg", "a.json"]


def test_shards_are_real_webdataset(tmp_path: Path) -> None:
    samples = make_samples(6)
    write(samples, tmp_path / "ds")
    urls = sorted(glob.glob(str(tmp_path / "ds" / "*.tar")))
    got = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert [g["__key__"] for g in got] == [k for k, _, _ in samples]
    assert np.array_equal(got[3]["png"], samples[3][1]) and got[3]["json"]["image_id"] == 103


def test_shards_are_byte_identical_to_webdataset_tarwriter_output(tmp_path: Path) -> None:
    """The stdlib writer reproduces webdataset.TarWriter byte for byte (existing DVC versions keep their hashes)."""
    samples = make_samples(5)
    index = write(samples, tmp_path / "ds", shard_size=10)
    buf = io.BytesIO()
    tw = wds.TarWriter(buf, user="selftrain", group="selftrain", mode=0o444, encoder=False, mtime=0)
    for key, img, rec in samples:
        tw.write({"__key__": key, "png": shards.encode_png(img),
                  "json": json.dumps(rec, sort_keys=True, separators=(",", ":"), default=shards._json_default).encode()})
    tw.close()
    assert (tmp_path / "ds" / index.shards[0]["name"]).read_bytes() == buf.getvalue()


def test_same_samples_give_byte_identical_shards(tmp_path: Path) -> None:
    a = write(make_samples(9, seed=3), tmp_path / "a")
    b = write(make_samples(9, seed=3), tmp_path / "b")
    assert a.shards == b.shards
    for s in a.shards:
        assert (tmp_path / "a" / s["name"]).read_bytes() == (tmp_path / "b" / s["name"]).read_bytes()
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()


def test_index_lists_checksums_and_verify_passes(tmp_path: Path) -> None:
    index = write(make_samples(5), tmp_path / "ds", source="unit-test")
    loaded = DatasetIndex.load(tmp_path / "ds")
    assert loaded == index and loaded.source == "unit-test" and not loaded.has_parts
    for s in loaded.shards:
        data = (tmp_path / "ds" / s["name"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data)
    assert shards.verify(tmp_path / "ds") == index


def test_verify_names_a_tampered_shard(tmp_path: Path) -> None:
    index = write(make_samples(9), tmp_path / "ds")
    victim = tmp_path / "ds" / index.shards[1]["name"]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # same size, different content
    victim.chmod(0o644)
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=index.shards[1]["name"]) as e:
        shards.verify(tmp_path / "ds")
    assert "sha256" in str(e.value)


def test_reader_names_a_truncated_shard(tmp_path: Path) -> None:
    index = write(make_samples(9), tmp_path / "ds")
    victim = tmp_path / "ds" / index.shards[1]["name"]
    victim.chmod(0o644)
    victim.write_bytes(victim.read_bytes()[:1500])
    with pytest.raises(DataError, match=index.shards[1]["name"]):
        list(shards.iter_samples(tmp_path / "ds"))
    with pytest.raises(DataError, match=index.shards[1]["name"]):
        shards.verify(tmp_path / "ds")


def test_reader_names_the_shard_when_the_tar_itself_is_cut_short(tmp_path: Path) -> None:
    """Even if the index agreed with the truncated size, the tar stream error names the shard."""
    index = write(make_samples(4), tmp_path / "ds", shard_size=4)
    victim = tmp_path / "ds" / index.shards[0]["name"]
    victim.chmod(0o644)
    victim.write_bytes(victim.read_bytes()[:2000])
    raw = json.loads((tmp_path / "ds" / "index.json").read_text())
    raw["shards"][0]["bytes"] = 2000
    (tmp_path / "ds" / "index.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=index.shards[0]["name"]):
        list(shards.iter_samples(tmp_path / "ds"))


@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 3), (7, 1)])
def test_every_sample_is_read_by_exactly_one_consumer(tmp_path: Path, world_size: int, num_workers: int) -> None:
    samples = make_samples(11)
    write(samples, tmp_path / "ds", shard_size=3)  # 4 shards: several combos have more consumers than shards
    seen = []
    for rank in range(world_size):
        rank_keys = []
        for worker in range(num_workers):
            rank_keys += [k for k, _, _ in shards.iter_samples(tmp_path / "ds", rank=rank, world_size=world_size,
                                                               worker=worker, num_workers=num_workers, decode=False)]
        assert len(rank_keys) == shards.num_samples_for(tmp_path / "ds", rank=rank, world_size=world_size,
                                                        num_workers=num_workers)
        seen += rank_keys
    assert sorted(seen) == sorted(k for k, _, _ in samples)  # each once: no overlap, no loss
    counts = shards.rank_sample_counts(tmp_path / "ds", world_size, num_workers)
    assert sum(counts) == 11 and len(counts) == world_size


def test_whole_shards_go_to_consumers_when_there_are_enough(tmp_path: Path) -> None:
    write(make_samples(12), tmp_path / "ds", shard_size=3)  # 4 shards, 2 consumers
    keys = [k for k, _, _ in shards.iter_samples(tmp_path / "ds", rank=1, world_size=2, decode=False)]
    assert keys == ["s00003", "s00004", "s00005", "s00009", "s00010", "s00011"]


def test_training_readers_cannot_see_parts(tmp_path: Path) -> None:
    write(make_samples(3, parts=True), tmp_path / "ev", split="eval", part_categories=PART_CATS)
    assert DatasetIndex.load(tmp_path / "ev").has_parts
    with pytest.raises(PartsNotAllowedError, match="allow_parts"):
        next(shards.iter_samples(tmp_path / "ev"))
    recs = [r for _, _, r in shards.iter_samples(tmp_path / "ev", allow_parts=True)]
    assert all(r["parts"] for r in recs)


def test_parts_without_part_categories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="part_categories"):
        write(make_samples(2, parts=True), tmp_path / "ev")
    assert not (tmp_path / "ev" / "index.json").exists()


def _bad_samples():
    good = make_samples(3)
    k, img, rec = good[1]
    return [
        (good[0], None),
        (("bad_shape", img[:5], dict(rec)), "image must be uint8"),
        (("bad.key", img, dict(rec)), "key must match"),
        (("bad_rle", img, {**rec, "objects": [{**rec["objects"][0], "segmentation": {"size": [3, 3], "counts": "9"}}]}),
         "mask size"),
        (("bad_cat", img, {**rec, "objects": [{**rec["objects"][0], "category_id": 99}]}), "not a known category"),
        (("bad_png", b"\x89PNG\r\n\x1a\nnot really", dict(rec)), "unreadable image"),
        (BadSample(DataError("corrupt or unreadable image", source="/x/broken.jpg", key="7 (broken.jpg)")), "broken"),
        (good[2], None),
    ]


@pytest.mark.parametrize("case", range(1, 7))
def test_bad_sample_raises_data_error_naming_it(tmp_path: Path, case: int) -> None:
    item, message = _bad_samples()[case]
    name = item.error.key if isinstance(item, BadSample) else item[0]
    with pytest.raises(DataError, match=message) as e:
        write([item], tmp_path / "ds")
    assert name in str(e.value)
    assert not (tmp_path / "ds" / "index.json").exists()


def test_skip_bad_quarantines_and_lists_every_bad_sample(tmp_path: Path) -> None:
    items = _bad_samples()
    index = write([it for it, _ in items], tmp_path / "ds", skip_bad=True)
    assert index.num_samples == 2
    assert [q["key"] for q in index.quarantined] == ["bad_shape", "bad.key", "bad_rle", "bad_cat", "bad_png", "7 (broken.jpg)"]
    assert index.quarantined[-1] == {"source": "/x/broken.jpg", "key": "7 (broken.jpg)", "error": "corrupt or unreadable image"}
    assert all(q["error"] for q in index.quarantined)
    assert DatasetIndex.load(tmp_path / "ds").quarantined == index.quarantined


def test_interrupted_write_keeps_the_published_dataset(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    first = write(make_samples(6, seed=1), d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def interrupted():
        yield from make_samples(9, seed=2)[:7]  # completes one shard of the new version, then fails
        raise RuntimeError("worker killed")

    with pytest.raises(RuntimeError, match="worker killed"):
        write(interrupted(), d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing lost, nothing half-published
    assert shards.verify(d) == first
    assert [k for k, _, _ in shards.iter_samples(d, decode=False)] == [f"s{i:05d}" for i in range(6)]


def test_interrupted_first_write_leaves_nothing(tmp_path: Path) -> None:
    def interrupted():
        yield from make_samples(6)
        raise RuntimeError("worker killed")

    with pytest.raises(RuntimeError):
        write(interrupted(), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_rewrite_replaces_the_dataset_and_removes_stale_shards(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    write(make_samples(9, seed=1), d)
    (d / ".train-000000.tar.tmp-0123456789abcdef0123456789abcdef").write_bytes(b"left by a killed writer")
    second = write(make_samples(5, seed=2), d)
    assert sorted(p.name for p in d.iterdir()) == sorted(["index.json"] + [s["name"] for s in second.shards])
    assert shards.verify(d).num_samples == 5


def test_missing_index_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="index.json"):
        list(shards.iter_samples(tmp_path))


def test_verify_names_a_missing_shard(tmp_path: Path) -> None:
    index = write(make_samples(5), tmp_path / "ds")
    (tmp_path / "ds" / index.shards[0]["name"]).unlink()
    with pytest.raises(DataError, match=f"{index.shards[0]['name']}: shard listed in the index is missing"):
        shards.verify(tmp_path / "ds")


def test_merge_parts_publishes_one_dataset_over_every_rank_share(tmp_path):
    """Map over shards by rank: each rank writes its part, one index covers all, readers see each sample once."""
    from trainers.data.shards import iter_samples, merge_parts, part_dir, verify, write_dataset
    import numpy as np

    cats = [{"id": 1, "name": "thing"}]
    keys = [f"s{i:03d}" for i in range(10)]
    for r in range(2):
        mine = [(k, np.full((8, 8, 3), i, np.uint8), {"image_id": i, "height": 8, "width": 8, "objects": []})
                for i, k in enumerate(keys) if i % 2 == r]
        write_dataset(mine, part_dir(tmp_path / "out", r), name="x", split="train", categories=cats, shard_size=2)
    index = merge_parts(tmp_path / "out", 2)
    assert index.num_samples == 10
    verify(tmp_path / "out")
    seen = [k for w in range(3) for k, _, _ in iter_samples(tmp_path / "out", rank=w, world_size=3)]
    assert sorted(seen) == keys
