"""ImageNet-S-style semantic segmentation data: label maps in that benchmark's PNG encoding, in and out (PASS sec. 3.1).

**The encoding** (the ImageNet-S toolbox's README): a label map is an RGB PNG whose pixel holds the category id as
``R + 256 * G`` (B = 0); id 0 is the 'other' category, 1000 marks the pixels to ignore, and ids 1..C are the
categories, the i-th line of the category list file (e.g. ``ImageNetS_categories_im50.txt``, one WordNet id a line)
being id i. Images and label maps mirror each other: ``<images>/<wnid>/<name>.JPEG`` and ``<labels>/<wnid>/<name>.png``.

- :func:`import_imagenet_s` turns such a folder pair into shards: one sample per label map, the image bytes as they
  are, and a record whose ``objects`` are the categories present (one RLE mask per category id, ``category_id`` =
  the ImageNet-S id) plus an ``ignore`` RLE of the 1000 pixels; the dataset's ``categories`` are the list file's
  lines. A label map holding ids outside ``{0, 1000} u {1..C}``, a missing or mismatched image, an unreadable file:
  an error naming the file and the ids, or with ``skip_bad`` a quarantined sample listed in the index.
- :func:`semantic_map` paints any record's objects back into a label map of class indices (0 'other', 1..C in the
  order of the dataset's categories, :data:`IGNORE_LABEL` for ignored pixels): PartWorld's object masks become the
  semantic ground truth the same way (its object classes are the categories, background and distractors 'other').
- :func:`write_label_png` writes predictions in the same encoding, at ``<out>/<file_name stem>.png``, so the
  benchmark's own ``match.py``/``evaluator.py`` can score them where the real data is at hand.

numpy, PIL and pycocotools only (no torch): the CLI imports it.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from contract.io import write_atomic
from trainers.data.shards import BadSample, DataError, DatasetIndex, write_dataset
from trainers.structures import annotation_from_mask, decode_mask, encode_mask

OTHER_ID = 0  # the 'other' category in ImageNet-S label maps
IGNORE_ID = 1000  # ignored pixels in ImageNet-S label maps
IGNORE_LABEL = -1  # ignored pixels in the in-memory label maps of semantic_map (class indices may exceed 255)
LABEL_SUFFIX = ".png"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def decode_label_png(data: bytes | str | os.PathLike) -> np.ndarray:
    """An ImageNet-S label PNG (bytes or a path) -> int32 ids ``R + 256 * G``."""
    raw = data if isinstance(data, (bytes, bytearray)) else Path(data).read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1]


def encode_label_png(ids: np.ndarray) -> bytes:
    """int ids (0 .. 65535) -> an ImageNet-S label PNG: ``(id % 256, id // 256, 0)`` per pixel."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"a label map is 2-D, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > 65535):
        raise ValueError(f"label ids must be in 0..65535, got {int(ids.min())}..{int(ids.max())}")
    rgb = np.zeros((*ids.shape, 3), dtype=np.uint8)
    rgb[..., 0] = ids % 256
    rgb[..., 1] = ids // 256
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_label_png(out_dir: str | os.PathLike, file_name: str, ids: np.ndarray) -> Path:
    """Write ``ids`` as ``<out_dir>/<file_name without suffix>.png`` (atomically), the benchmark's prediction layout."""
    rel = Path(file_name).with_suffix(LABEL_SUFFIX)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"prediction file name {file_name!r} must be relative and inside the output folder")
    return write_atomic(Path(out_dir) / rel, encode_label_png(ids))


def read_categories(path: str | os.PathLike) -> list[dict]:
    """A category list file (one name a line, the i-th line id i from 1) -> ``[{"id": i, "name": ...}]``."""
    p = Path(path)
    try:
        names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise DataError(f"cannot read the category list: {e.strerror}", source=p) from None
    if not names:
        raise DataError("the category list is empty", source=p)
    if len(set(names)) != len(names):
        raise DataError("the category list names a category twice", source=p)
    return [{"id": i, "name": n} for i, n in enumerate(names, 1)]


def _image_for(images: Path, rel: Path) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for s in (suffix, suffix.upper()):
            p = images / rel.with_suffix(s)
            if p.is_file():
                return p
    return None


