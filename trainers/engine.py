"""The training engine every trainer stage runs on: DeepSpeed from the stage spec, shard-aware data, resume.

One loop, read top to bottom in :func:`fit`: distributed init -> seed -> model -> DeepSpeed
(ZeRO 0-3, bf16 on GPU / fp32 on CPU) -> resume from the last complete checkpoint -> steps over
this rank's shards -> periodic atomic checkpoints -> plain ``state_dict`` export (``model.pt``).
Rank 0 alone draws the progress bar and logs per-step metrics to the stage's MLflow run.

A *step* is one optimizer step: ``gradient_accumulation_steps`` micro-batches of
``train_micro_batch_size_per_gpu`` samples on every rank. Ranks agree on the steps of an epoch:
the smallest per-rank sample count, floored to whole steps; a rank's samples beyond that are
left out of the epoch (which rank holds them rotates with the epoch, see :class:`ShardStream`).
Within an epoch the order is the shard reader's fixed order, so a resumed run skips exactly
the samples each rank (and DataLoader worker) had consumed at its checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from contract.spec import StageSpec
from trainers.checkpoint import Checkpointer, write_atomic

log = logging.getLogger(__name__)


# -- configuration ----------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Engine settings read from ``spec.params`` (unknown keys are left to the stage)."""

    steps: int = 100  # optimizer steps to train in total (resumed runs count the steps already done)
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    warmup_steps: int = 0  # linear warm-up steps before the cosine decay
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    checkpoint_every: int = 50  # steps between checkpoints (the last step is always checkpointed)
    keep_checkpoints: int = 2  # complete checkpoints kept on disk
    log_every: int = 1  # steps between metric records (MLflow, progress bar)
    seed: int = 0  # model init uses seed on every rank; data/augmentation use seed + rank
    num_workers: int = 0  # DataLoader worker processes per rank

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in names}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        cfg = cls(**kwargs)
        if cfg.steps < 1 or cfg.checkpoint_every < 1 or cfg.log_every < 1:
            raise ValueError("params.steps, checkpoint_every and log_every must be >= 1")
        return cfg


def on_gpu(spec: StageSpec) -> bool:
    return spec.resources.gpus_per_replica > 0 and torch.cuda.is_available()


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def deepspeed_config(spec: StageSpec, gpu: bool | None = None) -> dict[str, Any]:
    """DeepSpeed config: defaults (bf16 on GPU, fp32 on CPU) with ``spec.resources.deepspeed`` merged over them."""
    gpu = on_gpu(spec) if gpu is None else gpu
    defaults = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0},
        "bf16": {"enabled": gpu},
        "zero_allow_untested_optimizer": True,  # the optimizer is a client-side torch AdamW
        "steps_per_print": 2**31 - 1,  # the engine reports progress itself
        "wall_clock_breakdown": False,
    }
    cfg = deep_merge(defaults, spec.resources.deepspeed)
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x world size
    if not gpu:
        for key in ("bf16", "fp16"):
            if cfg.get(key, {}).get("enabled"):
                log.warning("%s requested on CPU: training in fp32 instead", key)
            cfg[key] = {"enabled": False}
    return cfg


# -- distributed ------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(gpu: bool) -> Dist:
    """Join the process group torchrun (or the training operator) describes; a lone process is world size 1."""
    import deepspeed

    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    if gpu:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not gpu:
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU *inference* (minutes on a fresh
        # machine, rebuilt when processes race on the cache); training never uses it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", verbose=False)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_min(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


# -- data -------------------------------------------------------------------------------------
Sample = tuple[str, np.ndarray, dict]  # (key, HxWx3 uint8 image, annotation record)


def rank_sample_count(path: str, *, rank: int, world_size: int, num_workers: int = 1) -> int:
    from trainers.data import shards

    return shards.num_samples_for(path, rank=rank, world_size=world_size, num_workers=max(1, num_workers))


class ShardStream(IterableDataset):
    """This rank's samples in ``epoch`` (split further across DataLoader workers), each tagged with its worker id.

    Ranks read as consumer ``(rank + epoch) % world_size``: when shards do not divide evenly,
    the ranks holding the extra samples (left out of the epoch, see :func:`fit`) change every epoch.

    The first ``skip[w]`` samples of worker w's stream are passed over undecoded: that is how a resumed
    run continues at the exact data position it checkpointed.
    """

    def __init__(self, path: str, rank: int, world_size: int, epoch: int, num_workers: int, skip: list[int],
                 transform: Callable[[Sample], Any]):
        self.path, self.world_size = path, world_size
        self.rank = (rank + epoch) % world_size
        self.num_workers = max(1, num_workers)
        self.skip = list(skip) if skip else [0] * self.num_workers
        self.transform = transform

    def __iter__(self):
        from trainers.data import shards

        info = get_worker_info()
        worker = info.id if info is not None else 0
        it = shards.iter_samples(self.path, rank=self.rank, world_size=self.world_size, worker=worker,
                                 num_workers=self.num_workers, decode=False)
        for key, image, record in itertools.islice(it, self.skip[worker], None):  # skipped ones stay undecoded
            yield worker, self.transform((key, shards.decode_image(image, key=key), record))


class _CollateWithWorker:
    """Batch (worker, sample) pairs into (worker, batch size, batch); picklable for spawned workers."""

    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate

    def __call__(self, items):
        workers = {w for w, _ in items}
        assert len(workers) == 1, "a batch must come from one worker"
        return workers.pop(), len(items), self.collate([x for _, x in items])


# -- metrics ----------------------------------------------------------------------------------
class MetricLogger:
    """Rank 0: progress bar and MLflow metrics on ``spec.tracking.run_id``; other ranks: nothing."""

    def __init__(self, spec: StageSpec, is_main: bool, total: int, initial: int):
        self.client = None
        self.run_id = spec.tracking.run_id if is_main else None
        self.bar = None
        if not is_main:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=spec.name, unit="step", dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 30.0)  # TQDM_DISABLE=1 turns it off (tqdm reads it)
        if self.run_id is not None:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=spec.tracking.mlflow_uri)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the loop ---------------------------------------------------------------------------------
LossFn = Callable[[Any, Any], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class FitResult:
    """What :func:`fit` hands back to its stage (on every rank)."""

    steps: int  # optimizer steps done in total, resumed ones included
    resumed_from: int  # step the run resumed from (0 on a fresh start)
    metrics: dict[str, float]  # last logged training metrics
    state_dict: dict[str, torch.Tensor] | None  # full fp32 weights on rank 0, None elsewhere
    model_path: str | None  # <workdir>/model.pt (rank 0), None elsewhere
    dist: Dist = field(repr=False, default=None)
    engine_config: dict[str, Any] = field(default_factory=dict)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``; a multiplier of the peak lr."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def fit(spec: StageSpec, *, build_model: Callable[[], torch.nn.Module], loss_fn: LossFn,
        transform: Callable[[Sample], Any], collate: Callable[[list], Any], dataset: str = "train") -> FitResult:
    """Train ``build_model()`` on ``spec.inputs.datasets[dataset]`` for ``params.steps`` steps; resume if possible.

    ``transform`` maps a (key, image, record) sample to what ``collate`` batches; ``loss_fn(engine, batch)``
    returns (scalar loss, extra metrics). Checkpoints live in ``<workdir>/checkpoints``; the final
    weights are written by rank 0 to ``<workdir>/model.pt`` as a plain ``state_dict``.
    """
    import deepspeed

    cfg = TrainConfig.from_params(spec.params)
    gpu = on_gpu(spec)
    d = init_distributed(gpu)
    workdir = Path(spec.outputs.workdir)
    ds_config = deepspeed_config(spec, gpu)

    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = build_model()
    seed_everything(cfg.seed + d.rank)  # per-rank randomness for data and augmentation

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    engine_config = {
        "zero_stage": engine.zero_optimization_stage(),
        "train_micro_batch_size_per_gpu": engine.train_micro_batch_size_per_gpu(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "train_batch_size": engine.train_batch_size(),
        "gradient_clipping": engine.gradient_clipping(),
        "bf16": engine.bfloat16_enabled(),
        "world_size": d.world_size,
        "backend": dist.get_backend(),
    }
    if d.is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        write_atomic(workdir / "engine.json", json.dumps({"deepspeed": ds_config, "engine": engine_config}, indent=2))

    # -- data: every rank takes the same number of steps per epoch ------------------------------
    data_path = spec.inputs.datasets[dataset].path
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    min_count = all_reduce_min(rank_sample_count(data_path, rank=d.rank, world_size=d.world_size,
                                                   num_workers=cfg.num_workers))
    steps_per_epoch = min_count // (micro * accum)
    if steps_per_epoch < 1:
        raise ValueError(f"{data_path}: {min_count} samples on the smallest rank, fewer than one step "
                         f"({micro} x {accum} micro-batches)")
    num_workers = cfg.num_workers

    # -- resume ---------------------------------------------------------------------------------
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    state = ckpt.load(engine) or {}
    step = int(state.get("step", 0))
    epoch = int(state.get("epoch", 0))
    consumed = [0] * max(1, num_workers)
    saved = state.get("data")
    if saved is not None:
        if saved.get("world_size") == d.world_size and saved.get("num_workers") == num_workers:
            consumed = list(saved["consumed"][d.rank])
        else:
            log.warning("world size or workers changed since the checkpoint: epoch %d restarts from its first sample", epoch)
    epoch_step = int(state.get("epoch_step", 0))
    resumed_from = step
    if d.is_main and step:
        log.info("resumed from %s at step %d (epoch %d, step %d of %d)", ckpt.latest_tag(), step, epoch,
                 epoch_step, steps_per_epoch)

    logger = MetricLogger(spec, d.is_main, total=cfg.steps, initial=min(step, cfg.steps))
    last_metrics: dict[str, float] = {}
    window: list[dict[str, float]] = []
    engine.train()
    try:
        while step < cfg.steps:
            stream = ShardStream(data_path, d.rank, d.world_size, epoch, num_workers, consumed, transform)
            loader = DataLoader(stream, batch_size=micro, num_workers=num_workers,
                                collate_fn=_CollateWithWorker(collate), persistent_workers=False)
            batches = iter(loader)
            while step < cfg.steps and epoch_step < steps_per_epoch:
                t0 = time.perf_counter()
                step_metrics: dict[str, float] = {}
                for _ in range(accum):
                    try:
                        worker, n, batch = next(batches)
                    except StopIteration:
                        raise RuntimeError(f"rank {d.rank}: data ran out at epoch {epoch} step {epoch_step} "
                                           f"of {steps_per_epoch}") from None
                    consumed[worker] += n
                    loss, extra = loss_fn(engine, _to_device(batch, d.device))
                    engine.backward(loss)
                    engine.step()
                    step_metrics["loss"] = step_metrics.get("loss", 0.0) + float(loss.detach()) / accum
                    for k, v in extra.items():
                        step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / accum
                step += 1
                epoch_step += 1
                step_metrics["lr"] = scheduler.get_last_lr()[0]
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    step_metrics["grad_norm"] = float(grad_norm)
                step_metrics["step_time_s"] = time.perf_counter() - t0
                window.append(step_metrics)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    last_metrics = _reduce_window(window)
                    window = []
                    logger.log(step, {f"train/{k}": v for k, v in last_metrics.items()})
                logger.advance()
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    done_epoch = epoch_step >= steps_per_epoch
                    ckpt.save(engine, step, {
                        "step": step,
                        "epoch": epoch + 1 if done_epoch else epoch,
                        "epoch_step": 0 if done_epoch else epoch_step,
                        "data": {"world_size": d.world_size, "num_workers": num_workers,
                                 "consumed": _gather(consumed if not done_epoch else [0] * len(consumed))},
                    })
            del batches, loader
            if epoch_step >= steps_per_epoch:
                epoch, epoch_step, consumed = epoch + 1, 0, [0] * max(1, num_workers)
    finally:
        logger.close()

    # -- export ---------------------------------------------------------------------------------
    state_dict = export_state_dict(engine, d)
    model_path = None
    if d.is_main:
        model_path = str(workdir / "model.pt")
        tmp = workdir / ".model.pt.tmp"
        torch.save(state_dict, tmp)
        os.replace(tmp, model_path)
    return FitResult(steps=step, resumed_from=resumed_from, metrics=last_metrics, state_dict=state_dict,
                     model_path=model_path, dist=d, engine_config=engine_config)


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _reduce_window(window: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the logging window and over ranks (a collective: every rank calls it)."""
    keys = sorted(window[-1])
    local = torch.tensor([sum(m.get(k, 0.0) for m in window) / len(window) for k in keys], dtype=torch.float64)
    dist.all_reduce(local)
    local /= dist.get_world_size()
    out = dict(zip(keys, local.tolist()))
    for k in ("lr", "grad_norm"):  # identical on every rank: the last value, not a mean
        if k in window[-1]:
            out[k] = window[-1][k]
    return out


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def export_state_dict(engine, d: Dist) -> dict[str, torch.Tensor] | None:
    """Full fp32 ``state_dict`` of the trained module on rank 0 (ZeRO-3 partitions gathered one parameter at a time).

    Collective under ZeRO-3: every rank must call it. bf16 runs export their bf16 weights cast to fp32.
    """
    import deepspeed

    module = engine.module
    if engine.zero_optimization_stage() == 3:
        params = dict(module.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for name, tensor in module.state_dict().items():
            p = params.get(name)
            if p is not None:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if d.is_main:
                        out[name] = p.detach().to("cpu", torch.float32).clone()
            elif d.is_main:
                out[name] = tensor.detach().cpu().clone()
        return out if d.is_main else None
    if not d.is_main:
        return None
    return {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).clone()
            for k, v in module.state_dict().items()}
