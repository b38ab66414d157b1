"""Split a shard dataset into new datasets by seeded fractions (val from an imported part set, CaSP's labeled/unlabeled).

``split_dataset`` assigns every sample of a dataset to exactly one of the named splits: a seeded
permutation of the samples (in reading order) is cut into consecutive runs whose sizes are the
fractions of the total, rounded by largest remainder so they add up to it. Each split is written
as a complete dataset (``<out>/<split>/`` with its own ``index.json``, atomically, by
``shards.write_dataset``); samples keep their keys, image bytes and reading order. The same
dataset, fractions (in the same order) and seed give byte-identical outputs.

Part labels stay only in the splits named in ``keep_parts`` (those meant for evaluation or model
selection); every other split gets records without ``parts`` and no part categories, so training
readers accept it and never see a part label. ``strip_labels`` splits also lose their objects
(and proposals): unlabeled images, e.g. the unlabeled side of a semi-supervised split.
Numpy only; never imports torch.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from trainers.data.shards import _NAME_RE, DataError, DatasetIndex, iter_samples, write_dataset


def parse_fractions(text: str) -> dict[str, float]:
    """``"val=0.1,train=0.9"`` -> ``{"val": 0.1, "train": 0.9}`` (order kept); ValueError naming the bad item."""
    out: dict[str, float] = {}
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"fraction {item!r} must be NAME=FRACTION, e.g. val=0.1")
        try:
            out_value = float(value)
        except ValueError:
            raise ValueError(f"fraction {item!r}: {value.strip()!r} is not a number") from None
        if name in out:
            raise ValueError(f"split {name!r} is named twice in {text!r}")
        out[name] = out_value
    return check_fractions(out)


def check_fractions(fractions: dict[str, float]) -> dict[str, float]:
    """Split names usable as directory and index split names, fractions in [0, 1] summing to 1."""
    if not fractions:
        raise ValueError("give at least one split, e.g. val=0.1,train=0.9")
    for name, f in fractions.items():
        if not _NAME_RE.match(str(name)):
            raise ValueError(f"split name {name!r} must match {_NAME_RE.pattern}")
        if not (isinstance(f, (int, float)) and math.isfinite(f) and 0 <= f <= 1):
            raise ValueError(f"fraction of {name!r} must be in [0, 1], got {f!r}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"fractions must add up to 1 (every sample goes to one split), got {total:g}: {fractions}")
    return {str(k): float(v) for k, v in fractions.items()}


def split_sizes(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Sizes adding up to ``n``: floors of ``n * fraction``, the rest to the largest remainders (ties: first named)."""
    fractions = check_fractions(fractions)
    exact = {k: n * f for k, f in fractions.items()}
    sizes = {k: int(math.floor(v)) for k, v in exact.items()}
    order = sorted(fractions, key=lambda k: (-(exact[k] - sizes[k]), list(fractions).index(k)))
    for k in order[: n - sum(sizes.values())]:
        sizes[k] += 1
    return sizes


def assign(n: int, fractions: dict[str, float], seed: int) -> list[str]:
    """The split of each of ``n`` samples (by reading position): a seeded permutation cut by ``split_sizes``."""
    sizes = split_sizes(n, fractions)
    perm = np.random.default_rng(int(seed)).permutation(n)
    out = [""] * n
    start = 0
    for name, size in sizes.items():
        for i in perm[start:start + size]:
            out[int(i)] = name
        start += size
    return out


def _samples(dataset_dir: Path, chosen: list[bool], keep_parts: bool, strip_labels: bool,
             counts: dict, per_category: dict[str, int]) -> Iterator[tuple[str, bytes, dict]]:
    for i, (key, image, record) in enumerate(iter_samples(dataset_dir, decode=False, allow_parts=True)):
        if i >= len(chosen):
            raise DataError(f"dataset holds more samples than its index says ({len(chosen)})", source=dataset_dir, key=key)
        if not chosen[i]:
            continue
        if not strip_labels:
            for o in record.get("objects", []):
                per_category[str(o["category_id"])] = per_category.get(str(o["category_id"]), 0) + 1
        if strip_labels:
            counts["objects_stripped"] += len(record.get("objects", []))
            record["objects"] = []
            record.pop("proposals", None)
            record.pop("stuff", None)
        if "parts" in record and (strip_labels or not keep_parts):
            counts["parts_stripped"] += len(record.pop("parts"))
        yield key, image, record


def _with_missing(samples: Iterator, categories: list[dict], per_category: dict[str, int], missing: list[dict],
                  stripped: bool) -> Iterator:
    """``samples`` unchanged; once exhausted (before the index is written), ``missing`` lists the categories with no
    object in them (never for a split whose labels are stripped: it has none by design)."""
    yield from samples
    if not stripped:
        missing.extend({"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in categories
                       if per_category.get(str(c["id"]), 0) == 0 and int(c.get("isthing", 1)))  # stuff is no object


def split_dataset(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike, fractions: dict[str, float] | str, *,
                  seed: int = 0, keep_parts: Iterable[str] = (), strip_labels: Iterable[str] = (),
                  name: str | None = None, shard_size: int = 1000) -> dict[str, DatasetIndex]:
    """Write ``<out_dir>/<split>/`` for every split in ``fractions``; return their indexes.

    ``keep_parts``: splits that keep the part labels (evaluation/selection); the rest lose them.
    ``strip_labels``: splits that lose every label (objects, parts, proposals). Each index names its
    source, the seed and the fractions in ``notes["split"]``, its object count per category in
    ``notes["objects_per_category"]`` and the categories it has no object of in
    ``notes["categories_without_objects"]`` (a small labeled fraction can miss a class: training class-specific on it
    never sees that class). Dataset names are ``<name>-<split>``
    (``name`` defaults to the source's). ValueError for a bad split request, DataError for a bad dataset.
    """
    src = Path(dataset_dir)
    fractions = parse_fractions(fractions) if isinstance(fractions, str) else check_fractions(dict(fractions))
    keep_parts, strip_labels = set(keep_parts), set(strip_labels)
    for what, names in (("keep_parts", keep_parts), ("strip_labels", strip_labels)):
        unknown = sorted(names - set(fractions))
        if unknown:
            raise ValueError(f"{what} names {unknown}, which are not among the splits {list(fractions)}")
    if keep_parts & strip_labels:
        raise ValueError(f"splits {sorted(keep_parts & strip_labels)} cannot both keep parts and strip labels")
    index = DatasetIndex.load(src)
    if keep_parts and not index.has_parts:
        raise ValueError(f"{src} has no part labels to keep (keep_parts={sorted(keep_parts)})")
    out = Path(out_dir)
    if out.resolve() == src.resolve() or src.resolve() in [(out / s).resolve() for s in fractions]:
        raise ValueError(f"the output {out} would overwrite the dataset being split ({src})")
    which = assign(index.num_samples, fractions, seed)
    base = name or index.name
    result = {}
    for split in fractions:
        keeps = split in keep_parts and index.has_parts
        counts = {"objects_stripped": 0, "parts_stripped": 0}
        per_category: dict[str, int] = {}
        notes = {"split": {"of": str(src), "of_name": index.name, "of_split": index.split, "of_samples": index.num_samples,
                           "seed": int(seed), "fractions": fractions, "keep_parts": keeps,
                           "strip_labels": split in strip_labels},
                 "stripped": counts, "objects_per_category": per_category}
        notes["categories_without_objects"] = missing = []  # filled while writing: a labeled split lacking a class
        result[split] = write_dataset(
            _with_missing(_samples(src, [w == split for w in which], keeps, split in strip_labels, counts, per_category),
                          index.categories, per_category, missing, split in strip_labels),
            out / split, name=f"{base}-{split}", split=split, categories=index.categories,
            part_categories=index.part_categories if keeps else None, shard_size=shard_size,
            source=index.source or str(src), notes=notes,
        )
    return result
