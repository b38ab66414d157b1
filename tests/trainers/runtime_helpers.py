"""Helpers for stage-runtime tests: tiny PartWorld shard datasets, stage specs, a torchrun launcher (CPU, gloo)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from contract.io import free_port  # noqa: F401  (re-exported for the tests)
from contract.spec import StageSpec
from trainers.data.partworld import PartWorldConfig, category_table, generate, part_category_table
from trainers.data.shards import write_dataset

REPO = Path(__file__).resolve().parents[2]
TINY_WORLD = PartWorldConfig(image_size=32, num_classes=3, num_part_types=4, min_parts=1, max_parts=2,
                             max_instances=2, min_object_area=16, max_distractors=0)


def write_partworld(out_dir: Path, split: str, count: int, shard_size: int) -> Path:
    """A tiny PartWorld split (32 px, 3 classes) written as shards."""
    write_dataset(generate(TINY_WORLD, split, 0, count), out_dir, name="tiny-partworld", split=split,
                  categories=category_table(TINY_WORLD),
                  part_categories=part_category_table(TINY_WORLD) if split == "eval" else None, shard_size=shard_size)
    return out_dir


def make_spec(workdir: Path, data: dict[str, Path], *, params: dict | None = None, deepspeed: dict | None = None,
              mlflow_uri: str = "sqlite:///unused.db", run_id: str | None = None, nproc: int = 2) -> StageSpec:
    return StageSpec.model_validate({
        "stage": "fit-objects", "name": "test-fit-objects",
        "inputs": {"datasets": {k: {"path": str(v)} for k, v in data.items()}},
        "outputs": {"workdir": str(workdir)},
        "params": {"steps": 6, "lr": 0.01, "image_size": 32, "width": 16, "checkpoint_every": 2, **(params or {})},
        "resources": {"nproc_per_node": nproc, "deepspeed": {"train_micro_batch_size_per_gpu": 4, **(deepspeed or {})}},
        "tracking": {"mlflow_uri": mlflow_uri, "run_id": run_id},
    })


def torchrun_cmd(spec: StageSpec, nproc: int = 2) -> tuple[list[str], dict]:
    """The command the training operator's pod runs, with the spec in SELFTRAIN_SPEC."""
    env = {**os.environ, "SELFTRAIN_SPEC": spec.to_json(), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
           f"--master-port={free_port()}", "-m", "trainers", spec.stage, "--spec", "env:SELFTRAIN_SPEC"]
    return cmd, env


def run_stage(spec: StageSpec, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd, env = torchrun_cmd(spec, nproc)
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stage failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc
