"""Faults on a real control plane (issue 15 item 3, issue 16 item 8): the API server stopped and restarted, the
training operator restarted, a worker pod deleted, the executor's RBAC removed, all while a stage runs; a failed
stage leaves no running pods. Components are stopped and started by tests/cluster/component (real processes).
"""
from __future__ import annotations

import time

import pytest

from executor_helpers import (
    Background,
    RecordingBackend,
    component,
    condition,
    executor,
    jobs,
    restart_clients,
    stage_job,
    wait_running,
)
from pipelines.executors.kubernetes import ClusterError, Forbidden, PyTorchJobBackend

pytestmark = pytest.mark.cluster

# The API server is stopped this long here (CI); benchmarks/k8s_faults.py stops it for 30 s (issue 15's acceptance),
# which costs up to a minute more here: the controllers' reflectors back off up to 60 s before they reconnect.
API_OUTAGE_S = 10


@pytest.fixture
def namespace(cluster):
    ns = cluster.new_namespace("fault-test")
    yield ns
    cluster.delete_namespace(ns)


def test_an_api_server_outage_is_retried_through_or_reported_past_the_retry_budget(cluster, namespace, tmp_path):
    """Two stages through one outage of the real API server: one with a retry budget longer than the outage finishes;
    one with a 3 s budget fails naming the server, the budget and that its job may still run (it is not deleted)."""
    patient, cfg = stage_job(namespace, "patient", duration="4s", api_retry_seconds=120, request_timeout_seconds=5)
    brief, brief_cfg = stage_job(namespace, "brief", duration="60s", api_retry_seconds=3, request_timeout_seconds=2, cleanup="never")
    lines: list[str] = []
    bg = Background(executor(cluster, cfg, lines=lines), patient, tmp_path / "patient")
    bg_brief = Background(executor(cluster, brief_cfg), brief, tmp_path / "brief")
    wait_running(cluster, namespace, bg, names=[patient["metadata"]["name"], brief["metadata"]["name"]])
    component(cluster, "stop", "kube-apiserver")
    try:
        time.sleep(API_OUTAGE_S)
    finally:
        component(cluster, "start", "kube-apiserver")
        # the controllers' reflectors back off up to a minute before they reconnect (client-go): restart them
        # so that the cluster, not the executor, is quick again (benchmarks/k8s_faults.py leaves them be)
        restart_clients(cluster)
    result = bg.result()
    with pytest.raises(ClusterError) as e:
        bg_brief.result()
    assert result.attempts == 1 and result.replicas[0].exit_code == 0
    assert any("retrying for up to 120s (api_retry_seconds)" in line for line in lines)
    assert any("answered after" in line and "of retries" in line for line in lines)
    msg = str(e.value)
    assert "API server at https://127.0.0.1" in msg and "did not answer" in msg and "api_retry_seconds" in msg
    assert "may still be running: run the stage again to re-attach" in msg
    (left,) = jobs(cluster, namespace)  # the patient one was cleaned up on success; the other was not deleted blind
    assert left["metadata"]["name"] == brief["metadata"]["name"]


def test_a_stage_survives_a_training_operator_restart(cluster, namespace, tmp_path):
    job, cfg = stage_job(namespace, "operator", duration="4s", cleanup="never")
    bg = Background(executor(cluster, cfg), job, tmp_path / "logs")
    running = wait_running(cluster, namespace, bg)
    component(cluster, "stop", "training-operator")
    try:
        time.sleep(1)
    finally:
        component(cluster, "start", "training-operator")
    result = bg.result()
    assert result.attempts == 1 and result.replicas[0].exit_code == 0
    (done,) = jobs(cluster, namespace)
    assert done["metadata"]["uid"] == running["metadata"]["uid"] and condition(done, "Succeeded")


