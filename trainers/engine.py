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
import io
import itertools
import logging
import math
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

from contract.io import deep_merge, write_atomic, write_json
from contract.spec import StageSpec
from contract.stages.training import TrainParams
from trainers.checkpoint import Checkpointer
from trainers.comm import Dist, all_gather, all_reduce_min, init_distributed, on_gpu

log = logging.getLogger(__name__)


# -- configuration ----------------------------------------------------------------------------
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
    cfg = deep_merge(defaults, copy.deepcopy(spec.resources.deepspeed))
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x world size
    if not gpu:
        for key in ("bf16", "fp16"):
            if cfg.get(key, {}).get("enabled"):
                log.warning("%s requested on CPU: training in fp32 instead", key)
            cfg[key] = {"enabled": False}
    return cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
        if self.run_id is not None:  # buffered: an MLflow outage within the limit delays metrics, never loses them
            from trainers.inputs import MetricBuffer

            self.client = MetricBuffer(spec.tracking.mlflow_uri, self.run_id, spec.tracking.outage_seconds)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        if self.client is not None:
            self.client.log(metrics, step)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.client is not None and sys.exc_info()[0] is None:  # send what is queued (not while failing anyway)
            self.client.close()


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


def lr_lambda(cfg: TrainParams) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``; a multiplier of the peak lr."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def fit(spec: StageSpec, params: TrainParams, *, build_model: Callable[[], torch.nn.Module], loss_fn: LossFn,
        transform: Callable[[Sample], Any], collate: Callable[[list], Any], dataset: str = "train") -> FitResult:
    """Train ``build_model()`` on ``spec.inputs.datasets[dataset]`` for ``params.steps`` steps; resume if possible.

    ``params`` are the stage's (a :class:`~contract.stages.training.TrainParams`). ``transform`` maps a
    (key, image, record) sample to what ``collate`` batches; ``loss_fn(engine, batch)`` returns (scalar loss,
    extra metrics). Checkpoints live in ``<workdir>/checkpoints``; the final weights are written by rank 0 to
    ``<workdir>/model.pt`` as a plain ``state_dict``.
    """
    gpu = on_gpu(spec)
    d = init_distributed(gpu)
    workdir = Path(spec.outputs.workdir)
    engine, scheduler, engine_config = _build_engine(spec, params, build_model, d, gpu)
    data = _Data.plan(spec.inputs.datasets[dataset].path, engine, d, params.num_workers)
    ckpt = Checkpointer(workdir / "checkpoints", keep=params.keep_checkpoints)
    pos = _Position.resume(ckpt, engine, d, data)
    resumed_from = pos.step
    logger = MetricLogger(spec, d.is_main, total=params.steps, initial=min(pos.step, params.steps))
    try:
        last_metrics = _train(engine, scheduler, params, loss_fn, transform, collate, d, data, ckpt, pos, logger)
    finally:
        logger.close()
    state_dict = export_state_dict(engine, d)
    model_path = None
    if d.is_main:
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        model_path = str(write_atomic(workdir / "model.pt", buf.getvalue()))
    return FitResult(steps=pos.step, resumed_from=resumed_from, metrics=last_metrics, state_dict=state_dict,
                     model_path=model_path, dist=d, engine_config=engine_config)


def _build_engine(spec: StageSpec, params: TrainParams, build_model, d: Dist, gpu: bool):
    """Seeded model -> AdamW + warm-up/cosine schedule -> DeepSpeed engine; rank 0 writes ``engine.json``."""
    import deepspeed

    if not gpu:  # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU *inference* (minutes on a fresh machine,
        # rebuilt when processes race on the cache); training never uses it. Before initialize builds its comm backend.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ds_config = deepspeed_config(spec, gpu)
    seed_everything(params.seed)  # identical initial weights on every rank
    model = build_model()
    seed_everything(params.seed + d.rank)  # per-rank randomness for data and augmentation
    # a model may scale the lr of its parameter groups (e.g. Leopart's backbone at a tenth of its heads' lr); the
    # schedule multiplies every group's own peak lr
    groups = ([{"params": ps, "lr": params.lr * scale} for ps, scale in model.lr_groups() if ps]
              if hasattr(model, "lr_groups") else model.parameters())
    optimizer = torch.optim.AdamW(groups, lr=params.lr, betas=tuple(params.betas), weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(params))
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
        "peak_lr_per_group": [float(g["initial_lr"]) for g in optimizer.param_groups],
    }
    if d.is_main:
        write_json(Path(spec.outputs.workdir) / "engine.json", {"deepspeed": ds_config, "engine": engine_config})
    return engine, scheduler, engine_config


