"""Distributed helpers every stage uses (in the manner of detectron2's ``utils/comm.py``).

:func:`init_distributed` joins the process group torchrun (or the training operator) describes; a lone
process is a world of one. The collectives here are no-ops in a world of one and safe on any backend
(gloo on CPU, nccl on GPU): counters travel as float64 CPU tensors or as pickled objects.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist

from contract.io import free_port
from contract.spec import StageSpec

__all__ = ["Dist", "Stats", "all_gather", "all_reduce_min", "all_reduce_stats", "all_reduce_sum", "barrier",
           "free_port", "init_distributed", "is_main", "on_gpu", "world_size"]


@dataclass
class Dist:
    """This process's place in the world."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def on_gpu(spec: StageSpec) -> bool:
    """The spec asks for GPUs and one is visible."""
    return spec.resources.gpus_per_replica > 0 and torch.cuda.is_available()


def init_distributed(gpu: bool) -> Dist:
    """Join the process group torchrun (or the training operator) describes; a lone process is world size 1.

    Plain ``torch.distributed`` (env:// rendezvous): labelling and evaluating stages never import DeepSpeed (seconds
    of start-up per rank); a training stage's ``deepspeed.initialize`` adopts this group (``trainers.engine``)."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    if gpu:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if gpu else "gloo", init_method="env://",
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=device)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather(obj: Any) -> list:
    """``obj`` of every rank, in rank order (pickled: any backend, no device tensors)."""
    if world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a list of numbers (float64)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64)
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_min(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


S = TypeVar("S", bound="Stats")


@dataclass
class Stats:
    """Base of a stage's counters: a dataclass of numbers, summed over ranks by :func:`all_reduce_stats`.

    Subclasses declare fields (int or float, default 0), a ``prefix`` for their metric names and,
    where they have them, derived metrics in :meth:`derived`.
    """

    prefix: ClassVar[str] = ""

    def add(self, other: "Stats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[S], doc: dict[str, Any]) -> S:
        return cls(**{f.name: doc[f.name] for f in dataclasses.fields(cls) if f.name in doc})

    def derived(self) -> dict[str, float]:
        """Metrics computed from the counts (ratios); none by default."""
        return {}

    def as_metrics(self) -> dict[str, float]:
        """``<prefix><field>`` for every counter, then the derived metrics (``<prefix><name>``)."""
        out = {f"{self.prefix}{k}": float(v) for k, v in self.to_dict().items()}
        out.update({f"{self.prefix}{k}": float(v) for k, v in self.derived().items()})
        return out


def all_reduce_stats(stats: S) -> S:
    """A new ``stats`` of the same class holding the sum over ranks (a collective: every rank calls it)."""
    fields = dataclasses.fields(stats)
    sums = all_reduce_sum([getattr(stats, f.name) for f in fields])
    return type(stats)(**{f.name: (float(v) if f.type in ("float", float) else int(round(v)))
                          for f, v in zip(fields, sums)})
