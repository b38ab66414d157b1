"""Rendering: stage spec -> PyTorchJob (training-operator v1) with the right replicas, env, resources and policies."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipelines import render
from contract.spec import StageSpec
from control_helpers import make_config


def _spec(tmp_path, **resources) -> StageSpec:
    cfg = make_config(tmp_path)
    spec = cfg.new_stage_spec("r1", "fit-objects", params={"steps": 5}, output_model="objects", resources=resources)
    return spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"run_id": "abc123"})})


def _container(job, rtype="Master"):
    return job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"][0]


def _env(job, rtype="Master"):
    return {e["name"]: e["value"] for e in _container(job, rtype)["env"]}


def test_one_replica_is_a_master_only_job(tmp_path):
    job = render.render_stage(_spec(tmp_path, nproc_per_node=2))
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "2"


def test_more_replicas_add_workers(tmp_path):
    job = render.render_stage(_spec(tmp_path, replicas=3))
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert _container(job, "Worker") == _container(job, "Master")


def test_container_runs_the_stage_job_with_the_spec_in_the_environment(tmp_path):
    spec = _spec(tmp_path)
    job = render.render_stage(spec, run="r1")
    c = _container(job)
    assert c["name"] == "pytorch"  # the operator reads the master port from this container
    assert c["ports"] == [{"containerPort": 23456, "name": "pytorchjob-port", "protocol": "TCP"}]
    assert c["command"] + c["args"] == ["python", "-m", "pipelines.stage_job", "--spec", "env:SELFTRAIN_SPEC"]
    env = _env(job)
    assert env["SELFTRAIN_RUN"] == "r1"
    assert StageSpec.model_validate_json(env["SELFTRAIN_SPEC"]) == spec
    assert env["MLFLOW_TRACKING_URI"] == spec.tracking.mlflow_uri
    assert env["MLFLOW_RUN_ID"] == "abc123"
    assert render.spec_of(job) == spec


def test_gpu_resources_are_requested_and_limited(tmp_path):
    job = render.render_stage(_spec(tmp_path, gpus_per_replica=4, cpu="8", memory="64Gi"))
    r = _container(job)["resources"]
    assert r["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "4"}
    assert r["requests"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "4"}
    assert "nvidia.com/gpu" not in _container(render.render_stage(_spec(tmp_path)))["resources"]["limits"]


def test_run_policy_and_restart_policy_come_from_the_config(tmp_path):
    cfg = make_config(tmp_path, executor={"kubernetes": {"backoff_limit": 5, "clean_pod_policy": "Running", "ttl_seconds_after_finished": 60, "restart_policy": "ExitCode"}})
    job = render.render_stage(_spec(tmp_path, replicas=2), cfg.executor.kubernetes)
    assert job["spec"]["runPolicy"] == {"backoffLimit": 5, "cleanPodPolicy": "Running", "ttlSecondsAfterFinished": 60}
    assert {rs["restartPolicy"] for rs in job["spec"]["pytorchReplicaSpecs"].values()} == {"ExitCode"}
    default = render.render_stage(_spec(tmp_path))
    assert default["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] == "OnFailure"


def test_volumes_are_pvcs_by_config_and_none_by_default(tmp_path):
    plain = render.render_stage(_spec(tmp_path), make_config(tmp_path, executor={"kubernetes": {"pod_security": "none"}}).executor.kubernetes)
    assert "volumes" not in plain["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    cfg = make_config(tmp_path, executor={"kubernetes": {"data_pvc": "selftrain-data", "checkpoints_pvc": "selftrain-ckpt",
                                                         "pod_security": "none"}})
    spec = _spec(tmp_path)
    ws = cfg.paths
    job = render.render_stage(spec, cfg.executor.kubernetes, path_map={ws.data: "/data", ws.runs: "/checkpoints"})
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["volumes"] == [
        {"name": "data", "persistentVolumeClaim": {"claimName": "selftrain-data"}},
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "selftrain-ckpt"}},
    ]
    assert pod["containers"][0]["volumeMounts"] == [{"mountPath": "/data", "name": "data"}, {"mountPath": "/checkpoints", "name": "checkpoints"}]
    assert render.spec_of(job).outputs.workdir == "/checkpoints/r1/fit-objects"


def test_trainer_pods_meet_pod_security_restricted_by_default(tmp_path):
    job = render.render_stage(_spec(tmp_path))
    for rs in job["spec"]["pytorchReplicaSpecs"].values():
        pod = rs["template"]["spec"]
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001 and psc["seccompProfile"] == {"type": "RuntimeDefault"}
        (c,) = pod["containers"]
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        assert {"mountPath": "/tmp", "name": "tmp"} in c["volumeMounts"] and {"emptyDir": {}, "name": "tmp"} in pod["volumes"]
        assert {e["name"]: e["value"] for e in c["env"]}["HOME"] == "/tmp"


def test_affinity_priority_extra_resources_and_placement_by_stage_kind(tmp_path):
    k8s = make_config(tmp_path, executor={"kubernetes": {
        "node_selector": {"pool": "gpu"}, "affinity": {"nodeAffinity": {"x": "y"}}, "priority_class_name": "training-high",
        "extra_resources": {"rdma/ib": 1}, "placement_by_kind": {"evaluate": {"node_selector": {"pool": "cpu"}}}}}).executor.kubernetes
    train = render.render_stage(_spec(tmp_path), k8s)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert train["nodeSelector"] == {"pool": "gpu"} and train["affinity"] == {"nodeAffinity": {"x": "y"}}
    assert train["priorityClassName"] == "training-high"
    res = train["containers"][0]["resources"]
    assert res["requests"]["rdma/ib"] == "1" and res["limits"]["rdma/ib"] == "1"
    evaluate = _spec(tmp_path).model_copy(update={"stage": "evaluate-parts", "name": "ev"})
    pod = render.render_stage(evaluate, k8s)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "cpu"} and pod["affinity"] == {"nodeAffinity": {"x": "y"}}  # kind replaces, field by field


def test_labels_and_annotations_identify_the_stage(tmp_path):
    spec = _spec(tmp_path)
    job = render.render_stage(spec, run="2026-11-25", depends_on=["mine-parts", "train"])
    meta = job["metadata"]
    fp = render.fingerprint(spec)
    assert meta["labels"] == {
        "selftrain.io/pipeline": "custom", "selftrain.io/stage": "fit-objects", "selftrain.io/trainer": "fit-objects",
        "selftrain.io/fingerprint": fp[:16], "selftrain.io/run": "2026-11-25",
    }
    assert meta["annotations"]["selftrain.io/fingerprint"] == fp
    assert meta["annotations"]["selftrain.io/depends-on"] == "mine-parts,train"
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"] == meta["labels"]
    assert meta["name"] == "custom-2026-11-25-fit-objects"


def test_job_names_stay_dns_labels(tmp_path):
    spec = _spec(tmp_path).model_copy(update={"name": "Round_12/Train-Proposals-with-a-very-long-name-indeed"})
    name = render.job_name(spec, run="20261125-104512")
    assert len(name) <= 50 and name == name.lower() and "/" not in name and "_" not in name


def test_fingerprint_follows_inputs_and_params_not_placement(tmp_path):
    spec = _spec(tmp_path)
    fp = render.fingerprint(spec)
    assert render.fingerprint(spec.model_copy(update={"params": {"steps": 6}})) != fp
    more = spec.model_copy(deep=True)
    more.resources.replicas = 4
    more.tracking.run_id = "other"
    assert render.fingerprint(more) == fp


def test_write_manifests_numbers_files_and_records_the_graph(tmp_path):
    cfg = make_config(tmp_path, stages=[{"stage": "a", "output_dataset": "x"}, {"stage": "b"},
                                        {"stage": "c", "datasets": {"x": "x"}, "models": {"m": "stage:b"}}])
    paths = render.write_manifests(cfg.stage_specs("r1"), tmp_path / "manifests", run="r1")
    assert [p.name for p in paths] == ["00-a.yaml", "01-b.yaml", "02-c.yaml"]
    assert (tmp_path / "manifests" / "README.md").is_file()
    first, last = render.load_manifest(paths[0]), render.load_manifest(paths[2])
    assert first["metadata"]["annotations"]["selftrain.io/depends-on"] == ""
    assert last["metadata"]["annotations"]["selftrain.io/depends-on"] == "a,b"
    assert render.spec_of(last).stage == "c"


# -- the real CRD schema -----------------------------------------------------------------------

CRD_FILE = Path(__file__).resolve().parents[1] / "fixtures" / "crds" / "kubeflow.org_pytorchjobs.yaml"


def _crd_schema() -> dict:
    """The v1 openAPIV3Schema of the project's pinned copy of the training operator's PyTorchJob CRD (never skips)."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    assert crd["metadata"]["name"] == "pytorchjobs.kubeflow.org", CRD_FILE
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _check(doc, schema, path="") -> list[str]:
    """Structural-schema check: types, enums, required keys, and no field the API server would prune."""
    errors = []
    if schema.get("x-kubernetes-int-or-string"):
        return [] if isinstance(doc, (int, str)) else [f"{path}: not int-or-string"]
    t = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool, "number": (int, float)}
    if t and not isinstance(doc, types[t]):
        return [f"{path}: expected {t}, got {type(doc).__name__}"]
    if "enum" in schema and doc not in schema["enum"]:
        errors.append(f"{path}: {doc!r} not in {schema['enum']}")
    if isinstance(doc, dict):
        props = schema.get("properties")
        for k in schema.get("required", []):
            if k not in doc:
                errors.append(f"{path}.{k}: required")
        for k, v in doc.items():
            if props is not None and k in props:
                errors += _check(v, props[k], f"{path}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _check(v, schema["additionalProperties"], f"{path}.{k}")
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{k}: unknown field (pruned by the API server)")
    if isinstance(doc, list) and "items" in schema:
        for i, v in enumerate(doc):
            errors += _check(v, schema["items"], f"{path}[{i}]")
    return errors


def test_rendered_job_matches_the_training_operator_crd(tmp_path):
    schema = _crd_schema()
    cfg = make_config(tmp_path, executor={"kubernetes": {"data_pvc": "d", "checkpoints_pvc": "c", "shm_size": "1Gi",
                                                         "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                                                         "node_selector": {"pool": "gpu"}, "service_account": "trainer", "active_deadline_seconds": 3600}})
    job = render.render_stage(_spec(tmp_path, replicas=2, gpus_per_replica=1), cfg.executor.kubernetes, run="r1", depends_on=["x"])
    assert _check(json.loads(json.dumps(job)), schema) == []
    broken = json.loads(json.dumps(job))
    broken["spec"]["runPolicy"]["backofLimit"] = 1
    assert _check(broken, schema) == [".spec.runPolicy.backofLimit: unknown field (pruned by the API server)"]


def test_manifests_keep_stage_refs_for_the_job_to_resolve(tmp_path):
    cfg = make_config(tmp_path, stages=[{"stage": "train", "output_model": "m"}, {"stage": "eval", "models": {"candidate": "stage:train"}}])
    specs = cfg.stage_specs("r1")
    paths = render.write_manifests(specs, tmp_path / "manifests", run="r1")
    job = render.load_manifest(paths[1])
    assert render.spec_of(job).inputs.models["candidate"].uri == "stage:train"  # no checkpoint path: the registered version
    assert job["metadata"]["annotations"]["selftrain.io/depends-on"] == "train"
