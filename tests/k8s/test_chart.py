"""The Helm chart (charts/selftrain) against real helm and the real local API server.

Rendered objects are accepted by the API server (PyTorchJobs by the training operator's CRD and
webhook), pods run as non-root with requests and limits, the pipeline config the chart writes is
valid selftrain config, the chart installs as an unprivileged user holding only the Role in its
README, and the driver's RBAC is least privilege.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cluster_helpers import REPO, Cluster, namespace  # noqa: F401  (fixture)
from pipelines import render
from pipelines.config import load_config

pytestmark = pytest.mark.cluster

CHART = REPO / "charts" / "selftrain"
USER = "selftrain-user"
IMAGE = ["--set", "image.repository=registry.example.com/ml/selftrain"]  # the default is a placeholder that fails
VARIANTS = {
    "default": IMAGE,
    "prod": ["-f", str(CHART / "ci" / "prod-values.yaml")],
    "kueue": [*IMAGE, "--set", "scheduling.gang=kueue", "--set", "scheduling.kueue.queueName=gpu-queue"],
    "external-mlflow": [*IMAGE, "--set", "mlflow.enabled=false", "--set", "mlflow.externalUri=http://mlflow.example.com:5000"],
}
CRD = ["--api-versions", "kubeflow.org/v1/PyTorchJob"]  # helm template asks no cluster


def template(cluster: Cluster, namespace: str, variant: str, release: str = "st") -> list[dict]:
    out = cluster.helm("template", release, str(CHART), "-n", namespace, *CRD, *VARIANTS[variant]).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]) for d in docs if d["kind"] in ("Deployment", "Job")]


def pipeline_config(docs: list[dict], tmp_path: Path):
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-pipeline")]
    path = tmp_path / "pipeline.yaml"
    path.write_text(cm["data"]["pipeline.yaml"])
    return load_config(path)


def readme_role() -> str:
    """The installer Role exactly as charts/selftrain/README.md prints it."""
    text = (CHART / "README.md").read_text()
    (role,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "kind: Role" in b]
    return role


# -- helm lint / template ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["default", "prod"])
def test_helm_lint_accepts_the_values(cluster, variant):
    p = cluster.helm("lint", "--strict", str(CHART), "--set", "checks.pytorchJobCRD=false", *VARIANTS[variant])
    assert "0 chart(s) failed" in (p.stdout + p.stderr)


@pytest.mark.parametrize("bad", ["image.tagg=1", "scheduling.gang=slurm", "mlflow.workers=two",
                                 "securityContext.allowPrivilegeEscalation=true", "podSecurityContext.runAsNonRoot=false",
                                 "mlflow.backend.type=mysql"])
def test_values_schema_rejects_unknown_and_mistyped_values(cluster, bad):
    p = cluster.helm("template", "st", str(CHART), *CRD, *IMAGE, "--set", bad, check=False)
    assert p.returncode != 0 and "values don't meet the specifications of the schema" in p.stderr, p.stderr


def test_postgres_and_s3_need_their_secrets(cluster):
    p = cluster.helm("template", "st", str(CHART), *CRD, *IMAGE, "--set", "mlflow.backend.type=postgres", check=False)
    assert p.returncode != 0 and "mlflow.backend.postgres.existingSecret is required" in p.stderr


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_rendered_document_is_accepted_by_the_api_server(cluster, namespace, variant):
    docs = template(cluster, namespace, variant)
    # `helm test` creates its pod after the install, when the ServiceAccount it runs as exists
    tests = [d for d in docs if (d["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
    installed = [d for d in docs if d not in tests]
    out = cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", "-",
                          input=yaml.safe_dump_all(installed)).stdout
    assert out.count("(server dry run)") == len(installed)
    assert tests, "the chart has a helm test hook"
    for t in tests:
        cluster.kubectl("create", "serviceaccount", t["spec"]["serviceAccountName"], "-n", namespace, check=False)
        out = cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", "-",
                              input=yaml.safe_dump(t)).stdout
        assert "(server dry run)" in out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_pod_runs_as_non_root_with_requests_and_limits(cluster, variant):
    pods = pod_specs(template(cluster, "ns", variant))
    assert {name.split("/")[0] for name, _ in pods} == ({"Deployment", "Job"} if variant != "external-mlflow" else {"Job"})
    assert len([n for n, _ in pods if n.startswith("Job/")]) == 2  # the driver and the pre-delete hook
    for name, spec in pods:
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001, name
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert sc.get("privileged") is not True
            assert c["resources"]["requests"] and c["resources"]["limits"], (name, c["name"])
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), (name, c["name"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_object_carries_the_app_kubernetes_io_labels(cluster, variant):
    for d in template(cluster, "ns", variant, release="rel"):
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "selftrain", d["metadata"]["name"]
        assert labels["app.kubernetes.io/instance"] == "rel"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] and labels["helm.sh/chart"].startswith("selftrain-")
        if d["kind"] in ("Deployment", "Job"):
            assert d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel"


def test_driver_job_runs_the_pipeline_in_the_cluster_with_the_driver_account(cluster):
    docs = template(cluster, "ns", "default")
    (job,) = [d for d in docs if d["kind"] == "Job" and "-driver-" in d["metadata"]["name"]]
    spec = job["spec"]["template"]["spec"]
    (driver,) = spec["containers"]
    assert driver["args"][:4] == ["run", "/config/pipeline.yaml", "--executor", "kubernetes"]
    assert spec["serviceAccountName"] == "st-selftrain"
    mounts = {m["mountPath"]: m["name"] for m in driver["volumeMounts"]}
    assert mounts["/config"] == "config" and mounts["/data"] == "data" and mounts["/checkpoints"] == "checkpoints"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "st-selftrain-pipeline"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "st-selftrain-data"


# -- the pipeline config the chart writes ----------------------------------------------------------

def _jobs(cfg, tmp_path: Path) -> list[dict]:
    paths = render.write_manifests(cfg.stage_specs("r1"), tmp_path / "jobs", cfg.executor.kubernetes, run="r1")
    return [render.load_manifest(p) for p in paths]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_pipeline_config_is_valid_and_its_pytorchjobs_pass_the_crd_and_webhook(cluster, namespace, tmp_path, variant):
    cfg = pipeline_config(template(cluster, namespace, variant), tmp_path)
    assert cfg.executor.kind == "kubernetes" and cfg.executor.kubernetes.namespace == namespace
    jobs = _jobs(cfg, tmp_path)
    out = cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=yaml.safe_dump_all(jobs)).stdout
    assert out.count("pytorchjob.kubeflow.org/") == len(jobs)


def test_default_values_track_to_the_chart_mlflow_and_mount_the_chart_pvcs(cluster, tmp_path):
    cfg = pipeline_config(template(cluster, "ns", "default"), tmp_path)
    k8s = cfg.executor.kubernetes
    assert cfg.tracking_uri() == "http://st-selftrain-mlflow:5000"
    assert (k8s.data_pvc, k8s.checkpoints_pvc, k8s.service_account) == ("st-selftrain-data", "st-selftrain-checkpoints", "st-selftrain-trainer")
    assert (cfg.paths.data, cfg.paths.runs) == (k8s.data_mount, k8s.checkpoints_mount)  # same paths in driver and trainers
    assert k8s.scheduling_policy == {} and k8s.labels == {"selftrain.io/release": "st"}


def test_prod_values_give_gpus_placement_and_volcano_gang_scheduling(cluster, tmp_path):
    cfg = pipeline_config(template(cluster, "ns", "prod"), tmp_path)
    job = _jobs(cfg, tmp_path)[0]
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"queue": "research", "priorityClass": "high-priority"}
    for rtype in ("Master", "Worker"):
        pod = job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert cfg.executor.kubernetes.backoff_limit == 5  # the user's own kubernetes keys survive the chart's


def test_kueue_puts_the_queue_label_on_every_pytorchjob(cluster, tmp_path):
    cfg = pipeline_config(template(cluster, "ns", "kueue"), tmp_path)
    for job in _jobs(cfg, tmp_path):
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert job["metadata"]["labels"]["selftrain.io/release"] == "st"
        assert "schedulingPolicy" not in job["spec"]["runPolicy"]


def test_mlflow_uses_its_own_image_sqlite_by_default_and_postgres_s3_from_secrets(cluster):
    pinned = re.search(r"^mlflow==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)

    def server(variant):
        (dep,) = [d for d in template(cluster, "ns", variant) if d["kind"] == "Deployment"]
        c = dep["spec"]["template"]["spec"]["containers"][0]
        return c, {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}

    c, env = server("default")
    assert c["image"] == f"ghcr.io/mlflow/mlflow:v{pinned}"
    assert env["MLFLOW_BACKEND_STORE_URI"] == "sqlite:////mlflow/mlflow.db" and env["MLFLOW_ARTIFACTS_DESTINATION"] == "/mlflow/artifacts"
    c, env = server("prod")
    assert c["image"] == f"ghcr.io/mlflow/mlflow:v{pinned}-full"
    assert env["MLFLOW_BACKEND_STORE_URI"] == {"secretKeyRef": {"name": "mlflow-postgres", "key": "uri"}}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://ml-artifacts/selftrain"
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "mlflow-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "https://minio.storage.svc:9000"
    assert "volumeMounts" not in c or all(m["mountPath"] != "/mlflow" for m in c["volumeMounts"])


# -- helm install as an unprivileged user ------------------------------------------------------------

def _bind_pvs(cluster: Cluster, ns: str, claims: list[str]) -> list[str]:
    """The local cluster has no storage provisioner: one pre-bound PV per claim of the release."""
    pvs = []
    for claim in claims:
        name = f"{ns}-{claim}"
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {"capacity": {"storage": "10Ti"}, "accessModes": ["ReadWriteMany", "ReadWriteOnce"],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                     "claimRef": {"namespace": ns, "name": claim}, "hostPath": {"path": f"/tmp/{name}"}}}))
        pvs.append(name)
    return pvs


@pytest.fixture(scope="module")
def installed(cluster):
    """The chart installed (default values) by selftrain-user holding only the README's Role."""
    ns = cluster.new_namespace("chart-test-install")
    pvs = _bind_pvs(cluster, ns, ["st-selftrain-data", "st-selftrain-checkpoints", "st-selftrain-mlflow"])
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=readme_role())
    cluster.kubectl("create", "rolebinding", "selftrain-installer", "-n", ns, "--role=selftrain-installer", f"--user={USER}")
    out = cluster.helm("install", "st", str(CHART), "-n", ns, *IMAGE, "--set", "tests.labels.selftrain\\.test/behaviour=succeed",
                       "--wait", "--wait-for-jobs", "--timeout", "120s", user=True).stdout
    yield ns, out
    cluster.helm("uninstall", "st", "-n", ns, "--wait", "--timeout", "60s", user=True, check=False)
    cluster.delete_namespace(ns)
    cluster.kubectl("delete", "pv", *pvs, "--wait=false", "--ignore-not-found", check=False)


