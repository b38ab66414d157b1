"""The pipeline config: one typed YAML document, validated in full before any stage starts.

Generic sections (workspace, tracking, executor, kubernetes, resources, deepspeed, promotion,
an explicit ``stages`` list) live here. A pipeline contributes its own typed section by
subclassing :class:`PipelineConfig`, adding one field named after itself, overriding
:meth:`PipelineConfig.stage_specs`, and listing the subclass in :data:`PIPELINES`
(docs/architecture.md "Adding a pipeline").

Stage params are checked when the config loads, before anything runs: every ``stages[i].params``
and every pass-through dict declared with :func:`stage_params` against the trainer's params model
(``contract.stages``), then every stage spec the pipeline builds. Errors name the file, the key
path and the allowed keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

from contract import stages as registry
from contract.io import deep_merge as _merge
from contract.spec import (
    DEFAULT_OUTAGE_SECONDS,
    DatasetRef,
    Inputs,
    ModelRef,
    Outputs,
    Promotion,
    Resources,
    SpecError,
    StageSpec,
    Tracking,
    _Strict,
    format_validation_error,
    load_model,
)

STAGE_KEY = "selftrain_stage"  # json_schema_extra key: the trainer whose params a pass-through dict holds


def stage_params(stage: str, description: str) -> Any:
    """A pipeline-section field holding overrides of trainer ``stage``'s params, validated against its params model at load time."""
    registry.get(stage)  # a typo in the pipeline's own code fails at import
    return Field(default_factory=dict, description=f"{description} Keys: `python -m trainers {stage} --help`.",
                 json_schema_extra={STAGE_KEY: stage})


class Workspace(_Strict):
    """Where a pipeline keeps its state on this machine (relative paths: to the config file)."""

    root: str = Field(default=".selftrain", description="Workspace directory; the other paths default to folders inside it.")
    data: str | None = Field(default=None, description="Datasets stages write (default <root>/data).")
    runs: str | None = Field(default=None, description="Pipeline runs: one folder per run, one workdir per stage (default <root>/runs).")
    mlflow: str | None = Field(default=None, description="Embedded MLflow store: mlflow.db and artifacts/ (default <root>/mlflow).")
    dvc_remote: str | None = Field(default=None, description="DVC remote directory or URL (default <root>/dvc-remote).")

    def resolved(self, base: Path) -> "Workspace":
        """A copy with every path absolute (relative ones taken against ``base``)."""
        root = (base / self.root).resolve()

        def _abs(value: str | None, default: str) -> str:
            if value is None:
                return str(root / default)
            return value if "://" in value else str((base / value).resolve())

        return Workspace(
            root=str(root),
            data=_abs(self.data, "data"),
            runs=_abs(self.runs, "runs"),
            mlflow=_abs(self.mlflow, "mlflow"),
            dvc_remote=_abs(self.dvc_remote, "dvc-remote"),
        )


class TrackingConfig(_Strict):
    """MLflow: where runs, metrics, artifacts and registered models go."""

    uri: str | None = Field(default=None, description="MLflow tracking URI; default: SQLite store in the workspace (sqlite:///<mlflow>/mlflow.db).")
    experiment: str = Field(default="selftrain", description="MLflow experiment that holds the pipeline runs.")
    artifact_location: str | None = Field(default=None, description="Artifact root for a new experiment; default <mlflow>/artifacts with the SQLite store, the server's default otherwise.")
    outage_seconds: float = Field(default=DEFAULT_OUTAGE_SECONDS, gt=0, allow_inf_nan=False,
                                  description="How long an MLflow outage may last (s): meanwhile a stage holds its metrics and the driver and "
                                              "stage jobs retry their bookkeeping; past it they fail naming the server (docs/faults.md).")


class StagePlacement(_Strict):
    """Scheduling of one stage kind's pods; a field left unset keeps the job-wide value."""

    node_selector: dict[str, str] | None = Field(default=None, description="nodeSelector of this kind's pods.")
    tolerations: list[dict[str, Any]] | None = Field(default=None, description="Tolerations of this kind's pods.")
    affinity: dict[str, Any] | None = Field(default=None, description="Affinity of this kind's pods.")


