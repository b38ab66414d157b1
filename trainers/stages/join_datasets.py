"""Stage ``join-datasets``: ``inputs.datasets.images`` and ``inputs.datasets.extra`` written as one dataset.

A map over shards (``trainers.shardmap``): every rank copies its share of both inputs into its part, records and
image bytes unchanged, so the output holds ground-truth records and pseudo-labeled records side by side (CaSP's
joint self-training baseline trains on it with ``targets: joint``). The two inputs must have the same categories,
and a key in both is an error naming it, checked on every rank and across ranks before anything is published. Params: ``python -m trainers
join-datasets --help``.
"""
from __future__ import annotations

from dataclasses import dataclass

from contract.spec import StageSpec
from contract.stages import params_of
from trainers.comm import Stats
from trainers.data import shards
from trainers.inputs import StageInputError, dataset_input
from trainers.shardmap import ShardMap


@dataclass
class JoinCounts(Stats):
    prefix = "join/"
    images: int = 0  # samples from inputs.datasets.images
    extra: int = 0  # samples from inputs.datasets.extra


def _categories(index: shards.DatasetIndex) -> list[tuple[int, str]]:
    return sorted((int(c["id"]), str(c.get("name", ""))) for c in index.categories)


def run(spec: StageSpec):
    """Copy this rank's share of both inputs into ``<out>/rank-<r>``; rank 0 publishes the joined dataset."""
    p = params_of(spec)
    sm = ShardMap(spec, p, name="joined")
    d = sm.dist
    extra = dataset_input(spec, "extra")
    extra_index = shards.DatasetIndex.load(extra)
    if _categories(extra_index) != _categories(sm.index):
        raise StageInputError(f"inputs.datasets.extra ({extra}) has categories {_categories(extra_index)}, "
                              f"inputs.datasets.images ({sm.images}) has {_categories(sm.index)}: only datasets of the "
                              "same categories can be joined")

    seen: set[str] = set()

    def samples(counts: JoinCounts):
        for which, path in (("images", sm.images), ("extra", extra)):
            for key, blob, record in shards.iter_samples(path, rank=d.rank, world_size=d.world_size, decode=False):
                if key in seen:
                    raise StageInputError(f"sample key {key!r} is in both inputs.datasets.images ({sm.images}) and "
                                          f"inputs.datasets.extra ({extra}); joined datasets need distinct keys")
                seen.add(key)
                setattr(counts, which, getattr(counts, which) + 1)
                yield key, blob, record

    counts = JoinCounts()
    counts = sm.write_part(lambda: samples(counts), counts)
    _no_key_on_two_ranks(seen, d.world_size)
    return sm.finish(counts)


def _no_key_on_two_ranks(keys: set[str], world_size: int) -> None:
    """Every rank raises when a key was written by two ranks (the parts are merged by key; each rank checked its own)."""
    if world_size == 1:
        return
    import torch.distributed as dist

    gathered: list[set[str] | None] = [None] * world_size
    dist.all_gather_object(gathered, keys)
    union: set[str] = set()
    for part in gathered:
        clash = union & (part or set())
        if clash:
            raise StageInputError(f"sample key {sorted(clash)[0]!r} is in both inputs (found on two ranks); joined "
                                  "datasets need distinct keys")
        union |= part or set()