def test_chart_installs_as_an_unprivileged_user_with_the_readme_role(cluster, installed):
    ns, notes = installed
    assert "port-forward svc/st-selftrain-mlflow 5000:5000" in notes and "set_registered_model_alias" in notes
    (job,) = [j for j in cluster.get("job", "-n", ns, "-l", "app.kubernetes.io/component=driver", user=True)["items"]]
    assert job["status"].get("succeeded") == 1
    dep = cluster.get("deployment", "st-selftrain-mlflow", "-n", ns, user=True)
    assert dep["status"].get("availableReplicas") == 1
    assert {"Bound"} == {c["status"]["phase"] for c in cluster.get("pvc", "-n", ns, user=True)["items"]}


def test_the_installer_role_is_namespaced_and_nothing_more_is_needed(cluster, installed):
    ns, _ = installed
    assert "kind: ClusterRole" not in readme_role()
    user = USER
    assert not cluster.can_i(ns, user, "list", "nodes")
    assert not cluster.can_i(ns, user, "create", "clusterroles")
    assert not cluster.can_i("default", user, "create", "deployments")


def test_a_user_without_the_role_cannot_install(cluster, namespace):
    p = cluster.helm("install", "st", str(CHART), "-n", namespace, *IMAGE, user=True, check=False)
    assert p.returncode != 0 and "forbidden" in p.stderr.lower()