@dataclass
class _Data:
    """Where the samples come from and how many steps an epoch has (every rank takes the same number)."""

    path: str
    micro: int  # samples per micro-batch
    accum: int  # micro-batches per step
    steps_per_epoch: int
    num_workers: int

    @classmethod
    def plan(cls, path: str, engine, d: Dist, num_workers: int) -> "_Data":
        micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
        min_count = all_reduce_min(rank_sample_count(path, rank=d.rank, world_size=d.world_size,
                                                     num_workers=num_workers))
        steps_per_epoch = min_count // (micro * accum)
        if steps_per_epoch < 1:
            raise ValueError(f"{path}: {min_count} samples on the smallest rank, fewer than one step "
                             f"({micro} x {accum} micro-batches)")
        return cls(path, micro, accum, steps_per_epoch, num_workers)


@dataclass
class _Position:
    """Where training stands: step, epoch, step within the epoch and samples each DataLoader worker consumed."""

    step: int
    epoch: int
    epoch_step: int
    consumed: list[int]

    @classmethod
    def resume(cls, ckpt: Checkpointer, engine, d: Dist, data: _Data) -> "_Position":
        """From the latest complete checkpoint (restoring the engine), or the start."""
        state = ckpt.load(engine) or {}
        pos = cls(step=int(state.get("step", 0)), epoch=int(state.get("epoch", 0)),
                  epoch_step=int(state.get("epoch_step", 0)), consumed=[0] * max(1, data.num_workers))
        saved = state.get("data")
        if saved is not None:
            if saved.get("world_size") == d.world_size and saved.get("num_workers") == data.num_workers:
                pos.consumed = list(saved["consumed"][d.rank])
            else:
                log.warning("world size or workers changed since the checkpoint: epoch %d restarts from its first sample",
                            pos.epoch)
        if d.is_main and pos.step:
            log.info("resumed from %s at step %d (epoch %d, step %d of %d)", ckpt.loaded_tag, pos.step, pos.epoch,
                     pos.epoch_step, data.steps_per_epoch)
        return pos


def _train(engine, scheduler, params: TrainParams, loss_fn: LossFn, transform, collate, d: Dist, data: _Data,
           ckpt: Checkpointer, pos: _Position, logger: MetricLogger) -> dict[str, float]:
    """Epochs of steps until ``params.steps``; logs every ``log_every``, checkpoints every ``checkpoint_every``.
    Returns the last logged metrics."""
    last_metrics: dict[str, float] = {}
    window: list[dict[str, float]] = []
    engine.train()
    while pos.step < params.steps:
        stream = ShardStream(data.path, d.rank, d.world_size, pos.epoch, data.num_workers, pos.consumed, transform)
        loader = DataLoader(stream, batch_size=data.micro, num_workers=data.num_workers,
                            collate_fn=_CollateWithWorker(collate), persistent_workers=False)
        batches = iter(loader)
        while pos.step < params.steps and pos.epoch_step < data.steps_per_epoch:
            step_metrics = _step(engine, scheduler, loss_fn, batches, d, data, pos, params.nonfinite_loss)
            window.append(step_metrics)
            if pos.step % params.log_every == 0 or pos.step == params.steps:
                last_metrics = _reduce_window(window)
                window = []
                logger.log(pos.step, {f"train/{k}": v for k, v in last_metrics.items()})
            logger.advance()
            if pos.step % params.checkpoint_every == 0 or pos.step == params.steps:
                _checkpoint(ckpt, engine, d, data, pos)
        del batches, loader
        if pos.epoch_step >= data.steps_per_epoch:
            pos.epoch, pos.epoch_step, pos.consumed = pos.epoch + 1, 0, [0] * max(1, data.num_workers)
    return last_metrics


class NonFiniteLossError(FloatingPointError):
    """A loss that is NaN or infinite on some rank (``nonfinite_loss: stop``); names the step, micro-batch and ranks."""


