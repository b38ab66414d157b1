"""WebDataset tar shards: atomic deterministic writer, dataset index, multi-rank readers.

A dataset is a directory holding ``index.json`` and tar shards in WebDataset format: each
sample is ``<key>.png`` (or ``<key>.jpg``) plus ``<key>.json`` (the record documented in
``trainers.structures``). The index is the single publish point: shards carry content-hash
names and a write becomes visible only when ``index.json`` is atomically replaced, so a
failed or interrupted write never destroys the previously published dataset.

Shards are written and read with the standard library's ``tarfile`` (byte-identical to
``webdataset.TarWriter``'s output, readable by ``webdataset.WebDataset``); only numpy and PIL are
imported at module level, so this module never imports torch (the control plane imports it).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import tarfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from contract.io import write_atomic

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
IMAGE_EXTS = ("png", "jpg")
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,90}$")  # no dots: WebDataset splits key/extension at the first dot
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SHARD_RE = re.compile(r"^[A-Za-z0-9_-]+-\d{6}-[0-9a-f]{12}\.tar$")
_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")
_ANNOTATION_LISTS = ("objects", "parts", "proposals", "stuff")  # stuff: trainers.data.panoptic


class DataError(Exception):
    """Bad input data: names the file (``source``) and, where known, the sample (``key``)."""

    def __init__(self, reason: str, *, source: str | os.PathLike | None = None, key: Any = None):
        self.reason = str(reason)
        self.source = None if source is None else str(source)
        self.key = None if key is None else str(key)
        where = [p for p in (self.source, None if self.key is None else f"sample {self.key}") if p]
        super().__init__(": ".join(where + [self.reason]))


class WriteError(DataError):
    """Writing a dataset failed (a full disk, a read-only folder): names the file; nothing half-written was published."""


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _write_error(e: OSError, path: Path) -> WriteError:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "disk full (no space left on device)" if full else f"cannot write: {e.strerror or e}"
    return WriteError(f"{reason}; nothing was published (the previous dataset, if any, is intact)",
                      source=e.filename or path)


class PartsNotAllowedError(DataError):
    """A training stage tried to read an evaluation dataset that carries part labels."""


@dataclass(frozen=True)
class BadSample:
    """What an importer yields instead of a sample it could not read.

    ``write_dataset`` raises ``error`` or, with ``skip_bad=True``, lists it under ``quarantined``.
    """

    error: DataError


@dataclass
class DatasetIndex:
    """Contents of ``index.json``: what the dataset holds and the checksum of every shard."""

    name: str
    split: str
    num_samples: int
    categories: list[dict]
    part_categories: list[dict] | None
    has_parts: bool
    shards: list[dict]  # [{"name", "num_samples", "sha256", "bytes"}]
    quarantined: list[dict] = field(default_factory=list)  # [{"source", "key", "error"}]
    source: str | None = None
    format_version: int = FORMAT_VERSION
    notes: dict = field(default_factory=dict)  # what the writer reports: an importer's counts, a split's seed and fractions

    @classmethod
    def load(cls, dataset_dir: str | os.PathLike) -> "DatasetIndex":
        """Read ``<dataset_dir>/index.json``; DataError if it is missing or malformed."""
        path = Path(dataset_dir) / INDEX_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError("no dataset index (not a dataset directory, or never published)", source=path) from None
        except (OSError, ValueError) as e:
            raise DataError(f"unreadable dataset index: {e}", source=path) from e
        if not isinstance(raw, dict):
            raise DataError("dataset index is not a JSON object", source=path)
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(f"unsupported format_version {version!r} (this reader knows {FORMAT_VERSION})", source=path)
        names = [f for f in cls.__dataclass_fields__]
        missing = [f for f in names if f not in raw and f not in ("quarantined", "source", "notes")]
        if missing:
            raise DataError(f"dataset index lacks fields {missing}", source=path)
        _check_index_fields(raw, path)
        return cls(**{f: raw[f] for f in names if f in raw})

    def to_json(self) -> str:
        d = asdict(self)
        if not d["notes"]:  # an index without notes is byte-identical to one written before notes existed
            del d["notes"]
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    def save(self, dataset_dir: str | os.PathLike) -> None:
        """Write ``index.json`` atomically (temp file, fsync, rename); WriteError naming it if that fails."""
        try:
            write_atomic(Path(dataset_dir) / INDEX_FILE, self.to_json().encode())
        except OSError as e:
            raise _write_error(e, Path(dataset_dir) / INDEX_FILE) from e


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_index_fields(raw: dict, path: Path) -> None:
    """The types readers rely on; DataError naming the field of a damaged (yet parseable) index."""
    def bad(field: str, want: str) -> DataError:
        return DataError(f"dataset index field {field} must be {want}", source=path)

    for f in ("name", "split"):
        if not isinstance(raw[f], str):
            raise bad(f, "a string")
    if not _is_int(raw["num_samples"]) or raw["num_samples"] < 0:
        raise bad("num_samples", "a non-negative integer")
    if not isinstance(raw["has_parts"], bool):
        raise bad("has_parts", "true or false")
    for f in ("categories", "part_categories"):
        cats = raw[f]
        if cats is None and f == "part_categories":
            continue
        if not isinstance(cats, list) or not all(isinstance(c, dict) and _is_int(c.get("id")) for c in cats):
            raise bad(f, "a list of {\"id\": int, \"name\": ...} objects")
    if not isinstance(raw["shards"], list):
        raise bad("shards", "a list")
    for i, sh in enumerate(raw["shards"]):
        if not isinstance(sh, dict):
            raise bad(f"shards[{i}]", "an object")
        name = sh.get("name")
        if not isinstance(name, str) or not name or name.startswith("/") or ".." in Path(name).parts:
            raise bad(f"shards[{i}].name", "a relative path inside the dataset")
        for f in ("num_samples", "bytes"):
            if not _is_int(sh.get(f)) or sh[f] < 0:
                raise bad(f"shards[{i}].{f}", "a non-negative integer")
        if not isinstance(sh.get("sha256"), str):
            raise bad(f"shards[{i}].sha256", "a hex string")
    if sum(sh["num_samples"] for sh in raw["shards"]) != raw["num_samples"]:
        raise DataError(f"dataset index says num_samples {raw['num_samples']} but its shards hold "
                        f"{sum(sh['num_samples'] for sh in raw['shards'])}", source=path)
    for f, want in (("quarantined", list), ("notes", dict)):
        if f in raw and not isinstance(raw[f], want):
            raise bad(f, f"a {want.__name__}")


# ----------------------------------------------------------------------------- writing


def write_dataset(
    samples: Iterable[tuple[str, Any, dict] | BadSample],
    out_dir: str | os.PathLike,
    *,
    name: str,
    split: str,
    categories: list[dict],
    part_categories: list[dict] | None = None,
    shard_size: int = 1000,
    skip_bad: bool = False,
    source: str | None = None,
    notes: dict | None = None,
) -> DatasetIndex:
    """Write samples ``(key, image, record)`` as shards plus ``index.json``; return the index.

    ``image`` is an HxWx3 uint8 array (stored as PNG) or already-encoded PNG/JPEG bytes (kept
    as they are). ``categories``/``part_categories`` are ``[{"id", "name", ...}]``; giving
    ``part_categories`` (or records with ``parts``) marks the dataset evaluation-only (has_parts).
    A bad sample (or a ``BadSample`` from an importer) raises DataError, or with
    ``skip_bad=True`` is listed in ``index.quarantined``. Shards are byte-deterministic;
    nothing is published until every shard is complete, and the previous dataset in
    ``out_dir`` stays intact if this call fails. ``notes`` (JSON-able) go into ``index.notes``; the
    dict is read at publish time, after the last sample, so a sample generator may fill it as it runs.
    """
    if not _NAME_RE.match(str(split)) or not str(name):
        raise ValueError(f"name must be non-empty and split must match {_NAME_RE.pattern}: {name!r}, {split!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    categories = _check_categories(categories, "categories")
    part_categories = None if part_categories is None else _check_categories(part_categories, "part_categories")
    cat_ids = {c["id"] for c in categories}
    part_ids = None if part_categories is None else {c["id"] for c in part_categories}

    out = Path(out_dir)
    new_dir = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        old = DatasetIndex.load(out)
    except DataError:
        old = None
    keep = {s["name"] for s in old.shards} if old else set()

    shards: list[dict] = []
    quarantined: list[dict] = []
    created: list[Path] = []  # files this call made (removed again on failure)
    writer: _ShardWriter | None = None
    num_samples = 0
    saw_parts = False
    try:
        for item in samples:
            if isinstance(item, BadSample):
                err = item.error
            else:
                try:
                    key, payload, ext, record_bytes, has_p = _encode_sample(item, cat_ids, part_ids, source)
                    err = None
                except DataError as e:
                    err = e
            if err is not None:
                if not skip_bad:
                    raise err
                quarantined.append({"source": err.source or source or "", "key": err.key or "", "error": err.reason})
                continue
            saw_parts = saw_parts or has_p
            if writer is None:
                writer = _ShardWriter(out, split, len(shards))
                created.append(writer.tmp_path)
            writer.add(key, ext, payload, record_bytes)
            num_samples += 1
            if writer.count >= shard_size:
                shards.append(writer.finish())
                created.append(out / shards[-1]["name"])
                writer = None
        if writer is not None:
            shards.append(writer.finish())
            created.append(out / shards[-1]["name"])
            writer = None
        if saw_parts and part_categories is None:
            raise ValueError("records carry 'parts' but no part_categories were given")
        index = DatasetIndex(
            name=str(name), split=str(split), num_samples=num_samples, categories=categories,
            part_categories=part_categories, has_parts=part_categories is not None or saw_parts,
            shards=shards, quarantined=quarantined, source=source, notes=dict(notes or {}),
        )
        index.save(out)  # the publish point
    except BaseException as e:
        failed_at = writer.tmp_path if writer is not None else out / INDEX_FILE
        if writer is not None:
            writer.abort()
        for p in created:
            if p.name not in keep:
                p.unlink(missing_ok=True)
        if new_dir and not any(out.iterdir()):
            out.rmdir()
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:  # a full disk: name the file, not just the errno
            raise _write_error(e, failed_at) from e
        raise
    _collect_garbage(out, {s["name"] for s in shards})
    return index


def _check_categories(cats: Any, what: str) -> list[dict]:
    out = []
    for c in cats:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ValueError(f"{what} entries must be dicts with 'id' and 'name', got {c!r}")
        out.append({**c, "id": int(c["id"]), "name": str(c["name"])})
    ids = [c["id"] for c in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what} has duplicate ids: {sorted(ids)}")
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, bytes):
        return o.decode("ascii")  # RLE counts
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _image_format(data: bytes) -> str | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    return None


def encode_png(image: np.ndarray) -> bytes:
    """HxWx3 uint8 array -> PNG bytes (deterministic for a given Pillow/zlib)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _encode_sample(item: Any, cat_ids: set, part_ids: set | None, source: str | None):
    """Validate one sample; return (key, image bytes, ext, json bytes, has_parts) or raise DataError."""
    try:
        key, image, record = item
    except (TypeError, ValueError):
        raise DataError(f"a sample must be (key, image, record), got {type(item).__name__}", source=source) from None
    src = record.get("file_name", source) if isinstance(record, dict) else source
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise DataError(f"key must match {_KEY_RE.pattern} (no dots)", source=src, key=key)
    if not isinstance(record, dict):
        raise DataError(f"record must be a dict, got {type(record).__name__}", source=src, key=key)
    try:
        h, w = int(record["height"]), int(record["width"])
        record["image_id"]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"record needs int image_id, height, width ({e!r})", source=src, key=key) from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.shape != (h, w, 3):
            raise DataError(f"image must be uint8 {h}x{w}x3 (record height/width), got {image.dtype} {image.shape}", source=src, key=key)
        payload, ext = encode_png(image), "png"
    elif isinstance(image, (bytes, bytearray, memoryview)):
        payload = bytes(image)
        ext = _image_format(payload)
        if ext is None:
            raise DataError("image bytes are neither PNG nor JPEG", source=src, key=key)
        try:
            size = Image.open(io.BytesIO(payload)).size
        except Exception as e:
            raise DataError(f"unreadable image: {e}", source=src, key=key) from None
        if size != (w, h):
            raise DataError(f"image is {size[0]}x{size[1]} (WxH) but the record says {w}x{h}", source=src, key=key)
    else:
        raise DataError(f"image must be an ndarray or PNG/JPEG bytes, got {type(image).__name__}", source=src, key=key)
    has_parts = False
    for list_name in _ANNOTATION_LISTS:
        anns = record.get(list_name, [] if list_name == "objects" else None)
        if anns is None:
            continue
        if not isinstance(anns, list):
            raise DataError(f"{list_name} must be a list", source=src, key=key)
        has_parts = has_parts or (list_name == "parts")
        valid_ids = {"objects": cat_ids, "stuff": cat_ids, "parts": part_ids}.get(list_name)
        for i, ann in enumerate(anns):
            seg = ann.get("segmentation") if isinstance(ann, dict) else None
            if not isinstance(seg, dict) or not isinstance(seg.get("counts"), (str, bytes)):
                raise DataError(f"{list_name}[{i}].segmentation must be a compressed RLE dict (see trainers.structures)", source=src, key=key)
            if [int(v) for v in seg.get("size", ())] != [h, w]:
                raise DataError(f"{list_name}[{i}] mask size {seg.get('size')} != image size [{h}, {w}]", source=src, key=key)
            if valid_ids is not None and ann.get("category_id") not in valid_ids:
                raise DataError(f"{list_name}[{i}].category_id {ann.get('category_id')!r} is not a known category", source=src, key=key)
    try:
        record_bytes = json.dumps(record, sort_keys=True, separators=(",", ":"), default=_json_default).encode()
    except (TypeError, ValueError) as e:
        raise DataError(f"record is not JSON serialisable: {e}", source=src, key=key) from None
    return key, payload, ext, record_bytes, has_parts


