"""Stage spec -> Kubeflow PyTorchJob (training-operator v1), the one rendering path of every executor.

The job runs ``torchrun -m trainers <stage> --spec env:SELFTRAIN_SPEC`` with the spec JSON in the
``SELFTRAIN_SPEC`` variable, so a rendered manifest is self-contained for ``kubectl apply``.

The v1 operator (v1.9.3, pkg/controller.v1/pytorch/envvar.go + master.go) injects MASTER_ADDR and
PET_MASTER_ADDR (``<job>-master-0``), MASTER_PORT and PET_MASTER_PORT (the ``pytorchjob-port`` of the
``pytorch`` container), WORLD_SIZE (replicas x nprocPerNode), RANK and PET_NODE_RANK (the node rank:
Master 0, Worker i -> i+1), PET_NPROC_PER_NODE, PET_NNODES and PYTHONUNBUFFERED; torchrun reads the
PET_* ones, so the command needs no launcher flags.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from kubeflow.training.models import (
    KubeflowOrgV1PyTorchJob,
    KubeflowOrgV1PyTorchJobSpec,
    KubeflowOrgV1ReplicaSpec,
    KubeflowOrgV1RunPolicy,
    KubeflowOrgV1SchedulingPolicy,
)
from kubernetes.client import (
    ApiClient,
    V1Container,
    V1ContainerPort,
    V1EmptyDirVolumeSource,
    V1EnvVar,
    V1ObjectMeta,
    V1PersistentVolumeClaimVolumeSource,
    V1PodSpec,
    V1PodTemplateSpec,
    V1ResourceRequirements,
    V1Toleration,
    V1Volume,
    V1VolumeMount,
)

from pipelines.config import KubernetesConfig
from contract.spec import StageSpec

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the operator finds the master port on the container with this name
PORT_NAME = "pytorchjob-port"
SPEC_ENV = "SELFTRAIN_SPEC"
LABEL = "selftrain.io"


def fingerprint(spec: StageSpec) -> str:
    """Identity of a stage's work: trainer, inputs (DVC hashes / model refs), params, DeepSpeed config, outputs.

    Two specs with the same fingerprint produce the same outputs; tracking, image and the
    number of replicas do not enter it (DESIGN.md: a stage whose outputs exist for the same
    inputs and params is skipped).
    """
    datasets = {k: (d.dvc_hash or f"path:{d.path}") for k, d in spec.inputs.datasets.items()}
    doc = {
        "stage": spec.stage,
        "name": spec.name,
        "pipeline": spec.pipeline,
        "datasets": datasets,
        "models": {k: m.uri for k, m in spec.inputs.models.items()},
        "params": spec.params,
        "deepspeed": spec.resources.deepspeed,
        "outputs": {"dataset": spec.outputs.dataset, "model": spec.outputs.model},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def job_name(spec: StageSpec, run: str | None = None) -> str:
    """DNS-1123 name ``<pipeline>-<run>-<stage name>``, short enough for ``<job>-worker-<i>`` pod names."""
    raw = "-".join(p for p in (spec.pipeline, run, spec.name) if p)
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if len(name) > 50:
        name = name[:41].rstrip("-") + "-" + hashlib.sha1(raw.encode()).hexdigest()[:8]
    return name or "stage"


def _label_value(v: str) -> str:
    v = re.sub(r"[^A-Za-z0-9_.-]+", "-", v)[:63]
    return v.strip("-_.")


def container_command(spec: StageSpec) -> tuple[list[str], list[str]]:
    """(command, args) of the trainer container: ``torchrun -m trainers <stage> --spec env:SELFTRAIN_SPEC``."""
    return ["torchrun"], ["-m", "trainers", spec.stage, "--spec", f"env:{SPEC_ENV}"]


def map_paths(spec: StageSpec, mapping: dict[str, str]) -> StageSpec:
    """The spec with path prefixes replaced (host workspace dirs -> PVC mount paths in the container)."""
    if not mapping:
        return spec

    def m(p: str | None) -> str | None:
        if p is None:
            return None
        for src, dst in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
            src = src.rstrip("/")
            if p == src or p.startswith(src + "/"):
                return dst.rstrip("/") + p[len(src):]
        return p

    s = spec.model_copy(deep=True)
    for d in s.inputs.datasets.values():
        d.path = m(d.path)
    for mr in s.inputs.models.values():
        if not mr.uri.startswith("models:/") and "://" not in mr.uri:
            mr.uri = m(mr.uri)
    s.outputs.dataset = m(s.outputs.dataset)
    s.outputs.workdir = m(s.outputs.workdir)
    return s


def build_job(
    spec: StageSpec,
    k8s: KubernetesConfig | None = None,
    *,
    run: str | None = None,
    depends_on: Iterable[str] = (),
    path_map: dict[str, str] | None = None,
) -> KubeflowOrgV1PyTorchJob:
    """The PyTorchJob of one stage, as kubeflow-training SDK objects."""
    k8s = k8s or KubernetesConfig()
    spec = map_paths(spec, path_map or {})
    res = spec.resources
    fp = fingerprint(spec)
    name = job_name(spec, run)

    labels = {
        f"{LABEL}/pipeline": _label_value(spec.pipeline),
        f"{LABEL}/stage": _label_value(spec.name),
        f"{LABEL}/trainer": _label_value(spec.stage),
        f"{LABEL}/fingerprint": fp[:16],
    }
    if run:
        labels[f"{LABEL}/run"] = _label_value(run)
    labels.update(k8s.labels)
    annotations = {f"{LABEL}/fingerprint": fp, f"{LABEL}/depends-on": ",".join(depends_on)}
    if spec.tracking.run_id:
        annotations[f"{LABEL}/mlflow-run-id"] = spec.tracking.run_id

    env = [V1EnvVar(name=SPEC_ENV, value=spec.model_dump_json()), V1EnvVar(name="MLFLOW_TRACKING_URI", value=spec.tracking.mlflow_uri)]
    if spec.tracking.run_id:
        env.append(V1EnvVar(name="MLFLOW_RUN_ID", value=spec.tracking.run_id))
    env += [V1EnvVar(name=k, value=v) for k, v in sorted(k8s.env.items())]

    requests = {"cpu": res.cpu, "memory": res.memory}
    limits = {"memory": res.memory}
    if res.gpus_per_replica:
        requests["nvidia.com/gpu"] = str(res.gpus_per_replica)
        limits["nvidia.com/gpu"] = str(res.gpus_per_replica)

    volumes, mounts = [], []
    for vol, pvc, mount in (("data", k8s.data_pvc, k8s.data_mount), ("checkpoints", k8s.checkpoints_pvc, k8s.checkpoints_mount)):
        if pvc:
            volumes.append(V1Volume(name=vol, persistent_volume_claim=V1PersistentVolumeClaimVolumeSource(claim_name=pvc)))
            mounts.append(V1VolumeMount(name=vol, mount_path=mount))
    if k8s.shm_size:
        volumes.append(V1Volume(name="dshm", empty_dir=V1EmptyDirVolumeSource(medium="Memory", size_limit=k8s.shm_size)))
        mounts.append(V1VolumeMount(name="dshm", mount_path="/dev/shm"))

    command, args = container_command(spec)

    def replica(n: int) -> KubeflowOrgV1ReplicaSpec:
        container = V1Container(
            name=CONTAINER,
            image=spec.image,
            image_pull_policy=k8s.image_pull_policy,
            command=command,
            args=args,
            env=env,
            ports=[V1ContainerPort(name=PORT_NAME, container_port=k8s.master_port, protocol="TCP")],
            resources=V1ResourceRequirements(requests=requests, limits=limits),
            volume_mounts=mounts or None,
        )
        pod = V1PodSpec(
            containers=[container],
            volumes=volumes or None,
            service_account_name=k8s.service_account,
            node_selector=k8s.node_selector or None,
            tolerations=[V1Toleration(**_snake(t)) for t in k8s.tolerations] or None,
        )
        return KubeflowOrgV1ReplicaSpec(
            replicas=n,
            restart_policy=k8s.restart_policy,
            template=V1PodTemplateSpec(metadata=V1ObjectMeta(labels=dict(labels)), spec=pod),
        )

    replicas = {"Master": replica(1)}
    if res.replicas > 1:
        replicas["Worker"] = replica(res.replicas - 1)

    return KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=V1ObjectMeta(name=name, namespace=k8s.namespace, labels=labels, annotations=annotations),
        spec=KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(res.nproc_per_node),
            pytorch_replica_specs=replicas,
            run_policy=KubeflowOrgV1RunPolicy(
                clean_pod_policy=k8s.clean_pod_policy,
                backoff_limit=k8s.backoff_limit,
                ttl_seconds_after_finished=k8s.ttl_seconds_after_finished,
                active_deadline_seconds=k8s.active_deadline_seconds,
                scheduling_policy=KubeflowOrgV1SchedulingPolicy(**_snake(k8s.scheduling_policy)) if k8s.scheduling_policy else None,
            ),
        ),
    )


def to_dict(job: KubeflowOrgV1PyTorchJob) -> dict[str, Any]:
    """The job as a plain Kubernetes manifest (camelCase keys, no nulls)."""
    return ApiClient().sanitize_for_serialization(job)


def to_yaml(job: KubeflowOrgV1PyTorchJob | dict[str, Any]) -> str:
    return yaml.safe_dump(job if isinstance(job, dict) else to_dict(job), sort_keys=False, width=1 << 16)


def render_stage(spec: StageSpec, k8s: KubernetesConfig | None = None, **kw: Any) -> dict[str, Any]:
    """The PyTorchJob manifest of one stage as a dict (see :func:`build_job` for the keywords)."""
    return to_dict(build_job(spec, k8s, **kw))


def write_manifests(
    specs: list[StageSpec],
    out_dir: str | Path,
    k8s: KubernetesConfig | None = None,
    *,
    run: str | None = None,
    path_map: dict[str, str] | None = None,
) -> list[Path]:
    """Write the PyTorchJobs of a pipeline as ``NN-<stage name>.yaml`` for ``kubectl apply -f``.

    Each job's ``selftrain.io/depends-on`` annotation lists the stages before it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = pin_stage_models(specs)
    paths = []
    for i, spec in enumerate(specs):
        doc = render_stage(spec, k8s, run=run, depends_on=[s.name for s in specs[:i]], path_map=path_map)
        p = out / f"{i:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', spec.name)}.yaml"
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(to_yaml(doc))
        tmp.replace(p)
        paths.append(p)
    return paths