@pytest.mark.parametrize("force", [False, True], ids=["deleted", "force-deleted"])
def test_a_worker_pod_deleted_mid_run_restarts_the_whole_group(cluster, namespace, tmp_path, force):
    job, cfg = stage_job(namespace, "evicted", master="hang", worker="hang", backoff_limit=2, cleanup="never")
    lines: list[str] = []
    backend = RecordingBackend(kubeconfig=str(cluster.admin), succeed_from_attempt=2)
    bg = Background(executor(cluster, cfg, backend=backend, lines=lines), job, tmp_path / "logs")
    wait_running(cluster, namespace, bg)
    worker = f"{job['metadata']['name']}-worker-0"
    # deleted: the pod ends Failed and fails the job; force-deleted (as when its node is lost): it just vanishes
    # and the operator recreates it alone, a rank that cannot rejoin: the executor sees it and restarts the group
    cluster.kubectl("-n", namespace, "delete", "pod", worker, "--wait=false", *(["--force", "--grace-period=0"] if force else []))
    result = bg.result()

    assert result.attempts == 2 and result.replicas[0].exit_code == 0
    # how the attempt ended: the operator saw the worker Failed, or the executor saw the deleted (or recreated lone)
    # rank first -- which one comes first is a race between the operator's reconcile and the executor's poll (kwok
    # decides; both were seen for a plain delete on a loaded machine); either way the whole group restarts
    seen = [line for line in lines if "was deleted while it ran" in line or "1 Worker replica(s) failed" in line]
    assert seen, lines
    assert any("restarting the whole group" in line for line in lines)
    first, second = list(backend.pods_seen.values())[:1] + list(backend.pods_seen.values())[-1:]
    assert set(second) == {"master-0", "worker-0"}
    assert first["master-0"] != second["master-0"]  # the master was replaced too: no lone rank rejoins
    (done,) = jobs(cluster, namespace)
    assert done["metadata"]["annotations"]["selftrain.io/attempt"] == "2" and condition(done, "Succeeded")


def test_rbac_removed_mid_run_is_reported_and_a_re_run_re_attaches(cluster, namespace, tmp_path):
    ns = namespace
    cluster.kubectl("-n", ns, "create", "role", "exec", "--verb=create,get,delete", "--resource=pytorchjobs.kubeflow.org")
    cluster.kubectl("-n", ns, "create", "role", "exec-pods", "--verb=list,delete", "--resource=pods")
    for role in ("exec", "exec-pods"):
        cluster.kubectl("-n", ns, "create", "rolebinding", role, f"--role={role}", "--user=selftrain-user")
    job, cfg = stage_job(ns, "revoked", duration="5s", cleanup="never")
    bg = Background(executor(cluster, cfg, kubeconfig=cluster.user), job, tmp_path / "logs")
    running = wait_running(cluster, ns, bg)
    cluster.kubectl("-n", ns, "delete", "rolebinding", "exec")
    with pytest.raises(Forbidden) as e:
        bg.result()
    msg = str(e.value)
    assert "RBAC forbids selftrain-user to get pytorchjobs.kubeflow.org" in msg and f"namespace {ns}" in msg
    assert "keeps running" in msg and "re-attach" in msg

    cluster.kubectl("-n", ns, "create", "rolebinding", "exec", "--role=exec", "--user=selftrain-user")
    lines: list[str] = []
    result = executor(cluster, cfg, kubeconfig=cluster.user, lines=lines).run(job, tmp_path / "logs")
    assert result.attempts == 1 and result.replicas[0].exit_code == 0
    assert any("re-attaching" in line and running["metadata"]["uid"] in line for line in lines)


def test_a_failed_stage_leaves_no_running_pods(cluster, namespace, tmp_path):
    """cleanPodPolicy Running (the default): the operator stops the replicas still running when the job fails,
    even when the executor keeps the job (cleanup never) and may not delete pods."""
    job, cfg = stage_job(namespace, "failed", master="fail", worker="hang", restart_policy="Never", cleanup="never")
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
    backend = PyTorchJobBackend(kubeconfig=str(cluster.admin))
    with pytest.raises(Exception) as e:
        executor(cluster, cfg, backend=backend).run(job, tmp_path / "logs")
    assert "failed after 1 attempt(s)" in str(e.value)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pods = cluster.get("-n", namespace, "pods")["items"]
        phases = {p["metadata"]["name"]: p["status"].get("phase") for p in pods if not p["metadata"].get("deletionTimestamp")}
        if "Running" not in phases.values() and "Pending" not in phases.values():
            break
        time.sleep(0.3)
    assert phases == {f"{job['metadata']['name']}-master-0": "Failed"}  # the failed one stays, with its log
