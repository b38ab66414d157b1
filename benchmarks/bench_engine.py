"""Stage runtime benchmark (issue 4): per-rank peak memory of ZeRO-2 vs ZeRO-0, engine step time vs bare torch.

    .venv/bin/python benchmarks/bench_engine.py [--runs 3] [--steps 10] [--width 2048] [--layers 6]

Every configuration runs under ``torchrun`` on CPU (gloo), fp32, AdamW, on the same MLP
(``layers`` x ``width``^2 weights: 25M parameters by default, so that AdamW's two moment
buffers and the gradients dominate the training state). Each rank reports its peak RSS
(``getrusage`` ``ru_maxrss``), its RSS before the model was built, and the mean step time
over ``steps`` timed steps after 2 warm-up steps. Medians over ``runs`` runs are printed as a
Markdown table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# -- one rank ----------------------------------------------------------------------------------
def _mlp(width: int, layers: int):
    from torch import nn

    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*mods[:-1])


def worker(args) -> None:
    import psutil
    import torch
    import torch.distributed as dist

    if args.mode == "deepspeed":
        import deepspeed

        from trainers.comm import init_distributed

        init_distributed(gpu=False)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    rss_before = psutil.Process().memory_info().rss
    model = _mlp(args.width, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    if args.mode == "deepspeed":
        from contract.spec import StageSpec
        from trainers.engine import deepspeed_config

        zero = {"stage": args.zero}
        if args.bucket:
            zero.update(reduce_bucket_size=args.bucket, allgather_bucket_size=args.bucket)
        spec = StageSpec(stage="bench", name="bench", outputs={"workdir": tempfile.gettempdir()}, resources={
            "deepspeed": {"zero_optimization": zero, "train_micro_batch_size_per_gpu": args.batch}})
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(spec, gpu=False),
                                               dist_init_required=False)

        def step(x, y):
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
    else:
        ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

        def step(x, y):
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=g)
    y = torch.randn(args.batch, args.width, generator=g)
    for _ in range(2):
        step(x, y)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(x, y)
    dist.barrier()
    step_s = (time.perf_counter() - t0) / args.steps
    gc.collect()
    rss_end = psutil.Process().memory_info().rss
    storages, live = set(), 0  # bytes of every tensor storage Python still holds (params, grads, optimizer state, buffers)
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            st = obj.untyped_storage()
            if st.data_ptr() not in storages:
                storages.add(st.data_ptr())
                live += st.nbytes()
    out = {"rank": rank, "world": world, "params": n_params, "step_s": step_s,
           "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": rss_before / 2**20,
           "rss_end_mb": rss_end / 2**20, "live_tensors_mb": live / 2**20}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


# -- driver ------------------------------------------------------------------------------------
def launch(mode: str, zero: int, nproc: int, bucket: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
               f"--master-port={_free_port()}", __file__, "--worker",
               "--mode", mode, "--zero", str(zero), "--steps", str(args.steps), "--width", str(args.width),
               "--layers", str(args.layers), "--batch", str(args.batch), "--bucket", str(bucket), "--out", out]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)),
               "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} zero={zero} failed:\n{proc.stderr[-4000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="deepspeed", choices=["deepspeed", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--zero", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--bucket", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--only", default="", help="comma-separated config names to run (default: all): "
                   "torch1,ds0x1,torch2,ds0x2,ds2x2,ds2x2b,ds0x4,ds2x4b; the default leaves out the 4-rank ones")
    p.add_argument("--runs", type=int, default=3, help="runs per configuration (the median is reported)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--width", type=int, default=2048, help="MLP width")
    p.add_argument("--layers", type=int, default=6, help="MLP layers")
    p.add_argument("--batch", type=int, default=32, help="micro-batch per rank")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    # name: (runner, ZeRO stage, ranks, ZeRO bucket size in elements; 0 = DeepSpeed's default 5e8)
    all_configs = {"torch1": ("torch", 0, 1, 0), "ds0x1": ("deepspeed", 0, 1, 0), "torch2": ("torch", 0, 2, 0),
                   "ds0x2": ("deepspeed", 0, 2, 0), "ds2x2": ("deepspeed", 2, 2, 0),
                   "ds2x2b": ("deepspeed", 2, 2, 2_000_000),
                   "ds0x4": ("deepspeed", 0, 4, 0), "ds2x4b": ("deepspeed", 2, 4, 2_000_000)}
    names = args.only.split(",") if args.only else [n for n in all_configs if not n.endswith("x4b") and n != "ds0x4"]
    configs = [all_configs[n] for n in names]
    results: dict[tuple, list[list[dict]]] = {c: [] for c in configs}
    for run in range(args.runs):  # interleaved, so that load from other processes hits every config alike
        for c in configs:
            results[c].append(launch(*c, args))
            print(f"run {run + 1}/{args.runs} {c}: {results[c][-1]}", file=sys.stderr)

    def med(c, key, reduce=max):
        return statistics.median(reduce(r[key] for r in ranks) for ranks in results[c])

    params = results[configs[0]][0][0]["params"]
    print(json.dumps({"args": vars(args), "results": [[list(c), results[c]] for c in configs]}), file=sys.stderr)
    print(f"\nMLP {args.layers} x {args.width}^2 ({params / 1e6:.1f}M params, fp32, AdamW), micro-batch {args.batch}, "
          f"{args.steps} timed steps, median of {args.runs} runs\n")
    print("| runner | ranks | ZeRO (buckets) | step time (s) | peak RSS per rank (MB) | RSS before model (MB) "
          "| peak - before (MB) | RSS after training - before (MB) | live tensors after training (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in configs:
        peak, before = med(c, "maxrss_mb"), med(c, "rss_before_mb")
        runner = "DeepSpeed engine" if c[0] == "deepspeed" else "bare torch" + (" DDP" if c[2] > 1 else "")
        zero = f"{c[1]} ({c[3]:.0e})" if c[3] else (str(c[1]) if c[0] == "deepspeed" else "-")
        end = med(c, "rss_end_mb") - before if "rss_end_mb" in results[c][0][0] else float("nan")
        live = med(c, "live_tensors_mb") if "live_tensors_mb" in results[c][0][0] else float("nan")
        print(f"| {runner} | {c[2]} | {zero} | {med(c, 'step_s'):.3f} | {peak:.0f} | {before:.0f} | {peak - before:.0f} "
              f"| {end:.0f} | {live:.0f} |")
    have = set(configs)
    for n in (2, 4):
        z0 = ("deepspeed", 0, n, 0)
        for z2 in (("deepspeed", 2, n, 0), ("deepspeed", 2, n, 2_000_000)):
            if z0 in have and z2 in have:
                state = {c: med(c, "maxrss_mb") - med(c, "rss_before_mb") for c in (z0, z2)}
                end = {c: med(c, "rss_end_mb") - med(c, "rss_before_mb") for c in (z0, z2)}
                print(f"\nZeRO-2{' (small buckets)' if z2[3] else ''} / ZeRO-0, {n} ranks: per-rank peak RSS "
                      f"{med(z2, 'maxrss_mb') / med(z0, 'maxrss_mb'):.2f}; peak training state {state[z2] / state[z0]:.2f}; "
                      f"training state after the steps {end[z2] / end[z0]:.2f}; live tensors "
                      f"{med(z2, 'live_tensors_mb') / med(z0, 'live_tensors_mb'):.2f}")
    for n in (1, 2):
        ds, pt = ("deepspeed", 0, n, 0), ("torch", 0, n, 0)
        if ds in have and pt in have:
            print(f"DeepSpeed ZeRO-0 / bare torch step time ({n} rank{'s' if n > 1 else ''}): "
                  f"{med(ds, 'step_s') / med(pt, 'step_s'):.2f}")


if __name__ == "__main__":
    main()