class _HashingFile:
    """File wrapper that hashes and counts what tarfile writes through it."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.bytes += len(b)
        return len(b)


class _ShardWriter:
    """One shard: written to a hidden temp file, renamed to ``<split>-<i>-<sha12>.tar`` when complete."""

    def __init__(self, out: Path, split: str, number: int):
        self.out, self.split, self.number, self.count = out, split, number, 0
        self.tmp_path = out / f".{split}-{number:06d}.tar.tmp-{uuid.uuid4().hex}"
        self.file = open(self.tmp_path, "xb")
        self.hashing = _HashingFile(self.file)
        # A WebDataset tar, as webdataset.TarWriter writes it: a stream in tarfile's default format, one
        # member per extension in sorted order. Fixed mtime/owner/mode: identical samples give byte-identical shards (DVC).
        self.tar = tarfile.open(fileobj=self.hashing, mode="w|")
        self.last_key: str | None = None
        self.keys: set[str] = set()

    def add(self, key: str, ext: str, image: bytes, record: bytes) -> None:
        if key in self.keys:
            raise DataError("duplicate key within a shard", source=self.tmp_path, key=key)
        self.keys.add(key)
        for member_ext, data in sorted({ext: image, "json": record}.items()):
            info = tarfile.TarInfo(f"{key}.{member_ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "selftrain", "selftrain"
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def finish(self) -> dict:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        sha = self.hashing.sha.hexdigest()
        name = f"{self.split}-{self.number:06d}-{sha[:12]}.tar"
        os.replace(self.tmp_path, self.out / name)
        return {"name": name, "num_samples": self.count, "sha256": sha, "bytes": self.hashing.bytes}

    def abort(self) -> None:
        """Close and remove the temp file; never raises (it runs while another error propagates, e.g. a full disk)."""
        with contextlib.suppress(Exception):
            self.tar.close()  # flush tarfile's buffer now, not in a finaliser after the file is closed
        with contextlib.suppress(Exception):
            self.file.close()
        self.tmp_path.unlink(missing_ok=True)


def _collect_garbage(out: Path, live: set[str]) -> None:
    """After a publish: remove shards no index references and temp files of interrupted writes."""
    for p in out.iterdir():
        if p.name not in live and (_SHARD_RE.match(p.name) or _TMP_RE.match(p.name)):
            p.unlink(missing_ok=True)


def part_dir(out_dir: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank`` of a multi-rank writer puts its share: ``<out_dir>/rank-<rank>``."""
    return Path(out_dir) / f"rank-{rank:05d}"


