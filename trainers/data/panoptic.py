"""Things and stuff (COCO panoptic, CaSP sec. 3.3 "entities"): the record's ``stuff`` list, and COCO panoptic in and out.

**In the records** a dataset with stuff keeps its things as ``objects`` and its stuff regions (sky, ground, ...) as
``stuff``: ``[{"id", "category_id", "segmentation": RLE, "area", "bbox", "iscrowd"}]``; the dataset's ``categories``
hold both, each marked ``isthing`` 1 or 0 as COCO panoptic marks them (a category without ``isthing`` is a thing, so
every dataset written before stuff existed reads as things only). Every reader of ``objects`` therefore sees things
only; an **entity** (Entity Segmentation, CaSP sec. 3.3) is a thing or a stuff region, class-free:
:func:`entity_record` gives the entity view of a record (the instance-teacher's ``entities`` targets).

**COCO panoptic** (``panoptic_<split>.json`` + a folder of PNGs): each image has one annotation ``{"image_id",
"file_name": <png>, "segments_info": [{"id", "category_id", "iscrowd", "area", "bbox"}]}``; the PNG's pixel holds the
segment id ``R + 256 G + 256^2 B`` (0: unlabeled), and ``categories`` carry ``isthing``.
:func:`import_panoptic` turns it into shards (things -> ``objects``, stuff -> ``stuff``); a PNG whose ids and
``segments_info`` disagree is an error naming the PNG and the ids (or, with ``skip_bad``, a quarantined sample).
:func:`export_panoptic` writes a dataset in that format (things and stuff; images beside it).

numpy, PIL and pycocotools only (the CLI imports it).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from contract.io import write_atomic
from trainers.data.coco_io import (
    _as_int, _coco_images, _image_header, _iscrowd, coco_categories, load_coco_json, read_image,
)
from trainers.data.shards import BadSample, DataError, DatasetIndex, _image_format, iter_samples, write_dataset
from trainers.structures import annotation_from_mask, decode_mask

VOID = 0  # segment id of unlabeled pixels in a panoptic PNG


# ----------------------------------------------------------------------------- things, stuff, entities


def is_thing(category: dict) -> bool:
    """COCO panoptic's ``isthing`` (absent: a thing, as in every dataset without stuff)."""
    return bool(int(category.get("isthing", 1)))


def stuff_categories(categories: list[dict]) -> list[dict]:
    """The stuff categories (``isthing`` 0) of a category list."""
    return [c for c in categories if not is_thing(c)]


def entity_record(record: dict) -> dict:
    """The record with its things and stuff regions together as ``objects`` (CaSP sec. 3.3: entities)."""
    return {**record, "objects": list(record.get("objects", [])) + list(record.get("stuff", []))}

# ----------------------------------------------------------------------------- COCO panoptic PNGs


def decode_segment_ids(data: bytes | str | os.PathLike) -> np.ndarray:
    """A panoptic PNG (bytes or a path) -> int64 segment ids ``R + 256 G + 256^2 B``."""
    raw = data if isinstance(data, (bytes, bytearray)) else Path(data).read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def encode_segment_ids(ids: np.ndarray) -> bytes:
    """int segment ids (0 .. 256^3 - 1) -> a panoptic PNG."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2 or (ids.size and (ids.min() < 0 or ids.max() >= 256 ** 3)):
        raise ValueError(f"segment ids must be a 2-D map of 0 .. 256^3-1, got shape {ids.shape}")
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _shown(ids) -> str:
    ids = sorted(int(i) for i in ids)
    return ", ".join(map(str, ids[:10])) + (f" ... ({len(ids)} in all)" if len(ids) > 10 else "")


def new_report() -> dict:
    """Counters of a panoptic import, published as ``index.notes["import"]``."""
    return {"format": "coco-panoptic", "things": 0, "stuff": 0, "crowd": 0, "void_pixels": 0, "area_mismatches": 0}


def _panoptic_categories(data: dict, path: Path) -> tuple[list[dict], set[int]]:
    cats, background = coco_categories(data, path)
    missing = [c["name"] for c in cats if "isthing" not in c]
    if missing:
        raise DataError(f"categories {missing[:10]} lack 'isthing' (COCO panoptic marks every category thing 1 or "
                        "stuff 0)", source=path)
    return cats, background


def _segments(ann: dict, ids: np.ndarray, cats: dict[int, dict], background: set[int], png: Path, path: Path,
              key: str, report: dict) -> tuple[list[dict], list[dict]]:
    """(objects, stuff) of one image from its PNG's ids and its ``segments_info``; DataError when they disagree."""
    info = ann.get("segments_info")
    if not isinstance(info, list):
        raise DataError(f"annotation of {png.name} lacks the 'segments_info' list", source=path, key=key)
    by_id: dict[int, dict] = {}
    for j, s in enumerate(info):
        what = f"segments_info[{j}] of {png.name}"
        if not isinstance(s, dict) or "id" not in s or "category_id" not in s:
            raise DataError(f"{what} lacks 'id' or 'category_id'", source=path, key=key)
        sid = _as_int(s["id"], f"{what}.id", path, key)
        if sid in by_id:
            raise DataError(f"{what}: segment id {sid} is listed twice", source=path, key=key)
        by_id[sid] = s
    present, counts = np.unique(ids, return_counts=True)
    area = {int(i): int(n) for i, n in zip(present, counts) if i != VOID}
    only_png, only_json = set(area) - set(by_id), set(by_id) - set(area)
    if only_png or only_json:
        parts = []
        if only_png:
            parts.append(f"ids {_shown(only_png)} are in the PNG but not in segments_info")
        if only_json:
            parts.append(f"ids {_shown(only_json)} are in segments_info but not in the PNG")
        raise DataError(f"panoptic PNG {png} does not match its JSON: " + "; ".join(parts), source=png, key=key)
    report["void_pixels"] += int(counts[present == VOID].sum())
    objects, stuff = [], []
    for sid in sorted(by_id):  # ascending segment id: a stable order whatever the JSON's
        s = by_id[sid]
        what = f"segment {sid} of {png.name}"
        cid = _as_int(s["category_id"], f"{what}.category_id", path, key)
        if cid in background:
            continue
        if cid not in cats:
            raise DataError(f"{what}.category_id {cid} is not in 'categories'", source=path, key=key)
        crowd = _iscrowd(s.get("iscrowd", 0), what, path, key)
        if s.get("area") is not None and s["area"] != area[sid]:
            report["area_mismatches"] += 1  # the PNG is the mask; COCO's area is its pixel count
        thing = is_thing(cats[cid])
        target = objects if thing else stuff
        target.append(annotation_from_mask(ids == sid, id=len(target) + 1, category_id=cid, iscrowd=crowd))
        report["things" if thing else "stuff"] += 1
        report["crowd"] += crowd
    return objects, stuff


def panoptic_samples(panoptic_json: str | os.PathLike, png_dir: str | os.PathLike, image_dir: str | os.PathLike, *,
                     report: dict | None = None) -> tuple[list[dict], Iterator[tuple[str, bytes, dict] | BadSample]]:
    """(categories with ``isthing``, samples) of a COCO panoptic file: one sample per image, things as ``objects``,
    stuff as ``stuff``, each mask the PNG's pixels of its segment id. ``report`` (:func:`new_report`) counts them."""
    path, pngs, root = Path(panoptic_json), Path(png_dir), Path(image_dir)
    data = load_coco_json(path)
    cats, background = _panoptic_categories(data, path)
    by_cat = {c["id"]: c for c in cats}
    images, by_image = _coco_images(data, path)
    report = new_report() if report is None else report

    def gen():
        for i, im in enumerate(images):
            try:
                iid, file_name, hw, key = _image_header(im, i, path)
                skey = f"{key} ({file_name})"
                anns = by_image.get(iid, [])
                if len(anns) != 1:
                    raise DataError(f"image {iid} has {len(anns)} panoptic annotations (COCO panoptic has one per image)",
                                    source=path, key=skey)
                if not isinstance(anns[0].get("file_name"), str):
                    raise DataError(f"the annotation of image {iid} lacks its PNG's 'file_name'", source=path, key=skey)
                data_bytes, h, w = read_image(root / file_name, key=skey, expect_hw=hw, annotation_file=path)
                png = pngs / anns[0]["file_name"]
                try:
                    ids = decode_segment_ids(png)
                except OSError as e:
                    raise DataError(f"cannot read the panoptic PNG: {getattr(e, 'strerror', None) or e}", source=png,
                                    key=skey) from None
                except Exception as e:  # not a PNG Pillow can decode
                    raise DataError(f"unreadable panoptic PNG: {e}", source=png, key=skey) from None
                if ids.shape != (h, w):
                    raise DataError(f"panoptic PNG is {ids.shape[1]}x{ids.shape[0]} (WxH), its image {w}x{h}", source=png,
                                    key=skey)
                mine = new_report()
                objects, stuff = _segments(anns[0], ids, by_cat, background, png, path, skey, mine)
            except DataError as e:
                yield BadSample(e)
                continue
            for k in ("things", "stuff", "crowd", "void_pixels", "area_mismatches"):
                report[k] += mine[k]
            yield key, data_bytes, {"image_id": iid, "file_name": file_name, "height": h, "width": w,
                                    "objects": objects, "stuff": stuff}

    return cats, gen()


