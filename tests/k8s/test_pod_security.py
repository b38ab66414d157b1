"""Pod Security `restricted` and ResourceQuota on a real API server (issue 15 items 2 and 3).

The rendered stage jobs are applied into a `restricted` namespace and the training operator's pods must be
admitted; the operator's own init container on Worker pods is not, and the executor says so, naming it; a
ResourceQuota that refuses a replica fails the stage within pod_creation_timeout_seconds with the quota message.
"""
from __future__ import annotations

import re
import time

import pytest
import yaml

from cluster_helpers import REPO
from executor_helpers import executor, stage_job
from pipelines.executors.kubernetes import PodsNotCreated

pytestmark = pytest.mark.cluster

MANIFESTS = REPO / "manifests"
TEMPLATE = REPO / "charts" / "selftrain" / "files" / "pytorch-init-container-restricted.yaml"


@pytest.fixture
def restricted(cluster):
    """A fresh namespace labelled as manifests/base/00-namespace.yaml labels `selftrain` (Pod Security restricted)."""
    (shipped,) = [d for d in yaml.safe_load_all((MANIFESTS / "base" / "00-namespace.yaml").read_text()) if d]
    labels = {k: v for k, v in shipped["metadata"]["labels"].items() if k.startswith("pod-security.kubernetes.io/")}
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    ns = cluster.new_namespace("restricted-test")
    cluster.kubectl("label", "namespace", ns, *(f"{k}={v}" for k, v in labels.items()))
    yield ns
    cluster.delete_namespace(ns)


def moved(path, ns) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        d["metadata"]["namespace"] = ns
        for s in d.get("subjects", []):
            s["namespace"] = ns
    return docs


def test_the_pods_of_every_rendered_stage_job_are_admitted_in_a_restricted_namespace(cluster, restricted):
    ns = restricted
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(moved(MANIFESTS / "base" / "01-rbac.yaml", ns)))
    files = sorted((MANIFESTS / "pipeline").glob("[0-9][0-9]-*.yaml"))
    jobs = [d for f in files for d in moved(f, ns)]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(jobs))
    expected = {f"{j['metadata']['name']}-{rtype.lower()}-{i}"
                for j in jobs for rtype, rs in j["spec"]["pytorchReplicaSpecs"].items() for i in range(rs.get("replicas", 1))}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pods = {p["metadata"]["name"] for p in cluster.get("-n", ns, "pods")["items"]}
        if expected <= pods:
            break
        time.sleep(0.5)
    refused = [e["message"] for e in cluster.get("-n", ns, "events")["items"] if e["reason"] == "FailedCreatePod"]
    assert sorted(expected - pods) == [] and refused == []


def test_the_operators_init_container_is_refused_by_restricted_and_the_executor_names_it(cluster, restricted, tmp_path):
    job, cfg = stage_job(restricted, "initc", master="hang", worker="hang", pod_creation_timeout_seconds=4)
    with pytest.raises(PodsNotCreated) as e:
        executor(cluster, cfg).run(job, tmp_path / "logs")
    msg = str(e.value)
    assert "worker-0" in msg and "pod_creation_timeout_seconds=4" in msg
    assert 'violates PodSecurity "restricted:latest"' in msg and 'container "init-pytorch"' in msg
    assert "--pytorch-init-container-template-file" in msg  # what to do
    assert cluster.get("-n", restricted, "pytorchjobs")["items"] == []  # given up: the job was deleted


def test_the_restricted_init_container_template_is_admitted(cluster, restricted):
    """charts/selftrain/files/pytorch-init-container-restricted.yaml, filled in as the operator does, in a Worker pod."""
    text = TEMPLATE.read_text().replace("{{.InitContainerImage}}", "docker.io/library/alpine:3.19")
    text = text.replace("{{.MasterAddr}}", "job-master-0").replace("{{.MaxTries}}", "100")
    assert not re.search(r"{{.*}}", text)
    init = yaml.safe_load(text)
    job, _ = stage_job(restricted, "tmpl")
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "worker", "namespace": restricted},
           "spec": {**pod["spec"], "initContainers": init, "restartPolicy": "Never"}}
    pod["spec"].pop("serviceAccountName", None)
    out = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(pod), check=False)
    assert out.returncode == 0 and "created (server dry run)" in out.stdout, out.stderr


def test_a_resource_quota_that_refuses_a_replica_fails_the_stage_naming_the_quota(cluster, restricted, tmp_path):
    cluster.kubectl("-n", restricted, "create", "quota", "small", "--hard=requests.cpu=500m")
    job, cfg = stage_job(restricted, "quota", replicas=1, pod_creation_timeout_seconds=4)
    with pytest.raises(PodsNotCreated) as e:
        executor(cluster, cfg).run(job, tmp_path / "logs")
    msg = str(e.value)
    assert "master-0" in msg and "exceeded quota: small" in msg and "requests.cpu=1" in msg
    assert f"kubectl -n {restricted} describe resourcequota" in msg
