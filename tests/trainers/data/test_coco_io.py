"""COCO importers/exporters on hand-made files shaped like real datasets, scored with real COCOeval."""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainers.data import coco_io, shards
from trainers.data.shards import DataError, DatasetIndex
from trainers.structures import decode_mask, encode_mask

H, W = 30, 40


def rect(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rect_mask(x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def poly_mask(polys: list[list[float]], h: int = H, w: int = W) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)


def save_image(path: Path, seed: int, fmt: str = "PNG", size: tuple[int, int] = (H, W)) -> np.ndarray:
    img = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format=fmt)
    return img


def uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's iscrowd format: column-major run lengths starting with zeros."""
    flat = m.T.reshape(-1)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


@pytest.fixture()
def coco_files(tmp_path: Path) -> dict:
    """Instance JSON as real datasets ship it: background category, gaps in ids, all segmentation kinds, extras."""
    imgs = tmp_path / "images"
    pixels = {1: save_image(imgs / "a.png", 1), 7: save_image(imgs / "sub" / "b.jpg", 2, "JPEG"), 9: save_image(imgs / "c.png", 3)}
    m_rle = rect_mask(20, 5, 35, 25)
    m_crowd = rect_mask(0, 20, 10, 30)
    data = {
        "info": {"year": 2024}, "licenses": [{"id": 1, "name": "x"}],
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W, "license": 1, "coco_url": "http://x/a.png"},
            {"id": 7, "file_name": "sub/b.jpg", "height": H, "width": W},
            {"id": 9, "file_name": "c.png"},  # no height/width: taken from the image
        ],
        "categories": [{"id": 0, "name": "background"}, {"id": 3, "name": "cat", "supercategory": "animal", "keypoints": []},
                       {"id": 17, "name": "dog", "supercategory": "animal"}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 3, "segmentation": [rect(2, 2, 12, 14)], "iscrowd": 0,
             "area": 999.0, "bbox": [0, 0, 1, 1], "attributes": {"occluded": True}},
            {"id": 12, "image_id": 1, "category_id": 17, "segmentation": encode_mask(m_rle), "iscrowd": False},
            {"id": 13, "image_id": 1, "category_id": 3, "segmentation": uncompressed_rle(m_crowd), "iscrowd": True},
            {"id": 14, "image_id": 7, "category_id": 17, "segmentation": [rect(1, 1, 8, 8), rect(20, 20, 30, 28)], "iscrowd": 0},
            {"id": 15, "image_id": 7, "category_id": 0, "segmentation": [rect(0, 0, 5, 5)], "iscrowd": 0},  # background
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return {"json": path, "images": imgs, "data": data, "pixels": pixels, "m_rle": m_rle, "m_crowd": m_crowd}


def test_import_coco_reads_every_segmentation_kind(tmp_path: Path, coco_files: dict) -> None:
    index = coco_io.import_coco(coco_files["json"], coco_files["images"], tmp_path / "ds", name="coco-toy")
    assert index.num_samples == 3 and not index.has_parts and index.quarantined == []
    assert index.categories == [{"id": 3, "name": "cat", "supercategory": "animal"},
                                {"id": 17, "name": "dog", "supercategory": "animal"}]  # background dropped, ids kept
    got = {r["image_id"]: (k, img, r) for k, img, r in shards.iter_samples(tmp_path / "ds")}
    k, img, rec = got[1]
    assert k == "000000000001" and rec["file_name"] == "a.png" and np.array_equal(img, coco_files["pixels"][1])
    o1, o2, o3 = rec["objects"]
    assert np.array_equal(decode_mask(o1["segmentation"]), poly_mask([rect(2, 2, 12, 14)]))
    assert o1["area"] == int(poly_mask([rect(2, 2, 12, 14)]).sum())  # recomputed, the file's 999 ignored
    assert "attributes" not in o1
    assert np.array_equal(decode_mask(o2["segmentation"]), coco_files["m_rle"].astype(bool)) and o2["iscrowd"] == 0
    assert np.array_equal(decode_mask(o3["segmentation"]), coco_files["m_crowd"].astype(bool)) and o3["iscrowd"] == 1
    assert [o["category_id"] for o in rec["objects"]] == [3, 17, 3]
    _, _, rec7 = got[7]
    assert len(rec7["objects"]) == 1  # the background annotation is dropped
    assert np.array_equal(decode_mask(rec7["objects"][0]["segmentation"]), poly_mask([rect(1, 1, 8, 8), rect(20, 20, 30, 28)]))
    assert got[9][2]["objects"] == [] and (got[9][2]["height"], got[9][2]["width"]) == (H, W)


