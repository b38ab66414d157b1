"""Local executor: a rendered PyTorchJob runs as local process groups with the operator's environment."""
from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from control_helpers import make_config, with_program
from pipelines import render
from pipelines.executors import StageFailed
from pipelines.executors.local import LocalExecutor, expand

pytestmark = pytest.mark.slow


def _job(tmp_path, replicas=2, nproc=2, backoff_limit=0, restart_policy="OnFailure", **env):
    cfg = make_config(tmp_path, executor={"kubernetes": {"backoff_limit": backoff_limit, "restart_policy": restart_policy}})
    spec = cfg.new_stage_spec("r1", "fake", resources={"replicas": replicas, "nproc_per_node": nproc})
    job = render.render_stage(spec, cfg.executor.kubernetes, run="r1")
    out = tmp_path / "out"
    return with_program(job, {"OUT": str(out), **{k: str(v) for k, v in env.items()}}), out, spec


def _records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _executor():
    lines: list[str] = []
    return LocalExecutor(grace_seconds=3, echo=lines.append), lines


def test_each_replica_gets_the_operator_environment(tmp_path):
    job, out, spec = _job(tmp_path, replicas=3, nproc=2)
    ex, lines = _executor()
    result = ex.run(job)
    assert result.attempts == 1 and [r.exit_code for r in result.replicas] == [0, 0, 0]
    recs = _records(out)
    assert sorted(recs) == ["1-0", "1-1", "1-2"]
    port = recs["1-0"]["env"]["MASTER_PORT"]
    for node in range(3):
        env = recs[f"1-{node}"]["env"]
        assert {k: env[k] for k in ("WORLD_SIZE", "RANK", "PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE")} == {
            "WORLD_SIZE": "6", "RANK": str(node), "PET_NNODES": "3", "PET_NODE_RANK": str(node), "PET_NPROC_PER_NODE": "2"}
        assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "127.0.0.1"
        assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == port
        assert env["CUDA_VISIBLE_DEVICES"] == ""  # no nvidia.com/gpu limit: no GPU, gloo
        assert json.loads(env["SELFTRAIN_SPEC"])["stage"] == "fake"  # the container's own env
        assert recs[f"1-{node}"]["argv"] == [f"--master=127.0.0.1:{port}"]  # $(VAR) expanded like the kubelet
    assert any(line.startswith("[worker-1] rank 2 attempt 1 up") for line in lines)
    logs = Path(spec.outputs.workdir) / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["master-0.log", "worker-0.log", "worker-1.log"]
    assert "rank 1 done" in (logs / "worker-0.log").read_text()


def test_a_failing_rank_stops_the_others_and_leaves_no_process(tmp_path):
    job, out, _ = _job(tmp_path, FAIL_NODE="1:3", SLEEP=120, SPAWN_CHILD=1)
    ex, _ = _executor()
    with pytest.raises(StageFailed) as e:
        ex.run(job)
    msg = str(e.value)
    assert "worker-0: exit code 3" in msg and "master-0: stopped by the executor" in msg
    assert "rank 1 failing with 3" in msg  # the failed replica's last log lines
    recs = _records(out)
    pids = [r["pid"] for r in recs.values()] + [r["child_pid"] for r in recs.values()]
    assert len(pids) == 4 and not [p for p in pids if _alive(p)]


def test_backoff_limit_restarts_the_whole_group(tmp_path):
    job, out, _ = _job(tmp_path, backoff_limit=2, FAIL_NODE="1:1", FAIL_ATTEMPTS=1)
    ex, lines = _executor()
    result = ex.run(job)
    assert result.attempts == 2
    assert sorted(_records(out)) == ["1-0", "1-1", "2-0", "2-1"]  # both replicas started again
    assert any("restarting the whole group" in line for line in lines)


def test_the_stage_fails_when_restarts_are_used_up(tmp_path):
    job, out, _ = _job(tmp_path, backoff_limit=1, FAIL_NODE="0:2")
    ex, _ = _executor()
    with pytest.raises(StageFailed, match=r"failed after 2 attempt\(s\): backoffLimit=1"):
        ex.run(job)
    assert len(_records(out)) == 4


def test_exit_code_policy_does_not_retry_a_permanent_error(tmp_path):
    job, out, _ = _job(tmp_path, backoff_limit=3, restart_policy="ExitCode", FAIL_NODE="1:1")
    ex, _ = _executor()
    with pytest.raises(StageFailed, match=r"after 1 attempt"):
        ex.run(job)


def test_a_manifest_file_runs_unchanged(tmp_path):
    job, out, _ = _job(tmp_path, replicas=2, nproc=1)
    path = tmp_path / "00-fake.yaml"
    path.write_text(render.to_yaml(job))
    ex, _ = _executor()
    assert ex.run(render.load_manifest(path), log_dir=tmp_path / "logs").attempts == 1
    assert _records(out)["1-1"]["env"]["WORLD_SIZE"] == "2"