def pin_stage_models(specs: list[StageSpec]) -> list[StageSpec]:
    """Model inputs ``stage:<name>`` -> the ``model.pt`` that stage writes in its workdir.

    Running, the runner resolves them to registered versions; manifests applied with kubectl have
    no runner, so each stage reads the earlier stage's weights from the shared workdir instead.
    """
    workdirs = {s.name: s.outputs.workdir for s in specs}
    out = []
    for s in specs:
        refs = {k: m.uri[len("stage:"):] for k, m in s.inputs.models.items() if m.uri.startswith("stage:")}
        if refs:
            s = s.model_copy(deep=True)
            for k, name in refs.items():
                if name not in workdirs:
                    raise ValueError(f"stage {s.name}: input model {k!r} names stage {name!r}, which is not in this pipeline")
                s.inputs.models[k].uri = str(Path(workdirs[name]) / "model.pt")
        out.append(s)
    return out


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read one PyTorchJob manifest (YAML) written by :func:`write_manifests` or by hand."""
    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise ValueError(f"{path}: not a {KIND} manifest")
    return doc


def spec_of(job: dict[str, Any]) -> StageSpec:
    """The stage spec carried in a rendered job's ``SELFTRAIN_SPEC`` variable."""
    c = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    for e in c.get("env", []):
        if e["name"] == SPEC_ENV:
            return StageSpec.model_validate_json(e["value"])
    raise ValueError(f"job {job['metadata'].get('name')}: no {SPEC_ENV} in the Master container")