ALLOWED = [("create", "pytorchjobs.kubeflow.org"), ("get", "pytorchjobs.kubeflow.org"), ("delete", "pytorchjobs.kubeflow.org"),
           ("list", "pods"), ("delete", "pods"), ("get", "pods/log"), ("list", "events")]
DENIED = [("update", "pytorchjobs.kubeflow.org"), ("patch", "pytorchjobs.kubeflow.org"), ("deletecollection", "pytorchjobs.kubeflow.org"),
          ("list", "pytorchjobs.kubeflow.org"), ("watch", "pytorchjobs.kubeflow.org"), ("get", "pods"), ("watch", "pods"),
          ("get", "secrets"), ("list", "secrets"), ("get", "configmaps"), ("create", "pods"), ("create", "events"), ("watch", "events"),
          ("create", "pods/exec"), ("create", "jobs.batch"), ("create", "deployments.apps"), ("create", "roles.rbac.authorization.k8s.io"),
          ("create", "rolebindings.rbac.authorization.k8s.io"), ("list", "nodes"), ("list", "namespaces"), ("escalate", "roles.rbac.authorization.k8s.io")]


def test_driver_service_account_has_exactly_the_stage_permissions(cluster, installed):
    ns, _ = installed
    sa = f"system:serviceaccount:{ns}:st-selftrain"
    assert [a for a in ALLOWED if not cluster.can_i(ns, sa, *a)] == []
    assert [d for d in DENIED if cluster.can_i(ns, sa, *d)] == []


def test_driver_service_account_has_nothing_cluster_wide_or_in_other_namespaces(cluster, installed):
    ns, _ = installed
    sa = f"system:serviceaccount:{ns}:st-selftrain"
    for verb, resource in ALLOWED:
        assert not cluster.can_i(ns, sa, verb, resource, all_namespaces=True), (verb, resource)
        assert not cluster.can_i("default", sa, verb, resource), (verb, resource)
    assert not cluster.can_i(ns, sa, "list", "nodes") and not cluster.can_i(ns, sa, "get", "clusterroles")


def test_trainer_service_account_has_no_permissions_and_no_token(cluster, installed):
    ns, _ = installed
    sa = f"system:serviceaccount:{ns}:st-selftrain-trainer"
    assert [a for a in ALLOWED + DENIED if cluster.can_i(ns, sa, *a)] == []
    assert cluster.get("serviceaccount", "st-selftrain-trainer", "-n", ns)["automountServiceAccountToken"] is False
