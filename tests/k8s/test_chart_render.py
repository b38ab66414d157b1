"""The chart rendered by helm 3 and helm 4 without a cluster: install-time checks, the driver Job's name,
the helm test pod, the pre-delete hook, the MLflow schema migration, Pod Security `restricted`, and the
values that reach the trainer PyTorchJobs through the pipeline config."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helm_tools import helm_binary

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "selftrain"
IMAGE = ["--set", "image.repository=registry.example.com/ml/selftrain"]
CRD = ["--api-versions", "kubeflow.org/v1/PyTorchJob"]


@pytest.fixture(scope="module", params=[3, 4], ids=["helm3", "helm4"])
def helm(request):
    return helm_binary(request.param)


def run(helm, *args, check=True):
    p = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)
    if check and p.returncode:
        raise AssertionError(p.stderr)
    return p


def render(helm, *args, release="st") -> list[dict]:
    out = run(helm, "template", release, str(CHART), "-n", "ns", *CRD, *IMAGE, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, [d["metadata"]["name"] for d in found]
    return found[0]


def pipeline(docs) -> dict:
    return yaml.safe_load(one(docs, "ConfigMap", "st-selftrain-pipeline")["data"]["pipeline.yaml"])


# -- install-time checks ---------------------------------------------------------------------------

def test_a_missing_pytorchjob_crd_fails_with_what_to_install(helm):
    p = run(helm, "template", "st", str(CHART), *IMAGE, check=False)
    assert p.returncode != 0
    assert "does not serve kubeflow.org/v1 PyTorchJob" in p.stderr and "training operator" in p.stderr
    assert "kubectl get crd pytorchjobs.kubeflow.org" in p.stderr


def test_the_crd_check_can_be_turned_off_for_offline_rendering(helm):
    run(helm, "template", "st", str(CHART), *IMAGE, "--set", "checks.pytorchJobCRD=false")
    p = run(helm, "lint", "--strict", str(CHART), *IMAGE, "--set", "checks.pytorchJobCRD=false")
    assert "0 chart(s) failed" in p.stdout + p.stderr


def test_the_placeholder_image_fails_with_how_to_publish_it(helm):
    p = run(helm, "template", "st", str(CHART), *CRD, check=False)
    assert p.returncode != 0
    assert "image.repository is the placeholder registry.invalid/selftrain" in p.stderr
    assert "Dockerfile" in p.stderr and "--set image.repository=" in p.stderr
    assert yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"] == "registry.invalid/selftrain"


# -- driver Job: re-run only when its config changes ------------------------------------------------

def _driver(docs):
    (job,) = [d for d in docs if d["kind"] == "Job" and "driver" in d["metadata"]["name"]]
    return job


def test_driver_job_name_is_a_hash_of_its_config_not_the_revision(helm):
    base = _driver(render(helm))["metadata"]["name"]
    assert re.fullmatch(r"st-selftrain-driver-[0-9a-f]{10}", base)
    assert _driver(render(helm))["metadata"]["name"] == base                      # same values: same Job
    assert _driver(render(helm, "--set", "mlflow.workers=4"))["metadata"]["name"] == base  # not the driver's business
    for change in (["--set", "pipeline.resources.cpu=8"], ["--set", "driver.run=other"], ["--set", "image.tag=0.2.0"],
                   ["--set", "trainers.env.NCCL_DEBUG=INFO"]):
        assert _driver(render(helm, *change))["metadata"]["name"] != base, change


def test_notes_name_the_driver_job_and_helm_test():
    helm = helm_binary(4)  # helm 3's install --dry-run=client still asks a cluster for its version
    out = run(helm, "install", "st", str(CHART), "-n", "ns", "--dry-run=client", "--set", "checks.pytorchJobCRD=false", *IMAGE).stdout
    docs = [d for d in yaml.safe_load_all(out.split("NOTES:")[0].split("MANIFEST:")[-1]) if d]
    assert f"logs -f job/{_driver(docs)['metadata']['name']}" in out
    assert "helm test st -n ns --logs" in out


# -- RBAC ------------------------------------------------------------------------------------------

def test_driver_role_has_exactly_the_executor_verbs(helm):
    role = one(render(helm), "Role", "st-selftrain-driver")
    rules = {(r["apiGroups"][0], r["resources"][0]): r["verbs"] for r in role["rules"]}
    assert rules == {("kubeflow.org", "pytorchjobs"): ["create", "get", "delete"], ("", "pods"): ["list", "delete"],
                     ("", "pods/log"): ["get"], ("", "events"): ["list"]}


# -- helm test pod and pre-delete hook ----------------------------------------------------------------

def test_helm_test_pod_runs_the_selftest_as_the_driver(helm):
    pod = one(render(helm), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    assert spec["serviceAccountName"] == "st-selftrain" and spec["restartPolicy"] == "Never"
    (c,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert c["command"] == ["python", "/scripts/selftest.py"]
    assert env["SELFTRAIN_MLFLOW_URI"] == "http://st-selftrain-mlflow:5000" and env["SELFTRAIN_VOLUMES"] == "/data /checkpoints"
    assert env["SELFTRAIN_DRIVER_RULES"].splitlines() == ["kubeflow.org pytorchjobs create get delete", "- pods list delete", "- pods/log get",
                                                         "- events list"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"st-selftrain-data", "st-selftrain-checkpoints"}
    scripts = one(render(helm), "ConfigMap", "st-selftrain-scripts")["data"]
    assert scripts["selftest.py"] == (CHART / "files" / "selftest.py").read_text()


def test_pre_delete_hook_stops_the_driver_and_deletes_the_release_pytorchjobs(helm):
    docs = render(helm)
    job = one(docs, "Job", "st-selftrain-cleanup")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    spec = job["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "st-selftrain-cleanup"
    role = one(docs, "Role", "st-selftrain-cleanup")
    assert {(r["apiGroups"][0], r["resources"][0]): r["verbs"] for r in role["rules"]} == {
        ("batch", "jobs"): ["list", "delete"], ("kubeflow.org", "pytorchjobs"): ["list", "delete"]}
    assert pipeline(docs)["executor"]["kubernetes"]["labels"] == {"selftrain.io/release": "st"}
    assert "selftrain.io/release=" in one(docs, "ConfigMap", "st-selftrain-scripts")["data"]["cleanup.py"]


def test_tests_and_cleanup_can_be_turned_off(helm):
    docs = render(helm, "--set", "tests.enabled=false", "--set", "cleanup.enabled=false")
    assert not [d for d in docs if d["kind"] == "Pod" or "cleanup" in d["metadata"]["name"] or "scripts" in d["metadata"]["name"]]


# -- MLflow schema migration -----------------------------------------------------------------------

def _db_upgrade(docs):
    dep = one(docs, "Deployment")
    (init,) = dep["spec"]["template"]["spec"]["initContainers"]
    return dep, init


def test_mlflow_runs_db_upgrade_before_the_server_with_the_same_store(helm):
    dep, init = _db_upgrade(render(helm, "-f", str(CHART / "ci" / "prod-values.yaml")))
    server = dep["spec"]["template"]["spec"]["containers"][0]
    assert init["name"] == "db-upgrade" and init["image"] == server["image"]
    assert init["env"] == server["env"]
    assert '"mlflow", "db", "upgrade"' in init["args"][0]
    assert "initContainers" not in one(render(helm, "--set", "mlflow.dbUpgrade=false"), "Deployment")["spec"]["template"]["spec"]


def test_db_upgrade_script_migrates_an_existing_store_and_skips_a_new_one(helm, tmp_path):
    """The init container's script against a real SQLite MLflow store (the mlflow of constraints.txt)."""
    _, init = _db_upgrade(render(helm))
    script = init["args"][0]
    new = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'none.db'}"})
    assert new.returncode == 0 and "new SQLite store" in new.stdout, new.stderr
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("x")
    old = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MLFLOW_BACKEND_STORE_URI": uri})
    assert old.returncode == 0 and "mlflow db upgrade" in old.stdout, old.stderr


