"""Importers (image folder, COCO instances, PartImageNet-style COCO parts) and COCO exporters.

Importers read files as real datasets ship them (polygons or RLE, compressed or not; ``iscrowd``
as 0/1 or a boolean; extra fields ignored; a "background" category dropped; any category ids)
and write shards with ``trainers.data.shards.write_dataset``. Every problem with a sample is a
``DataError`` naming the file, the sample, the annotation id and the field; with ``skip_bad=True``
the sample is quarantined (listed in the index) instead. Category ids are kept as the source file
numbers them. Polygons that overshoot the image by a few pixels are clipped to it, not rejected
(see ``clip_tolerance``); the counts are published as ``index.notes["import"]``.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from contract.io import write_atomic
from trainers.data.shards import (
    BadSample, DataError, DatasetIndex, _image_format, encode_png, iter_samples, write_dataset,
)
from trainers.structures import mask_area, mask_bbox

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
BACKGROUND_NAMES = {"background", "bg", "_background_", "__background__"}
# Polygons may overshoot the image a little (annotation tools let vertices sit past the border of a
# truncated object; real datasets have 1-2 px overshoots): such a polygon is clipped to the image
# (its mask is polygon & image, exactly) and counted in the import report. A vertex farther out
# than CLIP_TOLERANCE_PX or CLIP_TOLERANCE_FRACTION of the image side on that axis, whichever is
# larger, is clearly broken geometry and a DataError, as is a polygon entirely outside the image.
CLIP_TOLERANCE_PX = 16.0
CLIP_TOLERANCE_FRACTION = 0.1


def clip_tolerance(side: int) -> float:
    """How far (pixels) a polygon vertex may lie outside an image axis of ``side`` pixels and still be clipped."""
    return max(CLIP_TOLERANCE_PX, CLIP_TOLERANCE_FRACTION * side)


def new_report() -> dict:
    """Counters an importer fills and publishes as ``index.notes["import"]``."""
    return {"clipped_polygons": 0, "clipped_annotations": 0, "max_overshoot_px": 0.0}


def _add_report(total: dict | None, part: dict) -> None:
    if total is None:
        return
    total["clipped_polygons"] += part["clipped_polygons"]
    total["clipped_annotations"] += part["clipped_annotations"]
    total["max_overshoot_px"] = max(total["max_overshoot_px"], part["max_overshoot_px"])


# ----------------------------------------------------------------------------- images


def read_image(path: Path, *, key: Any, expect_hw: tuple[int, int] | None = None,
               annotation_file: Path | None = None) -> tuple[bytes, int, int]:
    """Read and fully decode an image file; return (bytes to store, height, width).

    PNG and JPEG bytes are kept as they are; other formats are re-encoded as PNG. A size other than
    ``expect_hw`` (from ``annotation_file``) is a DataError naming that file.
    """
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as e:  # ValueError: a file name with a NUL byte
        raise DataError(f"cannot read image: {getattr(e, 'strerror', None) or e}", source=path, key=key) from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode catches truncated/corrupt files, not just bad headers
            w, h = im.size
            if _image_format(data) is None:
                data = encode_png(np.asarray(im.convert("RGB")))
    except Exception as e:
        raise DataError(f"corrupt or unreadable image: {e}", source=path, key=key) from None
    if expect_hw is not None and (h, w) != tuple(expect_hw):
        raise DataError(f"{path} is {h}x{w} (HxW) but the annotation file says {expect_hw[0]}x{expect_hw[1]}",
                        source=annotation_file or path, key=key)
    return data, h, w


def image_folder_samples(image_dir: str | os.PathLike) -> Iterator[tuple[str, bytes, dict] | BadSample]:
    """Samples with empty ``objects`` for every image under ``image_dir`` (sorted; key = position)."""
    root = Path(image_dir)
    if not root.is_dir():
        raise DataError("image folder does not exist", source=root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    for i, path in enumerate(files):
        key = f"{i:09d}"
        try:
            data, h, w = read_image(path, key=key)
        except DataError as e:
            yield BadSample(e)
            continue
        rel = path.relative_to(root).as_posix()
        yield key, data, {"image_id": i, "file_name": rel, "height": h, "width": w, "objects": []}


def import_image_folder(image_dir: str | os.PathLike, out_dir: str | os.PathLike, *, name: str, split: str = "train",
                        shard_size: int = 1000, skip_bad: bool = False) -> DatasetIndex:
    """Image folder -> unlabelled shards (records with empty ``objects``)."""
    return write_dataset(image_folder_samples(image_dir), out_dir, name=name, split=split, categories=[],
                         shard_size=shard_size, skip_bad=skip_bad, source=str(image_dir))


# ----------------------------------------------------------------------------- COCO parsing


def load_coco_json(path: str | os.PathLike, required: tuple[str, ...] = ("images", "annotations", "categories")) -> dict:
    """Read a COCO JSON file; DataError naming it if unreadable or missing a top-level list."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read COCO JSON: {e}", source=path) from None
    if not isinstance(data, dict):
        raise DataError("COCO JSON must be an object", source=path)
    for k in required:
        if not isinstance(data.get(k), list):
            raise DataError(f"COCO JSON lacks the '{k}' list", source=path)
    return data


