"""Purity evaluation by manual rating (PartDistillation sec. 5.2, Fig. 4, Fig. 5).

For every (object class, part cluster) of a labels dataset, a **purity grid**: a 3x3 collage of nine
instances of the class with the cluster's part highlighted in red on the object crop (Fig. 5). Annotators
rate each grid 3..9, the number of tiles in which the mask consistently covers the same part; the
**precision curve** of Fig. 4 is, for r = 3..9, the fraction of rated parts with rating >= r.

A labels dataset is any dataset whose records carry ``proposals`` with a cluster id (``label``) and an
object class (``category_id``, else the class of the record object ``object_id`` names): the output of
``rank-parts`` or ``cluster-pixels``. A **predictions folder** (``evaluate-parts``' output dataset, or ``selftrain
predict`` of a part ranker) gives the grids of a trained model on held-out images: its segments (one per object and
part cluster) of a setting, the images and (setting ``gt``) the objects read from the dataset it was predicted on
(:func:`prediction_parts`, :func:`make_prediction_purity_grids`).

The paper's filter (sec. 5.4: "We remove part masks whose area exceed 50% of the object area"): a part larger than
``max_part_fraction`` of its object is left out (counted on the index page); None (the library's default) keeps
every part; ``selftrain purity grids`` and the pipeline report apply :data:`MAX_PART_FRACTION` (0.5).

Ratings file (CSV, one header line, ``#`` comments and blank lines allowed)::

    object_class,cluster,rating
    3,0,9
    3,1,6

``object_class`` is the object category id as in the grid (``class-<id>``), ``cluster`` a non-negative
integer, ``rating`` an integer 3..9; a (class, cluster) pair may be rated once per file.

Torch-free (numpy, PIL, matplotlib): the control plane (``pipelines.purity``) imports it.
"""
from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_erosion

from contract.io import write_atomic
from trainers.data import shards
from trainers.structures import decode_mask, mask_area

GRID = 3                  # a purity grid is GRID x GRID tiles (sec. 5.2: 3x3)
TILES = GRID * GRID
TILE = 112                # tile side in pixels; the object crop is scaled to fit
PAD = 4                   # pixels around and between tiles
CAPTION = 30              # height of the two caption lines above the tiles
RED = np.array([255, 0, 0], dtype=np.float64)
ALPHA = 0.55              # opacity of the red part fill
CONTEXT = 0.1             # the object crop is the object's box grown by this fraction on each side
RATINGS = range(3, 10)    # the rating scale of sec. 5.2
RATINGS_HEADER = ["object_class", "cluster", "rating"]
INDEX_FILE = "index.html"
MAX_PART_FRACTION = 0.5   # sec. 5.4: parts larger than this share of their object are left out of the grids
TEMPLATE_FILE = "ratings-template.csv"


class RatingsError(ValueError):
    """A ratings file is malformed; the message names the file and the line."""


# -- sampling ---------------------------------------------------------------------------------


@dataclass
class PartCluster:
    """One (object class, part cluster) of a labels dataset: how often it occurs and the instances sampled for its grid."""

    object_class: int
    cluster: int
    instances: int = 0   # proposals (object instances) carrying this cluster
    pixels: int = 0      # their total area
    picks: list[tuple[str, int]] = field(default_factory=list)  # (sample key, proposal index), at most TILES

    @property
    def grid_name(self) -> str:
        return f"class-{self.object_class}/cluster-{self.cluster}.png"


def proposal_class(proposal: dict, record: dict) -> int | None:
    """Object class of a labelled proposal: its ``category_id``, else that of the record object it belongs to."""
    if proposal.get("category_id") is not None:
        return int(proposal["category_id"])
    for obj in record.get("objects", []):
        if obj.get("id") is not None and obj.get("id") == proposal.get("object_id"):
            return int(obj["category_id"])
    return None


Parts = Iterable[tuple[str, dict]]  # (sample key, record with ``proposals`` and ``objects``)


def dataset_parts(labels_dataset_dir: str | Path) -> Iterator[tuple[str, dict]]:
    """(key, record) of every sample of a labels dataset (images not decoded)."""
    for key, _, record in shards.iter_samples(labels_dataset_dir, decode=False, allow_parts=True):
        yield key, record