# -- Pod Security restricted ---------------------------------------------------------------------------

def _pods(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield f"Pod/{d['metadata']['name']}", d["spec"]


@pytest.mark.parametrize("values", [[], ["-f", str(CHART / "ci" / "prod-values.yaml")]], ids=["default", "prod"])
def test_every_pod_of_the_chart_meets_pod_security_restricted(helm, values):
    pods = list(_pods(render(helm, *values)))
    assert len(pods) >= 3
    for name, spec in pods:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec), name
        for v in spec.get("volumes", []):
            assert set(v) - {"name"} <= {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "projected"}, (name, v)
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert not sc.get("privileged") and not sc.get("capabilities", {}).get("add"), (name, c["name"])
            assert sc.get("runAsUser", psc.get("runAsUser")) != 0


def test_pod_security_context_takes_fs_group_change_policy_and_supplemental_groups(helm):
    docs = render(helm, "--set", "podSecurityContext.fsGroupChangePolicy=Always", "--set", "podSecurityContext.supplementalGroups={2000,3000}")
    for _, spec in _pods(docs):
        assert spec["securityContext"]["fsGroupChangePolicy"] == "Always"
        assert spec["securityContext"]["supplementalGroups"] == [2000, 3000]
    assert one(render(helm), "Deployment")["spec"]["template"]["spec"]["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


# -- values that reach the trainer pods (through the pipeline config) --------------------------------

def test_trainer_env_affinity_priority_resources_and_per_kind_placement_reach_the_pipeline_config(helm, tmp_path):
    values = {
        "trainers": {
            "env": {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_HCA": "mlx5"},
            "priorityClassName": "training-high",
            "extraResources": {"rdma/ib": 1, "vpc.amazonaws.com/efa": 4},
            "affinity": {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
            "byStageKind": {"evaluate": {"nodeSelector": {"pool": "cpu"}, "tolerations": []}},
        },
        "scheduling": {"gang": "kueue", "kueue": {"queueName": "gpu"}},
    }
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump(values))
    k8s = pipeline(render(helm, "-f", str(f)))["executor"]["kubernetes"]
    assert k8s["env"] == {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_HCA": "mlx5"}
    assert k8s["priority_class_name"] == "training-high"
    assert k8s["extra_resources"] == {"rdma/ib": 1, "vpc.amazonaws.com/efa": 4}
    assert k8s["affinity"] == values["trainers"]["affinity"]
    assert k8s["placement_by_kind"] == {"evaluate": {"node_selector": {"pool": "cpu"}, "tolerations": []}}
    assert k8s["labels"] == {"selftrain.io/release": "st", "kueue.x-k8s.io/queue-name": "gpu"}
    # the config the driver loads accepts them, and the rendered trainer pods carry them
    from pipelines import render as render_jobs
    from pipelines.config import load_config

    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline(render(helm, "-f", str(f)))))
    cfg = load_config(tmp_path / "pipeline.yaml")
    evaluate = next(s for s in cfg.stage_specs("r") if s.stage.startswith("evaluate"))
    pod = render_jobs.render_stage(evaluate, cfg.executor.kubernetes)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["priorityClassName"] == "training-high" and pod["nodeSelector"] == {"pool": "cpu"}
    assert pod["containers"][0]["resources"]["limits"]["vpc.amazonaws.com/efa"] == "4"
    assert {"name": "NCCL_IB_HCA", "value": "mlx5"} in pod["containers"][0]["env"]


def test_unset_new_trainer_values_leave_the_pipeline_config_as_before(helm):
    k8s = pipeline(render(helm))["executor"]["kubernetes"]
    assert not {"affinity", "priority_class_name", "extra_resources", "placement_by_kind", "env"} & set(k8s)


def test_chart_pods_take_affinity_and_priority_class(helm):
    docs = render(helm, "--set", "priorityClassName=system-cluster-critical", "--set", "affinity.nodeAffinity.x=y")
    for name, spec in _pods(docs):
        assert spec["priorityClassName"] == "system-cluster-critical" and spec["affinity"] == {"nodeAffinity": {"x": "y"}}, name