def _snake(d: dict[str, Any]) -> dict[str, Any]:
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in d.items()}


# -- a whole pipeline as files for kubectl apply -----------------------------------------------

def render_pipeline(config_path: str | Path, out_dir: str | Path, run: str = "demo") -> list[Path]:
    """``selftrain render``: a pipeline's stages as ``NN-<stage>.yaml`` PyTorchJobs plus a README.md of their order.

    Paths under the config's workspace are mapped to the PVC mount paths of its kubernetes section;
    stage files left in ``out_dir`` by an earlier render of a longer pipeline are removed.
    """
    from pipelines.config import load_config
    from pipelines.runner import path_map

    cfg = load_config(config_path)
    specs = cfg.stage_specs(run)
    paths = write_manifests(specs, out_dir, cfg.executor.kubernetes, run=run, path_map=path_map(cfg))
    for stale in set(Path(out_dir).glob("[0-9][0-9]-*.yaml")) - set(paths):
        stale.unlink()
    pinned = pin_stage_models([map_paths(s, path_map(cfg)) for s in specs])
    readme = Path(out_dir) / "README.md"
    config = Path(config_path).resolve()
    shown = config.relative_to(Path.cwd()) if config.is_relative_to(Path.cwd()) else config
    readme.write_text(pipeline_readme(pinned, paths, cfg.executor.kubernetes, run, shown))
    return paths


