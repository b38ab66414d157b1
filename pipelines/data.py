"""Dataset operations behind ``selftrain data``: generate, import, split, version, push, pull, check out, show.

Library functions, one per command, so everything the CLI does can be done from Python. Data
generation and conversion are delegated to the data plane (``trainers.data``, numpy/PIL only);
versioning goes through DVC (``pipelines.dvc``).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from pipelines import dvc

SPLITS = ("train", "eval", "val")  # PartWorld's splits (trainers.data.partworld.SPLITS)
PART_SPLITS = ("eval", "val")  # the ones with part masks: eval reported, val for model selection only


def _progress(samples: Iterable, total: int | None, desc: str, enabled: bool = True) -> Iterator:
    return iter(tqdm(samples, total=total, desc=desc, unit="img", dynamic_ncols=True, disable=not enabled, mininterval=0.5))


def load_partworld_config(path: str | Path | None):
    """The PartWorld config from a YAML file (validated), or the embedded demo config."""
    from contract.spec import load_model
    from trainers.data.partworld import PartWorldConfig

    return PartWorldConfig.demo() if path is None else load_model(PartWorldConfig, path)


def generate_partworld(
    out: str | Path,
    config: str | Path | None = None,
    *,
    splits: Iterable[str] = SPLITS,
    shard_size: int = 500,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Render PartWorld into ``<out>/<split>/`` as WebDataset shards with an index per split.

    Splits: ``train`` (object labels), ``eval`` (part masks; the reported figures) and ``val`` (part
    masks; model selection only). Deterministic from (seed, config): the same config gives
    byte-identical shards, hence the same DVC hash; each split has its own seed stream, so adding
    ``val`` changed no byte of ``train`` or ``eval``. ``limit`` caps the number of images per split.
    """
    from trainers.data import partworld, shards

    cfg = load_partworld_config(config)
    out = Path(out)
    indexes = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; PartWorld has {', '.join(SPLITS)}")
        n = cfg.split_size(split)
        if limit is not None:
            n = min(n, limit)
        samples = _progress(partworld.generate(cfg, split, 0, n), n, f"PartWorld {split}", progress)
        indexes[split] = shards.write_dataset(
            samples, out / split, name=f"partworld-{split}", split=split,
            categories=partworld.category_table(cfg),
            part_categories=partworld.part_category_table(cfg) if split in PART_SPLITS else None,
            shard_size=shard_size, source=f"partworld:{config or 'demo'}",
        )
    (out / "partworld.yaml").write_text(_yaml_dump(cfg.model_dump()))
    return indexes