def merge_parts(out_dir: str | os.PathLike, world_size: int, *, name: str | None = None) -> DatasetIndex:
    """Publish one index over the shares ranks 0..world_size-1 wrote with ``write_dataset(.., part_dir(out, r))``.

    The map-over-shards pattern: every rank writes its own complete dataset part (atomic as
    always), then one rank calls this after a barrier. Shards are listed as ``rank-<r>/<shard>``,
    so readers, ``verify`` and DVC see one dataset; categories must agree across parts. The
    combined ``index.json`` is the publish point: until it is written, readers see the previous
    dataset (or none).
    """
    out = Path(out_dir)
    parts = [DatasetIndex.load(part_dir(out, r)) for r in range(world_size)]
    first = parts[0]
    for r, p in enumerate(parts[1:], 1):
        if p.categories != first.categories or p.part_categories != first.part_categories or p.split != first.split:
            raise DataError(f"rank {r}'s part disagrees with rank 0's on split or categories", source=part_dir(out, r))
    index = DatasetIndex(
        name=name or first.name, split=first.split, num_samples=sum(p.num_samples for p in parts),
        categories=first.categories, part_categories=first.part_categories, has_parts=any(p.has_parts for p in parts),
        shards=[{**s, "name": f"{part_dir(out, r).name}/{s['name']}"} for r, p in enumerate(parts) for s in p.shards],
        quarantined=[q for p in parts for q in p.quarantined], source=first.source,
    )
    index.save(out)
    return index


