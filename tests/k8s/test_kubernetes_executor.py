"""The kubernetes executor against a real control plane: training operator v1.9.3 PyTorchJobs, kwok pods.

Pod behaviours come from the tests/cluster kwok rules (label ``selftrain.test/behaviour``,
annotation ``selftrain.test/run-duration``); kwok pods have no container logs.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from executor_helpers import RecordingBackend, executor, jobs, stage_job
from pipelines.config import KubernetesConfig
from pipelines.executors import StageFailed, make_executor
from pipelines.executors.kubernetes import (
    ATTEMPT,
    CrdMissing,
    Forbidden,
    ImagePullFailed,
    JobConflict,
    KubernetesExecutor,
    PendingTimeout,
    PyTorchJobBackend,
    StageTimeout,
)

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]


# -- helpers ---------------------------------------------------------------------------------------
@pytest.fixture
def namespace(cluster):
    """A fresh namespace ``exec-test-<id>``, created and deleted as admin."""
    ns = cluster.new_namespace("exec-test")
    yield ns
    cluster.delete_namespace(ns)


# -- success, restarts, backoff --------------------------------------------------------------------
def test_a_succeeding_job_returns_its_replicas_and_keeps_a_log_per_replica(cluster, namespace, tmp_path):
    job, cfg = stage_job(namespace, "ok")
    lines: list[str] = []
    result = executor(cluster, cfg, lines=lines).run(job, tmp_path / "logs")

    assert result.attempts == 1
    assert [r.replica for r in result.replicas] == ["master-0", "worker-0"]
    assert result.replicas[0].exit_code == 0
    for r in ("master-0", "worker-0"):
        text = (tmp_path / "logs" / f"{r}.log").read_text()
        assert text.startswith(f"===== attempt 1: pod {job['metadata']['name']}-{r} =====")
        assert "no log for pod" in text  # kwok pods have no container logs: noted, not an error
    assert any(line.startswith("[master-0] (no log for pod") for line in lines)
    assert any(": Succeeded:" in line or "] Succeeded:" in line for line in lines)
    assert jobs(cluster, namespace) == []  # cleanup on-success deleted it


def test_make_executor_builds_the_kubernetes_executor(cluster):
    ex = make_executor("kubernetes", config=KubernetesConfig(namespace="x"), kubeconfig=str(cluster.admin))
    assert isinstance(ex, KubernetesExecutor) and ex.config.namespace == "x"


def test_a_failed_replica_restarts_the_whole_group(cluster, namespace, tmp_path):
    # attempt 1: the Master fails while the Worker runs; attempt 2 succeeds
    job, cfg = stage_job(namespace, "flaky", master="fail", worker="hang", restart_policy="OnFailure", backoff_limit=2, cleanup="never")
    backend = RecordingBackend(kubeconfig=str(cluster.admin), succeed_from_attempt=2)
    result = executor(cluster, cfg, backend=backend).run(job, tmp_path / "logs")

    assert result.attempts == 2
    # the operator never restarts a replica on its own: every replica is Never, no backoffLimit
    for submitted in backend.submitted:
        assert {rs["restartPolicy"] for rs in submitted["spec"]["pytorchReplicaSpecs"].values()} == {"Never"}
        assert "backoffLimit" not in submitted["spec"]["runPolicy"]
    first, second = backend.pods_seen.values()
    assert set(first) == set(second) == {"master-0", "worker-0"}
    assert not set(first.values()) & set(second.values())  # the running worker was replaced too, not only the failed master
    (kept,) = jobs(cluster, namespace)
    assert kept["metadata"]["annotations"][ATTEMPT] == "2"
    assert any(c["type"] == "Succeeded" and c["status"] == "True" for c in kept["status"]["conditions"])
    # one log section per attempt (the failed master's pod stays; cleanPodPolicy Running removes a running worker's)
    assert (tmp_path / "logs" / "master-0.log").read_text().count("===== attempt") == 2


def test_backoff_exhausted_fails_the_stage_with_its_attempts_and_keeps_the_failed_job(cluster, namespace, tmp_path):
    job, cfg = stage_job(namespace, "broken", master="fail", worker="hang", restart_policy="OnFailure", backoff_limit=1)
    with pytest.raises(StageFailed) as e:
        executor(cluster, cfg).run(job, tmp_path / "logs")

    assert e.value.attempts == 2
    assert "failed after 2 attempt(s): backoffLimit=1" in str(e.value)
    by_name = {r.replica: r for r in e.value.replicas}
    assert by_name["master-0"].exit_code == 1 and not by_name["master-0"].stopped
    assert by_name["worker-0"].stopped
    (kept,) = jobs(cluster, namespace)  # cleanup on-success keeps the failed job for debugging ...
    assert any(c["type"] == "Failed" and c["status"] == "True" for c in kept["status"]["conditions"])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # ... with its failed pod, but stops the replicas still running
        pods = cluster.get("-n", namespace, "pods")["items"]
        if [p["metadata"]["name"] for p in pods] == [f"{job['metadata']['name']}-master-0"]:
            break
        time.sleep(0.3)
    assert [p["metadata"]["name"] for p in pods] == [f"{job['metadata']['name']}-master-0"]


@pytest.mark.parametrize("exit_code, attempts", [(1, 1), (137, 3)])
def test_exit_code_policy_restarts_only_on_retryable_exit_codes(cluster, namespace, tmp_path, exit_code, attempts):
    job, cfg = stage_job(namespace, f"exit{exit_code}", master="fail", replicas=1, restart_policy="ExitCode", backoff_limit=2, cleanup="always")
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["annotations"]["selftrain.test/exit-code"] = str(exit_code)
    with pytest.raises(StageFailed) as e:
        executor(cluster, cfg).run(job, tmp_path / "logs")
    assert e.value.attempts == attempts
    assert e.value.replicas[0].exit_code == exit_code
    assert jobs(cluster, namespace) == []  # cleanup always


# -- clear errors ----------------------------------------------------------------------------------
def test_a_pod_pending_past_the_deadline_is_a_clear_error(cluster, namespace, tmp_path):
    job, cfg = stage_job(namespace, "unschedulable", node_selector={"selftrain.test/no-such-node": "true"}, unschedulable_timeout_seconds=3)
    with pytest.raises(PendingTimeout) as e:
        executor(cluster, cfg).run(job, tmp_path / "logs")
    msg = str(e.value)
    assert f"pod {job['metadata']['name']}-" in msg and "still Pending, unschedulable" in msg
    assert "(unschedulable_timeout_seconds=3)" in msg
    assert "node affinity/selector" in msg  # the scheduler's reason
    assert "nodeSelector" in msg  # what to check
    assert jobs(cluster, namespace) == []  # the job it gave up on does not hold a place in the queue


def test_an_image_that_cannot_be_pulled_is_a_clear_error_naming_pod_and_image(cluster, namespace, tmp_path):
    job, cfg = stage_job(namespace, "noimage", master="image-pull-error", worker="image-pull-error", image="registry.invalid/selftrain:nope",
                          image_pull_timeout_seconds=3)
    with pytest.raises(ImagePullFailed) as e:
        executor(cluster, cfg).run(job, tmp_path / "logs")
    msg = str(e.value)
    assert "registry.invalid/selftrain:nope" in msg
    assert f"pod {job['metadata']['name']}-master-0" in msg or f"pod {job['metadata']['name']}-worker-0" in msg
    assert "ErrImagePull" in msg or "ImagePullBackOff" in msg
    assert "imagePullSecrets" in msg and "image_pull_timeout_seconds=3" in msg


@pytest.mark.parametrize("group, version", [("kubeflow.org", "v9"), ("training.selftrain.invalid", "v1")])
def test_a_missing_crd_is_a_clear_error(cluster, namespace, tmp_path, group, version):
    job, cfg = stage_job(namespace, "nocrd")
    backend = PyTorchJobBackend(kubeconfig=str(cluster.admin), group=group, version=version)
    with pytest.raises(CrdMissing) as e:
        executor(cluster, cfg, backend=backend).run(job, tmp_path / "logs")
    assert f"pytorchjobs.{group}/{version}" in str(e.value)
    assert "training operator" in str(e.value)


def test_rbac_forbidden_names_the_user_verb_resource_and_namespace(cluster, namespace, tmp_path):
    job, cfg = stage_job(namespace, "nobody")
    with pytest.raises(Forbidden) as e:
        executor(cluster, cfg, kubeconfig=cluster.user).run(job, tmp_path / "logs")
    msg = str(e.value)
    assert "selftrain-user" in msg and f"namespace {namespace}" in msg
    assert "create pytorchjobs.kubeflow.org" in msg
    assert "kubectl" in msg and "rolebinding" in msg  # what to do

    # PyTorchJobs granted, pods not: the missing verb is named
    cluster.kubectl("-n", namespace, "create", "role", "pj", "--verb=*", "--resource=pytorchjobs.kubeflow.org")
    cluster.kubectl("-n", namespace, "create", "rolebinding", "pj", "--role=pj", "--user=selftrain-user")
    with pytest.raises(Forbidden) as e:
        executor(cluster, cfg, kubeconfig=cluster.user).run(job, tmp_path / "logs")
    assert "to list pods in namespace" in str(e.value) and "create pytorchjobs" not in str(e.value)
    assert jobs(cluster, namespace) == []  # checked before anything was created


def test_the_overall_timeout_stops_the_stage(cluster, namespace, tmp_path):
    job, cfg = stage_job(namespace, "slow", master="hang", worker="hang", timeout_seconds=3)
    t0 = time.monotonic()
    with pytest.raises(StageTimeout) as e:
        executor(cluster, cfg).run(job, tmp_path / "logs")
    assert time.monotonic() - t0 < 30
    assert "timeout_seconds=3" in str(e.value) and "Running" in str(e.value)
    assert jobs(cluster, namespace) == []


def test_a_running_job_of_other_inputs_is_a_conflict(cluster, namespace, tmp_path):
    other, cfg = stage_job(namespace, "same", master="hang", worker="hang")
    other["metadata"]["annotations"]["selftrain.io/fingerprint"] = "0" * 64
    cluster.kubectl("create", "-f", "-", input=json.dumps(other))
    job, cfg = stage_job(namespace, "same")
    with pytest.raises(JobConflict) as e:
        executor(cluster, cfg).run(job, tmp_path / "logs")
    assert "other inputs or params" in str(e.value) and "kubectl" in str(e.value)
    (still,) = jobs(cluster, namespace)
    assert still["metadata"]["annotations"]["selftrain.io/fingerprint"] == "0" * 64  # untouched


# -- re-attach -------------------------------------------------------------------------------------
DRIVER = """
import json, sys
from pipelines.config import KubernetesConfig
from pipelines.executors.kubernetes import KubernetesExecutor
job, cfg, kubeconfig, logs = sys.argv[1:5]
KubernetesExecutor(KubernetesConfig.model_validate_json(open(cfg).read()), kubeconfig=kubeconfig, poll_seconds=0.3).run(json.load(open(job)), logs)
"""


def test_a_killed_driver_re_attaches_to_its_job_and_sees_it_to_completion(cluster, namespace, tmp_path):
    job, cfg = stage_job(namespace, "reattach", duration="8s", cleanup="never")
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "job.json"), str(tmp_path / "cfg.json"),
                               str(cluster.admin), str(tmp_path / "logs")], cwd=REPO, env=cluster.env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        uid = None
        while time.monotonic() < deadline and uid is None:
            for j in jobs(cluster, namespace):
                if any(c["type"] == "Running" and c["status"] == "True" for c in (j.get("status") or {}).get("conditions") or []):
                    uid = j["metadata"]["uid"]
            time.sleep(0.3)
        assert uid, "the driver's job never ran"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL

    lines: list[str] = []
    result = executor(cluster, cfg, lines=lines).run(job, tmp_path / "logs")
    assert result.attempts == 1 and result.replicas[0].exit_code == 0
    assert any("re-attaching" in line and uid in line for line in lines)
    (only,) = jobs(cluster, namespace)  # no second job
    assert only["metadata"]["uid"] == uid
    assert any(c["type"] == "Succeeded" and c["status"] == "True" for c in only["status"]["conditions"])

    # once more: a finished job of the same stage and inputs is attached to, not run again
    again = executor(cluster, cfg, lines=lines).run(job, tmp_path / "logs")
    assert again.attempts == 1
    (only,) = jobs(cluster, namespace)
    assert only["metadata"]["uid"] == uid


def test_active_deadline_fails_the_stage_without_restarts(cluster, namespace, tmp_path):
    job, cfg = stage_job(namespace, "deadline", master="hang", worker="hang", active_deadline_seconds=2, backoff_limit=3)
    with pytest.raises(StageFailed) as e:
        executor(cluster, cfg).run(job, tmp_path / "logs")
    assert e.value.attempts == 1
    assert "activeDeadlineSeconds=2 passed" in str(e.value)


class DiesBeforeRestart(PyTorchJobBackend):
    """A driver that dies right after its first attempt failed, before the group restart."""

    def delete(self, namespace, name, wait=0.0):
        raise SystemExit("driver killed")


def test_a_driver_killed_between_attempts_goes_on_with_the_next_attempt(cluster, namespace, tmp_path):
    job, cfg = stage_job(namespace, "between", master="fail", worker="hang", restart_policy="OnFailure", backoff_limit=2, cleanup="never")
    with pytest.raises(SystemExit):
        executor(cluster, cfg, backend=DiesBeforeRestart(kubeconfig=str(cluster.admin))).run(job, tmp_path / "logs")
    (failed,) = jobs(cluster, namespace)
    assert failed["metadata"]["annotations"][ATTEMPT] == "1"

    lines: list[str] = []
    backend = RecordingBackend(kubeconfig=str(cluster.admin), succeed_from_attempt=2)
    result = executor(cluster, cfg, backend=backend, lines=lines).run(job, tmp_path / "logs")
    assert result.attempts == 2 and result.replicas[0].exit_code == 0
    assert any("restarting the whole group" in line for line in lines)
    (done,) = jobs(cluster, namespace)
    assert done["metadata"]["uid"] != failed["metadata"]["uid"]


def test_a_re_run_after_a_stage_failed_for_good_starts_over(cluster, namespace, tmp_path):
    job, cfg = stage_job(namespace, "again", master="fail", replicas=1, restart_policy="OnFailure", backoff_limit=0)
    with pytest.raises(StageFailed):
        executor(cluster, cfg).run(job, tmp_path / "logs")
    (kept,) = jobs(cluster, namespace)  # on-success keeps the failed job

    lines: list[str] = []
    backend = RecordingBackend(kubeconfig=str(cluster.admin), succeed_from_attempt=1)  # the cause was fixed
    result = executor(cluster, cfg, backend=backend, lines=lines).run(job, tmp_path / "logs")
    assert result.attempts == 1
    assert any("failed for good: starting over" in line for line in lines)
    assert jobs(cluster, namespace) == []