class KubernetesConfig(_Strict):
    """How a stage becomes a PyTorchJob (used by the render and kubernetes executors, and read by the local one)."""

    namespace: str = Field(default="default", description="Namespace the PyTorchJobs are created in.")
    service_account: str | None = Field(default=None, description="Service account of the training pods.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(default="IfNotPresent", description="Pull policy of the trainer image.")
    data_pvc: str | None = Field(default=None, description="PVC holding the workspace data (datasets); mounted at data_mount.")
    data_mount: str = Field(default="/data", description="Mount path of data_pvc in the trainer container.")
    checkpoints_pvc: str | None = Field(default=None, description="PVC for stage workdirs (checkpoints, results); mounted at checkpoints_mount.")
    checkpoints_mount: str = Field(default="/checkpoints", description="Mount path of checkpoints_pvc in the trainer container.")
    shm_size: str | None = Field(default=None, description="Size of a memory-backed /dev/shm emptyDir (e.g. 8Gi); none by default.")
    restart_policy: Literal["OnFailure", "ExitCode", "Never"] = Field(
        default="OnFailure",
        description="Replica restart policy. OnFailure: a failed rank makes the others' collectives fail too, so the whole group restarts and resumes from its checkpoint.",
    )
    backoff_limit: int = Field(default=3, ge=0, description="Restarts of the group before the stage fails (runPolicy.backoffLimit).")
    clean_pod_policy: Literal["None", "Running", "All"] = Field(
        default="Running", description="Pods deleted when the job ends (runPolicy.cleanPodPolicy). Running: replicas still running when the job fails or finishes are stopped (their GPUs freed), ended pods and their logs stay; None keeps them all running.")
    ttl_seconds_after_finished: int | None = Field(default=86400, ge=0, description="Delete the finished PyTorchJob after this many seconds (runPolicy.ttlSecondsAfterFinished).")
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Fail a stage running longer than this (runPolicy.activeDeadlineSeconds).")
    cleanup: Literal["always", "on-success", "never"] = Field(
        default="on-success",
        description="Kubernetes executor: delete finished PyTorchJobs always, on success only (failed ones are kept for debugging, their running pods stopped), or never.",
    )
    queued_timeout_seconds: float | None = Field(
        default=None, gt=0, description="Kubernetes executor: fail a stage queued longer than this (job suspended by Kueue, pods waiting for a gang scheduler); none: wait, keeping its place in the queue.")
    unschedulable_timeout_seconds: float | None = Field(
        default=1800, gt=0, description="Kubernetes executor: fail a stage whose pod the scheduler cannot place for this long (no node fits; covers a GPU node scale-up).")
    image_pull_timeout_seconds: float | None = Field(
        default=900, gt=0, description="Kubernetes executor: fail a stage whose scheduled pod is still pulling its image or starting (or in pull back-off) after this long.")
    pod_creation_timeout_seconds: float | None = Field(
        default=300, gt=0, description="Kubernetes executor: fail a stage whose replicas the training operator has not created after this long (the FailedCreatePod event's admission or quota error is named).")
    request_timeout_seconds: float = Field(default=30, gt=0, description="Kubernetes executor: timeout of every API request (connect and read; a log stream is resumed after a read timeout).")
    api_retry_seconds: float = Field(
        default=300, ge=0, description="Kubernetes executor: how long API calls are retried (exponential backoff with jitter) on 429, 5xx and connection errors before the stage fails.")
    timeout_seconds: float | None = Field(default=None, gt=0, description="Kubernetes executor: fail a stage not finished after this many seconds (all attempts); none by default.")
    master_port: int = Field(default=23456, ge=1, le=65535, description="Port of the pytorchjob-port on the Master (the operator's MASTER_PORT).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of the training pods.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations of the training pods (Kubernetes toleration objects).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables of the trainer container (e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA).")
    affinity: dict[str, Any] = Field(default_factory=dict, description="Affinity of the training pods (a Kubernetes affinity object).")
    priority_class_name: str | None = Field(default=None, description="priorityClassName of the training pods.")
    extra_resources: dict[str, str | int] = Field(default_factory=dict, description="Extra resources every trainer container requests and limits (e.g. rdma/ib, vpc.amazonaws.com/efa).")
    placement_by_kind: dict[Literal["train", "label", "evaluate"], StagePlacement] = Field(
        default_factory=dict, description="nodeSelector/tolerations/affinity replacing the job-wide ones for one stage kind (the kind in the stage's definition).")
    pod_security: Literal["restricted", "none"] = Field(
        default="restricted",
        description="restricted: trainer pods meet Pod Security 'restricted' (non-root uid 10001, no privilege escalation, all capabilities dropped, seccomp RuntimeDefault, read-only root with a writable /tmp); none: no securityContext.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels of the PyTorchJobs and their pods (e.g. kueue.x-k8s.io/queue-name for Kueue).")
    scheduling_policy: dict[str, Any] = Field(
        default_factory=dict,
        description="runPolicy.schedulingPolicy of the PyTorchJobs (gang scheduling, e.g. Volcano: minAvailable, queue, priorityClass); none by default.",
    )


class ExecutorConfig(_Strict):
    """Which executor runs the rendered PyTorchJobs."""

    kind: Literal["local", "kubernetes", "render"] = Field(default="local", description="local: processes on this machine; kubernetes: create PyTorchJobs; render: only write YAML.")
    manifests: str = Field(default="manifests", description="Folder the render executor writes numbered PyTorchJob YAML files into (relative: to the config file).")
    grace_seconds: float = Field(default=10.0, gt=0, description="Local executor: seconds between SIGTERM and SIGKILL when a group is stopped.")
    max_parallel: int | None = Field(default=None, ge=1, description="Stages run side by side when the graph allows (`selftrain run --max-parallel`); default: what the machine holds (local: cores / processes per stage; kubernetes: 8).")
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig, description="PyTorchJob settings.")