def test_kubelet_variable_expansion():
    env = {"A": "1", "B": "x"}
    assert expand("$(A)-$(B)-$(C)-$$(A)", env) == "1-x-$(C)-$(A)"


def test_active_deadline_fails_a_stage_that_runs_too_long(tmp_path):
    job, out, _ = _job(tmp_path, replicas=1, nproc=1, backoff_limit=3, SLEEP=120)
    job["spec"]["runPolicy"]["activeDeadlineSeconds"] = 2
    ex, _ = _executor()
    with pytest.raises(StageFailed, match=r"after 1 attempt\(s\): activeDeadlineSeconds=2 passed"):
        ex.run(job)
    assert not _alive(_records(out)["1-0"]["pid"])


def test_each_process_gets_its_share_of_the_cores(tmp_path, monkeypatch):
    """A job alone gets every core (capped at its own OMP_NUM_THREADS); a job started while another runs gets the
    cores left per process, at least 1; the user's exported value wins. (Two stages at once on 2 cores, each with
    a thread per core, ran 18x slower than one alone.)"""
    import threading
    import time

    from pipelines.executors.local import local_cpus

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    first, out1, _ = _job(tmp_path / "a", replicas=1, nproc=1, SLEEP=6)
    second, out2, _ = _job(tmp_path / "b", replicas=1, nproc=1)
    rendered = next(e["value"] for e in first["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
                    if e["name"] == "OMP_NUM_THREADS")
    assert rendered == "2"  # the default CPU request "2" for one process per replica
    ex, _ = _executor()
    t = threading.Thread(target=ex.run, args=(first,))
    t.start()
    deadline = time.monotonic() + 60
    while not list(out1.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    ex.run(second)  # while the first one sleeps
    t.join(60)
    assert _records(out1)["1-0"]["env"]["OMP_NUM_THREADS"] == str(max(1, min(2, local_cpus())))
    assert _records(out2)["1-0"]["env"]["OMP_NUM_THREADS"] == str(max(1, min(2, local_cpus() // 2)))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    ex.run(second)
    assert _records(out2)["2-0"]["env"]["OMP_NUM_THREADS"] == "7"


def test_stages_the_runner_starts_together_share_the_cores_from_the_first(tmp_path, monkeypatch):
    """Of two stages started together the first must not take every core because it reached the executor first: the
    runner tells the executor how many run side by side before it starts them."""
    from pipelines.executors.local import local_cpus
    from pipelines.runner import _schedule

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    told: list[int] = []
    specs = [type("S", (), {"name": n})() for n in ("a", "b", "c")]
    _schedule(specs, {"a": [], "b": [], "c": ["a"]}, 2, lambda s: s.name, {}, side_by_side=told.append)
    assert told[0] == 2 and set(told[1:]) <= {1, 2}  # a and b together; c once a is done
    ex, _ = _executor()
    ex.side_by_side = 2
    job, out, _ = _job(tmp_path / "a", replicas=1, nproc=1)
    ex.run(job)  # the first of two: nothing runs yet, half the cores all the same
    assert _records(out)["1-0"]["env"]["OMP_NUM_THREADS"] == str(max(1, min(2, local_cpus() // 2)))
    ex.side_by_side = 1
    ex.run(job)
    assert _records(out)["2-0"]["env"]["OMP_NUM_THREADS"] == str(max(1, min(2, local_cpus())))


def test_threads_per_process_reads_kubernetes_cpu_quantities():
    assert [render.threads_per_process(c, n) for c, n in (("2", 1), ("2", 2), ("500m", 1), ("7.5", 2), ("16", 3))] == [2, 1, 1, 3, 5]
    with pytest.raises(ValueError, match="resources.cpu 'lots'"):
        render.threads_per_process("lots", 1)


def test_a_world_of_one_runs_the_trainer_without_torchrun():
    """torchrun only for more than one process: a lone trainer joins its world of one from the launch variables."""
    from contract.spec import Outputs, StageSpec
    from pipelines.stage_job import SPEC_ENV, trainer_command

    spec = StageSpec(stage="fit-objects", name="fit", pipeline="p", params={}, outputs=Outputs(workdir="/tmp/w"))
    lone = trainer_command(spec, {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "1"})
    assert lone[1:] == ["-u", "-m", "trainers", "fit-objects", "--spec", f"env:{SPEC_ENV}"]
    for env in ({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1"}, {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2"}, {}):
        assert trainer_command(spec, env)[1:3] == ["-m", "torch.distributed.run"], env