def _nonfinite_ranks(loss: torch.Tensor, d: Dist) -> list[int]:
    """Ranks whose ``loss`` is NaN or infinite (a collective: every rank gets the same answer)."""
    bad = torch.zeros(d.world_size, dtype=torch.float32, device=loss.device)
    bad[d.rank] = 0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0
    if d.world_size > 1:
        dist.all_reduce(bad)
    return [r for r, v in enumerate(bad.tolist()) if v]


def _zero_loss(engine) -> torch.Tensor:
    """A loss of exactly 0 reaching every trainable parameter: a skipped micro-batch's stand-in, so that every rank
    still runs the same backward (gradient reduction) and DeepSpeed's micro-step count stays in step."""
    return sum((p.sum() * 0.0 for p in engine.module.parameters() if p.requires_grad), torch.zeros((), device=engine.device))


def _step(engine, scheduler, loss_fn: LossFn, batches, d: Dist, data: _Data, pos: _Position,
          nonfinite: str = "stop") -> dict[str, float]:
    """One optimizer step: ``accum`` micro-batches; advances ``pos``; returns the step's metrics.

    A loss that is not finite on any rank stops every rank with :class:`NonFiniteLossError` (``nonfinite="stop"``)
    or is skipped (``"skip"``): with one micro-batch per step the optimizer step is not taken; with accumulation
    that micro-batch contributes no gradient. Skips are logged and counted in the ``skipped`` metric."""
    t0 = time.perf_counter()
    step_metrics: dict[str, float] = {}
    if nonfinite == "skip":
        step_metrics["skipped"] = 0.0
    counted = 0
    for micro in range(data.accum):
        try:
            worker, n, batch = next(batches)
        except StopIteration:
            raise RuntimeError(f"rank {d.rank}: data ran out at epoch {pos.epoch} step {pos.epoch_step} "
                               f"of {data.steps_per_epoch}") from None
        pos.consumed[worker] += n
        loss, extra = loss_fn(engine, _to_device(batch, d.device))
        bad = _nonfinite_ranks(loss, d)
        if bad:
            where = (f"step {pos.step + 1} (epoch {pos.epoch}, step {pos.epoch_step + 1} of the epoch, micro-batch "
                     f"{micro + 1} of {data.accum})")
            if nonfinite != "skip":
                raise NonFiniteLossError(f"non-finite loss ({float(loss.detach())} on rank {d.rank}; non-finite on "
                                         f"rank(s) {bad}) at {where}: training stopped (params.nonfinite_loss: skip "
                                         "skips such steps instead)")
            if d.is_main:
                log.warning("non-finite loss on rank(s) %s at %s: skipped (nonfinite_loss: skip)", bad, where)
            step_metrics["skipped"] = 1.0
            if data.accum == 1:
                continue  # no backward, no optimizer step
            loss, extra = _zero_loss(engine), {}
        engine.backward(loss)
        engine.step()
        if bad:
            continue
        counted += 1
        step_metrics["loss"] = step_metrics.get("loss", 0.0) + float(loss.detach()) / data.accum
        for k, v in extra.items():
            step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / data.accum
    if counted and counted < data.accum:  # means over the micro-batches that counted
        for k in [k for k in step_metrics if k != "skipped"]:
            step_metrics[k] *= data.accum / counted
    pos.step += 1
    pos.epoch_step += 1
    step_metrics["lr"] = scheduler.get_last_lr()[0]
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        step_metrics["grad_norm"] = float(grad_norm)
    step_metrics["step_time_s"] = time.perf_counter() - t0
    return step_metrics


def _checkpoint(ckpt: Checkpointer, engine, d: Dist, data: _Data, pos: _Position) -> None:
    """A checkpoint at ``pos`` (collective); the end of an epoch is saved as the start of the next."""
    done_epoch = pos.epoch_step >= data.steps_per_epoch
    ckpt.save(engine, pos.step, {
        "step": pos.step,
        "epoch": pos.epoch + 1 if done_epoch else pos.epoch,
        "epoch_step": 0 if done_epoch else pos.epoch_step,
        "data": {"world_size": d.world_size, "num_workers": data.num_workers,
                 "consumed": all_gather(pos.consumed if not done_epoch else [0] * len(pos.consumed))},
    })


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