class DeepSpeedDefaults(_Strict):
    """DeepSpeed settings every stage starts from; a stage's resources.deepspeed overrides them."""

    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="ZeRO stage (0: plain data parallel).")
    train_micro_batch_size_per_gpu: int = Field(default=8, ge=1, description="Micro batch per rank.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro batches per optimizer step.")
    bf16: bool = Field(default=False, description="bf16 mixed precision (GPUs that support it).")
    gradient_clipping: float = Field(default=1.0, ge=0, description="Global gradient-norm clip (0: off).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Any other DeepSpeed config keys, passed through unchanged.")

    def as_overrides(self) -> dict[str, Any]:
        """The dict a stage spec carries in ``resources.deepspeed``."""
        ds: dict[str, Any] = {
            "zero_optimization": {"stage": self.zero_stage},
            "train_micro_batch_size_per_gpu": self.train_micro_batch_size_per_gpu,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "gradient_clipping": self.gradient_clipping,
        }
        if self.bf16:
            ds["bf16"] = {"enabled": True}
        return _merge(ds, self.extra)


class PromotionPolicy(_Strict):
    """When a candidate model takes an alias (teacher, champion) from its holder."""

    metric: str = Field(default="miou", description="Evaluation metric compared (a key of the evaluate stage's metrics).")
    direction: Literal["max", "min"] = Field(default="max", description="max: higher is better; min: lower is better.")
    min_delta: float = Field(default=0.0, ge=0, description="The candidate must beat the holder by more than this.")


class StageConfig(_Strict):
    """One stage of an explicit ``stages`` list (pipelines with their own section build these themselves)."""

    stage: str = Field(description="Trainer name (python -m trainers <stage>).")
    name: str | None = Field(default=None, description="Unique stage name in the pipeline (default: the trainer name).")
    params: dict[str, Any] = Field(default_factory=dict, description="The trainer's hyper-parameters.")
    datasets: dict[str, str] = Field(default_factory=dict, description="Datasets read: name -> directory (relative: to workspace.data).")
    models: dict[str, str] = Field(default_factory=dict, description="Models read: name -> models:/<name>@<alias>, models:/<name>/<version> or a file.")
    output_dataset: str | None = Field(default=None, description="Dataset directory written (relative: to workspace.data).")
    output_model: str | None = Field(default=None, description="Registered-model name the trained weights become a version of.")
    resources: dict[str, Any] = Field(default_factory=dict, description="Overrides of the default resources (replicas, nproc_per_node, ...).")
    promotion: Promotion | None = Field(default=None, description="An evaluating stage's promotion rule for the model it evaluates (inputs.models[candidate]).")

    @field_validator("stage")
    @classmethod
    def _known_trainer(cls, v: str) -> str:
        if v not in registry.STAGES:
            raise ValueError(str(registry.UnknownStage(v)))
        return v

    @field_validator("resources")
    @classmethod
    def _known_resources(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(Resources.model_fields))
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(Resources.model_fields))})")
        return v


