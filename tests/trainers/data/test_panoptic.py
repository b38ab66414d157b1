"""Things and stuff: PartWorld's stuff regions (off by default, byte-identical), COCO panoptic export and import
(the round trip is exact), and a PNG whose segment ids disagree with its JSON named or quarantined."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainers.data import partworld, shards
from trainers.data.panoptic import (
    decode_segment_ids, encode_segment_ids, entity_record, export_panoptic, import_panoptic, is_thing,
)
from trainers.structures import decode_mask

SMALL = partworld.PartWorldConfig(image_size=64, num_classes=6, num_part_types=10, train_images=6, eval_images=6,
                                  val_images=4, min_object_area=32)
STUFF = SMALL.model_copy(update={"stuff_classes": 4})


def test_stuff_is_off_by_default_and_changes_neither_objects_nor_the_config_dump():
    assert SMALL.stuff_classes == 0 and "stuff_classes" not in SMALL.model_dump()
    assert all("isthing" not in c for c in partworld.category_table(SMALL))
    for i in range(3):
        _, plain_img, plain = partworld.render_sample(SMALL, "train", i)
        _, img, rec = partworld.render_sample(STUFF, "train", i)
        assert "stuff" not in plain
        assert rec["objects"] == plain["objects"]  # stuff has its own seed stream: the same objects
        assert not np.array_equal(img, plain_img)  # ... on a different background
    assert partworld.PartWorldConfig.model_validate(STUFF.model_dump()) == STUFF


def test_stuff_regions_are_categories_marked_isthing_0_with_masks_disjoint_from_objects():
    cats = partworld.category_table(STUFF)
    things = [c for c in cats if is_thing(c)]
    stuff_ids = {c["id"] for c in cats if not is_thing(c)}
    assert [c["id"] for c in things] == list(range(1, 7)) and stuff_ids == {7, 8, 9, 10}
    assert [c["name"] for c in cats if not is_thing(c)] == ["sky", "ground", "water", "grass"]
    seen = set()
    for _, _, rec in partworld.generate(STUFF, "eval"):
        objects = np.zeros((64, 64), dtype=int)
        for o in rec["objects"]:
            objects += decode_mask(o["segmentation"])
        claimed = objects.copy()
        assert 1 <= len(rec["stuff"]) <= STUFF.max_stuff_regions
        for s in rec["stuff"]:
            m = decode_mask(s["segmentation"])
            assert s["category_id"] in stuff_ids and s["area"] == int(m.sum()) >= STUFF.min_object_area
            assert not (m & (objects > 0)).any()
            claimed += m
            seen.add(s["category_id"])
        assert claimed.max() == 1  # things and stuff never share a pixel
        assert len({s["category_id"] for s in rec["stuff"]}) == len(rec["stuff"])
    assert len(seen) >= 3


def _write(cfg, split: str, out: Path) -> shards.DatasetIndex:
    return shards.write_dataset(partworld.generate(cfg, split), out, name=f"pw-{split}", split=split,
                                categories=partworld.category_table(cfg),
                                part_categories=partworld.part_category_table(cfg) if split != "train" else None)


def test_export_then_import_panoptic_gives_back_every_thing_and_stuff_mask(tmp_path: Path):
    _write(STUFF, "train", tmp_path / "pw")
    doc = export_panoptic(tmp_path / "pw", tmp_path / "panoptic.json", tmp_path / "pngs", tmp_path / "images")
    assert {c["isthing"] for c in doc["categories"]} == {0, 1}
    from typer.testing import CliRunner

    from pipelines.cli import app

    res = CliRunner().invoke(app, ["data", "import", "panoptic", str(tmp_path / "panoptic.json"), "--png-dir",
                                   str(tmp_path / "pngs"), "--images", str(tmp_path / "images"), "-o",
                                   str(tmp_path / "imported")])
    assert res.exit_code == 0, res.output
    assert "thing and" in res.output and f"{STUFF.train_images} samples" in res.output
    index = shards.DatasetIndex.load(tmp_path / "imported")
    assert index.categories == partworld.category_table(STUFF)
    rep = index.notes["import"]
    original = {r["image_id"]: (img, r) for _, img, r in shards.iter_samples(tmp_path / "pw")}
    imported = list(shards.iter_samples(tmp_path / "imported"))
    assert len(imported) == STUFF.train_images and rep["area_mismatches"] == 0
    for _, img, rec in imported:
        img0, rec0 = original[rec["image_id"]]
        assert np.array_equal(img, img0)
        for field in ("objects", "stuff"):
            assert [(a["category_id"], a["segmentation"]) for a in rec[field]] == \
                   [(a["category_id"], a["segmentation"]) for a in rec0[field]]
    assert rep["things"] == sum(len(r["objects"]) for _, _, r in imported) > 0
    assert rep["stuff"] == sum(len(r["stuff"]) for _, _, r in imported) > 0


def test_a_png_whose_ids_disagree_with_its_json_is_named_and_quarantined_with_skip_bad(tmp_path: Path):
    _write(STUFF.model_copy(update={"train_images": 3}), "train", tmp_path / "pw")
    doc = export_panoptic(tmp_path / "pw", tmp_path / "panoptic.json", tmp_path / "pngs", tmp_path / "images")
    bad = doc["annotations"][1]
    png = tmp_path / "pngs" / bad["file_name"]
    ids = decode_segment_ids(png)
    ids[0, :5] = 70000  # an id segments_info does not list (B = 1: the whole 24-bit id is read)
    png.write_bytes(encode_segment_ids(ids))
    dropped = bad["segments_info"].pop()["id"]  # and a listed segment... now missing from the JSON side only
    (tmp_path / "panoptic.json").write_text(json.dumps(doc))
    with pytest.raises(shards.DataError) as e:
        import_panoptic(tmp_path / "panoptic.json", tmp_path / "pngs", tmp_path / "images", tmp_path / "out")
    msg = str(e.value)
    assert bad["file_name"] in msg and "70000" in msg and str(dropped) in msg and "not in segments_info" in msg
    assert not (tmp_path / "out" / "index.json").exists()
    index = import_panoptic(tmp_path / "panoptic.json", tmp_path / "pngs", tmp_path / "images", tmp_path / "out",
                            skip_bad=True)
    assert index.num_samples == 2 and len(index.quarantined) == 1
    assert Path(index.quarantined[0]["source"]).name == Path(bad["file_name"]).name
    from typer.testing import CliRunner

    from pipelines.cli import app

    res = CliRunner().invoke(app, ["data", "import", "panoptic", str(tmp_path / "panoptic.json"), "--png-dir",
                                   str(tmp_path / "pngs"), "--images", str(tmp_path / "images"), "-o",
                                   str(tmp_path / "cli"), "--skip-bad"])
    assert res.exit_code == 0 and "1 sample(s) quarantined" in res.output and "70000" in res.output, res.output
    # the reverse: a segment listed in the JSON that the PNG does not hold
    bad["segments_info"].append({"id": 4242, "category_id": 7, "iscrowd": 0, "area": 1})
    png.write_bytes(encode_segment_ids(np.where(ids == 70000, 0, ids)))
    (tmp_path / "panoptic.json").write_text(json.dumps(doc))
    with pytest.raises(shards.DataError, match=r"ids 4242 are in segments_info but not in the PNG"):
        import_panoptic(tmp_path / "panoptic.json", tmp_path / "pngs", tmp_path / "images", tmp_path / "out2")


def test_the_entity_view_holds_things_and_stuff_and_leaves_the_record_alone():
    _, _, rec = partworld.render_sample(STUFF, "train", 0)
    ent = entity_record(rec)
    assert ent["objects"] == rec["objects"] + rec["stuff"] and len(rec["stuff"]) > 0
    assert len(rec["objects"]) < len(ent["objects"])


def test_class_labels_and_strip_labels_ignore_stuff(tmp_path: Path):
    from trainers.data.batches import category_labels
    from trainers.data.splits import split_dataset

    _write(STUFF, "train", tmp_path / "pw")
    assert set(category_labels(str(tmp_path / "pw"))) == set(range(1, 7))
    out = split_dataset(tmp_path / "pw", tmp_path / "split", "labeled=0.5,unlabeled=0.5", strip_labels=["unlabeled"])
    assert all("stuff" not in r for _, _, r in shards.iter_samples(tmp_path / "split" / "unlabeled"))
    assert all(c["id"] <= 6 for c in out["labeled"].notes["categories_without_objects"])