def test_import_keeps_original_jpeg_bytes(tmp_path: Path, coco_files: dict) -> None:
    coco_io.import_coco(coco_files["json"], coco_files["images"], tmp_path / "ds", name="coco-toy")
    raw = {r["image_id"]: b for _, b, r in shards.iter_samples(tmp_path / "ds", decode=False)}
    assert raw[7] == (coco_files["images"] / "sub" / "b.jpg").read_bytes()


def test_compressed_rle_as_bytes_is_accepted() -> None:
    m = rect_mask(3, 4, 9, 20)
    rle = mask_utils.encode(np.asfortranarray(m))  # counts as bytes, as pycocotools returns them
    out = coco_io.segmentation_to_rle(rle, H, W, what="ann", source="f.json", key="k")
    assert isinstance(out["counts"], str) and np.array_equal(decode_mask(out), m.astype(bool))


def _score_against_itself(coco_json: Path) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco_json))
        dets = [{**a, "score": 1.0} for a in gt.dataset["annotations"]]
        ev = COCOeval(gt, gt.loadRes(dets), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_export_objects_scores_ap_1_against_itself(tmp_path: Path, coco_files: dict) -> None:
    coco_io.import_coco(coco_files["json"], coco_files["images"], tmp_path / "ds", name="coco-toy")
    coco = coco_io.export_coco(tmp_path / "ds", tmp_path / "out.json", kind="objects")
    assert [a["id"] for a in coco["annotations"]] == [1, 2, 3, 4]
    assert {a["iscrowd"] for a in coco["annotations"]} == {0, 1}
    assert _score_against_itself(tmp_path / "out.json") == pytest.approx(1.0)


def test_export_of_broken_labels_scores_below_1(tmp_path: Path, coco_files: dict) -> None:
    """The AP check above can fail: a shifted mask in the results drops AP."""
    coco_io.import_coco(coco_files["json"], coco_files["images"], tmp_path / "ds", name="coco-toy")
    coco_io.export_coco(tmp_path / "ds", tmp_path / "out.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "out.json"))
        dets = [{**a, "score": 1.0} for a in gt.dataset["annotations"]]
        dets[0]["segmentation"] = encode_mask(np.roll(decode_mask(dets[0]["segmentation"]), 6, axis=1))
        ev = COCOeval(gt, gt.loadRes(dets), "segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] < 0.99


@pytest.fixture()
def part_files(tmp_path: Path) -> dict:
    """PartImageNet-style: part categories (id 0 is a real part) with supercategory = object class, one object per image."""
    imgs = tmp_path / "pimgs"
    save_image(imgs / "n01/q1.JPEG", 4, "JPEG")
    save_image(imgs / "n02/f1.JPEG", 5, "JPEG")
    save_image(imgs / "n02/f2.png", 6)
    data = {
        "images": [{"id": 0, "file_name": "n01/q1.JPEG", "height": H, "width": W},
                   {"id": 1, "file_name": "n02/f1.JPEG", "height": H, "width": W},
                   {"id": 2, "file_name": "n02/f2.png", "height": H, "width": W}],
        "categories": [{"id": 0, "name": "Quadruped Head", "supercategory": "Quadruped"},
                       {"id": 1, "name": "Quadruped Body", "supercategory": "Quadruped"},
                       {"id": 4, "name": "Fish Head", "supercategory": "Fish"},
                       {"id": 5, "name": "Fish Tail", "supercategory": "Fish"}],
        "annotations": [
            {"id": 1, "image_id": 0, "category_id": 0, "segmentation": [rect(2, 2, 10, 10)], "iscrowd": 0, "area": 64},
            {"id": 2, "image_id": 0, "category_id": 1, "segmentation": [rect(10, 4, 30, 20)], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 4, "segmentation": encode_mask(rect_mask(5, 5, 15, 15)), "iscrowd": 0},
            {"id": 4, "image_id": 1, "category_id": 5, "segmentation": [rect(15, 8, 25, 12)], "iscrowd": 0},
            {"id": 5, "image_id": 2, "category_id": 5, "segmentation": [rect(1, 1, 6, 6)], "iscrowd": 0},
        ],
    }
    path = tmp_path / "parts.json"
    path.write_text(json.dumps(data))
    return {"json": path, "images": imgs, "data": data}


def test_partimagenet_objects_are_the_union_of_parts(tmp_path: Path, part_files: dict) -> None:
    index = coco_io.import_partimagenet(part_files["json"], part_files["images"], tmp_path / "ev", name="pin")
    assert index.has_parts and index.num_samples == 3
    assert index.categories == [{"id": 1, "name": "Fish"}, {"id": 2, "name": "Quadruped"}]
    assert [c["id"] for c in index.part_categories] == [0, 1, 4, 5]  # id 0 is a part here, not background
    recs = {r["image_id"]: r for _, _, r in shards.iter_samples(tmp_path / "ev", allow_parts=True)}
    (obj,) = recs[0]["objects"]
    assert obj["category_id"] == 2
    union = poly_mask([rect(2, 2, 10, 10)]) | poly_mask([rect(10, 4, 30, 20)])
    assert np.array_equal(decode_mask(obj["segmentation"]), union)
    assert [p["object_id"] for p in recs[0]["parts"]] == [obj["id"]] * 2
    (fish,) = recs[1]["objects"]
    assert fish["category_id"] == 1
    assert np.array_equal(decode_mask(fish["segmentation"]), rect_mask(5, 5, 15, 15).astype(bool) | poly_mask([rect(15, 8, 25, 12)]))


def test_partimagenet_object_class_option(tmp_path: Path, part_files: dict) -> None:
    data = json.loads(part_files["json"].read_text())
    for c in data["categories"][1:]:
        del c["supercategory"]
    path = tmp_path / "somesuper.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="object_class") as e:  # some parts name a class, others not: ambiguous
        coco_io.import_partimagenet(path, part_files["images"], tmp_path / "x", name="pin")
    assert "Quadruped Body" in str(e.value) and str(path) in str(e.value)
    index = coco_io.import_partimagenet(path, part_files["images"], tmp_path / "ev", name="pin", object_class="thing")
    assert index.categories == [{"id": 1, "name": "thing"}]
    recs = [r for _, _, r in shards.iter_samples(tmp_path / "ev", allow_parts=True)]
    assert [len(r["objects"]) for r in recs] == [1, 1, 1]


def test_part_file_without_supercategories_gives_one_object_class(tmp_path: Path, part_files: dict) -> None:
    data = json.loads(part_files["json"].read_text())
    for c in data["categories"]:
        del c["supercategory"]
    path = tmp_path / "nosuper.json"
    path.write_text(json.dumps(data))
    index = coco_io.import_partimagenet(path, part_files["images"], tmp_path / "ev", name="pin")
    assert index.categories == [{"id": 1, "name": "object"}]
    recs = [r for _, _, r in shards.iter_samples(tmp_path / "ev", allow_parts=True)]
    assert [len(r["objects"]) for r in recs] == [1, 1, 1]


def test_parts_go_to_the_instance_they_overlap(tmp_path: Path, part_files: dict) -> None:
    inst = {"images": part_files["data"]["images"], "categories": [{"id": 2, "name": "Quadruped"}, {"id": 8, "name": "Fish"}],
            "annotations": [
                {"id": 1, "image_id": 0, "category_id": 2, "segmentation": [rect(0, 0, 32, 22)], "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 8, "segmentation": [rect(0, 0, 12, 20)], "iscrowd": 0},
                {"id": 3, "image_id": 1, "category_id": 8, "segmentation": [rect(12, 0, 30, 20)], "iscrowd": 0},
                {"id": 4, "image_id": 2, "category_id": 8, "segmentation": [rect(0, 0, 8, 8)], "iscrowd": 0}]}
    ipath = tmp_path / "inst.json"
    ipath.write_text(json.dumps(inst))
    index = coco_io.import_partimagenet(part_files["json"], part_files["images"], tmp_path / "ev", name="pin", instances_json=ipath)
    assert [c["name"] for c in index.categories] == ["Quadruped", "Fish"]
    recs = {r["image_id"]: r for _, _, r in shards.iter_samples(tmp_path / "ev", allow_parts=True)}
    assert [o["category_id"] for o in recs[1]["objects"]] == [8, 8]
    # fish head (x 5..15) lies mostly in object 1 (x < 12); the tail (x 15..25) in object 2
    assert [p["object_id"] for p in recs[1]["parts"]] == [1, 2]
    assert np.array_equal(decode_mask(recs[1]["objects"][0]["segmentation"]), poly_mask([rect(0, 0, 12, 20)]))


def test_export_parts_scores_ap_1_against_itself(tmp_path: Path, part_files: dict) -> None:
    coco_io.import_partimagenet(part_files["json"], part_files["images"], tmp_path / "ev", name="pin")
    coco = coco_io.export_coco(tmp_path / "ev", tmp_path / "parts.json", kind="parts")
    assert len(coco["annotations"]) == 5 and {a["object_id"] for a in coco["annotations"]} == {1, 2, 3}
    assert _score_against_itself(tmp_path / "parts.json") == pytest.approx(1.0)
    coco_io.export_coco(tmp_path / "ev", tmp_path / "objects.json", kind="objects")
    assert _score_against_itself(tmp_path / "objects.json") == pytest.approx(1.0)


def test_image_folder_import_gives_unlabelled_shards(tmp_path: Path) -> None:
    imgs = tmp_path / "folder"
    a = save_image(imgs / "z.png", 1)
    save_image(imgs / "deep" / "b.jpg", 2, "JPEG")
    c = save_image(imgs / "m.bmp", 3, "BMP", size=(12, 9))
    (imgs / "notes.txt").write_text("not an image")
    index = coco_io.import_image_folder(imgs, tmp_path / "ds", name="folder")
    assert index.num_samples == 3 and index.categories == [] and not index.has_parts
    got = list(shards.iter_samples(tmp_path / "ds"))
    assert [r["file_name"] for _, _, r in got] == ["deep/b.jpg", "m.bmp", "z.png"]
    assert all(r["objects"] == [] for _, _, r in got)
    assert np.array_equal(got[1][1], c) and np.array_equal(got[2][1], a)


# ----------------------------------------------------------------------------- bad input


def _mutate(coco_files: dict, tmp_path: Path, fn) -> Path:
    data = json.loads(json.dumps(coco_files["data"]))
    fn(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


def _set_ann(i, **kw):
    return lambda d: d["annotations"][i].update(kw)


BAD_JSON = {
    "missing segmentation": (lambda d: d["annotations"][3].pop("segmentation"), "lacks 'category_id' or 'segmentation'", "sub/b.jpg"),
    "missing file_name": (lambda d: d["images"][1].pop("file_name"), "lacks 'id' or 'file_name'", "7"),
    "polygon far outside": (_set_ann(3, segmentation=[rect(1, 1, 60, 8)]),
                            r"annotation 14: segmentation\[0\]: polygon outside the 40x30 \(WxH\) image by 20 px", "sub/b.jpg"),
    "polygon entirely outside": (_set_ann(3, segmentation=[rect(1, 1, 8, 8), rect(-9, 2, -1, 8)]),
                                 r"annotation 14: segmentation\[1\]: polygon entirely outside", "sub/b.jpg"),
    "polygon of 2 points": (_set_ann(3, segmentation=[rect(1, 1, 8, 8), [1, 1, 5, 5]]),
                            r"annotation 14: segmentation\[1\] has 2 point\(s\); a polygon needs at least 3", "sub/b.jpg"),
    "polygon with NaN": (_set_ann(3, segmentation=[[1, 1, float("nan"), 5, 6, 1]]),
                         r"annotation 14: segmentation\[0\] has non-finite coordinates", "sub/b.jpg"),
    "polygon of strings": (_set_ann(3, segmentation=[["1", "1", "5", "5", "6", "1"]]),
                           r"annotation 14: segmentation\[0\] must be a flat list of numbers", "sub/b.jpg"),
    "polygon with odd length": (_set_ann(3, segmentation=[[1, 1, 5, 5, 6, 1, 7]]),
                                r"annotation 14: segmentation\[0\] has an odd number of coordinates", "sub/b.jpg"),
    "empty segmentation": (_set_ann(3, segmentation=[]), r"annotation 14: segmentation is an empty list", "sub/b.jpg"),
    "rle size mismatch": (_set_ann(3, segmentation=encode_mask(np.zeros((H + 2, W), np.uint8))), "does not match the image size", "sub/b.jpg"),
    "rle counts too long": (_set_ann(3, segmentation={"size": [H, W], "counts": uncompressed_rle(rect_mask(0, 0, 3, 3))["counts"] + [5]}),
                            "summing to", "sub/b.jpg"),
    "compressed counts wrong": (_set_ann(3, segmentation={"size": [H, W], "counts": encode_mask(np.zeros((H, W + 3), np.uint8))["counts"]}),
                                "do not cover", "sub/b.jpg"),
    "bad iscrowd": (_set_ann(3, iscrowd="yes"), "iscrowd", "sub/b.jpg"),
    "size disagrees": (lambda d: d["images"][1].update(height=H + 1), "annotation file says", "sub/b.jpg"),
    "unknown category": (_set_ann(3, category_id=4), "not in 'categories'", "sub/b.jpg"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_annotation_names_file_and_sample(tmp_path: Path, coco_files: dict, case: str) -> None:
    fn, message, sample = BAD_JSON[case]
    path = _mutate(coco_files, tmp_path, fn)
    with pytest.raises(DataError, match=message) as e:
        coco_io.import_coco(path, coco_files["images"], tmp_path / "ds", name="bad")
    assert str(path) in str(e.value) and sample in str(e.value)
    assert not (tmp_path / "ds" / "index.json").exists()


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_skip_bad_quarantines_the_sample(tmp_path: Path, coco_files: dict, case: str) -> None:
    fn, message, sample = BAD_JSON[case]
    path = _mutate(coco_files, tmp_path, fn)
    index = coco_io.import_coco(path, coco_files["images"], tmp_path / "ds", name="bad", skip_bad=True)
    assert index.num_samples == 2
    (q,) = index.quarantined
    assert q["source"] == str(path) and sample in q["key"] and re.search(message, q["error"])
    assert DatasetIndex.load(tmp_path / "ds").quarantined == [q]


def test_missing_top_level_list_names_the_file(tmp_path: Path, coco_files: dict) -> None:
    path = _mutate(coco_files, tmp_path, lambda d: d.pop("annotations"))
    with pytest.raises(DataError, match="lacks the 'annotations' list") as e:
        coco_io.import_coco(path, coco_files["images"], tmp_path / "ds", name="bad")
    assert str(path) in str(e.value)


def test_annotation_without_image_id_names_it(tmp_path: Path, coco_files: dict) -> None:
    path = _mutate(coco_files, tmp_path, lambda d: d["annotations"][2].pop("image_id"))
    with pytest.raises(DataError, match=r"annotations\[2\] \(id 13\) lacks 'image_id'") as e:
        coco_io.import_coco(path, coco_files["images"], tmp_path / "ds", name="bad")
    assert str(path) in str(e.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_unreadable_image_names_file_and_sample(tmp_path: Path, coco_files: dict, damage: str) -> None:
    img = coco_files["images"] / "sub" / "b.jpg"
    if damage == "garbage":
        img.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    elif damage == "truncated":
        img.write_bytes(img.read_bytes()[: len(img.read_bytes()) // 2])
    else:
        img.unlink()
    with pytest.raises(DataError, match="image") as e:
        coco_io.import_coco(coco_files["json"], coco_files["images"], tmp_path / "ds", name="bad")
    assert str(img) in str(e.value) and "000000000007" in str(e.value)
    index = coco_io.import_coco(coco_files["json"], coco_files["images"], tmp_path / "ds", name="bad", skip_bad=True)
    assert index.num_samples == 2 and [q["source"] for q in index.quarantined] == [str(img)]


def test_corrupt_image_in_folder_is_quarantined(tmp_path: Path) -> None:
    imgs = tmp_path / "folder"
    save_image(imgs / "a.png", 1)
    (imgs / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    with pytest.raises(DataError, match="b.png"):
        coco_io.import_image_folder(imgs, tmp_path / "ds", name="f")
    index = coco_io.import_image_folder(imgs, tmp_path / "ds", name="f", skip_bad=True)
    assert index.num_samples == 1 and index.quarantined[0]["source"].endswith("b.png")


def test_partworld_eval_split_exports_and_scores_ap_1(tmp_path: Path) -> None:
    partworld = pytest.importorskip("trainers.data.partworld")
    cfg = partworld.PartWorldConfig.demo()
    shards.write_dataset(partworld.generate(cfg, "eval", 0, 6), tmp_path / "ev", name="pw", split="eval",
                         categories=partworld.category_table(cfg), part_categories=partworld.part_category_table(cfg))
    for kind in ("objects", "parts"):
        coco = coco_io.export_coco(tmp_path / "ev", tmp_path / f"{kind}.json", kind=kind)
        assert coco["annotations"] and len(coco["images"]) == 6
        assert _score_against_itself(tmp_path / f"{kind}.json") == pytest.approx(1.0)


# ----------------------------------------------------------------------------- real-file geometry


def _padded_truth(polys: list[list[float]], pad: int = 40) -> np.ndarray:
    """The polygon's pixels inside the image: rasterised (pycocotools) on a canvas holding it whole, then cropped."""
    shifted = [(np.asarray(p, float) + pad).tolist() for p in polys]
    return poly_mask(shifted, H + 2 * pad, W + 2 * pad)[pad:pad + H, pad:pad + W]


def test_overshooting_polygons_are_clipped_counted_and_reported(tmp_path: Path, coco_files: dict) -> None:
    over_a = rect(-1.8, 2, 12, 14)  # 1.8 px past the left border, as an annotation tool wrote it
    over_b = [20, -6, 45, 15, 20, 36, -5, 15]  # a diamond past all four borders by up to 6 px
    inside = rect(1, 1, 8, 8)
    def fn(d):
        d["annotations"][0]["segmentation"] = [over_a]
        d["annotations"][3]["segmentation"] = [inside, over_b]
    path = _mutate(coco_files, tmp_path, fn)
    index = coco_io.import_coco(path, coco_files["images"], tmp_path / "ds", name="clip")
    assert index.num_samples == 3 and index.quarantined == []
    assert index.notes["import"] == {"clipped_polygons": 2, "clipped_annotations": 2, "max_overshoot_px": 6.0}
    assert DatasetIndex.load(tmp_path / "ds").notes == index.notes  # published in index.json
    recs = {r["image_id"]: r for _, _, r in shards.iter_samples(tmp_path / "ds")}
    got_a = decode_mask(recs[1]["objects"][0]["segmentation"])
    assert np.array_equal(got_a, _padded_truth([over_a])) and got_a[:, 0].any()
    got_b = decode_mask(recs[7]["objects"][0]["segmentation"])
    assert np.array_equal(got_b, _padded_truth([over_b]) | poly_mask([inside]))
    assert recs[7]["objects"][0]["area"] == int(got_b.sum()) and recs[7]["objects"][0]["bbox"] == [0.0, 0.0, 40.0, 30.0]


def test_a_file_without_overshoot_reports_zero_clipped(tmp_path: Path, coco_files: dict) -> None:
    index = coco_io.import_coco(coco_files["json"], coco_files["images"], tmp_path / "ds", name="ok")
    assert index.notes["import"] == {"clipped_polygons": 0, "clipped_annotations": 0, "max_overshoot_px": 0.0}


def test_clip_tolerance_is_16_px_or_a_tenth_of_the_side() -> None:
    assert coco_io.clip_tolerance(40) == 16 and coco_io.clip_tolerance(640) == 64
    ok = rect(-16, 2, 10, 10)
    report = coco_io.new_report()
    rle = coco_io.segmentation_to_rle([ok], H, W, what="annotation 5", source="f.json", key="k", report=report)
    assert report["clipped_polygons"] == 1 and np.array_equal(decode_mask(rle), rect_mask(0, 2, 10, 10).astype(bool))
    with pytest.raises(DataError, match=r"f.json: sample k: annotation 5: segmentation\[0\]: polygon outside .* by 16.5 px"):
        coco_io.segmentation_to_rle([rect(-16.5, 2, 10, 10)], H, W, what="annotation 5", source="f.json", key="k")


def test_part_import_clips_and_counts_too(tmp_path: Path, part_files: dict) -> None:
    data = json.loads(part_files["json"].read_text())
    data["annotations"][1]["segmentation"] = [rect(10, 4, 41.5, 20)]
    path = tmp_path / "over.json"
    path.write_text(json.dumps(data))
    index = coco_io.import_partimagenet(path, part_files["images"], tmp_path / "ev", name="pin")
    assert index.notes["import"]["clipped_polygons"] == 1 and index.notes["import"]["max_overshoot_px"] == 1.5


# ----------------------------------------------------------------------------- part file -> training split


def test_as_training_gives_objects_and_no_parts(tmp_path: Path, part_files: dict) -> None:
    index = coco_io.import_partimagenet(part_files["json"], part_files["images"], tmp_path / "tr", name="pin-train",
                                        as_training=True)
    assert index.split == "train" and not index.has_parts and index.part_categories is None
    assert index.categories == [{"id": 1, "name": "Fish"}, {"id": 2, "name": "Quadruped"}]
    assert index.notes["import"]["parts_dropped"] == 5 and index.notes["objects_from"] == "union"
    recs = {r["image_id"]: r for _, _, r in shards.iter_samples(tmp_path / "tr")}  # a training reader may read it
    assert all("parts" not in r for r in recs.values())
    assert b'"parts"' not in b"".join((tmp_path / "tr" / s["name"]).read_bytes() for s in index.shards)
    (obj,) = recs[0]["objects"]
    assert obj["category_id"] == 2
    assert np.array_equal(decode_mask(obj["segmentation"]), poly_mask([rect(2, 2, 10, 10)]) | poly_mask([rect(10, 4, 30, 20)]))
    # the same file as an evaluation split keeps its parts, and training readers refuse it
    coco_io.import_partimagenet(part_files["json"], part_files["images"], tmp_path / "ev", name="pin")
    with pytest.raises(shards.PartsNotAllowedError):
        next(shards.iter_samples(tmp_path / "ev"))


def test_as_training_objects_from_connected_components(tmp_path: Path, part_files: dict) -> None:
    data = json.loads(part_files["json"].read_text())
    # image 0: a third Quadruped part far from the other two -> a second component
    data["annotations"].append({"id": 9, "image_id": 0, "category_id": 0, "segmentation": [rect(33, 22, 39, 29)], "iscrowd": 0})
    path = tmp_path / "cc.json"
    path.write_text(json.dumps(data))
    index = coco_io.import_partimagenet(path, part_files["images"], tmp_path / "tr", name="cc", as_training=True,
                                        objects_from="components")
    assert index.notes["objects_from"] == "components" and not index.has_parts
    recs = {r["image_id"]: r for _, _, r in shards.iter_samples(tmp_path / "tr")}
    a, b = recs[0]["objects"]
    assert a["category_id"] == b["category_id"] == 2 and [a["id"], b["id"]] == [1, 2]
    assert np.array_equal(decode_mask(a["segmentation"]), poly_mask([rect(2, 2, 10, 10)]) | poly_mask([rect(10, 4, 30, 20)]))
    assert np.array_equal(decode_mask(b["segmentation"]), poly_mask([rect(33, 22, 39, 29)]))
    # image 1: fish head and tail touch -> one component; the union mode gives the same object
    (fish,) = recs[1]["objects"]
    assert np.array_equal(decode_mask(fish["segmentation"]), rect_mask(5, 5, 15, 15).astype(bool) | poly_mask([rect(15, 8, 25, 12)]))
    with pytest.raises(ValueError, match="components"):
        coco_io.part_samples(path, part_files["images"], instances_json=path, objects_from="components")


def test_as_training_with_an_instance_file_keeps_its_objects(tmp_path: Path, part_files: dict) -> None:
    inst = {"images": part_files["data"]["images"], "categories": [{"id": 2, "name": "Quadruped"}, {"id": 8, "name": "Fish"}],
            "annotations": [
                {"id": 1, "image_id": 0, "category_id": 2, "segmentation": [rect(0, 0, 32, 22)], "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 8, "segmentation": [rect(0, 0, 30, 20)], "iscrowd": 0},
                {"id": 4, "image_id": 2, "category_id": 8, "segmentation": [rect(0, 0, 8, 8)], "iscrowd": 0}]}
    ipath = tmp_path / "inst.json"
    ipath.write_text(json.dumps(inst))
    index = coco_io.import_partimagenet(part_files["json"], part_files["images"], tmp_path / "tr", name="pin",
                                        instances_json=ipath, as_training=True)
    assert not index.has_parts and index.notes["objects_from"] == "instances"
    recs = {r["image_id"]: r for _, _, r in shards.iter_samples(tmp_path / "tr")}
    assert np.array_equal(decode_mask(recs[0]["objects"][0]["segmentation"]), poly_mask([rect(0, 0, 32, 22)]))
    assert all("parts" not in r for r in recs.values())