class PipelineConfig(_Strict):
    """A pipeline config (generic part). Subclasses add a section named after their pipeline."""

    pipeline: str = Field(default="custom", description="Pipeline name: selects the typed section and the stage builder.")
    image: str = Field(default="selftrain:latest", description="Trainer container image.")
    workspace: Workspace = Field(default_factory=Workspace, description="Directories of data, runs, MLflow store and DVC remote.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig, description="How stages run.")
    resources: Resources = Field(default_factory=Resources, description="Default resources of every stage.")
    deepspeed: DeepSpeedDefaults = Field(default_factory=DeepSpeedDefaults, description="Default DeepSpeed settings of every stage.")
    promotion: PromotionPolicy = Field(default_factory=PromotionPolicy, description="Alias promotion rule (teacher, champion).")
    stages: list[StageConfig] = Field(default_factory=list, description="Explicit stage list (pipelines with their own section may leave it empty).")

    _base_dir: Path | None = PrivateAttr(default=None)  # the config file's folder (set by load_config)

    @model_validator(mode="after")
    def _unique_stage_names(self) -> "PipelineConfig":
        seen: set[str] = set()
        for i, s in enumerate(self.stages):
            n = s.name or s.stage
            if n in seen:
                raise ValueError(f"stages.{i}.name: duplicate stage name {n!r}")
            seen.add(n)
        return self

    # -- derived values ------------------------------------------------------------------------
    @property
    def paths(self) -> Workspace:
        """The workspace with absolute paths."""
        return self.workspace.resolved(self._base())

    def _base(self) -> Path:
        return self._base_dir or Path.cwd()

    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{Path(self.paths.mlflow) / 'mlflow.db'}"

    def artifact_location(self) -> str | None:
        if self.tracking.artifact_location:
            return self.tracking.artifact_location
        if self.tracking.uri is None:
            return (Path(self.paths.mlflow) / "artifacts").as_uri()
        return None

    def manifests_dir(self) -> Path:
        return (self._base() / self.executor.manifests).resolve()

    def run_dir(self, run: str) -> Path:
        return Path(self.paths.runs) / run

    # -- stage specs ---------------------------------------------------------------------------
    def new_stage_spec(
        self,
        run: str,
        stage: str,
        name: str | None = None,
        *,
        params: dict[str, Any] | None = None,
        datasets: dict[str, str] | None = None,
        models: dict[str, str] | None = None,
        output_dataset: str | None = None,
        output_model: str | None = None,
        resources: dict[str, Any] | None = None,
        promotion: Promotion | None = None,
    ) -> StageSpec:
        """A stage spec with this config's defaults filled in (workdir <runs>/<run>/<name>)."""
        name = name or stage
        data = Path(self.paths.data)
        res = self.resources.model_dump()
        res["deepspeed"] = _merge(self.deepspeed.as_overrides(), res.get("deepspeed") or {})
        for k, v in (resources or {}).items():
            res[k] = _merge(res[k], v) if k == "deepspeed" else v
        return StageSpec(
            stage=stage,
            name=name,
            pipeline=self.pipeline,
            image=self.image,
            inputs=Inputs(
                datasets={k: DatasetRef(path=str(data / v)) for k, v in (datasets or {}).items()},
                models={k: ModelRef(uri=v) for k, v in (models or {}).items()},
            ),
            outputs=Outputs(
                dataset=str(data / output_dataset) if output_dataset else None,
                model=output_model,
                workdir=str(self.run_dir(run) / name),
            ),
            params=dict(params or {}),
            resources=Resources.model_validate(res),
            tracking=Tracking(mlflow_uri=self.tracking_uri(), experiment=self.tracking.experiment, dvc_remote=self.paths.dvc_remote,
                              outage_seconds=self.tracking.outage_seconds),
            promotion=promotion,
        )

    def promotion_rule(self, metric: str, candidate: str = "candidate") -> Promotion:
        """The config's promotion policy (direction, min_delta) applied to ``metric`` of input ``candidate``."""
        return Promotion(candidate=candidate, metric=metric, direction=self.promotion.direction, min_delta=self.promotion.min_delta)

    def reported_splits(self) -> list[str]:
        """Datasets (relative: to workspace.data) whose figures a pipeline reports: no promoting stage may read them."""
        return []

    def report(self, result: Any, lineage: Any) -> str:
        """A pipeline's final report after all stages succeeded (logged to the parent MLflow run); none by default."""
        return ""

    def stage_specs(self, run: str) -> list[StageSpec]:
        """The stages of one pipeline run, in order. Pipelines with their own section override this."""
        return [
            self.new_stage_spec(
                run, s.stage, s.name, params=s.params, datasets=s.datasets, models=s.models,
                output_dataset=s.output_dataset, output_model=s.output_model, resources=s.resources,
                promotion=s.promotion,
            )
            for s in self.stages
        ]


#: Pipeline name -> its config class. A pipeline module adds its subclass here.
PIPELINES: dict[str, type[PipelineConfig]] = {"custom": PipelineConfig}


def load_config(path: str | Path, model: type[PipelineConfig] | None = None) -> PipelineConfig:
    """Load and validate a pipeline config; errors name the file and every bad key.

    The class is ``model`` if given, else the one :data:`PIPELINES` lists for the file's
    ``pipeline`` key (an unknown pipeline is an error naming the known ones).
    """
    path = Path(path)
    import pipelines.partdistillation  # noqa: F401  (registers the built-in pipelines in PIPELINES)
    import pipelines.casp  # noqa: F401
    import pipelines.luss  # noqa: F401
    import pipelines.dense  # noqa: F401

    if model is None:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise SpecError(f"{path}: cannot read ({e.strerror})") from e
        except UnicodeDecodeError as e:
            raise SpecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        except yaml.YAMLError as e:
            raise SpecError(f"{path}: not valid YAML: {e}") from e
        name = raw.get("pipeline", "custom") if isinstance(raw, dict) else "custom"
        if not isinstance(name, str) or name not in PIPELINES:
            raise SpecError(f"{path}: invalid configuration\n  pipeline: unknown pipeline {name!r} (known: {', '.join(sorted(PIPELINES))})")
        model = PIPELINES[name]
    try:
        cfg = load_model(model, path)
    except registry.UnknownStage as e:
        raise SpecError(f"{path}: invalid configuration\n  {e}") from None
    cfg._base_dir = path.resolve().parent
    check_stage_params(cfg, str(path))
    return cfg


def config_from_dict(data: dict[str, Any], base_dir: str | Path = ".", model: type[PipelineConfig] = PipelineConfig, source: str = "<config>") -> PipelineConfig:
    """Validate a config given as a dict (tests, programmatic use); relative paths are taken against ``base_dir``."""
    try:
        cfg = model.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, source, model)) from e
    except registry.UnknownStage as e:
        raise SpecError(f"{source}: invalid configuration\n  {e}") from None
    cfg._base_dir = Path(base_dir).resolve()
    check_stage_params(cfg, source)
    return cfg


