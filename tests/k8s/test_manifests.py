"""manifests/ (plain kubectl apply) against the real local API server: every file accepted, base RBAC least privilege."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cluster_helpers import REPO, Cluster, namespace  # noqa: F401  (fixture)

pytestmark = pytest.mark.cluster

MANIFESTS = REPO / "manifests"
FILES = sorted(p for p in MANIFESTS.rglob("*.yaml"))
NAMESPACE = "selftrain"  # the namespace manifests/ is written for


def in_namespace(path: Path, ns: str) -> list[dict]:
    """The documents of one file moved to namespace ``ns`` (the Namespace object itself stays as written)."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        if d["metadata"].get("namespace") == NAMESPACE:
            d["metadata"]["namespace"] = ns
        for s in d.get("subjects", []):
            if s.get("namespace") == NAMESPACE:
                s["namespace"] = ns
    return docs


def test_manifests_hold_the_base_objects_and_the_pipeline():
    names = {p.relative_to(MANIFESTS).as_posix() for p in FILES}
    assert {"base/00-namespace.yaml", "base/01-rbac.yaml", "base/02-pvcs.yaml", "base/03-mlflow.yaml", "pipeline/00-instance-teacher.yaml"} <= names
    assert (MANIFESTS / "README.md").is_file() and (MANIFESTS / "pipeline" / "README.md").is_file()


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(MANIFESTS).as_posix() for p in FILES])
def test_every_manifest_is_accepted_by_the_api_server(cluster: Cluster, namespace, path):
    docs = in_namespace(path, namespace)
    out = cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=yaml.safe_dump_all(docs)).stdout
    assert out.count("(server dry run)") == len(docs)


def test_mlflow_image_matches_the_pinned_mlflow():
    pinned = re.search(r"^mlflow==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    (dep,) = [d for d in in_namespace(MANIFESTS / "base" / "03-mlflow.yaml", NAMESPACE) if d["kind"] == "Deployment"]
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/mlflow/mlflow:v{pinned}"


def test_pipeline_jobs_use_the_base_pvcs_and_trainer_account():
    base = {d["metadata"]["name"]: d for p in (MANIFESTS / "base").glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d}
    for p in (MANIFESTS / "pipeline").glob("*.yaml"):
        pod = yaml.safe_load(p.read_text())["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        assert base[pod["serviceAccountName"]]["kind"] == "ServiceAccount"
        for v in pod["volumes"]:
            if "persistentVolumeClaim" in v:
                assert base[v["persistentVolumeClaim"]["claimName"]]["kind"] == "PersistentVolumeClaim", p.name


def test_base_rbac_grants_the_driver_what_the_chart_grants_it(cluster: Cluster):
    """manifests/base/01-rbac.yaml's driver Role = the chart's (selftrain.driverRules), rule for rule."""
    (role,) = [d for d in yaml.safe_load_all((MANIFESTS / "base" / "01-rbac.yaml").read_text()) if d and d["kind"] == "Role"]
    out = cluster.helm("template", "st", str(REPO / "charts" / "selftrain"), "--api-versions", "kubeflow.org/v1/PyTorchJob",
                       "--set", "image.repository=registry.example.com/ml/selftrain", "--show-only", "templates/rbac.yaml").stdout
    (chart,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Role"]
    assert role["rules"] == chart["rules"]


def test_base_rbac_is_least_privilege(cluster: Cluster, namespace):
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(in_namespace(MANIFESTS / "base" / "01-rbac.yaml", namespace)))
    driver, trainer = (f"system:serviceaccount:{namespace}:{n}" for n in ("selftrain", "selftrain-trainer"))
    allowed = [("create", "pytorchjobs.kubeflow.org"), ("get", "pytorchjobs.kubeflow.org"), ("delete", "pytorchjobs.kubeflow.org"),
               ("list", "pods"), ("delete", "pods"), ("get", "pods/log"), ("list", "events")]
    denied = [("update", "pytorchjobs.kubeflow.org"), ("patch", "pytorchjobs.kubeflow.org"), ("list", "pytorchjobs.kubeflow.org"),
              ("watch", "pytorchjobs.kubeflow.org"), ("get", "pods"), ("watch", "pods"), ("get", "secrets"),
              ("create", "pods"), ("create", "pods/exec"), ("create", "events"), ("list", "nodes")]
    assert [a for a in allowed if not cluster.can_i(namespace, driver, *a)] == []
    assert [d for d in denied if cluster.can_i(namespace, driver, *d)] == []
    assert [a for a in allowed if cluster.can_i(namespace, driver, *a, all_namespaces=True)] == []
    assert [a for a in allowed + denied if cluster.can_i(namespace, trainer, *a)] == []


def test_the_base_objects_and_the_first_stage_run_it_to_success(cluster: Cluster, namespace, tmp_path):
    """base/ (RBAC, PVCs) + pipeline/00: the job's pods are scheduled with its PVCs and account, and it succeeds."""
    claims = [d["metadata"]["name"] for d in in_namespace(MANIFESTS / "base" / "02-pvcs.yaml", namespace)]
    pvs = [f"{namespace}-{c}" for c in claims]
    try:
        for pv, claim in zip(pvs, claims):  # the local cluster has no provisioner: pre-bound volumes
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({
                "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                "spec": {"capacity": {"storage": "1Ti"}, "accessModes": ["ReadWriteMany", "ReadWriteOnce"], "storageClassName": "",
                         "persistentVolumeReclaimPolicy": "Retain", "claimRef": {"namespace": namespace, "name": claim},
                         "hostPath": {"path": f"/tmp/{pv}"}}}))
        for f in ("01-rbac.yaml", "02-pvcs.yaml"):
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(in_namespace(MANIFESTS / "base" / f, namespace)))
        job = tmp_path / "00.yaml"
        job.write_text(yaml.safe_dump_all(in_namespace(MANIFESTS / "pipeline" / "00-instance-teacher.yaml", namespace)))
        cluster.kubectl("apply", "-f", str(job))
        cluster.kubectl("wait", "--for=condition=Succeeded", "--timeout=90s", "-f", str(job), timeout=120)
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", *pvs, "--wait=false", "--ignore-not-found", check=False)
