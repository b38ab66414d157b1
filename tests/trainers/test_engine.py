"""The training engine: DeepSpeed ZeRO on CPU ranks (gloo) under torchrun, checkpoint/resume, export, metrics."""
from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time

import psutil
import pytest
import torch

from contract.spec import StageSpec
from contract.stages.training import TrainParams
from trainers.engine import ShardStream, deepspeed_config, lr_lambda
from trainers.models.object_seg import ObjectSegNet

from runtime_helpers import REPO, make_spec, run_stage, torchrun_cmd


def _mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("engine-test"))
    return uri, run.info.run_id, client


def _load_fresh(path) -> ObjectSegNet:
    model = ObjectSegNet(num_classes=3, width=16)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model


# -- configuration (fast) -----------------------------------------------------------------------
def test_deepspeed_overrides_merge_over_defaults():
    spec = StageSpec(stage="fit-objects", name="x", outputs={"workdir": "/tmp/x"},
                     resources={"deepspeed": {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}})
    cfg = deepspeed_config(spec, gpu=False)
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 1.0  # default kept
    assert cfg["bf16"] == {"enabled": False}


def test_bf16_on_gpu_fp32_on_cpu():
    spec = StageSpec(stage="fit-objects", name="x", outputs={"workdir": "/tmp/x"},
                     resources={"deepspeed": {"bf16": {"enabled": True}}})
    assert deepspeed_config(spec, gpu=True)["bf16"]["enabled"] is True
    assert deepspeed_config(spec, gpu=False)["bf16"]["enabled"] is False