def _yaml_dump(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def version(path: str | Path, root: str | Path | None = None, remote: str | None = None, push: bool = False) -> dvc.DataVersion:
    """Track a dataset directory with DVC (``<path>.dvc`` beside it) and optionally push it.

    ``path`` is absolute or relative to the cwd; it is versioned in the DVC repository holding it, else in ``root``
    (default: the cwd), which becomes a git + DVC repository first when it is none.
    """
    path = Path(path)
    root = versioning_root(path, root)
    dvc.ensure_repo(root, remote=remote) if not (root / ".dvc").is_dir() else None
    v = dvc.add(path, root)
    if push:
        dvc.push([path], root, remote=None)
    return v


def versioning_root(path: str | Path, root: str | Path | None = None) -> Path:
    """The repository :func:`version` would track ``path`` in, or a ``DvcError`` saying what to do when DVC cannot
    track it there (checked before a command writes anything)."""
    found = Path(root or Path.cwd()).resolve()
    for where in (path, found):
        try:
            found = dvc.find_root(where)
            break
        except dvc.DvcError:
            continue
    dvc.check_trackable(path, found)
    return found


def show(path: str | Path, out_png: str | Path, n: int = 16, cols: int = 4) -> Path:
    """Contact sheet of the first ``n`` samples with instance (and, for evaluation splits, part) overlays."""
    from trainers.data import shards, show as show_mod

    idx = shards.DatasetIndex.load(path)
    samples = list(itertools.islice(shards.iter_samples(path, allow_parts=True), n))
    if not samples:
        raise ValueError(f"{path}: dataset has no samples to show")
    show_mod.contact_sheet(samples, out_png, cols=cols, parts=bool(idx.has_parts),
                           categories=idx.categories, part_categories=idx.part_categories)
    return Path(out_png)


def import_folder(image_dir: str | Path, out: str | Path, *, name: str | None = None, shard_size: int = 1000,
                  skip_bad: bool = False, progress: bool = True):
    """Image folder -> unlabelled shards (for mining/pseudo-labelling on new images)."""
    from trainers.data import coco_io, shards

    samples = _progress(coco_io.image_folder_samples(image_dir), None, "import images", progress)
    return shards.write_dataset(samples, out, name=name or Path(out).name, split="train", categories=[],
                                shard_size=shard_size, skip_bad=skip_bad, source=str(image_dir))


def import_coco(instances_json: str | Path, image_dir: str | Path, out: str | Path, *, name: str | None = None,
                split: str = "train", shard_size: int = 1000, skip_bad: bool = False, progress: bool = True):
    """COCO instance JSON + images -> shards with object labels.

    Polygons overshooting the image by a little are clipped; the counts are in ``index.notes["import"]``.
    """
    from trainers.data import coco_io, shards

    report = coco_io.new_report()
    cats, samples = coco_io.coco_samples(instances_json, image_dir, report=report)
    return shards.write_dataset(_progress(samples, None, "import COCO", progress), out, name=name or Path(out).name,
                                split=split, categories=cats, shard_size=shard_size, skip_bad=skip_bad,
                                source=str(instances_json), notes={"import": report})


def import_parts(parts_json: str | Path, image_dir: str | Path, out: str | Path, *, instances_json: str | Path | None = None,
                 object_class: str | None = None, name: str | None = None, split: str | None = None,
                 as_training: bool = False, objects_from: str = "union", shard_size: int = 1000,
                 skip_bad: bool = False, progress: bool = True):
    """PartImageNet-style COCO part JSON (+ optional instance JSON) -> shards.

    Default: evaluation shards with part labels (split ``eval``). ``as_training``: an object-labelled
    training split (split ``train``) with no part labels at all; objects come from the instance file
    or, without one, from the parts (``objects_from``: ``union`` per object class, or ``components``).
    """
    from trainers.data import coco_io, shards

    report = coco_io.new_report()
    cats, part_cats, samples = coco_io.part_samples(parts_json, image_dir, instances_json=instances_json,
                                                    object_class=object_class, objects_from=objects_from,
                                                    as_training=as_training, report=report)
    notes = {"import": report, "objects_from": "instances" if instances_json is not None else objects_from}
    return shards.write_dataset(_progress(samples, None, "import parts", progress), out, name=name or Path(out).name,
                                split=split or ("train" if as_training else "eval"), categories=cats,
                                part_categories=None if as_training else part_cats, shard_size=shard_size,
                                skip_bad=skip_bad, source=str(parts_json), notes=notes)


def split(dataset_dir: str | Path, out: str | Path, fractions: str | dict, *, seed: int = 0,
          keep_parts: Iterable[str] = (), strip_labels: Iterable[str] = (), name: str | None = None,
          shard_size: int = 1000) -> dict:
    """Split a dataset by seeded fractions into ``<out>/<split>/`` datasets (see ``trainers.data.splits``).

    Parts stay only in ``keep_parts`` splits (evaluation, selection); ``strip_labels`` splits keep images only.
    """
    from trainers.data import splits

    return splits.split_dataset(dataset_dir, out, fractions, seed=seed, keep_parts=keep_parts,
                                strip_labels=strip_labels, name=name, shard_size=shard_size)


def export(dataset_dir: str | Path, out_json: str | Path, kind: str = "objects") -> dict:
    """Instance or part labels of a dataset -> COCO JSON (pycocotools can score against it)."""
    from trainers.data import coco_io

    return coco_io.export_coco(dataset_dir, out_json, kind=kind)
