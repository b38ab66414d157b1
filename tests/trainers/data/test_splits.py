"""Seeded fraction splits of real shard datasets: deterministic, disjoint, complete; parts only where asked."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from trainers.data import partworld, shards, splits
from trainers.data.shards import DatasetIndex, PartsNotAllowedError

CFG = partworld.PartWorldConfig(image_size=48, num_classes=3, num_part_types=6, max_parts=4, train_images=4,
                                eval_images=23, min_object_area=16)


@pytest.fixture(scope="module")
def part_set(tmp_path_factory) -> Path:
    """An evaluation dataset with parts, in several shards (like an imported part file)."""
    d = tmp_path_factory.mktemp("src") / "parts"
    shards.write_dataset(partworld.generate(CFG, "eval"), d, name="pw", split="eval",
                         categories=partworld.category_table(CFG), part_categories=partworld.part_category_table(CFG),
                         shard_size=5, source="partworld:test")
    return d


def keys(d: Path) -> list[str]:
    return [k for k, _, _ in shards.iter_samples(d, decode=False, allow_parts=True)]


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_parse_fractions_keeps_order_and_names_bad_items() -> None:
    assert splits.parse_fractions("val=0.1, train=0.9") == {"val": 0.1, "train": 0.9}
    for bad, msg in (("val=0.1,train=0.8", "add up to 1"), ("val", "NAME=FRACTION"), ("val=x,train=1", "not a number"),
                     ("val=0.5,val=0.5", "twice"), ("v.al=1", "must match"), ("a=1.5,b=-0.5", r"\[0, 1\]"), ("", "at least one")):
        with pytest.raises(ValueError, match=msg):
            splits.parse_fractions(bad)


def test_sizes_add_up_by_largest_remainder() -> None:
    assert splits.split_sizes(23, {"val": 0.1, "train": 0.9}) == {"val": 2, "train": 21}
    assert splits.split_sizes(10, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) == {"a": 4, "b": 3, "c": 3}
    assert splits.split_sizes(0, {"a": 0.5, "b": 0.5}) == {"a": 0, "b": 0}
    for n in range(0, 40):
        assert sum(splits.split_sizes(n, {"l": 0.07, "u": 0.93}).values()) == n


def test_split_is_disjoint_complete_and_keeps_records(part_set: Path, tmp_path: Path) -> None:
    idx = splits.split_dataset(part_set, tmp_path / "out", "val=0.2,eval=0.3,train=0.5", seed=0, keep_parts=["val", "eval"],
                               shard_size=4)
    assert {k: i.num_samples for k, i in idx.items()} == {"val": 5, "eval": 7, "train": 11}  # 4.6, 6.9, 11.5 -> 5, 7, 11
    got = {s: keys(tmp_path / "out" / s) for s in idx}
    every = keys(part_set)
    assert sorted(k for ks in got.values() for k in ks) == sorted(every)  # complete and disjoint
    assert all(len(set(ks)) == len(ks) for ks in got.values())
    for s, ks in got.items():
        assert ks == [k for k in every if k in set(ks)]  # reading order kept
        assert shards.verify(tmp_path / "out" / s).split == s
    src = {k: (img, rec) for k, img, rec in shards.iter_samples(part_set, decode=False, allow_parts=True)}
    for k, img, rec in shards.iter_samples(tmp_path / "out" / "val", decode=False, allow_parts=True):
        assert img == src[k][0] and rec == src[k][1]  # image bytes and record untouched where parts are kept
    val = DatasetIndex.load(tmp_path / "out" / "val")
    assert val.has_parts and val.part_categories == partworld.part_category_table(CFG) and val.name == "pw-val"
    assert val.notes["split"] == {"of": str(part_set), "of_name": "pw", "of_split": "eval", "of_samples": 23, "seed": 0,
                                  "fractions": {"val": 0.2, "eval": 0.3, "train": 0.5}, "keep_parts": True,
                                  "strip_labels": False}


def test_parts_stay_only_in_the_flagged_splits(part_set: Path, tmp_path: Path) -> None:
    idx = splits.split_dataset(part_set, tmp_path / "out", {"val": 0.1, "train": 0.9}, seed=3, keep_parts=["val"])
    train = tmp_path / "out" / "train"
    assert not idx["train"].has_parts and idx["train"].part_categories is None
    recs = [r for _, _, r in shards.iter_samples(train)]  # a training reader accepts it
    assert recs and all("parts" not in r and r["objects"] for r in recs)
    assert b'"parts"' not in b"".join((train / s["name"]).read_bytes() for s in idx["train"].shards)
    assert idx["train"].notes["stripped"]["parts_stripped"] > 0
    with pytest.raises(PartsNotAllowedError):
        next(shards.iter_samples(tmp_path / "out" / "val"))


def test_same_seed_same_bytes_other_seed_other_assignment(part_set: Path, tmp_path: Path) -> None:
    for run in ("a", "b"):
        splits.split_dataset(part_set, tmp_path / run, "val=0.3,train=0.7", seed=5, keep_parts=["val"])
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    splits.split_dataset(part_set, tmp_path / "c", "val=0.3,train=0.7", seed=6, keep_parts=["val"])
    assert keys(tmp_path / "c" / "val") != keys(tmp_path / "a" / "val")
    assert len(keys(tmp_path / "c" / "val")) == len(keys(tmp_path / "a" / "val")) == 7


def test_strip_labels_makes_an_unlabeled_split(part_set: Path, tmp_path: Path) -> None:
    """CaSP-style: a few labeled images keep their objects, the rest are images only."""
    idx = splits.split_dataset(part_set, tmp_path / "out", "labeled=0.1,unlabeled=0.9", seed=0, strip_labels=["unlabeled"])
    assert idx["labeled"].num_samples == 2 and idx["unlabeled"].num_samples == 21
    assert all(r["objects"] for _, _, r in shards.iter_samples(tmp_path / "out" / "labeled"))
    un = [r for _, _, r in shards.iter_samples(tmp_path / "out" / "unlabeled")]
    assert all(r["objects"] == [] and "parts" not in r for r in un)
    assert idx["unlabeled"].notes["split"]["strip_labels"] and idx["unlabeled"].notes["stripped"]["objects_stripped"] > 0


def test_bad_requests_are_rejected_before_writing(part_set: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not among the splits"):
        splits.split_dataset(part_set, tmp_path / "o", "val=0.5,train=0.5", keep_parts=["eval"])
    with pytest.raises(ValueError, match="both keep parts and strip labels"):
        splits.split_dataset(part_set, tmp_path / "o", "val=0.5,train=0.5", keep_parts=["val"], strip_labels=["val"])
    with pytest.raises(ValueError, match="overwrite"):
        splits.split_dataset(part_set, part_set.parent, "parts=1.0")
    train_only = tmp_path / "tr"
    shards.write_dataset(partworld.generate(CFG, "train"), train_only, name="t", split="train",
                         categories=partworld.category_table(CFG))
    with pytest.raises(ValueError, match="no part labels to keep"):
        splits.split_dataset(train_only, tmp_path / "o", "val=0.5,train=0.5", keep_parts=["val"])
    assert not (tmp_path / "o").exists()
    with pytest.raises(shards.DataError, match="no dataset index"):
        splits.split_dataset(tmp_path / "nothing", tmp_path / "o", "a=1")


def test_index_without_notes_is_unchanged(tmp_path: Path) -> None:
    """Indexes written without notes keep their bytes (pinned DVC hashes of existing datasets stay valid)."""
    idx = shards.write_dataset(partworld.generate(CFG, "train"), tmp_path / "t", name="t", split="train",
                               categories=partworld.category_table(CFG))
    assert "notes" not in json.loads((tmp_path / "t" / "index.json").read_text()) and idx.notes == {}


def test_a_split_without_an_object_of_some_class_names_that_class(part_set: Path, tmp_path: Path) -> None:
    """CaSP's bad input: a small labeled fraction can miss a class; the split's index counts objects per class and
    names the classes it has none of (a stripped split, unlabeled by design, names none)."""
    idx = splits.split_dataset(part_set, tmp_path / "s", "labeled=0.1,unlabeled=0.9", seed=0, strip_labels=["unlabeled"])
    records = [r for _, _, r in shards.iter_samples(tmp_path / "s" / "labeled")]
    present = {o["category_id"] for r in records for o in r["objects"]}
    counts = idx["labeled"].notes["objects_per_category"]
    assert {int(k) for k, v in counts.items() if v} == present
    assert sum(counts.values()) == sum(len(r["objects"]) for r in records)
    missing = {c["id"] for c in idx["labeled"].notes["categories_without_objects"]}
    assert missing == {int(c["id"]) for c in idx["labeled"].categories} - present and missing
    assert idx["unlabeled"].notes["categories_without_objects"] == []