def test_lr_schedule_warms_up_then_decays_to_min_ratio():
    f = lr_lambda(TrainParams(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) < f(20)


def _keys(path, rank, epoch=0, skip=None):
    return [key for _, key in ShardStream(str(path), rank, 2, epoch, 0, skip, transform=lambda s: s[0])]


def test_shard_stream_resumes_after_the_consumed_samples(tiny_partworld):
    full = _keys(tiny_partworld["train"], rank=0)
    assert _keys(tiny_partworld["train"], rank=0, skip=[5]) == full[5:]


def test_ranks_trade_shares_every_epoch_and_cover_the_dataset(tiny_partworld):
    epoch0 = [_keys(tiny_partworld["train"], r) for r in (0, 1)]
    assert _keys(tiny_partworld["train"], 0, epoch=1) == epoch0[1]
    assert sorted(epoch0[0] + epoch0[1]) == sorted(set(epoch0[0]) | set(epoch0[1])) and len(epoch0[0] + epoch0[1]) == 64


# -- multi-rank runs (slow) ---------------------------------------------------------------------
@pytest.mark.slow
def test_zero2_two_ranks_trains_and_exports_loadable_weights(tmp_path, tiny_partworld):
    uri, run_id, client = _mlflow_run(tmp_path)
    spec = make_spec(tmp_path / "work", tiny_partworld, params={"steps": 12, "lr": 0.02},
                     deepspeed={"zero_optimization": {"stage": 2}}, mlflow_uri=uri, run_id=run_id)
    run_stage(spec)

    result = json.loads((tmp_path / "work" / "result.json").read_text())
    assert result["status"] == "succeeded" and result["stage"] == "fit-objects" and result["steps"] == 12
    assert result["model_path"] == str(tmp_path / "work" / "model.pt")
    assert 0.0 <= result["metrics"]["eval/miou"] <= 1.0
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the loss goes down
    _load_fresh(result["model_path"])
    engine = json.loads((tmp_path / "work" / "engine.json").read_text())["engine"]
    assert engine["zero_stage"] == 2 and engine["world_size"] == 2 and engine["backend"] == "gloo"


@pytest.mark.slow
def test_zero3_export_gathers_full_weights(tmp_path, tiny_partworld):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    spec = make_spec(tmp_path / "work", {"train": tiny_partworld["train"]}, params={"steps": 4},
                     deepspeed={"zero_optimization": {"stage": 3}})
    run_stage(spec)

    model = _load_fresh(tmp_path / "work" / "model.pt")
    exported = model.state_dict()
    assert all(v.numel() > 0 for v in exported.values())
    ckpt = tmp_path / "work" / "checkpoints"
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=(ckpt / "latest").read_text())
    for name, value in consolidated.items():  # DeepSpeed's own consolidation of the last checkpoint agrees
        torch.testing.assert_close(exported[name], value.float(), rtol=0, atol=0)


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint_at_the_same_data_position(tmp_path, tiny_partworld):
    train = {"train": tiny_partworld["train"]}
    params = {"steps": 40, "checkpoint_every": 4}
    # 64 samples, 2 ranks, micro-batch 4: 8 steps an epoch, so the kill lands mid-epoch
    spec = make_spec(tmp_path / "killed", train, params=params)
    cmd, env = torchrun_cmd(spec)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    ranks[-1].send_signal(signal.SIGKILL)  # one rank dies mid-run; torchrun tears the others down
    assert proc.wait(timeout=120) != 0
    for p in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    assert not (tmp_path / "killed" / "result.json").exists(), "the run finished before it could be killed"

    resumed = run_stage(spec)
    m = re.search(r"resumed from step\d+ at step (\d+)", resumed.stderr)
    assert m, resumed.stderr[-3000:]
    assert 0 < int(m.group(1)) < 40  # continued from the checkpoint, not from 0
    result = json.loads((tmp_path / "killed" / "result.json").read_text())
    assert result["steps"] == 40

    # an uninterrupted run sees the same samples in the same order: the same weights
    run_stage(make_spec(tmp_path / "straight", train, params=params))
    resumed_weights = _load_fresh(result["model_path"]).state_dict()
    straight_weights = _load_fresh(tmp_path / "straight" / "model.pt").state_dict()
    for name in straight_weights:
        torch.testing.assert_close(resumed_weights[name], straight_weights[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_accumulation_and_clipping_reach_deepspeed(tmp_path, tiny_partworld):
    spec = make_spec(tmp_path / "work", {"train": tiny_partworld["train"]}, params={"steps": 3},
                     deepspeed={"gradient_accumulation_steps": 2, "gradient_clipping": 0.25})
    run_stage(spec)

    engine = json.loads((tmp_path / "work" / "engine.json").read_text())["engine"]
    assert engine["gradient_accumulation_steps"] == 2
    assert engine["gradient_clipping"] == 0.25
    assert engine["train_batch_size"] == 4 * 2 * 2  # micro-batch x accumulation x ranks
    assert json.loads((tmp_path / "work" / "result.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_only_rank0_logs_metrics_to_mlflow(tmp_path, tiny_partworld):
    uri, run_id, client = _mlflow_run(tmp_path)
    spec = make_spec(tmp_path / "work", {"train": tiny_partworld["train"]}, params={"steps": 6, "log_every": 2},
                     mlflow_uri=uri, run_id=run_id)
    run_stage(spec)

    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [2, 4, 6]  # steps / log_every records, none from rank 1
    assert {"train/loss", "train/lr", "train/step_time_s"} <= set(client.get_run(run_id).data.metrics)


# -- a non-finite loss (issue 16 item 5; fast: a stand-in engine on one rank) ----------------------------
class _OneParamEngine:
    """What ``_step`` calls on a DeepSpeed engine: backward, step, the module, the global grad norm."""

    def __init__(self):
        self.module = torch.nn.Linear(1, 1)
        self.device = torch.device("cpu")
        self.backwards, self.steps = [], 0

    def backward(self, loss):
        self.backwards.append(float(loss.detach()))
        loss.backward()

    def step(self):
        self.steps += 1

    def get_global_grad_norm(self):
        return None


def _run_step(losses, nonfinite, accum=1):
    from trainers.comm import Dist
    from trainers.engine import _Data, _Position, _step

    engine = _OneParamEngine()
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(engine.module.parameters(), lr=1.0), lambda s: 1.0)
    batches = iter([(0, 1, v) for v in losses])
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    pos = _Position(step=4, epoch=0, epoch_step=4, consumed=[0])

    def loss_fn(engine, value):
        return engine.module.weight.sum() * 0 + value, {}

    metrics = _step(engine, scheduler, loss_fn, batches, d, _Data("x", 1, accum, 10, 0), pos, nonfinite)
    return engine, metrics, pos


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_loss_stops_training_naming_the_step(bad):
    from trainers.engine import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at step 5 \(epoch 0, step 5 of the epoch"):
        _run_step([bad], "stop")


def test_a_non_finite_loss_is_skipped_when_the_params_say_so():
    engine, metrics, pos = _run_step([float("nan")], "skip")
    assert engine.backwards == [] and engine.steps == 0  # no update at all
    assert metrics["skipped"] == 1.0 and "loss" not in metrics and pos.step == 5  # the data position moves on
    engine, metrics, _ = _run_step([1.0, float("inf")], "skip", accum=2)  # with accumulation: a zero contribution
    assert engine.backwards == [1.0, 0.0] and engine.steps == 2 and metrics["loss"] == pytest.approx(1.0)
    engine, metrics, _ = _run_step([2.0], "skip")
    assert engine.backwards == [2.0] and metrics["skipped"] == 0.0 and metrics["loss"] == 2.0


def test_nonfinite_loss_param_defaults_to_stop():
    assert TrainParams().nonfinite_loss == "stop"
    with pytest.raises(ValueError):
        TrainParams(nonfinite_loss="ignore")