def import_panoptic(panoptic_json: str | os.PathLike, png_dir: str | os.PathLike, image_dir: str | os.PathLike,
                    out_dir: str | os.PathLike, *, name: str | None = None, split: str = "train",
                    shard_size: int = 1000, skip_bad: bool = False) -> DatasetIndex:
    """COCO panoptic JSON + PNG folder + images -> shards with things (``objects``) and stuff (``stuff``)."""
    report = new_report()
    cats, samples = panoptic_samples(panoptic_json, png_dir, image_dir, report=report)
    return write_dataset(samples, out_dir, name=name or Path(out_dir).name, split=split, categories=cats,
                         shard_size=shard_size, skip_bad=skip_bad, source=str(panoptic_json), notes={"import": report})


# ----------------------------------------------------------------------------- export


def export_panoptic(dataset_dir: str | os.PathLike, out_json: str | os.PathLike, png_dir: str | os.PathLike,
                    image_dir: str | os.PathLike | None = None) -> dict:
    """Write a dataset's things and stuff as COCO panoptic: ``out_json`` plus one PNG per image under ``png_dir``
    (segment ids 1.. in record order, objects then stuff; a later mask wins a pixel two claim, and a segment left with
    no pixel is not listed) and, with ``image_dir``, the images as stored. Categories keep ``isthing`` (1 when absent).
    Written atomically file by file; returns the JSON document."""
    index = DatasetIndex.load(dataset_dir)
    pngs = Path(png_dir)
    images, annotations = [], []
    for key, blob, rec in iter_samples(dataset_dir, decode=False, allow_parts=True):
        h, w = int(rec["height"]), int(rec["width"])
        file_name = str(rec.get("file_name") or f"{key}.{_image_format(blob)}")
        ids = np.zeros((h, w), dtype=np.int64)
        segs = list(rec.get("objects", [])) + list(rec.get("stuff", []))
        for sid, s in enumerate(segs, 1):
            ids[decode_mask(s["segmentation"])] = sid
        present, counts = np.unique(ids, return_counts=True)
        area = dict(zip(present.tolist(), counts.tolist()))
        info = []
        for sid, s in enumerate(segs, 1):
            if area.get(sid):
                ys, xs = np.nonzero(ids == sid)
                info.append({"id": sid, "category_id": int(s["category_id"]), "iscrowd": int(s.get("iscrowd", 0)),
                             "area": int(area[sid]), "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                                               int(ys.max() - ys.min() + 1)]})
        png_name = Path(file_name).with_suffix(".png").as_posix()
        write_atomic(_inside(pngs, png_name), encode_segment_ids(ids))
        if image_dir is not None:
            write_atomic(_inside(Path(image_dir), file_name), blob)
        images.append({"id": rec["image_id"], "file_name": file_name, "height": h, "width": w})
        annotations.append({"image_id": rec["image_id"], "file_name": png_name, "segments_info": info})
    categories = [{**c, "isthing": int(is_thing(c))} for c in index.categories]
    doc = {"info": {"description": f"{index.name} ({index.split}) panoptic"}, "licenses": [], "images": images,
           "annotations": annotations, "categories": categories}
    write_atomic(_inside(Path(out_json).parent, Path(out_json).name), json.dumps(doc, separators=(",", ":")).encode())
    return doc


def _inside(root: Path, rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise ValueError(f"file name {rel!r} must be relative and inside {root}")
    out = root / p
    out.parent.mkdir(parents=True, exist_ok=True)
    return out
