"""PartWorld: determinism, random access, split semantics (parts only in eval and val), geometry and scale."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from trainers.data.partworld import (
    PartWorldConfig,
    category_table,
    class_template,
    generate,
    part_category_table,
    part_type,
    render_sample,
    stream,
)
from trainers.structures import decode_mask

REPO = Path(__file__).resolve().parents[3]
SMALL = PartWorldConfig(image_size=64, num_classes=6, num_part_types=10, train_images=12, eval_images=12, val_images=8,
                        min_object_area=32)


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1].tobytes() == b[1].tobytes() and json.dumps(a[2]) == json.dumps(b[2])


def test_same_seed_and_config_give_byte_identical_samples():
    for split in ("train", "eval"):
        a = render_sample(SMALL, split, 3)
        b = render_sample(SMALL.model_copy(), split, 3)
        assert a[1].dtype == np.uint8 and a[1].shape == (64, 64, 3)
        assert _same(a, b)


def test_different_seed_gives_different_samples():
    other = SMALL.model_copy(update={"seed": 1})
    assert render_sample(SMALL, "train", 0)[1].tobytes() != render_sample(other, "train", 0)[1].tobytes()
    assert class_template(SMALL, 1) != class_template(other, 1)


def test_train_and_eval_splits_are_different_images():
    assert render_sample(SMALL, "train", 0)[1].tobytes() != render_sample(SMALL, "eval", 0)[1].tobytes()


def test_render_sample_equals_the_ith_item_of_generate():
    items = list(generate(SMALL, "eval"))
    assert [k for k, _, _ in items] == [f"eval-{i:08d}" for i in range(SMALL.eval_images)]
    for i in (0, 5, 11):
        assert _same(render_sample(SMALL, "eval", i), items[i])
    window = list(generate(SMALL, "eval", start=4, count=3))
    assert all(_same(w, items[4 + j]) for j, w in enumerate(window))


def test_generate_defaults_to_the_split_size_and_stream_never_ends():
    assert len(list(generate(SMALL, "train"))) == SMALL.train_images
    assert len(list(generate(SMALL, "train", start=10))) == SMALL.train_images - 10
    s = stream(SMALL.model_copy(update={"train_images": 2}), "train")
    assert [next(s)[0] for _ in range(4)] == [f"train-{i:08d}" for i in range(4)]


def _split_digest(cfg: PartWorldConfig, split: str) -> str:
    h = hashlib.sha256()
    for k, img, rec in generate(cfg, split):
        h.update(k.encode())
        h.update(img.tobytes())
        h.update(json.dumps(rec, sort_keys=True).encode())
    return h.hexdigest()


def test_adding_the_val_split_changed_no_byte_of_train_and_eval():
    """Digests of SMALL's train and eval samples as rendered before the val split existed."""
    assert _split_digest(SMALL, "train") == "4fc843a82190b5512d3e512dba68e53bf3cba07b1e9f2bdb3ce1aa19ef8fb70a"
    assert _split_digest(SMALL, "eval") == "184435893e52bd2ea8a72373cae0bfa0e6226d9c061e71f753c2bb36f81bfeda"


def test_val_split_has_parts_and_images_of_its_own():
    val = list(generate(SMALL, "val"))
    assert len(val) == SMALL.val_images and [k for k, _, _ in val] == [f"val-{i:08d}" for i in range(SMALL.val_images)]
    assert all(rec["parts"] and rec["objects"] and rec["file_name"] == f"val/{i:08d}.png" for i, (_, _, rec) in enumerate(val))
    others = {img.tobytes() for split in ("train", "eval") for _, img, _ in generate(SMALL, split, 0, SMALL.val_images)}
    assert not others & {img.tobytes() for _, img, _ in val}
    assert PartWorldConfig.demo().split_size("val") == 100


def test_train_records_have_no_parts_key():
    for _, _, rec in generate(SMALL, "train"):
        assert "parts" not in rec
        assert rec["objects"]