def coco_categories(data: dict, path: Path) -> tuple[list[dict], set[int]]:
    """(categories sorted by id without background, background ids); DataError on missing id/name or duplicates."""
    cats, seen, background = [], set(), set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DataError(f"categories[{i}] lacks 'id' or 'name'", source=path)
        cid = _as_int(c["id"], f"categories[{i}].id", path, None)
        if str(c["name"]).strip().lower() in BACKGROUND_NAMES:
            background.add(cid)
            continue
        if cid in seen:
            raise DataError(f"duplicate category id {cid}", source=path)
        seen.add(cid)
        cat = {"id": cid, "name": str(c["name"])}
        if c.get("supercategory") is not None:
            cat["supercategory"] = str(c["supercategory"])
        if c.get("isthing") is not None:  # COCO panoptic: thing 1, stuff 0
            cat["isthing"] = _as_int(c["isthing"], f"categories[{i}].isthing", path, None)
        cats.append(cat)
    return sorted(cats, key=lambda c: c["id"]), background


def _as_int(v: Any, what: str, path: Path, key: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or int(v) != v:
        raise DataError(f"{what} must be an integer, got {v!r}", source=path, key=key)
    return int(v)


def _coco_images(data: dict, path: Path) -> tuple[list[dict], dict[int, list[dict]]]:
    """(images in file order, annotations grouped by image id); DataError for unattributable annotations."""
    images = data["images"]
    ids = set()
    for i, im in enumerate(images):
        if isinstance(im, dict) and "id" in im:
            ids.add(_as_int(im["id"], f"images[{i}].id", path, im.get("file_name")))
    by_image: dict[int, list[dict]] = defaultdict(list)
    for j, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise DataError(f"annotations[{j}] (id {ann.get('id') if isinstance(ann, dict) else None}) lacks 'image_id'", source=path)
        iid = ann["image_id"]
        if isinstance(iid, bool) or not isinstance(iid, (int, float)) or iid not in ids:
            raise DataError(f"annotations[{j}] (id {ann.get('id')}) refers to unknown image_id {iid!r}", source=path)
        by_image[iid].append(ann)
    return images, by_image


def _rle_counts_total(counts: bytes) -> int | None:
    """Sum of a compressed COCO RLE's run lengths (pycocotools' rleFrString), None if malformed."""
    total, runs, p, n = 0, [], 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None
            c = counts[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
        total += x
    return total


def _polygon(p: Any, field: str, h: int, w: int, bad) -> tuple[np.ndarray, float]:
    """Check one polygon; return (flat float array, how far it overshoots the image in px, 0 if inside)."""
    if not isinstance(p, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in p):
        raise bad(f"{field} must be a flat list of numbers x1, y1, x2, y2, ...")
    if len(p) % 2:
        raise bad(f"{field} has an odd number of coordinates ({len(p)})")
    if len(p) < 6:
        raise bad(f"{field} has {len(p) // 2} point(s); a polygon needs at least 3")
    a = np.asarray(p, dtype=np.float64)
    if not np.isfinite(a).all():
        raise bad(f"{field} has non-finite coordinates (NaN or inf)")
    xs, ys = a[0::2], a[1::2]
    extent = f"x in [{xs.min():g}, {xs.max():g}], y in [{ys.min():g}, {ys.max():g}]"
    if xs.max() <= 0 or ys.max() <= 0 or xs.min() >= w or ys.min() >= h:
        raise bad(f"{field}: polygon entirely outside the {w}x{h} (WxH) image ({extent})")
    over_x = max(-xs.min(), xs.max() - w, 0.0)
    over_y = max(-ys.min(), ys.max() - h, 0.0)
    if over_x > clip_tolerance(w) or over_y > clip_tolerance(h):
        raise bad(f"{field}: polygon outside the {w}x{h} (WxH) image by {max(over_x, over_y):g} px ({extent}), "
                  f"beyond the clipping tolerance of {clip_tolerance(w):g} x {clip_tolerance(h):g} px")
    return a, float(max(over_x, over_y))


def _clipped_polygon_rle(a: np.ndarray, h: int, w: int, overshoot: float) -> dict:
    """The mask of polygon ``a`` intersected with the h x w image: rasterised on a canvas that holds the
    whole polygon (pycocotools' rules), then cropped, so it equals the unclipped polygon's pixels inside
    (pycocotools' own clipping at the border is close but not exact)."""
    pad = int(np.ceil(overshoot)) + 2
    shifted = (a + pad).tolist()
    big = mask_utils.decode(mask_utils.frPyObjects([shifted], h + 2 * pad, w + 2 * pad))[:, :, 0]
    return mask_utils.encode(np.asfortranarray(big[pad:pad + h, pad:pad + w]))


def segmentation_to_rle(seg: Any, h: int, w: int, *, what: str, source: Any, key: Any,
                        report: dict | None = None) -> dict:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE with str counts.

    Polygons that overshoot the image by up to ``clip_tolerance`` are clipped to it and counted in
    ``report`` (see ``new_report``). DataError, naming ``what`` and the field, if malformed: a polygon
    with fewer than 3 points, non-numeric or non-finite coordinates, entirely outside the image or
    beyond the tolerance; an RLE whose size or run lengths do not match the image.
    """
    def bad(reason: str) -> DataError:
        return DataError(f"{what}: {reason}", source=source, key=key)

    if isinstance(seg, list):
        if not seg:
            raise bad("segmentation is an empty list (no polygon)")
        nested = isinstance(seg[0], (list, tuple))
        raw = seg if nested else [seg]
        rles, overshoots = [], []
        for i, p in enumerate(raw):
            field = f"segmentation[{i}]" if nested else "segmentation"
            a, over = _polygon(p, field, h, w, bad)
            if over > 0:
                overshoots.append(over)
                rles.append(_clipped_polygon_rle(a, h, w, over))
            else:
                rles.extend(mask_utils.frPyObjects([a.tolist()], h, w))
        rle = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
        if report is not None and overshoots:
            report["clipped_polygons"] += len(overshoots)
            report["clipped_annotations"] += 1
            report["max_overshoot_px"] = max(report["max_overshoot_px"], round(max(overshoots), 3))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        try:
            size = [int(v) for v in seg["size"]]
        except (TypeError, ValueError, OverflowError):
            raise bad(f"bad RLE size {seg['size']!r}") from None
        if size != [h, w]:
            raise bad(f"RLE size {size} does not match the image size [{h}, {w}]")
        counts = seg["counts"]
        if isinstance(counts, list):
            if any(not isinstance(c, int) or c < 0 for c in counts) or sum(counts) != h * w:
                raise bad(f"uncompressed RLE counts must be non-negative ints summing to {h}*{w}")
            rle = mask_utils.frPyObjects({"size": size, "counts": counts}, h, w)
        elif isinstance(counts, (str, bytes)):
            try:
                counts = counts.encode("ascii") if isinstance(counts, str) else counts
            except UnicodeEncodeError:
                raise bad("compressed RLE counts must be ASCII") from None
            if _rle_counts_total(counts) != h * w:
                raise bad(f"compressed RLE counts are malformed or do not cover the {h}x{w} image")
            rle = {"size": size, "counts": counts}
        else:
            raise bad(f"RLE counts must be a list, str or bytes, got {type(counts).__name__}")
    else:
        raise bad("segmentation must be polygons or an RLE dict")
    c = rle["counts"]
    return {"size": [h, w], "counts": c.decode("ascii") if isinstance(c, bytes) else c}


def _iscrowd(v: Any, what: str, source: Any, key: Any) -> int:
    if v in (0, 1):  # also False/True
        return int(v)
    raise DataError(f"{what}.iscrowd must be 0/1 or a boolean, got {v!r}", source=source, key=key)


def _image_header(im: Any, i: int, path: Path) -> tuple[int, str, tuple[int, int] | None, str]:
    """(image id, file name, (h, w) or None, key) of an ``images`` entry; DataError if id/file_name are missing."""
    if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
        raise DataError(f"images[{i}] lacks 'id' or 'file_name'", source=path, key=im.get("id") if isinstance(im, dict) else i)
    iid = _as_int(im["id"], f"images[{i}].id", path, im["file_name"])
    hw = None
    if im.get("height") is not None and im.get("width") is not None:
        hw = (_as_int(im["height"], "height", path, im["file_name"]), _as_int(im["width"], "width", path, im["file_name"]))
    return iid, str(im["file_name"]), hw, f"{iid:012d}" if iid >= 0 else f"n{-iid:012d}"


def _annotations(anns: list[dict], h: int, w: int, cats: tuple[list[dict], set[int]], path: Path, key: str, *,
                 crowd: bool, report: dict | None = None) -> list[dict]:
    """COCO annotations of one image -> record annotations (ids 1..n in file order); background ones dropped.

    Clipped polygons are counted in ``report``."""
    cat_ids, background = {c["id"] for c in cats[0]}, cats[1]
    out = []
    for a in anns:
        what = f"annotation {a.get('id')}"
        if "category_id" not in a or "segmentation" not in a:
            raise DataError(f"{what} lacks 'category_id' or 'segmentation'", source=path, key=key)
        cid = _as_int(a["category_id"], f"{what}.category_id", path, key)
        if cid in background:
            continue
        if cid not in cat_ids:
            raise DataError(f"{what}.category_id {cid} is not in 'categories'", source=path, key=key)
        rle = segmentation_to_rle(a["segmentation"], h, w, what=what, source=path, key=key, report=report)
        ann = {"id": len(out) + 1, "category_id": cid, "segmentation": rle, "area": mask_area(rle), "bbox": mask_bbox(rle)}
        if crowd:
            ann["iscrowd"] = _iscrowd(a.get("iscrowd", 0), what, path, key)
        out.append(ann)
    return out


# ----------------------------------------------------------------------------- COCO instances


def coco_samples(instances_json: str | os.PathLike, image_dir: str | os.PathLike, *,
                 report: dict | None = None) -> tuple[list[dict], Iterator]:
    """(categories, samples) of a COCO instance file: one sample per image, its objects from the annotations.

    ``report`` (from ``new_report``) counts the clipped polygons of the samples yielded."""
    path, root = Path(instances_json), Path(image_dir)
    data = load_coco_json(path)
    cats = coco_categories(data, path)
    images, by_image = _coco_images(data, path)

    def gen():
        for i, im in enumerate(images):
            try:
                iid, file_name, hw, key = _image_header(im, i, path)
                data_bytes, h, w = read_image(root / file_name, key=f"{key} ({file_name})", expect_hw=hw, annotation_file=path)
                mine = new_report()
                objects = _annotations(by_image.get(iid, []), h, w, cats, path, f"{key} ({file_name})", crowd=True,
                                       report=mine)
            except DataError as e:
                yield BadSample(e)
                continue
            _add_report(report, mine)
            yield key, data_bytes, {"image_id": iid, "file_name": file_name, "height": h, "width": w, "objects": objects}

    return cats[0], gen()


def import_coco(instances_json: str | os.PathLike, image_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                name: str, split: str = "train", shard_size: int = 1000, skip_bad: bool = False) -> DatasetIndex:
    """COCO instance JSON + image directory -> shards with object labels (training data)."""
    report = new_report()
    cats, samples = coco_samples(instances_json, image_dir, report=report)
    return write_dataset(samples, out_dir, name=name, split=split, categories=cats, shard_size=shard_size,
                         skip_bad=skip_bad, source=str(instances_json), notes={"import": report})


# ----------------------------------------------------------------------------- PartImageNet-style parts

OBJECTS_FROM = ("union", "components")
DEFAULT_OBJECT_CLASS = "object"  # the one object class of a part file whose part categories name no supercategory


def part_samples(parts_json: str | os.PathLike, image_dir: str | os.PathLike, *,
                 instances_json: str | os.PathLike | None = None,
                 object_class: str | None = None, objects_from: str = "union", as_training: bool = False,
                 report: dict | None = None) -> tuple[list[dict], list[dict], Iterator]:
    """(object categories, part categories, samples) of a PartImageNet-style COCO part file.

    A part's object class is its category's ``supercategory`` (or ``object_class`` for all parts;
    ``"object"`` when no part category names a supercategory). Objects come from ``instances_json``
    when given (matched by image id; each part goes to the object of its class it overlaps most);
    otherwise they are made from the parts: ``objects_from="union"`` -- PartImageNet ships no
    instance masks and has one object per image -- gives each image one object per class, its mask
    the union of the parts of that class; ``"components"`` gives one object per 8-connected
    component of that union. With ``as_training=True`` the records carry no ``parts`` (an
    object-labelled training split: part labels never reach training). ``report`` (``new_report``)
    counts clipped polygons and, with ``as_training``, the part annotations dropped.
    """
    if objects_from not in OBJECTS_FROM:
        raise ValueError(f"objects_from must be one of {OBJECTS_FROM}, got {objects_from!r}")
    if instances_json is not None and objects_from != "union":
        raise ValueError("objects_from='components' makes objects from the parts; it cannot be combined with an instance file")
    path, root = Path(parts_json), Path(image_dir)
    data = load_coco_json(path)
    part_table = coco_categories(data, path)
    part_cats = part_table[0]
    images, parts_by_image = _coco_images(data, path)

    inst_path = Path(instances_json) if instances_json is not None else None
    if inst_path is not None:
        inst = load_coco_json(inst_path)
        obj_table = coco_categories(inst, inst_path)
        obj_cats = obj_table[0]
        _, objs_by_image = _coco_images(inst, inst_path)
    else:
        if object_class is None and part_cats and not any(c.get("supercategory") for c in part_cats):
            object_class = DEFAULT_OBJECT_CLASS
        classes = {object_class} if object_class is not None else {c.get("supercategory") for c in part_cats}
        if None in classes:
            missing = [c["name"] for c in part_cats if not c.get("supercategory")]
            raise DataError(f"part categories {missing} have no 'supercategory' (others do); pass object_class= "
                            "(--object-class) to give every part one object class", source=path)
        obj_cats = [{"id": i + 1, "name": n} for i, n in enumerate(sorted(classes))]
    class_of_name = {c["name"]: c["id"] for c in obj_cats}
    part_class = {}
    for c in part_cats:
        cls_name = object_class if object_class is not None else c.get("supercategory")
        part_class[c["id"]] = class_of_name.get(cls_name)  # None: class unknown to the instance file
    if report is not None and as_training:
        report.setdefault("parts_dropped", 0)

    def gen():
        for i, im in enumerate(images):
            try:
                iid, file_name, hw, key = _image_header(im, i, path)
                skey = f"{key} ({file_name})"
                data_bytes, h, w = read_image(root / file_name, key=skey, expect_hw=hw, annotation_file=path)
                mine = new_report()
                parts = _annotations(parts_by_image.get(iid, []), h, w, part_table, path, skey, crowd=False, report=mine)
                if inst_path is not None:
                    objects = _annotations(objs_by_image.get(iid, []), h, w, obj_table, inst_path, skey, crowd=True,
                                           report=mine)
                    _assign_parts(parts, objects, part_class, path, skey)
                else:
                    objects = _objects_from_parts(parts, part_class, h, w, components=objects_from == "components")
            except DataError as e:
                yield BadSample(e)
                continue
            _add_report(report, mine)
            record = {"image_id": iid, "file_name": file_name, "height": h, "width": w, "objects": objects}
            if as_training:
                if report is not None:
                    report["parts_dropped"] += len(parts)
            else:
                record["parts"] = parts
            yield key, data_bytes, record

    return obj_cats, part_cats, gen()


def _objects_from_parts(parts: list[dict], part_class: dict, h: int, w: int, *, components: bool = False) -> list[dict]:
    """Objects made from the parts, classes in id order; parts get their object's ``object_id``.

    One object per class present (mask = union of that class's parts) or, with ``components``, one per
    8-connected component of that union (in raster order of the component's first pixel).
    """
    by_class: dict[int, list[dict]] = defaultdict(list)
    for p in parts:
        by_class[part_class[p["category_id"]]].append(p)
    objects = []

    def add(rle: dict, cls: int) -> int:
        rle = {"size": [h, w], "counts": rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]}
        objects.append({"id": len(objects) + 1, "category_id": cls, "segmentation": rle, "area": mask_area(rle),
                        "bbox": mask_bbox(rle), "iscrowd": 0})
        return len(objects)

    for cls in sorted(by_class):
        members = by_class[cls]
        union = mask_utils.merge([{"size": [h, w], "counts": p["segmentation"]["counts"].encode("ascii")} for p in members])
        if not components:
            oid = add(union, cls)
            for p in members:
                p["object_id"] = oid
            continue
        from scipy import ndimage

        labels, n = ndimage.label(mask_utils.decode(union), structure=np.ones((3, 3), dtype=bool))
        ids = [add(mask_utils.encode(np.asfortranarray((labels == k).astype(np.uint8))), cls) for k in range(1, n + 1)]
        for p in members:  # the component holding most of the part (all of it: a part is inside the union)
            pm = mask_utils.decode({"size": [h, w], "counts": p["segmentation"]["counts"].encode("ascii")}).astype(bool)
            hits = np.bincount(labels[pm].ravel(), minlength=n + 1)[1:]
            if hits.sum():
                p["object_id"] = ids[int(np.argmax(hits))]
    return objects


def _assign_parts(parts: list[dict], objects: list[dict], part_class: dict, path: Path, key: str) -> None:
    """Give each part the object (of its class when known) that covers most of it."""
    if not parts:
        return
    if not objects:
        raise DataError(f"image has {len(parts)} part(s) but no object in the instance file", source=path, key=key)
    def enc(a):
        return {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode("ascii")}
    pr, orl = [enc(p) for p in parts], [enc(o) for o in objects]
    inter = np.asarray(mask_utils.iou(pr, orl, [1] * len(orl)), dtype=np.float64).reshape(len(parts), len(objects))
    for i, p in enumerate(parts):  # iscrowd=1 makes iou() return |part & object| / |part|
        cls = part_class.get(p["category_id"])
        score = inter[i].copy()
        if cls is not None:
            score[[o["category_id"] != cls for o in objects]] = -1
        j = int(np.argmax(score))
        if score[j] <= 0:
            raise DataError(f"part annotation (category {p['category_id']}) overlaps no object of its class", source=path, key=key)
        p["object_id"] = objects[j]["id"]


def import_partimagenet(parts_json: str | os.PathLike, image_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                        name: str, split: str | None = None, instances_json: str | os.PathLike | None = None,
                        object_class: str | None = None, objects_from: str = "union", as_training: bool = False,
                        shard_size: int = 1000, skip_bad: bool = False) -> DatasetIndex:
    """PartImageNet-style COCO part JSON (+ optional instance JSON) -> shards.

    By default evaluation shards (has_parts; split ``eval``); with ``as_training`` an object-labelled
    training split (split ``train``) whose records carry no parts. See ``part_samples``.
    """
    report = new_report()
    cats, part_cats, samples = part_samples(parts_json, image_dir, instances_json=instances_json, object_class=object_class,
                                            objects_from=objects_from, as_training=as_training, report=report)
    notes = {"import": report, "objects_from": "instances" if instances_json is not None else objects_from}
    return write_dataset(samples, out_dir, name=name, split=split or ("train" if as_training else "eval"), categories=cats,
                         part_categories=None if as_training else part_cats, shard_size=shard_size, skip_bad=skip_bad,
                         source=str(parts_json), notes=notes)


# ----------------------------------------------------------------------------- export


def export_coco(dataset_dir: str | os.PathLike, out_json: str | os.PathLike, *, kind: str = "objects") -> dict:
    """Write a dataset's object (``kind="objects"``) or part (``kind="parts"``) labels as COCO JSON.

    Annotation ids are global and 1-based; exported parts carry ``object_id`` = the id of their
    object in the matching ``kind="objects"`` export. Written atomically; returns the COCO dict.
    """
    if kind not in ("objects", "parts"):
        raise ValueError(f"kind must be 'objects' or 'parts', got {kind!r}")
    index = DatasetIndex.load(dataset_dir)
    if kind == "parts" and not index.has_parts:
        raise DataError("dataset has no part labels to export", source=Path(dataset_dir))
    images, annotations, seen = [], [], set()
    next_object = 1
    for key, _, rec in iter_samples(dataset_dir, decode=False, allow_parts=True):
        if rec["image_id"] in seen:
            raise DataError(f"image_id {rec['image_id']} appears twice; COCO needs unique image ids", source=Path(dataset_dir), key=key)
        seen.add(rec["image_id"])
        images.append({"id": rec["image_id"], "file_name": rec.get("file_name", key), "height": rec["height"], "width": rec["width"]})
        object_ids = {}
        for o in rec.get("objects", []):
            object_ids[o["id"]] = next_object
            next_object += 1
            if kind == "objects":
                annotations.append(_coco_ann(o, len(annotations) + 1, rec["image_id"], iscrowd=o.get("iscrowd", 0)))
        if kind == "parts":
            for p in rec.get("parts", []):
                a = _coco_ann(p, len(annotations) + 1, rec["image_id"], iscrowd=0)
                if p.get("object_id") in object_ids:
                    a["object_id"] = object_ids[p["object_id"]]
                annotations.append(a)
    cats = index.categories if kind == "objects" else index.part_categories
    coco = {"info": {"description": f"{index.name} ({index.split}) {kind}", "version": str(index.format_version)},
            "licenses": [], "images": images, "annotations": annotations, "categories": cats}
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(coco, separators=(",", ":")).encode())
    return coco


def _coco_ann(a: dict, ann_id: int, image_id: int, *, iscrowd: int) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": a["category_id"], "segmentation": a["segmentation"],
            "area": a.get("area", mask_area(a["segmentation"])), "bbox": a.get("bbox", mask_bbox(a["segmentation"])),
            "iscrowd": int(iscrowd)}
