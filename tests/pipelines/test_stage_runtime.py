"""The real ``fit-objects`` trainer through the control plane: rendered PyTorchJob -> local executor -> torchrun.

ZeRO-2 on 2 CPU ranks (gloo) in one replica, and as Master + 1 Worker (two "nodes") with a rank
killed mid-run: the executor restarts the whole group (backoffLimit=1) and the trainer resumes
from its last checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from control_helpers import make_config
from pipelines.lineage import Lineage, resolve_model
from pipelines.runner import run_stages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def partworld(tmp_path_factory) -> dict[str, Path]:
    from trainers.data.partworld import PartWorldConfig, category_table, generate, part_category_table
    from trainers.data.shards import write_dataset

    world = PartWorldConfig(image_size=32, num_classes=3, num_part_types=4, min_parts=1, max_parts=2,
                            max_instances=2, min_object_area=16, max_distractors=0)
    root = tmp_path_factory.mktemp("partworld")
    out = {}
    for split, count, shard in (("train", 64, 16), ("eval", 16, 8)):
        write_dataset(generate(world, split, 0, count), root / split, name="tiny-partworld", split=split,
                      categories=category_table(world),
                      part_categories=part_category_table(world) if split == "eval" else None, shard_size=shard)
        out[split] = root / split
    return out


def _config(tmp_path, partworld, *, replicas=1, nproc=2, steps=6, checkpoint_every=2, backoff_limit=0):
    return make_config(
        tmp_path,
        stages=[{
            "stage": "fit-objects",
            "datasets": {"train": str(partworld["train"]), "eval": str(partworld["eval"])},
            "output_model": "objects",
            "params": {"steps": steps, "lr": 0.01, "image_size": 32, "width": 16, "checkpoint_every": checkpoint_every},
            "resources": {"replicas": replicas, "nproc_per_node": nproc,
                          "deepspeed": {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}},
        }],
        executor={"grace_seconds": 5, "kubernetes": {"backoff_limit": backoff_limit, "env": {"SELFTRAIN_PROGRESS": "0", "OMP_NUM_THREADS": "1"}}},
    )


def _check_model(cfg, outcome) -> None:
    """The registered version downloads and loads into the trainer's model."""
    import torch

    from trainers.stages.fit_objects import ObjectSegNet

    path = resolve_model(f"models:/objects/{outcome.model_version}", cfg.tracking_uri(), dst=Path(outcome.workdir) / "dl")
    state = torch.load(path, map_location="cpu")
    ObjectSegNet(num_classes=3, width=16).load_state_dict(state)


def _engine(outcome) -> dict:
    return json.loads((Path(outcome.workdir) / "engine.json").read_text())["engine"]


def test_zero2_on_two_cpu_ranks_in_one_replica(tmp_path, partworld):
    cfg = _config(tmp_path, partworld, replicas=1, nproc=2)
    (outcome,) = run_stages(cfg, cfg.stage_specs("r1"), "r1", echo=lambda s: None).stages
    assert outcome.status == "succeeded" and outcome.result["steps"] == 6
    engine = _engine(outcome)
    assert (engine["zero_stage"], engine["world_size"], engine["backend"]) == (2, 2, "gloo")
    run = Lineage(cfg.tracking_uri(), cfg.tracking.experiment).client.get_run(outcome.mlflow_run_id)
    assert "eval/miou" in run.data.metrics and "train/loss" in run.data.metrics
    _check_model(cfg, outcome)


def _rank_process(workdir: str, rank: str) -> psutil.Process | None:
    """The torchrun worker process of global rank ``rank`` of the stage writing ``workdir``."""
    for p in psutil.process_iter():
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if "LOCAL_RANK" in env and env.get("RANK") == rank and workdir in env.get("SELFTRAIN_SPEC", ""):
            return p
    return None


def test_a_killed_rank_restarts_the_group_which_resumes_from_its_checkpoint(tmp_path, partworld):
    steps = 20
    cfg = _config(tmp_path, partworld, replicas=2, nproc=1, steps=steps, checkpoint_every=4, backoff_limit=1)
    (spec,) = cfg.stage_specs("r1")
    latest = Path(spec.outputs.workdir) / "checkpoints" / "latest"
    box: dict = {}

    def run():
        try:
            box["result"] = run_stages(cfg, [spec], "r1", echo=lambda s: None)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    victim = None
    while t.is_alive() and victim is None:
        if latest.exists():
            victim = _rank_process(spec.outputs.workdir, "1")
        time.sleep(0.05)
    assert victim is not None, f"the stage ended before a checkpoint and a rank-1 process were seen: {box}"
    os.kill(victim.pid, signal.SIGKILL)
    t.join(timeout=600)
    assert "error" not in box, box.get("error")
    (outcome,) = box["result"].stages
    assert outcome.status == "succeeded" and outcome.result["steps"] == steps
    master_log = (Path(outcome.workdir) / "logs" / "master-0.log").read_text()
    assert "===== attempt 2 =====" in master_log
    second = master_log.split("===== attempt 2 =====", 1)[1]
    resumed = [line for line in second.splitlines() if "resumed from" in line]
    assert resumed, second[-3000:]
    step = int(resumed[0].split(" at step ")[1].split()[0])
    assert 0 < step < steps  # continued from the checkpoint, not from scratch
    # Master + 1 Worker are two "nodes" of one ZeRO-2 group, each with its own log
    assert (_engine(outcome)["world_size"], _engine(outcome)["zero_stage"]) == (2, 2)
    assert sorted(p.name for p in (Path(outcome.workdir) / "logs").glob("*.log")) == ["master-0.log", "worker-0.log"]
    _check_model(cfg, outcome)


@pytest.mark.gpu
def test_one_gpu_replica_trains_with_nccl(tmp_path, partworld):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cfg = _config(tmp_path, partworld, replicas=1, nproc=1)
    (spec,) = cfg.stage_specs("r1")
    spec.resources.gpus_per_replica = 1
    (outcome,) = run_stages(cfg, [spec], "r1", echo=lambda s: None).stages
    assert outcome.status == "succeeded" and _engine(outcome)["backend"] == "nccl"
    _check_model(cfg, outcome)
