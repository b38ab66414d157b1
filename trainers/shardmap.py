"""The map over shards every labelling stage runs (mine-parts, pseudo-label, rank-parts, rank-pseudo-label, cluster-pixels).

One skeleton (docs/architecture.md "Idempotent and resumable"): parse the params, require ``outputs.dataset``, join the
process group, fingerprint, and on every rank r write its share of ``inputs.datasets.images``
(``iter_samples(rank=r)``) as a complete dataset part ``<out>/rank-<r>`` (``shards.part_dir``; atomic as every
``shards.write_dataset``) -- or skip it when that part is already complete for the same fingerprint. Then the
counters (a :class:`~trainers.comm.Stats`) are summed over ranks, rank 0 publishes one index over all parts
(``shards.merge_parts``), logs the metrics and returns the :class:`~trainers.stages.StageResult`.

A stage supplies only its per-batch labelling function (``label(keys, images, records, stats) -> proposals per
image``, built once per rank by ``labeller(dist)`` so models load only when a part is written), its stats and the
output name; :meth:`ShardMap.run` does the rest. Multi-phase stages (rank-parts, cluster-pixels) use the
pieces: :meth:`ShardMap.write_part`, :meth:`ShardMap.finish`.

**Fingerprint** (:func:`fingerprint`): the sha256 of (the spec's inputs -- every dataset's DVC hash (its path
only when it has none), every model's URI --, the parsed params with their defaults filled in, the world size). A rank part holds
a done marker ``<workdir>/shardmap/rank-<r>.json`` = ``{"fingerprint", "part", "stats"}``, written after the
part's index, and a rerun skips a part whose marker carries the same fingerprint. The marker sits in the workdir,
not in the dataset: its stats hold timings, and the dataset's bytes (its DVC version) depend on the inputs,
params and world size only. A local model file (or dataset path) rewritten in place under the
same name is not seen: the control plane pins ``models:/`` aliases to versions and versions datasets by DVC
hash. Stages whose parts depend on more pass it (``more``): rank-parts its spill generation.

**Overlap** (:meth:`ShardMap.labelled`): a part is written by three threads joined by bounded queues
(:func:`background`, ``PIPELINE_DEPTH`` batches each), so reading and decoding the next batch and encoding and
writing the last one run while the model's forward pass runs on the current one: a loader thread reads the shards
and decodes the images (and a stage's ``prepare``, e.g. an augmentation), a labelling thread runs ``label`` (the
forward pass), and the caller's thread runs the stage's ``finish`` (post-processing, e.g. RLE encoding) and
``shards.write_dataset``. The queues bound the memory (a few batches, whatever the number of images); the order
of the samples -- and so the bytes written -- is the serial loop's; an error in any thread is raised in the
caller's thread naming the batch's samples, the other threads stop, and nothing is published (the part is atomic as
before).
"""
from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

from contract.io import read_json, write_json
from contract.spec import StageSpec
from contract.stages import Params
from trainers.comm import Dist, Stats, all_reduce_max, all_reduce_stats, barrier, init_distributed, on_gpu
from trainers.data import shards
from trainers.data.batches import images_to_tensor, iter_batches, iter_same_size, with_proposals
from trainers.inputs import dataset_input, log_metrics, output_dataset

log = logging.getLogger(__name__)

MARKER_DIR = "shardmap"  # <workdir>/shardmap/rank-<r>.json: fingerprint + stats of a complete part <out>/rank-<r>
PIPELINE_DEPTH = 2  # batches queued between the loader, labelling and writing threads (the memory bound)

Sample = tuple[str, Any, dict]  # (key, image bytes, record)
Label = Callable[[list[str], Any, list[dict], Stats], list[Any]]
# finish(key, image bytes, decoded image, record, label's output for it) -> the sample to write, or None to drop it
Finish = Callable[[str, bytes, Any, dict, Any], "Sample | None"]
T = TypeVar("T")

_DONE, _ERROR = object(), object()


def background(items: Iterable[T], *, name: str, depth: int = PIPELINE_DEPTH) -> Iterator[T]:
    """``items``, produced by a daemon thread ``name`` up to ``depth`` ahead of the consumer (a bounded queue).

    An exception of the producer is raised in the consumer (with a note naming the thread) after the items before
    it; when the consumer stops early (an exception of its own, or closing the generator) the producer stops at its
    next item and is joined, so no thread outlives the map.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for it in items:
                if not put((None, it)):
                    return
            put((_DONE, None))
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which raises it
            put((_ERROR, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:  # a generator: its own finally blocks (an inner background thread) run here
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, it = q.get()
            if kind is _DONE:
                return
            if kind is _ERROR:
                it.add_note(f"(raised in the shard map's {name} thread)")
                raise it
            yield it
    finally:
        stop.set()
        thread.join()


@dataclass
class Batch:
    """One batch on its way through the map: keys, stored image bytes, decoded (prepared) images, records, the
    images as one float tensor (``images_to_tensor``, on the CPU) and, once labelled, ``label``'s outputs."""

    keys: list[str]
    blobs: list[bytes]
    images: list[Any]
    records: list[dict]
    tensor: Any
    outputs: list[Any] | None = None

    def names(self) -> str:
        return f"sample(s) {', '.join(map(repr, self.keys[:3]))}{', ...' if len(self.keys) > 3 else ''} " \
               f"({len(self.keys)} in the batch)"


def fingerprint(spec: StageSpec, params: Params | dict, world_size: int, **more: Any) -> str:
    """sha256 of the spec's inputs (each dataset by its DVC hash, or its path when it has none; model URIs), the
    parsed params (defaults filled in), the world size and ``more`` (what a stage's parts depend on besides).

    A pinned dataset enters by content, not by where it is mounted: the same stage on the same data writes the
    same bytes (and so the same DVC version) whether its PVC is at /data or the workspace is in a home folder.
    """
    inputs = {"datasets": {k: d.dvc_hash or f"path:{d.path}" for k, d in spec.inputs.datasets.items()},
              "models": {k: m.uri for k, m in spec.inputs.models.items()}}
    doc = {"inputs": inputs,
           "params": params.model_dump(mode="json") if isinstance(params, Params) else params,
           "world_size": world_size, **more}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


class ShardMap:
    """One rank's view of a map over the shards of ``inputs.datasets.images`` into ``outputs.dataset``."""

    def __init__(self, spec: StageSpec, params: Params, *, name: str, d: Dist | None = None, **more: Any):
        self.spec, self.params = spec, params
        self.out = output_dataset(spec)
        self.images = dataset_input(spec, "images")
        self.index = shards.DatasetIndex.load(self.images)
        self.name = f"{self.index.name}-{name}"
        self.dist = d or init_distributed(on_gpu(spec))
        self.part = shards.part_dir(self.out, self.dist.rank)
        # the done marker lives in the stage's workdir, not in the dataset: its stats hold timings, and the
        # dataset's bytes (its DVC version) must depend on the inputs, params and world size only
        self.marker = Path(spec.outputs.workdir) / MARKER_DIR / f"{self.part.name}.json"
        self.fingerprint = fingerprint(spec, params, self.dist.world_size, **more)
        self.resumed = False
        self.t0 = time.perf_counter()

    def depend_on(self, **more: Any) -> None:
        """The parts depend on ``more`` too (known only after earlier phases)."""
        self.fingerprint = fingerprint(self.spec, self.params, self.dist.world_size, **more)

    def num_samples(self) -> int:
        """Samples of this rank's share."""
        return shards.num_samples_for(self.index, rank=self.dist.rank, world_size=self.dist.world_size)

    def done(self) -> dict | None:
        """The done marker of this rank's part when the part is complete for the current fingerprint."""
        doc = read_json(self.marker)
        if not doc or doc.get("fingerprint") != self.fingerprint:
            return None
        try:
            shards.DatasetIndex.load(self.part)
        except shards.DataError:
            return None
        return doc

    def write_part(self, samples: Callable[[], Iterable[Sample]], stats: Stats) -> Stats:
        """This rank's part: skipped when complete (its saved stats returned), else written from ``samples()``
        (which counts into ``stats``) and marked complete."""
        doc = self.done()
        if doc is not None:
            self.resumed = True
            log.info("rank %d: %s already holds this share (%s): skipped", self.dist.rank, self.part, self.fingerprint)
            return type(stats).from_dict(doc["stats"])
        self.marker.unlink(missing_ok=True)
        items = samples()
        try:
            shards.write_dataset(items, self.part, name=self.name, split=self.index.split,
                                 categories=self.index.categories, shard_size=self.params.shard_size,
                                 source=f"{self.spec.stage}:{self.fingerprint}")
        finally:  # a failed write stops the map's threads (ShardMap.labelled) before the error propagates
            close = getattr(items, "close", None)
            if close is not None:
                close()
        write_json(self.marker, {"fingerprint": self.fingerprint, "part": str(self.part), "stats": stats.to_dict()}, indent=1)
        return stats

    def batches(self, *, same_size: bool = False, allow_parts: bool = False,
                prepare: Callable[[str, Any], Any] | None = None) -> Iterator[Batch]:
        """This rank's share as decoded batches of ``batch_size`` images (``same_size``: split into runs of one image
        size, never padded; else zero-padded to the largest), each image through ``prepare(key, image)`` (an
        augmentation that keeps the size) when given."""
        d, bs = self.dist, self.params.batch_size

        def prepared(key: str, image):
            try:
                return prepare(key, image)
            except Exception as e:
                e.add_note(f"preparing sample {key!r}")
                raise

        def batch(keys, blobs, images, records) -> Batch:
            if prepare is not None:
                images = [prepared(k, im) for k, im in zip(keys, images)]
            return Batch(list(keys), list(blobs), list(images), list(records), images_to_tensor(images))

        if same_size:
            for group in iter_same_size(self.images, bs, rank=d.rank, world_size=d.world_size, allow_parts=allow_parts):
                yield batch(*zip(*group))
            return
        for keys, blobs, records in iter_batches(self.images, bs, rank=d.rank, world_size=d.world_size, decode=False,
                                                 allow_parts=allow_parts):
            yield batch(keys, blobs, [shards.decode_image(b, key=k) for k, b in zip(keys, blobs)], records)

    def labelled(self, label: Label, stats: Stats, *, same_size: bool = False, allow_parts: bool = False,
                 on_batch: Callable[[int], None] = lambda n: None, prepare: Callable[[str, Any], Any] | None = None,
                 finish: Finish | None = None) -> Iterator[Sample]:
        """This rank's samples labelled by ``label(keys, images, records, stats)`` (``images``: the batch as one tensor
        on the device; returns one output per image), each made a sample by ``finish(key, blob, image, record,
        output)`` (None drops it; default: the record with ``proposals`` = output). Batches as :meth:`batches`.

        Overlapped (module doc, "Overlap"): the loader thread reads, decodes and ``prepare``s, the labelling thread
        runs ``label``, the caller's thread ``finish`` and whatever consumes the samples (``shards.write_dataset``).
        ``label`` runs in the caller's grad mode; ``label`` and ``finish`` should count into different fields of
        ``stats`` (they run at the same time).
        """
        device, grad = self.dist.device, torch.is_grad_enabled()

        def run_label(batches: Iterable[Batch]) -> Iterator[Batch]:
            with torch.set_grad_enabled(grad):
                for b in batches:
                    try:
                        b.outputs = label(b.keys, b.tensor.to(device), b.records, stats)
                    except Exception as e:
                        e.add_note(f"labelling {b.names()}")
                        raise
                    yield b

        loaded = background(self.batches(same_size=same_size, allow_parts=allow_parts, prepare=prepare), name="loader")
        done = background(run_label(loaded), name="labelling")
        try:
            for b in done:
                for key, blob, image, record, out in zip(b.keys, b.blobs, b.images, b.records, b.outputs):
                    if finish is None:
                        yield key, blob, with_proposals(record, out)
                        continue
                    try:
                        sample = finish(key, blob, image, record, out)
                    except Exception as e:
                        e.add_note(f"finishing sample {key!r}")
                        raise
                    if sample is not None:
                        yield sample
                on_batch(len(b.keys))
        finally:  # stop and join the threads now, not when the generators are collected
            done.close()
            loaded.close()

    def finish(self, stats: Stats, metrics: Callable[[Stats, float, shards.DatasetIndex | None], dict] | None = None,
               publish: Callable[[Path], None] | None = None, logger=None):
        """Sum ``stats`` over ranks, merge the parts and ``publish`` extra files (rank 0), compute the metrics (every
        rank: ``metrics(total, slowest rank's seconds, merged index or None)`` may use collectives), log them on
        rank 0; returns the StageResult on rank 0, None elsewhere."""
        from trainers.stages import StageResult

        total = all_reduce_stats(stats)
        wall = all_reduce_max(time.perf_counter() - self.t0)
        merged = None
        if self.dist.is_main:
            merged = shards.merge_parts(self.out, self.dist.world_size, name=self.name)
            if publish is not None:
                publish(self.out)
        result = metrics(total, wall, merged) if metrics is not None else total.as_metrics()
        if self.dist.is_main:
            if logger is not None:
                logger.log(0, result)
            else:
                log_metrics(self.spec, result)
            log.info("%s: %s", self.spec.stage, ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in result.items()))
        barrier()
        if not self.dist.is_main:
            return None
        return StageResult(metrics=result, dataset_path=str(self.out))

    def run(self, labeller: Callable[[Dist], Label], stats: Stats, *, same_size: bool = False,
            allow_parts: bool = False, metrics=None, publish=None):
        """The whole map: write (or skip) this rank's part labelled by ``labeller(dist)``, then :meth:`finish`."""
        from trainers.engine import MetricLogger

        logger = MetricLogger(self.spec, self.dist.is_main, total=0 if self.done() else self.num_samples(), initial=0)
        try:
            def samples():
                return self.labelled(labeller(self.dist), stats, same_size=same_size, allow_parts=allow_parts,
                                     on_batch=logger.advance)

            stats = self.write_part(samples, stats)
            return self.finish(stats, metrics, publish, logger)
        finally:
            logger.close()