def check_stage_params(cfg: PipelineConfig, source: str) -> None:
    """Every stage's params against its trainer's params model: first what the file says, then the stages it builds.

    Raises SpecError naming ``source``, each bad key path and the allowed keys.
    """
    problems: list[str] = []
    for path, stage, params in _declared_stage_params(cfg):
        try:
            registry.get(stage).parse(params, source=path)
        except registry.ParamsError as e:
            problems += str(e).splitlines()
    if not problems:  # the built stages: what the pipeline adds to the user's params must validate too
        for spec in cfg.stage_specs("config-check"):
            try:
                d = registry.get(spec.stage)
                d.parse(spec.params, source=f"stage {spec.name} ({spec.stage}) params")
            except (registry.ParamsError, registry.UnknownStage) as e:
                problems += str(e).splitlines()
                continue
            missing = d.missing_inputs(set(spec.inputs.datasets), set(spec.inputs.models))
            if missing:
                problems.append(f"stage {spec.name} ({spec.stage}): missing inputs {', '.join(missing)}")
            if d.output_dataset and not spec.outputs.dataset:
                problems.append(f"stage {spec.name} ({spec.stage}): needs an output dataset")
        problems += _promotions_reading_reported_splits(cfg)
    if problems:
        raise SpecError(f"{source}: invalid configuration\n" + "\n".join(f"  {p}" for p in problems))


def _promotions_reading_reported_splits(cfg: PipelineConfig) -> list[str]:
    """A model is selected on a split that is never the one reported: every promoting stage whose input datasets
    include a reported split (e.g. a section's ``val`` set to its ``eval``)."""
    data = Path(cfg.paths.data)
    reported = {str(data / s) for s in cfg.reported_splits()}
    out = []
    for spec in cfg.stage_specs("config-check"):
        if spec.promotion is None:
            continue
        for key, ref in spec.inputs.datasets.items():
            if ref.path in reported:
                out.append(f"stage {spec.name} ({spec.stage}) promotes {spec.outputs.model or 'its model'} on "
                           f"{spec.promotion.metric} and reads the reported split {ref.path} (input '{key}'): "
                           "select on a val split, report on eval")
    return out


def _declared_stage_params(model: BaseModel, prefix: str = ""):
    """(key path, trainer, params dict) of every ``stages[i].params`` and :func:`stage_params` field in a config."""
    if isinstance(model, StageConfig):
        yield f"{prefix}params", model.stage, model.params
        return
    for name, f in type(model).model_fields.items():
        value = getattr(model, name)
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if STAGE_KEY in extra:
            yield f"{prefix}{name}", extra[STAGE_KEY], value
        elif isinstance(value, BaseModel):
            yield from _declared_stage_params(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _declared_stage_params(item, f"{prefix}{name}.{i}.")
