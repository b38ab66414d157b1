"""Runs the stages of a pipeline run in order: resolve inputs, skip what is done, render, execute, record.

A stage is skipped when its workdir holds a succeeded result for the same fingerprint (trainer,
input DVC hashes and model versions, params, DeepSpeed config, outputs). A stage that was
interrupted is started again in the same workdir, so the trainer resumes from its last
checkpoint; a workdir left by a different fingerprint is moved aside first, so a trainer never
resumes from a checkpoint of other inputs or params.

Model inputs may name ``stage:<stage name>``: the model version an earlier stage of the same run
registered (e.g. ``evaluate`` reading ``candidate: stage:r1-train-proposals``).

Evaluation convention: a stage that reads a registered model as ``inputs.models["candidate"]`` is
that model's evaluation: its result metrics are recorded on the model version and the promotion
rule (``teacher``, ``champion``; ``promotion.metric`` is a key of those metrics) is applied; a
failed evaluation is recorded too (the aliases stay).
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines import render
from pipelines.config import PipelineConfig, load_config
from pipelines.executors import Executor, StageFailed
from contract.spec import SpecError, StageSpec

MARKER = "stage.json"  # <workdir>/stage.json: {"fingerprint", "status", "mlflow_run_id", "model_version", "output_hash"}


class PipelineError(RuntimeError):
    """A pipeline cannot go on (a stage failed, an input is missing); the message names the stage."""


@dataclass
class StageOutcome:
    name: str
    status: str  # "succeeded" | "skipped"
    fingerprint: str
    workdir: Path
    mlflow_run_id: str | None = None
    model_version: str | None = None
    output_hash: str | None = None
    result: dict[str, Any] | None = None
    decisions: list[Any] = field(default_factory=list)


@dataclass
class PipelineResult:
    run: str
    mlflow_run_id: str
    stages: list[StageOutcome]
    report: str = ""  # the pipeline's own final report (e.g. PartDistillation's table), also logged to MLflow

    @property
    def summary(self) -> str:
        """One line per stage: status, model version, output dataset version."""
        lines = [f"pipeline run {self.run} (MLflow run {self.mlflow_run_id})"]
        for s in self.stages:
            extra = [f"model version {s.model_version}"] if s.model_version else []
            extra += [f"dataset {s.output_hash}"] if s.output_hash else []
            extra += [f"{d.alias}: {'promoted' if d.promoted else 'kept'} ({d.reason})" for d in s.decisions]
            lines.append(f"  {s.name}: {s.status}" + (f" - {'; '.join(extra)}" if extra else ""))
        if self.report:
            lines += ["", self.report]
        return "\n".join(lines)


def run_pipeline(config_path: str | Path, run: str | None = None, *, executor: Executor | None = None,
                 executor_kind: str | None = None, echo: Callable[[str], None] | None = None) -> PipelineResult | list[Path]:
    """Load a config and run its stages (or, with executor kind ``render``, write their manifests).

    ``executor_kind`` overrides the config's ``executor.kind``; re-using a ``run`` name resumes that run.
    """
    cfg = load_config(config_path)
    if executor_kind is not None:
        try:
            cfg.executor.kind = executor_kind
        except ValueError as e:
            raise SpecError(f"--executor {executor_kind!r}: expected local, kubernetes or render") from e
    run = run or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    specs = cfg.stage_specs(run)
    if cfg.executor.kind == "render" and executor is None:
        return render.write_manifests(specs, cfg.manifests_dir(), cfg.executor.kubernetes, run=run, path_map=path_map(cfg))
    return run_stages(cfg, specs, run, executor=executor, echo=echo, config_text=Path(config_path).read_text())


def run_pipeline_cli(config_path: str | Path, run: str | None, executor_kind: str | None,
                     echo: Callable[[str], None] | None = None) -> PipelineResult | list[Path]:
    """``selftrain run``: :func:`run_pipeline` (a failed stage raises PipelineError naming it, its exit codes and log tail)."""
    return run_pipeline(config_path, run, executor_kind=executor_kind, echo=echo)


def render_pipeline(config_path: str | Path, out_dir: str | Path, run: str = "demo") -> list[Path]:
    """``selftrain render``: the pipeline's stages as numbered PyTorchJob manifests in ``out_dir``."""
    cfg = load_config(config_path)
    return render.write_manifests(cfg.stage_specs(run), out_dir, cfg.executor.kubernetes, run=run, path_map=path_map(cfg))


def path_map(cfg: PipelineConfig) -> dict[str, str]:
    """Workspace dirs -> container mount paths, for the PVCs the config mounts."""
    k8s = cfg.executor.kubernetes
    out = {}
    if k8s.data_pvc:
        out[cfg.paths.data] = k8s.data_mount
    if k8s.checkpoints_pvc:
        out[cfg.paths.runs] = k8s.checkpoints_mount
    return out