def label_records(ids: np.ndarray, num_categories: int) -> tuple[list[dict], dict | None, list[int]]:
    """Objects (one per category id present), the ignore RLE (or None) and the ids outside the category list."""
    present = np.unique(ids)
    bad = [int(v) for v in present if v not in (OTHER_ID, IGNORE_ID) and not 1 <= v <= num_categories]
    objects = []
    for cid in present:
        if cid in (OTHER_ID, IGNORE_ID) or not 1 <= cid <= num_categories:
            continue
        ann = annotation_from_mask(ids == cid)
        objects.append({"id": len(objects) + 1, "category_id": int(cid), **ann, "iscrowd": 0})
    ignore = encode_mask(ids == IGNORE_ID) if (ids == IGNORE_ID).any() else None
    return objects, ignore, bad


def imagenet_s_samples(labels_dir: str | os.PathLike, images_dir: str | os.PathLike,
                       categories: list[dict]) -> Iterator[tuple[str, bytes, dict] | BadSample]:
    """One sample per label map under ``labels_dir`` (sorted; key = position), a BadSample for each bad one."""
    from trainers.data.coco_io import read_image

    labels, images = Path(labels_dir), Path(images_dir)
    for root, what in ((labels, "label folder"), (images, "image folder")):
        if not root.is_dir():
            raise DataError(f"{what} does not exist", source=root)
    files = sorted(p for p in labels.rglob(f"*{LABEL_SUFFIX}") if p.is_file())
    for i, path in enumerate(files):
        key, rel = f"{i:09d}", path.relative_to(labels)
        image_path = _image_for(images, rel)
        if image_path is None:
            yield BadSample(DataError(f"no image {rel.with_suffix('.JPEG')} (or .jpg/.png) under {images}", source=path, key=key))
            continue
        try:
            data, h, w = read_image(image_path, key=key)
            ids = decode_label_png(path)
        except DataError as e:
            yield BadSample(e)
            continue
        except Exception as e:  # an unreadable PNG
            yield BadSample(DataError(f"unreadable label map: {e}", source=path, key=key))
            continue
        if ids.shape != (h, w):
            yield BadSample(DataError(f"label map is {ids.shape[1]}x{ids.shape[0]} (WxH), image {w}x{h}", source=path, key=key))
            continue
        objects, ignore, bad = label_records(ids, len(categories))
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            yield BadSample(DataError(f"label map holds ids {shown} outside the category list (1..{len(categories)}; "
                                      f"{OTHER_ID} other, {IGNORE_ID} ignore)", source=path, key=key))
            continue
        record = {"image_id": i, "file_name": image_path.relative_to(images).as_posix(), "height": h, "width": w,
                  "objects": objects}
        if ignore is not None:
            record["ignore"] = ignore
        yield key, data, record


def import_imagenet_s(labels_dir: str | os.PathLike, images_dir: str | os.PathLike, categories_file: str | os.PathLike,
                      out: str | os.PathLike, *, split: str = "validation", name: str | None = None,
                      shard_size: int = 1000, skip_bad: bool = False) -> DatasetIndex:
    """ImageNet-S label maps + images -> shards with one object per category present (see the module doc)."""
    categories = read_categories(categories_file)
    return write_dataset(imagenet_s_samples(labels_dir, images_dir, categories), out, name=name or Path(out).name,
                         split=split, categories=categories, shard_size=shard_size, skip_bad=skip_bad,
                         source=str(labels_dir), notes={"import": {"format": "imagenet-s", "categories": str(categories_file)}})


def class_indices(categories: list[dict]) -> dict[int, int]:
    """Category id -> class index 1..C in the order of the dataset's categories (0 is 'other')."""
    return {int(c["id"]): i for i, c in enumerate(categories, 1)}


def semantic_map(record: dict, classes: dict[int, int]) -> np.ndarray:
    """A record's ground truth as an int32 label map: 0 'other', ``classes[category_id]`` under each object (later
    objects over earlier ones), :data:`IGNORE_LABEL` under the record's ``ignore`` mask. ValueError for an unknown id."""
    h, w = int(record["height"]), int(record["width"])
    out = np.zeros((h, w), dtype=np.int32)
    for o in record.get("objects", []):
        cid = int(o["category_id"])
        if cid not in classes:
            raise ValueError(f"object category {cid} is not among the dataset's categories ({len(classes)} known)")
        out[decode_mask(o["segmentation"])] = classes[cid]
    if record.get("ignore"):
        out[decode_mask(record["ignore"])] = IGNORE_LABEL
    return out