def test_records_follow_the_structures_format():
    for i, (key, img, rec) in enumerate(generate(SMALL, "eval")):
        assert rec["image_id"] == i and rec["height"] == rec["width"] == 64
        assert rec["file_name"] == f"eval/{i:08d}.png" and key == f"eval-{i:08d}"
        assert [o["id"] for o in rec["objects"]] == list(range(1, len(rec["objects"]) + 1))
        assert [p["id"] for p in rec["parts"]] == list(range(1, len(rec["parts"]) + 1))
        for o in rec["objects"]:
            m = decode_mask(o["segmentation"])
            assert o["iscrowd"] == 0 and 1 <= o["category_id"] <= SMALL.num_classes
            assert o["area"] == int(m.sum()) >= SMALL.min_object_area
            ys, xs = np.nonzero(m)
            assert o["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        json.dumps(rec)  # JSON-safe


def test_object_masks_are_disjoint_visible_pixels():
    for _, _, rec in generate(SMALL, "eval"):
        masks = np.stack([decode_mask(o["segmentation"]) for o in rec["objects"]])
        assert (masks.sum(0) <= 1).all()


def test_eval_parts_lie_inside_their_objects_and_are_disjoint():
    seen = 0
    for _, _, rec in generate(SMALL, "eval"):
        objects = {o["id"]: decode_mask(o["segmentation"]) for o in rec["objects"]}
        cover = {oid: np.zeros_like(m, dtype=np.int32) for oid, m in objects.items()}
        for p in rec["parts"]:
            pm = decode_mask(p["segmentation"])
            assert p["object_id"] in objects
            assert 1 <= p["category_id"] <= SMALL.num_part_types
            assert p["area"] == int(pm.sum()) >= SMALL.min_part_area
            assert not (pm & ~objects[p["object_id"]]).any(), "part pixels outside its object"
            cover[p["object_id"]] += pm
            seen += 1
        for oid, c in cover.items():
            assert c.max() <= 1, "parts of one object overlap"
            assert c.sum() >= 0.9 * objects[oid].sum(), "parts should tile their object"
    assert seen > 0


def test_instances_per_image_within_bounds():
    cfg = SMALL.model_copy(update={"min_instances": 2, "max_instances": 3})
    counts = [len(rec["objects"]) for _, _, rec in generate(cfg, "train")]
    assert all(1 <= c <= 3 for c in counts)
    assert max(counts) >= 2
    counts = [len(rec["objects"]) for _, _, rec in generate(SMALL, "train")]
    assert all(SMALL.min_instances <= c <= SMALL.max_instances for c in counts)


def test_later_instances_are_drawn_on_top_of_earlier_ones():
    """Big objects, occlusion allowed: the first-drawn object keeps less of itself than the last one."""
    cfg = SMALL.model_copy(update={"min_instances": 3, "max_instances": 3, "max_occlusion": 1.0,
                                   "min_object_scale": 0.8, "max_object_scale": 0.9, "min_visible_fraction": 0.0,
                                   "min_object_area": 1})
    first, last = [], []
    for _, _, rec in generate(cfg, "train", count=12):
        assert len(rec["objects"]) >= 2
        first.append(rec["objects"][0]["area"])
        last.append(rec["objects"][-1]["area"])
    assert np.mean(first) < 0.7 * np.mean(last)


def test_max_occlusion_zero_keeps_instances_apart():
    """No occlusion allowed: big instances that cannot be placed apart are left out, so fewer appear."""
    crowded = SMALL.model_copy(update={"min_instances": 4, "max_instances": 4, "min_object_scale": 0.6,
                                       "max_object_scale": 0.7, "max_occlusion": 1.0})
    apart = crowded.model_copy(update={"max_occlusion": 0.0})
    n_crowded = sum(len(r["objects"]) for _, _, r in generate(crowded, "train", count=8))
    n_apart = sum(len(r["objects"]) for _, _, r in generate(apart, "train", count=8))
    assert n_apart < n_crowded


def test_templates_have_3_to_6_distinct_part_types():
    cfg = PartWorldConfig.demo()
    sizes = set()
    for c in range(1, cfg.num_classes + 1):
        t = class_template(cfg, c)
        types = [p["part_type"] for p in t["parts"]]
        assert 3 <= len(types) <= 6 and len(set(types)) == len(types)
        assert all(1 <= x <= cfg.num_part_types for x in types)
        assert all(-1.0001 <= v <= 1.0001 for p in t["parts"] for v in p["center"])
        sizes.add(len(types))
    assert len(sizes) > 1


def test_part_types_are_shared_across_classes():
    cfg = PartWorldConfig.demo()
    users: dict[int, set[int]] = {}
    for c in range(1, cfg.num_classes + 1):
        for p in class_template(cfg, c)["parts"]:
            users.setdefault(p["part_type"], set()).add(c)
    assert max(len(v) for v in users.values()) >= 2
    assert sum(len(v) >= 2 for v in users.values()) >= cfg.num_part_types // 3


def test_part_types_differ_in_texture_or_colour_family():
    cfg = PartWorldConfig.demo()
    looks = [(part_type(cfg, t)["texture"], round(part_type(cfg, t)["hue"] / 45) % 8) for t in range(1, 41)
             if t <= cfg.num_part_types]
    assert len(set(looks)) == len(looks)
    assert len({t for t, _ in looks}) == 5


def test_part_appearance_is_learnable_but_jittered():
    """Mean/std colour of a part separates part types (nearest centroid), yet varies between instances."""
    feats, labels = [], []
    for _, img, rec in generate(SMALL, "eval", count=12):
        for p in rec["parts"]:
            m = decode_mask(p["segmentation"])
            if m.sum() >= 20:
                px = img[m].astype(np.float64) / 255
                feats.append(np.concatenate([px.mean(0), px.std(0)]))
                labels.append(p["category_id"])
    x, y = np.array(feats), np.array(labels)
    half = len(y) // 2
    classes = np.unique(y[:half])
    centroids = np.stack([x[:half][y[:half] == c].mean(0) for c in classes])
    pred = classes[((x[half:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    assert (pred == y[half:]).mean() > 0.7
    spread = [x[y == c, :3].std(0).max() for c in classes if (y == c).sum() >= 3]
    assert spread and min(spread) > 0.005


def test_stream_with_10k_classes_reaches_index_ten_million_without_precomputation():
    cfg = PartWorldConfig.demo().model_copy(update={"num_classes": 10_000})
    t0 = time.perf_counter()
    key, img, rec = render_sample(cfg, "train", 9_999_999)
    it = stream(cfg, "train", start=9_999_999)
    first, second = next(it), next(it)
    assert time.perf_counter() - t0 < 5.0
    assert key == "train-09999999" and _same(first, (key, img, rec))
    assert second[0] == "train-10000000" and second[2]["image_id"] == 10_000_000
    assert img.shape == (112, 112, 3) and rec["objects"]
    assert all(1 <= o["category_id"] <= 10_000 for o in rec["objects"])
    t = class_template(cfg, 10_000)
    assert 3 <= len(t["parts"]) <= 6


def test_category_tables_are_coco_style():
    cats, parts = category_table(SMALL), part_category_table(SMALL)
    assert [c["id"] for c in cats] == list(range(1, 7))
    assert [c["id"] for c in parts] == list(range(1, 11))
    assert all(set(c) == {"id", "name", "supercategory"} for c in cats + parts)
    assert parts[6]["name"].startswith("part-07:") and parts[6]["supercategory"] == "part"
    shape, texture = parts[6]["name"].split(":")[1].split("-")
    assert shape == part_type(SMALL, 7)["shape"] and texture == part_type(SMALL, 7)["texture"]
    assert len({c["name"] for c in cats}) == len(cats)


def test_out_of_range_ids_and_splits_are_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        class_template(SMALL, 7)
    with pytest.raises(ValueError, match="class_id"):
        class_template(SMALL, 0)
    with pytest.raises(ValueError, match="split"):
        render_sample(SMALL, "test", 0)
    with pytest.raises(ValueError, match="index"):
        render_sample(SMALL, "train", -1)


def test_config_rejects_unknown_fields_and_inverted_ranges_naming_the_field():
    with pytest.raises(ValidationError, match="image_sise"):
        PartWorldConfig(image_sise=64)
    with pytest.raises(ValidationError, match="min_instances"):
        PartWorldConfig(min_instances=5, max_instances=4)
    with pytest.raises(ValidationError, match="max_parts"):
        PartWorldConfig(num_part_types=4, max_parts=6)
    with pytest.raises(ValidationError, match="image_size"):
        PartWorldConfig(image_size=8)


def test_demo_yaml_equals_demo_config_and_every_field_is_described():
    assert PartWorldConfig.from_yaml(REPO / "configs" / "partworld-demo.yaml") == PartWorldConfig.demo()
    assert all(f.description for f in PartWorldConfig.model_fields.values())
    demo = PartWorldConfig.demo()
    assert demo.image_size == 112 and demo.num_classes == 12 and 16 <= demo.num_part_types <= 20


def test_module_imports_no_torch():
    code = "import sys, trainers.data.partworld, trainers.data.show; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