def run_stages(cfg: PipelineConfig, specs: list[StageSpec], run: str, *, executor: Executor | None = None,
               lineage: Any = None, echo: Callable[[str], None] | None = None, config_text: str | None = None) -> PipelineResult:
    """Run ``specs`` in order as pipeline run ``run``; raises PipelineError when a stage fails."""
    from pipelines.lineage import Lineage

    echo = echo or (lambda s: print(s, flush=True))
    if executor is None:
        from pipelines.executors import make_executor

        if cfg.executor.kind == "local":
            executor = make_executor("local", grace_seconds=cfg.executor.grace_seconds)
        else:
            executor = make_executor(cfg.executor.kind, config=cfg.executor.kubernetes)
    lineage = lineage or Lineage(cfg.tracking_uri(), cfg.tracking.experiment, cfg.artifact_location())
    _ensure_workspace_repo(cfg, specs)
    parent = lineage.pipeline_run(cfg.pipeline, run, {"pipeline": cfg.pipeline, "run": run, "stages": ",".join(s.name for s in specs)}, config_text)
    outcomes: list[StageOutcome] = []
    produced: dict[str, str] = {}  # stage name -> models:/<name>/<version> it registered
    try:
        for i, spec in enumerate(specs):
            o = run_stage(cfg, spec, run, parent, lineage, executor, depends_on=[s.name for s in specs[:i]], echo=echo, produced=produced)
            if o.model_version and spec.outputs.model:
                produced[spec.name] = f"models:/{spec.outputs.model}/{o.model_version}"
            outcomes.append(o)
    except BaseException:
        lineage.finish_pipeline(parent, succeeded=False)
        raise
    result = PipelineResult(run=run, mlflow_run_id=parent, stages=outcomes)
    try:
        result.report = cfg.report(result, lineage)
    except BaseException:
        lineage.finish_pipeline(parent, succeeded=False)
        raise
    lineage.finish_pipeline(parent, succeeded=True)
    return result


def _ensure_workspace_repo(cfg: PipelineConfig, specs: list[StageSpec]) -> None:
    """Datasets a run writes inside the workspace are versioned in the workspace's own git + DVC repository.

    The workspace is usually git-ignored by the project around it, and DVC refuses to track a
    path whose .dvc file git ignores; a repository of its own (sharing the DVC remote) avoids that.
    """
    from pipelines import dvc

    root = Path(cfg.paths.root)
    if any(s.outputs.dataset and root in Path(s.outputs.dataset).resolve().parents for s in specs):
        if not (root / ".dvc").is_dir() or not (root / ".git").exists():
            dvc.ensure_repo(root, remote=cfg.paths.dvc_remote)