def prediction_parts(predictions_dir: str | Path, dataset_dir: str | Path, setting: str = "gt") -> dict[str, dict]:
    """A predictions folder (``images.json`` + ``results-<setting>.json``, as evaluate-parts writes) as labelled records
    by dataset key: ``proposals`` = its segments (``label`` the cluster, ``category_id`` the object class, ``object_id``
    the index of the object it belongs to, ``area``), ``objects`` = the objects those indices name (ids 0..J-1): the
    dataset record's (setting ``gt``) or ``objects-<setting>.json``'s (the detections a ``pred`` prediction was
    conditioned on). A setting the folder lacks, or an image of it the dataset lacks, is an error naming the file."""
    import json

    folder = Path(predictions_dir)
    try:
        doc = json.loads((folder / "images.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: not a predictions folder (no images.json)") from None
    if setting not in doc.get("settings", []):
        raise ValueError(f"{folder / 'images.json'}: no setting {setting!r} (it has {doc.get('settings')})")
    key_of = {im["id"]: im["file_name"] for im in doc["images"]}
    records: dict[str, dict] = {key: {"objects": [], "proposals": []} for key in key_of.values()}
    objects_file = folder / f"objects-{setting}.json"
    if setting != "gt" and objects_file.is_file():
        for o in json.loads(objects_file.read_text()):
            objs = records[key_of[o["image_id"]]]["objects"]
            objs.append({"id": len(objs), "category_id": int(o["category_id"]), "segmentation": o["segmentation"]})
    for n, r in enumerate(json.loads((folder / f"results-{setting}.json").read_text())):
        if r.get("image_id") not in key_of:
            raise ValueError(f"{folder}/results-{setting}.json: entry {n} has image_id {r.get('image_id')!r}, not in images.json")
        records[key_of[r["image_id"]]]["proposals"].append({
            "label": int(r["cluster"]), "category_id": int(r["object_class"]), "segmentation": r["segmentation"],
            "object_id": int(r["object"]) if int(r.get("object", -1)) >= 0 else None, "area": mask_area(r["segmentation"])})
    if setting == "gt":
        seen = 0
        for key, record in dataset_parts(dataset_dir):
            if key in records:
                seen += 1
                records[key]["objects"] = [{**o, "id": j} for j, o in enumerate(record.get("objects", []))]
        if seen != len(records):
            raise ValueError(f"{folder}: {len(records) - seen} of its images are not in {dataset_dir}")
    return records


def too_large(proposal: dict, record: dict, max_part_fraction: float | None) -> bool:
    """The part covers more than ``max_part_fraction`` of the record object it belongs to (sec. 5.4's filter); False
    when the filter is off or the object is unknown."""
    if max_part_fraction is None or proposal.get("object_id") is None:
        return False
    for obj in record.get("objects", []):
        if obj.get("id") == proposal["object_id"]:
            area = proposal.get("area") or mask_area(proposal["segmentation"])
            return area > max_part_fraction * mask_area(obj["segmentation"])
    return False


def sample_part_clusters(labels: str | Path | Parts, seed: int = 0, per_cluster: int = TILES,
                         max_part_fraction: float | None = None,
                         left_out: dict[str, int] | None = None) -> tuple[dict[tuple[int, int], PartCluster], int]:
    """One streaming pass over a labels dataset (a path) or (key, record) pairs: every (class, cluster) with its counts
    and a uniform sample of ``per_cluster`` instances (reservoir sampling, seeded; images are not decoded). Also returns
    the number of proposals left out: no cluster id or no object class (``left_out["unlabelled"]``), larger than
    ``max_part_fraction`` of their object (``left_out["too_large"]``)."""
    rng = np.random.default_rng(seed)
    clusters: dict[tuple[int, int], PartCluster] = {}
    counts = {"unlabelled": 0, "too_large": 0} if left_out is None else left_out
    counts.setdefault("unlabelled", 0)
    counts.setdefault("too_large", 0)
    for key, record in (dataset_parts(labels) if isinstance(labels, (str, Path)) else labels):
        for i, p in enumerate(record.get("proposals", [])):
            label, cls = p.get("label"), proposal_class(p, record)
            if label is None or int(label) < 0 or cls is None:
                counts["unlabelled"] += 1
                continue
            if too_large(p, record, max_part_fraction):
                counts["too_large"] += 1
                continue
            c = clusters.setdefault((cls, int(label)), PartCluster(cls, int(label)))
            c.instances += 1
            c.pixels += int(p.get("area", 0))
            if len(c.picks) < per_cluster:
                c.picks.append((key, i))
            else:  # reservoir sampling (Algorithm R): each instance kept with probability per_cluster / instances
                j = int(rng.integers(c.instances))
                if j < per_cluster:
                    c.picks[j] = (key, i)
    return clusters, counts["unlabelled"] + counts["too_large"]


# -- drawing ----------------------------------------------------------------------------------


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def part_tile(image: np.ndarray, part: np.ndarray, obj: np.ndarray | None, size: int = TILE) -> Image.Image:
    """The object crop with the part filled and outlined in red (Fig. 5), scaled to fit a ``size`` square tile."""
    out = np.asarray(image[..., :3], dtype=np.float64).copy()
    out[part] = (1 - ALPHA) * out[part] + ALPHA * RED
    out[part & ~binary_erosion(part)] = RED
    box = _box(obj if obj is not None and obj.any() else part) or (0, 0, image.shape[1], image.shape[0])
    x0, y0, x1, y1 = box
    gx, gy = max(1, round((x1 - x0) * CONTEXT)), max(1, round((y1 - y0) * CONTEXT))
    x0, y0 = max(0, x0 - gx), max(0, y0 - gy)
    x1, y1 = min(image.shape[1], x1 + gx), min(image.shape[0], y1 + gy)
    crop = Image.fromarray(np.clip(out[y0:y1, x0:x1], 0, 255).astype(np.uint8))
    scale = size / max(crop.width, crop.height)
    crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                       Image.NEAREST if scale >= 1 else Image.BILINEAR)
    tile = Image.new("RGB", (size, size), (24, 24, 24))
    tile.paste(crop, ((size - crop.width) // 2, (size - crop.height) // 2))
    return tile


def purity_grid(tiles: list[Image.Image], title: str, subtitle: str) -> Image.Image:
    """A GRID x GRID collage of ``tiles`` (at most nine) under a two-line caption; missing tiles stay empty and
    are marked, so a grid of a cluster with fewer than nine instances says so."""
    if len(tiles) > TILES:
        raise ValueError(f"a purity grid holds at most {TILES} tiles, got {len(tiles)}")
    side = PAD + GRID * (TILE + PAD)
    sheet = Image.new("RGB", (side, CAPTION + side), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((PAD, 2), title, fill=(235, 235, 235), font=font)
    draw.text((PAD, 2 + CAPTION // 2), subtitle, fill=(255, 200, 120) if len(tiles) < TILES else (190, 190, 190),
              font=font)
    for n in range(TILES):
        x = PAD + (n % GRID) * (TILE + PAD)
        y = CAPTION + PAD + (n // GRID) * (TILE + PAD)
        if n < len(tiles):
            sheet.paste(tiles[n], (x, y))
        else:
            draw.rectangle((x, y, x + TILE - 1, y + TILE - 1), outline=(90, 90, 90))
            draw.text((x + TILE // 2 - 20, y + TILE // 2 - 6), "no instance", fill=(120, 120, 120), font=font)
    return sheet


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -- grids and the browsing page --------------------------------------------------------------


def make_purity_grids(labels_dataset_dir: str | Path, out_dir: str | Path, max_classes: int | None = None,
                      seed: int = 0, max_part_fraction: float | None = None) -> Path:
    """Write one purity grid PNG per (object class, part cluster) of a labels dataset, ``index.html`` to browse
    them and ``ratings-template.csv`` to rate them (sec. 5.2); returns the ``index.html`` path.

    Streaming passes: sample nine instances per cluster, then draw the sampled ones. ``max_classes`` keeps
    a seeded random subset of the object classes (the paper rates 100 sampled classes).
    """
    return _write_grids(lambda: dataset_parts(labels_dataset_dir), labels_dataset_dir, out_dir, max_classes, seed,
                        max_part_fraction, f"labels dataset <code>{html.escape(str(labels_dataset_dir))}</code>")


def make_prediction_purity_grids(predictions_dir: str | Path, dataset_dir: str | Path, out_dir: str | Path,
                                 setting: str = "gt", max_classes: int | None = None, seed: int = 0,
                                 max_part_fraction: float | None = None) -> Path:
    """The purity grids of a model's predictions on held-out images (:func:`prediction_parts` of a predictions folder
    and the dataset it was predicted on), as :func:`make_purity_grids` writes them; returns ``index.html``."""
    records = prediction_parts(predictions_dir, dataset_dir, setting)  # the evaluation split's: held in memory
    what = (f"predictions <code>{html.escape(str(predictions_dir))}</code> (setting {html.escape(setting)}) on "
            f"<code>{html.escape(str(dataset_dir))}</code>")
    return _write_grids(lambda: iter(records.items()), dataset_dir, out_dir, max_classes, seed, max_part_fraction, what)


def _write_grids(parts: Callable[[], Parts], images_dir: str | Path, out_dir: str | Path, max_classes: int | None,
                 seed: int, max_part_fraction: float | None, source: str) -> Path:
    """Sample (one pass over ``parts()``), keep the sampled records (a second pass), draw them on the images of
    ``images_dir`` (decoded only for the sampled keys), then the index page and the ratings template."""
    out = Path(out_dir)
    names = {int(c["id"]): str(c["name"]) for c in shards.DatasetIndex.load(images_dir).categories}
    left_out: dict[str, int] = {}
    clusters, _ = sample_part_clusters(parts(), seed=seed, max_part_fraction=max_part_fraction, left_out=left_out)
    classes = sorted({c for c, _ in clusters})
    if max_classes is not None and len(classes) > max_classes:
        keep = np.random.default_rng(seed).choice(len(classes), size=max(0, int(max_classes)), replace=False)
        classes = sorted(classes[i] for i in keep)
    keep_classes = set(classes)
    chosen = sorted((c for c in clusters.values() if c.object_class in keep_classes),
                    key=lambda c: (c.object_class, c.cluster))
    wanted: dict[str, list[tuple[PartCluster, int, int]]] = {}  # key -> [(cluster, proposal index, tile slot)]
    for c in chosen:
        for slot, (key, i) in enumerate(c.picks):
            wanted.setdefault(key, []).append((c, i, slot))
    records = {key: record for key, record in parts() if key in wanted}
    tiles: dict[tuple[int, int], list[Image.Image | None]] = {(c.object_class, c.cluster): [None] * len(c.picks)
                                                             for c in chosen}
    for key, raw, _ in shards.iter_samples(images_dir, decode=False, allow_parts=True):
        if key not in wanted:
            continue
        image, record = shards.decode_image(raw, key=key), records[key]
        objects = {o.get("id"): o for o in record.get("objects", []) if o.get("id") is not None}
        for c, i, slot in wanted[key]:
            p = record["proposals"][i]
            obj = objects.get(p.get("object_id"))
            obj_mask = decode_mask(obj["segmentation"]) if obj is not None else None
            tiles[(c.object_class, c.cluster)][slot] = part_tile(image, decode_mask(p["segmentation"]), obj_mask)
    for c in chosen:
        drawn = [t for t in tiles[(c.object_class, c.cluster)] if t is not None]
        title = f"{names.get(c.object_class, 'class')} (class {c.object_class}) - part cluster {c.cluster}"
        subtitle = (f"{c.instances} instances" if len(drawn) == TILES else
                    f"only {len(drawn)} of {TILES} tiles: the cluster has {c.instances} instance(s)")
        write_atomic(out / c.grid_name, _png_bytes(purity_grid(drawn, title, subtitle)))
    template = "".join(f"{c.object_class},{c.cluster},\n" for c in chosen)
    write_atomic(out / TEMPLATE_FILE, (",".join(RATINGS_HEADER) + "\n" + template).encode())
    page = _index_html(chosen, names, source, left_out, max_part_fraction)
    return write_atomic(out / INDEX_FILE, page.encode())


def _index_html(chosen: list[PartCluster], names: dict[int, str], source: str, left_out: dict[str, int],
                max_part_fraction: float | None) -> str:
    esc = html.escape
    by_class: dict[int, list[PartCluster]] = {}
    for c in chosen:
        by_class.setdefault(c.object_class, []).append(c)
    lines = ["<!doctype html>", "<html><head><meta charset='utf-8'><title>Purity grids</title>", "<style>",
             "body{font-family:sans-serif;background:#222;color:#ddd} figure{display:inline-block;margin:6px}",
             "img{width:240px;border:1px solid #555} figcaption{font-size:12px} a{color:#9cf}</style></head><body>",
             "<h1>Purity grids (PartDistillation sec. 5.2)</h1>",
             f"<p>Parts of the {source}. {len(by_class)} object classes, {len(chosen)} part clusters; "
             f"{left_out['unlabelled']} parts without cluster id or class left out"
             + ("" if max_part_fraction is None else
                f", {left_out['too_large']} parts larger than {max_part_fraction:.0%} of their object left out "
                "(sec. 5.4)")
             + f". Rate each grid 3-9 (tiles where the red mask covers the same part) in "
             f"<a href='{TEMPLATE_FILE}'>{TEMPLATE_FILE}</a>.</p>", "<ul>"]
    lines += [f"<li><a href='#class-{cid}'>{esc(names.get(cid, str(cid)))} (class {cid})</a>: "
              f"{len(cs)} clusters</li>" for cid, cs in by_class.items()]
    lines.append("</ul>")
    for cid, cs in by_class.items():
        lines.append(f"<h2 id='class-{cid}'>{esc(names.get(cid, str(cid)))} (class {cid})</h2><div>")
        for c in cs:
            lines.append(f"<figure><a href='{c.grid_name}'><img src='{c.grid_name}' alt='class {cid} cluster "
                         f"{c.cluster}'></a><figcaption>cluster {c.cluster}: {c.instances} instances, "
                         f"{c.pixels} px</figcaption></figure>")
        lines.append("</div>")
    lines.append("</body></html>")
    return "\n".join(lines) + "\n"


# -- ratings and the precision curve ----------------------------------------------------------


@dataclass(frozen=True)
class Rating:
    object_class: str
    cluster: int
    rating: int


def load_ratings(path: str | Path) -> list[Rating]:
    """Read a ratings CSV (module docstring); RatingsError naming the file and line of the first bad entry."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RatingsError(f"{path}: cannot read ({e.strerror})") from e
    rows = [(n, line) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise RatingsError(f"{path}: empty ratings file (expected the header {','.join(RATINGS_HEADER)})")
    n, header = rows[0]
    if [h.strip() for h in next(csv.reader([header]))] != RATINGS_HEADER:
        raise RatingsError(f"{path}:{n}: header must be {','.join(RATINGS_HEADER)}, got {header!r}")
    out, seen = [], {}
    for n, line in rows[1:]:
        fields = [f.strip() for f in next(csv.reader([line]))]
        if len(fields) != 3:
            raise RatingsError(f"{path}:{n}: expected 3 fields (object_class,cluster,rating), got {len(fields)}: {line!r}")
        cls, cluster, rating = fields
        if not cls:
            raise RatingsError(f"{path}:{n}: object_class is empty")
        if not cluster.isdigit():
            raise RatingsError(f"{path}:{n}: cluster must be a non-negative integer, got {cluster!r}")
        if not (rating.isdigit() and int(rating) in RATINGS):
            raise RatingsError(f"{path}:{n}: rating must be an integer {RATINGS.start}..{RATINGS.stop - 1}, "
                               f"got {rating!r}")
        r = Rating(cls, int(cluster), int(rating))
        if (r.object_class, r.cluster) in seen:
            raise RatingsError(f"{path}:{n}: class {cls} cluster {cluster} is already rated on line "
                               f"{seen[(r.object_class, r.cluster)]}")
        seen[(r.object_class, r.cluster)] = n
        out.append(r)
    if not out:
        raise RatingsError(f"{path}: no ratings after the header")
    return out


def precision_curve(ratings: Iterable[Rating | int]) -> dict[int, float]:
    """Fig. 4: for each rating r in 3..9, the fraction of rated parts with rating >= r (precision(3) = 1)."""
    values = np.asarray([r.rating if isinstance(r, Rating) else int(r) for r in ratings], dtype=np.int64)
    if not len(values):
        raise ValueError("precision_curve needs at least one rating")
    if ((values < RATINGS.start) | (values >= RATINGS.stop)).any():
        raise ValueError(f"ratings must lie in {RATINGS.start}..{RATINGS.stop - 1}, got {sorted(set(values.tolist()))}")
    return {r: float((values >= r).mean()) for r in RATINGS}


def plot_precision_curve(curves: dict[str, Iterable[Rating | int]], out_png: str | Path) -> dict[str, dict[int, float]]:
    """Fig. 4 for several methods on one plot (matplotlib, Agg), written atomically; returns each method's curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("plot_precision_curve needs at least one method")
    numbers = {name: precision_curve(r) for name, r in curves.items()}
    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=120)
    try:
        for name, curve in numbers.items():
            ax.plot(list(curve), list(curve.values()), marker="o", label=name)
        ax.set_xlabel("purity rating r")
        ax.set_ylabel("precision (fraction of parts rated >= r)")
        ax.set_xticks(list(RATINGS))
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    write_atomic(Path(out_png), buf.getvalue())
    return numbers
