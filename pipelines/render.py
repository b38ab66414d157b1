"""Stage spec -> Kubeflow PyTorchJob (training-operator v1), the one rendering path of every executor.

Every replica runs ``python -m pipelines.stage_job --spec env:SELFTRAIN_SPEC`` with the spec JSON
in the ``SELFTRAIN_SPEC`` variable and the pipeline run's name in ``SELFTRAIN_RUN``: the stage job
resolves the inputs, runs ``torchrun -m trainers <stage>`` and, on the Master, versions the output
dataset, registers the model and applies the promotion rule (:mod:`pipelines.stage_job`). So a
rendered manifest is complete in itself for ``kubectl apply``.

:func:`stage_graph` is the pipeline as a graph (what each stage reads from which earlier stage);
the runner schedules by it and :func:`write_manifests`, the one manifest-writing path, records it
in each job's ``selftrain.io/depends-on`` annotation.

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
    V1Capabilities,
    V1Container,
    V1ContainerPort,
    V1EmptyDirVolumeSource,
    V1EnvVar,
    V1ObjectMeta,
    V1PersistentVolumeClaimVolumeSource,
    V1PodSecurityContext,
    V1PodSpec,
    V1PodTemplateSpec,
    V1ResourceRequirements,
    V1SeccompProfile,
    V1SecurityContext,
    V1Toleration,
    V1Volume,
    V1VolumeMount,
)

from pipelines.config import KubernetesConfig
from contract import stages as registry
from contract.spec import StageSpec

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the operator finds the master port on the container with this name
PORT_NAME = "pytorchjob-port"
SPEC_ENV = "SELFTRAIN_SPEC"
RUN_ENV = "SELFTRAIN_RUN"
LABEL = "selftrain.io"
TRAINER_UID = 10001  # the image's user (Dockerfile)
#: Caches the trainers write, moved to the /tmp emptyDir when the root filesystem is read-only (Pod Security restricted).
RESTRICTED_ENV = {"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache", "TORCH_EXTENSIONS_DIR": "/tmp/torch_extensions",
                  "TRITON_CACHE_DIR": "/tmp/triton", "MPLCONFIGDIR": "/tmp/matplotlib"}


def fingerprint(spec: StageSpec, extra: dict[str, Any] | None = None) -> str:
    """Identity of a stage's work: trainer, inputs (DVC hashes / model refs), params, DeepSpeed config, outputs.

    Two specs with the same fingerprint produce the same outputs; tracking, image and the
    number of replicas do not enter it (docs/architecture.md "Idempotent and resumable": a stage whose outputs exist for the same
    inputs and params is skipped). ``extra`` adds what pins an input beyond the spec (the
    sha256 of a model file).
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
    if spec.promotion is not None:
        doc["promotion"] = spec.promotion.model_dump()
    if extra:
        doc["extra"] = extra
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
    """(command, args) of the trainer container: ``python -m pipelines.stage_job --spec env:SELFTRAIN_SPEC``."""
    return ["python"], ["-m", "pipelines.stage_job", "--spec", f"env:{SPEC_ENV}"]


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
    if run:
        env.append(V1EnvVar(name=RUN_ENV, value=run))
    if spec.tracking.run_id:
        env.append(V1EnvVar(name="MLFLOW_RUN_ID", value=spec.tracking.run_id))
    restricted = k8s.pod_security == "restricted"
    if restricted:  # a read-only root: every cache the trainers write goes to the /tmp emptyDir
        env += [V1EnvVar(name=k, value=v) for k, v in RESTRICTED_ENV.items() if k not in k8s.env]
    if "OMP_NUM_THREADS" not in k8s.env:  # torch sizes its pools by the node's cores, not the pod's request
        env.append(V1EnvVar(name="OMP_NUM_THREADS", value=str(threads_per_process(res.cpu, res.nproc_per_node))))
    env += [V1EnvVar(name=k, value=v) for k, v in sorted(k8s.env.items())]

    requests = {"cpu": res.cpu, "memory": res.memory}
    limits = {"memory": res.memory}
    if res.gpus_per_replica:
        requests["nvidia.com/gpu"] = str(res.gpus_per_replica)
        limits["nvidia.com/gpu"] = str(res.gpus_per_replica)
    for k, v in sorted(k8s.extra_resources.items()):
        requests[k] = limits[k] = str(v)

    volumes, mounts = [], []
    for vol, pvc, mount in (("data", k8s.data_pvc, k8s.data_mount), ("checkpoints", k8s.checkpoints_pvc, k8s.checkpoints_mount)):
        if pvc:
            volumes.append(V1Volume(name=vol, persistent_volume_claim=V1PersistentVolumeClaimVolumeSource(claim_name=pvc)))
            mounts.append(V1VolumeMount(name=vol, mount_path=mount))
    if k8s.shm_size:
        volumes.append(V1Volume(name="dshm", empty_dir=V1EmptyDirVolumeSource(medium="Memory", size_limit=k8s.shm_size)))
        mounts.append(V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    if restricted:
        volumes.append(V1Volume(name="tmp", empty_dir=V1EmptyDirVolumeSource()))
        mounts.append(V1VolumeMount(name="tmp", mount_path="/tmp"))
    placement = _placement(spec, k8s)

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
            security_context=V1SecurityContext(
                allow_privilege_escalation=False, capabilities=V1Capabilities(drop=["ALL"]),
                read_only_root_filesystem=True, run_as_non_root=True) if restricted else None,
        )
        pod = V1PodSpec(
            containers=[container],
            volumes=volumes or None,
            service_account_name=k8s.service_account,
            node_selector=placement["node_selector"] or None,
            tolerations=[V1Toleration(**_snake(t)) for t in placement["tolerations"]] or None,
            affinity=placement["affinity"] or None,
            priority_class_name=k8s.priority_class_name,
            security_context=V1PodSecurityContext(
                run_as_non_root=True, run_as_user=TRAINER_UID, run_as_group=TRAINER_UID, fs_group=TRAINER_UID,
                fs_group_change_policy="OnRootMismatch", seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
            ) if restricted else None,
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


def threads_per_process(cpu: str, nproc_per_node: int) -> int:
    """Intra-op threads for each of a replica's ``nproc_per_node`` processes: its CPU request (``"2"``, ``"1.5"``,
    ``"500m"``) shared among them, at least 1. Without it torch starts one thread per core of the node, and
    several processes on one node then oversubscribe it many times over."""
    text = str(cpu).strip()
    try:
        cores = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError as e:
        raise ValueError(f"resources.cpu {cpu!r}: expected a Kubernetes CPU quantity such as 2, 1.5 or 500m") from e
    return max(1, int(cores // max(1, nproc_per_node)))


def _placement(spec: StageSpec, k8s: KubernetesConfig) -> dict[str, Any]:
    """nodeSelector, tolerations and affinity of a stage's pods: the job-wide ones, replaced field by field by its kind's."""
    out = {"node_selector": k8s.node_selector, "tolerations": k8s.tolerations, "affinity": k8s.affinity}
    if spec.stage in registry.STAGES and registry.STAGES[spec.stage].kind in k8s.placement_by_kind:
        by_kind = k8s.placement_by_kind[registry.STAGES[spec.stage].kind]
        out.update({k: v for k, v in by_kind.model_dump().items() if v is not None})
    return out


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
    config: str | Path | None = None,
) -> list[Path]:
    """Write the PyTorchJobs of a pipeline as ``NN-<stage name>.yaml`` plus a ``README.md``: the one manifest-writing path.

    Each job's ``selftrain.io/depends-on`` annotation lists the stages it waits for
    (:func:`stage_graph`); paths are mapped by ``path_map`` (workspace -> PVC mount paths).
    Stage files left in ``out_dir`` by an earlier render of a longer pipeline are removed.
    ``config`` names the config file in the README's "rendered by" line.
    """
    from contract.io import write_atomic

    k8s = k8s or KubernetesConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graph = stage_graph(specs)
    paths = []
    for i, spec in enumerate(specs):
        doc = render_stage(spec, k8s, run=run, depends_on=graph[spec.name], path_map=path_map)
        p = out / f"{i:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', spec.name)}.yaml"
        write_atomic(p, to_yaml(doc))
        paths.append(p)
    for stale in set(out.glob("[0-9][0-9]-*.yaml")) - set(paths):
        stale.unlink()
    write_atomic(out / "README.md", pipeline_readme(specs, paths, k8s, run or "", config, graph))
    return paths


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


# -- the pipeline as a graph ------------------------------------------------------------------

def stage_graph(specs: list[StageSpec]) -> dict[str, list[str]]:
    """Stage name -> the earlier stages it must wait for, from the inputs each stage declares.

    A stage waits for the stage that wrote a dataset it reads (its path under an earlier output
    dataset), the stage a ``stage:<name>`` model ref names, the stage whose workdir holds a model
    file it reads, and, for ``models:/<name>@<alias>``, the last earlier stage that can move that
    alias (an evaluating stage whose ``promotion`` covers a candidate registered as ``<name>``;
    without one, the last earlier stage that registers ``<name>``). So that running side by side
    gives the same results as running in order, it also waits for earlier stages that touch the
    same things: a stage moving ``<name>@<alias>`` waits for earlier readers of that alias and
    earlier movers of ``<name>``'s aliases; a stage registering ``<name>`` waits for the earlier
    one that registered it (version numbers follow the pipeline order); a stage writing a
    dataset waits for earlier writers of it. Raises ValueError for a ``stage:`` ref to a stage
    that is not earlier in the pipeline.
    """
    index = {s.name: i for i, s in enumerate(specs)}
    deps: dict[str, list[str]] = {}
    for i, s in enumerate(specs):
        before = specs[:i]
        found: list[str] = []
        for d in s.inputs.datasets.values():
            found += [b.name for b in before if b.outputs.dataset and _under(d.path, b.outputs.dataset)][-1:]
        for k, m in s.inputs.models.items():
            if m.uri.startswith("stage:"):
                ref = m.uri[len("stage:"):]
                if index.get(ref, i) >= i:
                    raise ValueError(f"stage {s.name}: input model {k!r} names stage {ref!r}, which is not an earlier stage of this pipeline")
                found.append(ref)
            elif m.uri.startswith("models:/"):
                name, sep, rest = m.uri[len("models:/"):].partition("@")
                if sep:
                    movers = [b.name for b in before if rest in _moves(b, specs).get(name, ())]
                    found += movers[-1:] or [b.name for b in before if b.outputs.model == name][-1:]
            elif "://" not in m.uri:
                found += [b.name for b in before if _under(m.uri, b.outputs.workdir)][-1:]
        # write-after-read and write-after-write: side by side stays the same as in order
        for name, aliases in _moves(s, specs).items():
            for b in before:
                if set(aliases) & set(_reads_aliases(b).get(name, ())) or _moves(b, specs).get(name):
                    found.append(b.name)
        if s.outputs.model:
            found += [b.name for b in before if b.outputs.model == s.outputs.model][-1:]
        if s.outputs.dataset:
            found += [b.name for b in before if b.outputs.dataset and (_under(s.outputs.dataset, b.outputs.dataset) or _under(b.outputs.dataset, s.outputs.dataset))]
            found += [b.name for b in before for d in b.inputs.datasets.values() if _under(d.path, s.outputs.dataset)]
        deps[s.name] = sorted(dict.fromkeys(found), key=index.__getitem__)
    return deps


def _moves(s: StageSpec, specs: list[StageSpec]) -> dict[str, tuple[str, ...]]:
    """Registered model -> the aliases stage ``s`` may move (its ``promotion`` applied to its candidate)."""
    if s.promotion is None:
        return {}
    cand = s.inputs.models.get(s.promotion.candidate)
    if cand is None:
        return {}
    if cand.uri.startswith("stage:"):
        writer = next((b for b in specs if b.name == cand.uri[len("stage:"):]), None)
        name = writer.outputs.model if writer else None
    elif cand.uri.startswith("models:/"):
        name = re.split(r"[@/]", cand.uri[len("models:/"):], maxsplit=1)[0]
    else:
        name = None
    return {name: tuple(s.promotion.aliases)} if name else {}


def _reads_aliases(s: StageSpec) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in s.inputs.models.values():
        if m.uri.startswith("models:/") and "@" in m.uri:
            name, alias = m.uri[len("models:/"):].split("@", 1)
            out.setdefault(name, []).append(alias)
    return out


def render_pipeline(config_path: str | Path, out_dir: str | Path, run: str = "demo") -> list[Path]:
    """``selftrain render``: a config's stages through :func:`write_manifests` (paths mapped to the PVC mounts)."""
    from pipelines.config import load_config

    cfg = load_config(config_path)
    config = Path(config_path).resolve()
    shown = config.relative_to(Path.cwd()) if config.is_relative_to(Path.cwd()) else config
    return write_manifests(cfg.stage_specs(run), out_dir, cfg.executor.kubernetes, run=run, path_map=workspace_mounts(cfg), config=shown)


def workspace_mounts(cfg: Any) -> dict[str, str]:
    """Workspace dirs -> container mount paths, for the PVCs the config mounts."""
    k8s = cfg.executor.kubernetes
    out = {}
    if k8s.data_pvc:
        out[cfg.paths.data] = k8s.data_mount
    if k8s.checkpoints_pvc:
        out[cfg.paths.runs] = k8s.checkpoints_mount
    return out


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def pipeline_readme(specs: list[StageSpec], paths: list[Path], k8s: KubernetesConfig, run: str, config: str | Path | None,
                    graph: dict[str, list[str]] | None = None) -> str:
    """The README of a rendered pipeline folder: apply order, what each stage waits for, what each job does."""
    graph = graph if graph is not None else stage_graph(specs)
    by_name = {s.name: p.name for s, p in zip(specs, paths)}
    rendered = f"`selftrain render {Path(config).as_posix()} -o <this folder> --run {run}`" if config else "`selftrain render`"
    lines = [
        f"# {specs[0].pipeline if specs else 'pipeline'} run `{run}` as PyTorchJobs",
        "",
        f"Rendered by {rendered}; do not edit by hand.",
        f"Every job runs in namespace `{k8s.namespace}` and is complete in itself: it resolves its inputs",
        "(`stage:<name>` -> the model version that stage registered in this run, `models:/<name>@<alias>` -> the",
        "version holding the alias, datasets -> their DVC hashes) and records them in MLflow, runs the trainer, and",
        "then, on the Master, versions and pushes its output dataset with DVC, registers its model, and an evaluating",
        "stage applies its promotion rule (moves `teacher` / `champion`). A job whose stage already succeeded for the",
        "same inputs and params exits at once. Apply the files **one at a time, in order**, and wait for each job",
        "to succeed before the next one (`kubectl apply -f <folder>` would start them all at once):",
        "",
        "```bash",
        "for f in [0-9][0-9]-*.yaml; do",
        f"  kubectl -n {k8s.namespace} apply -f \"$f\"",
        f"  kubectl -n {k8s.namespace} wait --for=condition=Succeeded --timeout=24h -f \"$f\"",
        "done",
        "```",
        "",
        "The order is one of many: a job may start once the jobs it waits for (its `selftrain.io/depends-on`",
        "annotation, the last column) have succeeded, which is how `selftrain run --max-parallel N` runs them.",
        "Jobs need the MLflow server (`tracking.mlflow_uri` in the spec) and the DVC remote reachable.",
        "",
        "| # | file | stage | trainer | replicas x procs | promotes | waits for |",
        "| ---: | --- | --- | --- | --- | --- | --- |",
    ]
    for i, (s, p) in enumerate(zip(specs, paths)):
        r = s.resources
        size = f"{r.replicas} x {r.nproc_per_node}" + (f" ({r.gpus_per_replica} GPU each)" if r.gpus_per_replica else "")
        moves = ", ".join(f"`{m}@{a}`" for m, aliases in _moves(s, specs).items() for a in aliases) or "-"
        waits = ", ".join(f"{d} (`{by_name[d][:2]}`)" for d in graph[s.name]) or "-"
        lines.append(f"| {i:02d} | `{p.name}` | {s.name} | {s.stage} | {size} | {moves} | {waits} |")
    return "\n".join(lines) + "\n"