def data_dependencies(specs: list[StageSpec]) -> dict[str, list[str]]:
    """Stage name -> the earlier stages whose outputs it reads (datasets, model files, registered models).

    A ``models:/<name>@<alias>`` input depends on the last earlier stage that registers ``<name>``.
    """
    deps: dict[str, list[str]] = {}
    for i, s in enumerate(specs):
        before = specs[:i]
        found: list[str] = []
        for d in s.inputs.datasets.values():
            found += [b.name for b in before if b.outputs.dataset and _under(d.path, b.outputs.dataset)]
        for m in s.inputs.models.values():
            if m.uri.startswith("models:/"):
                name = re.split(r"[@/]", m.uri[len("models:/"):], maxsplit=1)[0]
                writers = [b.name for b in before if b.outputs.model == name]
                found += writers[-1:]
            else:
                found += [b.name for b in before if _under(m.uri, b.outputs.workdir)]
        deps[s.name] = list(dict.fromkeys(found))
    return deps


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def pipeline_readme(specs: list[StageSpec], paths: list[Path], k8s: KubernetesConfig, run: str, config: Path) -> str:
    """The README of a rendered pipeline folder: apply order, what each stage reads, and the one manual step."""
    deps = data_dependencies(specs)
    aliased = [(p.name, m.uri) for s, p in zip(specs, paths) for m in s.inputs.models.values()
               if m.uri.startswith("models:/") and "@" in m.uri]
    lines = [
        f"# {specs[0].pipeline if specs else 'pipeline'} run `{run}` as PyTorchJobs",
        "",
        f"Rendered by `selftrain render {config.as_posix()} -o <this folder> --run {run}`; do not edit by hand.",
        f"Every job runs in namespace `{k8s.namespace}`. Apply the files **one at a time, in order**, and wait",
        "for each job to succeed before the next one (`kubectl apply -f <folder>` would start them all at once):",
        "",
        "```bash",
        "for f in [0-9][0-9]-*.yaml; do",
        f"  kubectl -n {k8s.namespace} apply -f \"$f\"",
        f"  kubectl -n {k8s.namespace} wait --for=condition=Succeeded --timeout=24h -f \"$f\"",
        "done",
        "```",
        "",
        "`selftrain.io/depends-on` on each job lists every stage before it (the order above);",
        "the last column names the stages whose outputs it actually reads.",
        "",
        "| # | file | stage | trainer | replicas x procs | reads outputs of |",
        "| ---: | --- | --- | --- | --- | --- |",
    ]
    for i, (s, p) in enumerate(zip(specs, paths)):
        r = s.resources
        size = f"{r.replicas} x {r.nproc_per_node}" + (f" ({r.gpus_per_replica} GPU each)" if r.gpus_per_replica else "")
        lines.append(f"| {i:02d} | `{p.name}` | {s.name} | {s.stage} | {size} | {', '.join(deps[s.name]) or '-'} |")
    if aliased:
        lines += [
            "",
            "Models are promoted by `selftrain run`, not by these files. Before applying a job that reads a",
            "model by alias, set that alias on the version you accept (MLflow UI, or",
            "`MlflowClient().set_registered_model_alias(name, alias, version)`):",
            "",
        ]
        lines += [f"- `{f}` reads `{uri}`" for f, uri in aliased]
    return "\n".join(lines) + "\n"