# ----------------------------------------------------------------------------- checking


def verify(dataset_dir: str | os.PathLike) -> DatasetIndex:
    """Check every shard's size and sha256 against the index; DataError naming the first bad shard."""
    d = Path(dataset_dir)
    index = DatasetIndex.load(d)
    for s in index.shards:
        path = d / s["name"]
        if not path.is_file():
            raise DataError("shard listed in the index is missing", source=path)
        size = path.stat().st_size
        if size != s["bytes"]:
            raise DataError(f"shard is {size} bytes, index says {s['bytes']} (truncated or modified)", source=path)
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        if sha.hexdigest() != s["sha256"]:
            raise DataError(f"sha256 mismatch: file {sha.hexdigest()}, index {s['sha256']}", source=path)
    return index


# ----------------------------------------------------------------------------- reading


def _assignment(shard_sizes: list[int], consumer: int, consumers: int) -> list[tuple[int, int, int]]:
    """(shard, offset, stride) this consumer reads: whole shards when there are enough, else strided samples.

    With S shards and C consumers: if S >= C consumer c reads shards c, c+C, ...; otherwise the
    consumers c with c % S == s share shard s and take every m-th sample of it (m = how many share it).
    Either way every sample goes to exactly one consumer.
    """
    n = len(shard_sizes)
    if n == 0:
        return []
    if n >= consumers:
        return [(s, 0, 1) for s in range(consumer, n, consumers)]
    s = consumer % n
    return [(s, consumer // n, len(range(s, consumers, n)))]


def _check_consumer(rank: int, world_size: int, worker: int, num_workers: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise ValueError(f"need 0 <= worker < num_workers, got worker={worker} num_workers={num_workers}")


def num_samples_for(index: DatasetIndex | str | os.PathLike, *, rank: int = 0, world_size: int = 1,
                    worker: int | None = None, num_workers: int = 1) -> int:
    """Samples ``iter_samples`` yields for this rank (all its workers, or one ``worker``)."""
    if not isinstance(index, DatasetIndex):
        index = DatasetIndex.load(index)
    sizes = [s["num_samples"] for s in index.shards]
    workers = range(num_workers) if worker is None else [worker]
    total = 0
    for w in workers:
        _check_consumer(rank, world_size, w, num_workers)
        for s, off, stride in _assignment(sizes, rank * num_workers + w, world_size * num_workers):
            total += len(range(off, sizes[s], stride))
    return total


def rank_sample_counts(index: DatasetIndex | str | os.PathLike, world_size: int, num_workers: int = 1) -> list[int]:
    """Samples each rank reads; DDP ranks agree on steps per epoch with ``min(...) // batch_size``."""
    if not isinstance(index, DatasetIndex):
        index = DatasetIndex.load(index)
    return [num_samples_for(index, rank=r, world_size=world_size, num_workers=num_workers) for r in range(world_size)]


def iter_samples(
    dataset_dir: str | os.PathLike,
    *,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    decode: bool = True,
    allow_parts: bool = False,
) -> Iterator[tuple[str, Any, dict]]:
    """Yield ``(key, image, record)`` for this (rank, worker)'s share of the dataset.

    Consumers are ``world_size * num_workers``; together they read every sample exactly once
    (see ``_assignment``). ``image`` is an HxWx3 uint8 array, or the stored PNG/JPEG bytes with
    ``decode=False``. Evaluation datasets (index ``has_parts``) raise PartsNotAllowedError unless
    ``allow_parts=True``: training stages must never see part labels. A truncated or corrupt
    shard raises DataError naming the shard (and the sample where known).
    """
    _check_consumer(rank, world_size, worker, num_workers)
    d = Path(dataset_dir)
    index = DatasetIndex.load(d)
    if index.has_parts and not allow_parts:
        raise PartsNotAllowedError(
            "this is an evaluation dataset with part labels; training stages may not read it "
            "(evaluation code passes allow_parts=True)", source=d / INDEX_FILE)
    sizes = [s["num_samples"] for s in index.shards]
    for s, offset, stride in _assignment(sizes, rank * num_workers + worker, world_size * num_workers):
        yield from _read_shard(d / index.shards[s]["name"], index.shards[s], offset, stride, decode)


def _read_shard(path: Path, info: dict, offset: int, stride: int, decode: bool) -> Iterator[tuple[str, Any, dict]]:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot open shard: {e}", source=path) from None
    if size != info["bytes"]:
        raise DataError(f"shard is {size} bytes, index says {info['bytes']} (truncated or modified)", source=path)
    i, key, parts, selected = -1, None, {}, False  # i: index of the current sample in the shard
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                base, _, ext = member.name.partition(".")
                if base != key:
                    if selected:
                        yield _make_sample(path, key, parts, decode)
                    i, key, parts = i + 1, base, {}
                    selected = i >= offset and (i - offset) % stride == 0
                if selected and ext in IMAGE_EXTS + ("json",):
                    parts[ext] = tar.extractfile(member).read()
            if selected:
                yield _make_sample(path, key, parts, decode)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"corrupt or truncated shard: {e}", source=path, key=key) from None
    i += 1  # number of samples seen
    if i != info["num_samples"]:
        raise DataError(f"shard holds {i} samples, index says {info['num_samples']} (truncated?)", source=path)


def _make_sample(path: Path, key: str, parts: dict, decode: bool) -> tuple[str, Any, dict]:
    if "json" not in parts:
        raise DataError("sample has no .json record", source=path, key=key)
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if image is None:
        raise DataError("sample has no .png/.jpg image", source=path, key=key)
    try:
        record = json.loads(parts["json"])
    except ValueError as e:
        raise DataError(f"bad JSON record: {e}", source=path, key=key) from None
    if decode:
        image = decode_image(image, source=path, key=key)
    return key, image, record


def decode_image(data: bytes, *, source: Any = None, key: Any = None) -> np.ndarray:
    """PNG/JPEG bytes -> HxWx3 uint8 array; DataError (naming source and key) if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise DataError(f"unreadable image: {e}", source=source, key=key) from None