def run_stage(cfg: PipelineConfig, spec: StageSpec, run: str, parent_run_id: str, lineage: Any, executor: Executor,
              depends_on: list[str] = (), echo: Callable[[str], None] = print, produced: dict[str, str] | None = None) -> StageOutcome:
    """One stage: resolve its inputs, skip it if done, else execute it and record lineage."""
    spec = resolve_inputs(spec, lineage, produced or {})
    fp = render.fingerprint(spec)
    workdir = Path(spec.outputs.workdir)
    marker = _read_json(workdir / MARKER)
    result = _read_json(workdir / "result.json")
    if marker and marker.get("fingerprint") == fp and marker.get("status") == "succeeded" and result and result.get("status") == "succeeded":
        echo(f"[{spec.name}] skipped: outputs exist for the same inputs and params ({fp[:12]})")
        lineage.client.set_tag(parent_run_id, f"stage.{spec.name}.status", "skipped")
        return StageOutcome(spec.name, "skipped", fp, workdir, marker.get("mlflow_run_id"), marker.get("model_version"), marker.get("output_hash"), result)
    if marker and marker.get("fingerprint") != fp:  # other inputs or params: never resume from those checkpoints or shards
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        for old in [workdir] + ([Path(spec.outputs.dataset)] if spec.outputs.dataset else []):
            if old.exists():
                aside = old.with_name(f"{old.name}.replaced-{stamp}")
                shutil.move(str(old), aside)
                echo(f"[{spec.name}] inputs or params changed: previous {old} moved to {aside}")
    elif not marker and result:  # a result without a marker: not ours to trust
        (workdir / "result.json").unlink()

    run_id = lineage.start_stage(parent_run_id, spec, fp, run)
    spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"parent_run_id": parent_run_id, "run_id": run_id})})
    workdir.mkdir(parents=True, exist_ok=True)
    spec.write(workdir / "spec.json")
    _write_json(workdir / MARKER, {"fingerprint": fp, "status": "running", "mlflow_run_id": run_id})
    (workdir / "result.json").unlink(missing_ok=True)
    job = render.render_stage(spec, cfg.executor.kubernetes, run=run, depends_on=depends_on)
    (workdir / "pytorchjob.yaml").write_text(render.to_yaml(job))
    log_dir = workdir / "logs"
    echo(f"[{spec.name}] running {job['metadata']['name']} ({spec.resources.replicas} replica(s) x {spec.resources.nproc_per_node} process(es))")
    try:
        executor.run(job, log_dir=log_dir)
        result = _read_json(workdir / "result.json")
        if not result or result.get("status") != "succeeded":
            raise PipelineError(f"stage {spec.name}: all ranks exited 0 but {workdir / 'result.json'} {'says ' + repr(result.get('status')) if result else 'is missing'}")
        output_hash = version_dataset(spec.outputs.dataset) if spec.outputs.dataset else None
        version = lineage.finish_stage(run_id, spec, result, output_hash=output_hash, job=job, log_dir=log_dir)
    except Exception as e:  # noqa: BLE001 - every failure is recorded on the stage's run, then raised
        lineage.fail_stage(run_id, f"{type(e).__name__}: {e}", log_dir)
        _write_json(workdir / MARKER, {"fingerprint": fp, "status": "failed", "mlflow_run_id": run_id, "error": str(e)[-2000:]})
        decisions = _after_evaluate(cfg, spec, lineage, run_id, None)
        if not isinstance(e, (StageFailed, PipelineError)):
            raise
        raise PipelineError(f"stage {spec.name} failed:\n{e}" + "".join(f"\n{d.alias}: kept ({d.reason})" for d in decisions)) from e
    decisions = _after_evaluate(cfg, spec, lineage, run_id, result)
    _write_json(workdir / MARKER, {"fingerprint": fp, "status": "succeeded", "mlflow_run_id": run_id, "model_version": version, "output_hash": output_hash})
    echo(f"[{spec.name}] succeeded" + (f": model {spec.outputs.model} version {version}" if version else ""))
    return StageOutcome(spec.name, "succeeded", fp, workdir, run_id, version, output_hash, result, decisions)


def resolve_inputs(spec: StageSpec, lineage: Any, produced: dict[str, str] | None = None) -> StageSpec:
    """Pin the inputs: DVC hashes of the datasets read, registered versions of aliased and ``stage:`` models."""
    from pipelines.dvc import dataset_hash

    spec = spec.model_copy(deep=True)
    for name, d in spec.inputs.datasets.items():
        if not Path(d.path).is_dir():
            raise PipelineError(f"stage {spec.name}: input dataset {name!r} does not exist at {d.path}")
        if d.dvc_hash is None:
            d.dvc_hash = dataset_hash(d.path)
    for name, m in spec.inputs.models.items():
        if m.uri.startswith("stage:"):
            if m.uri[len("stage:"):] not in (produced or {}):
                raise PipelineError(f"stage {spec.name}: input model {name!r} ({m.uri}): no earlier stage of this run registered a model under that name")
            m.uri = produced[m.uri[len("stage:"):]]
        elif m.uri.startswith("models:/") and "@" in m.uri:
            try:
                model, version = lineage.model_version(m.uri)
            except Exception as e:  # noqa: BLE001 - the registry's own message is the useful one
                raise PipelineError(f"stage {spec.name}: cannot resolve input model {name!r} ({m.uri}): {e}") from e
            m.uri = f"models:/{model}/{version}"
    return spec


def version_dataset(path: str) -> str:
    """The DVC version of a dataset a stage wrote: ``dvc add`` inside a DVC repository, else its hash."""
    from pipelines import dvc

    try:
        root = dvc.find_root(path)
    except dvc.DvcError:
        return dvc.dataset_hash(path)
    version = dvc.add(path, root)
    dvc.push([path], root)  # every dataset version also lives on the remote
    return version.md5


def _after_evaluate(cfg: PipelineConfig, spec: StageSpec, lineage: Any, run_id: str, result: dict[str, Any] | None) -> list[Any]:
    cand = spec.inputs.models.get("candidate")
    if cand is None or not cand.uri.startswith("models:/"):
        return []
    name, version = lineage.model_version(cand.uri)
    ok = result is not None and result.get("status") == "succeeded"
    lineage.record_evaluation(name, version, (result or {}).get("metrics") or {}, ok, run_id=run_id)
    return lineage.promote(name, version, cfg.promotion_for(name))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
