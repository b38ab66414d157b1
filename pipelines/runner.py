"""Runs a pipeline run as a graph: order, skip, submit, watch; each stage's job does the rest.

Stages run in dependency order (:func:`pipelines.render.stage_graph`: what each stage reads from
which earlier stage), up to ``max_parallel`` side by side. Every stage is its rendered PyTorchJob,
the same manifest ``selftrain render`` writes, and the job is complete in itself
(:mod:`pipelines.stage_job`): it resolves its inputs, records them in MLflow, trains, versions and
pushes its output dataset, registers its model, and an evaluating stage (``spec.promotion``)
applies the promotion rule. So ``selftrain run`` and applying the rendered manifests one by one
give the same MLflow runs, registered versions, aliases and DVC versions.

The driver here only orders, skips and watches: a stage is skipped when its workdir's
``stage.json`` says it succeeded for the same fingerprint (trainer, input DVC hashes and model
versions, params, DeepSpeed config, outputs; computed by the same resolution the job does); a
stage that was interrupted runs again in the same workdir, so the trainer resumes from its last
checkpoint (a workdir of a different fingerprint is moved aside by the job first). When a stage
fails, the running ones finish, no new one starts, and PipelineError names the stage.
"""
from __future__ import annotations

import datetime as _dt
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from contract.io import read_json
from contract.spec import SpecError, StageSpec
from pipelines import render, stage_job
from pipelines.config import PipelineConfig, load_config
from pipelines.executors import Executor, StageFailed
from pipelines.stage_job import MARKER


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
                 executor_kind: str | None = None, echo: Callable[[str], None] | None = None,
                 max_parallel: int | None = None) -> PipelineResult | list[Path]:
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
    if cfg.executor.kind == "render" and executor is None:
        return render.write_manifests(cfg.stage_specs(run), cfg.manifests_dir(), cfg.executor.kubernetes, run=run,
                                      path_map=render.workspace_mounts(cfg), config=Path(config_path))
    return run_stages(cfg, cfg.stage_specs(run), run, executor=executor, echo=echo, config_text=Path(config_path).read_text(),
                      max_parallel=max_parallel)


def run_pipeline_cli(config_path: str | Path, run: str | None, executor_kind: str | None,
                     echo: Callable[[str], None] | None = None, max_parallel: int | None = None) -> PipelineResult | list[Path]:
    """``selftrain run``: :func:`run_pipeline` (a failed stage raises PipelineError naming it, its exit codes and log tail)."""
    return run_pipeline(config_path, run, executor_kind=executor_kind, echo=echo, max_parallel=max_parallel)


def default_max_parallel(cfg: PipelineConfig, specs: list[StageSpec]) -> int:
    """How many stages run side by side by default: the config's ``executor.max_parallel``, else what the machine holds.

    Local: the GPUs divided by the most any stage needs (when stages use GPUs), else the CPU cores
    divided by the most processes any stage starts; at least 1. Kubernetes: 8 (the cluster's
    scheduler and queue decide the rest).
    """
    configured = cfg.executor.max_parallel
    if configured:
        return int(configured)
    if cfg.executor.kind == "kubernetes":
        return 8
    gpus = max((s.resources.gpus_per_replica * s.resources.replicas for s in specs), default=0)
    if gpus:
        from pipelines.executors.local import local_gpus

        return max(1, len(local_gpus()) // gpus)
    from pipelines.executors.local import local_cpus

    procs = max((s.resources.nproc_per_node * s.resources.replicas for s in specs), default=1)
    return max(1, local_cpus() // procs)


def run_stages(cfg: PipelineConfig, specs: list[StageSpec], run: str, *, executor: Executor | None = None,
               lineage: Any = None, echo: Callable[[str], None] | None = None, config_text: str | None = None,
               max_parallel: int | None = None) -> PipelineResult:
    """Run ``specs`` as pipeline run ``run``, in dependency order, up to ``max_parallel`` at once.

    Raises PipelineError naming the stage when one fails (after the running ones finished).
    """
    from pipelines.lineage import Lineage

    echo = echo or (lambda s: print(s, flush=True))
    if executor is None:
        from pipelines.executors import make_executor

        if cfg.executor.kind == "local":
            executor = make_executor("local", grace_seconds=cfg.executor.grace_seconds)
        else:
            executor = make_executor(cfg.executor.kind, config=cfg.executor.kubernetes)
    try:
        graph = render.stage_graph(specs)
    except ValueError as e:
        raise PipelineError(str(e)) from e
    parallel = max(1, max_parallel or default_max_parallel(cfg, specs))
    lineage = lineage or Lineage(cfg.tracking_uri(), cfg.tracking.experiment, cfg.artifact_location(), cfg.tracking.outage_seconds)
    _ensure_workspace_repo(cfg, specs)
    parent = lineage.pipeline_run(cfg.pipeline, run, {"pipeline": cfg.pipeline, "run": run, "stages": ",".join(s.name for s in specs)}, config_text)
    outcomes: dict[str, StageOutcome] = {}
    try:
        _schedule(specs, graph, parallel, lambda spec: run_stage(cfg, spec, run, parent, lineage, executor, graph[spec.name], echo), outcomes,
                  side_by_side=(lambda n: setattr(executor, "side_by_side", n)) if hasattr(executor, "side_by_side") else None)
    except BaseException:
        lineage.finish_pipeline(parent, succeeded=False)
        raise
    result = PipelineResult(run=run, mlflow_run_id=parent, stages=[outcomes[s.name] for s in specs])
    try:
        result.report = cfg.report(result, lineage)
    except BaseException:
        lineage.finish_pipeline(parent, succeeded=False)
        raise
    lineage.retry("finishing the pipeline run", lambda: lineage.finish_pipeline(parent, succeeded=True), echo)
    return result


def _schedule(specs: list[StageSpec], graph: dict[str, list[str]], parallel: int,
              run_one: Callable[[StageSpec], StageOutcome], outcomes: dict[str, StageOutcome],
              side_by_side: Callable[[int], None] | None = None) -> None:
    """Start every stage whose dependencies succeeded (in pipeline order), at most ``parallel`` at once.

    After a failure no new stage starts; the running ones finish, then the first failure (in
    pipeline order) is raised, naming the others. ``side_by_side(n)`` is told how many stages run at
    once (the ones starting included) before they start: the local executor shares the cores by it.
    """
    if parallel == 1:  # in order, in this thread (Ctrl-C reaches the executor directly)
        for spec in specs:
            outcomes[spec.name] = run_one(spec)
        return
    pending = list(specs)
    failures: dict[str, BaseException] = {}
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="stage") as pool:
        running: dict[Future, str] = {}
        try:
            while pending or running:
                if not failures:
                    ready = [s for s in pending if all(d in outcomes for d in graph[s.name])][:max(0, parallel - len(running))]
                    if ready and side_by_side is not None:
                        side_by_side(len(running) + len(ready))
                    for spec in ready:
                        pending.remove(spec)
                        running[pool.submit(run_one, spec)] = spec.name
                if not running:
                    break
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for f in done:
                    name = running.pop(f)
                    try:
                        outcomes[name] = f.result()
                    except BaseException as e:  # noqa: BLE001 - raised below, after the running stages finished
                        failures[name] = e
        except BaseException:
            for f in running:
                f.cancel()
            raise
    if failures:
        order = [s.name for s in specs if s.name in failures]
        first = failures[order[0]]
        if len(order) > 1 and isinstance(first, PipelineError):
            raise PipelineError(f"{first}\n(also failed: {', '.join(order[1:])})") from first
        raise first


def _ensure_workspace_repo(cfg: PipelineConfig, specs: list[StageSpec]) -> None:
    """Datasets a run writes inside the workspace are versioned in the workspace's own git + DVC repository.

    The workspace is usually git-ignored by the project around it, and DVC refuses to track a
    path whose .dvc file git ignores; a repository of its own (sharing the DVC remote) avoids that.
    (A stage job makes one in its runs folder when it finds none; see :mod:`pipelines.stage_job`.)
    """
    from pipelines import dvc

    root = Path(cfg.paths.root)
    if any(s.outputs.dataset and root in Path(s.outputs.dataset).resolve().parents for s in specs):
        if not (root / ".dvc").is_dir() or not (root / ".git").exists():
            dvc.ensure_repo(root, remote=cfg.paths.dvc_remote)


def run_stage(cfg: PipelineConfig, spec: StageSpec, run: str, parent_run_id: str, lineage: Any, executor: Executor,
              depends_on: list[str] = (), echo: Callable[[str], None] = print) -> StageOutcome:
    """One stage: skip it when done for the same fingerprint, else submit its job, watch it and read its outcome."""
    workdir = Path(spec.outputs.workdir)
    marker, result = read_json(workdir / MARKER), read_json(workdir / "result.json")
    try:  # a finished stage's alias inputs resolve to what it ran with (stage_job.resolve)
        resolved = lineage.retry(f"resolving the inputs of stage {spec.name}",
                                 lambda: stage_job.resolve(spec, run, lineage, done=marker), echo)
    except stage_job.StageJobError as e:
        raise PipelineError(str(e)) from e
    fp = resolved.fingerprint
    if stage_job.is_done(marker, result, fp):
        echo(f"[{spec.name}] skipped: outputs exist for the same inputs and params ({fp[:12]})")
        lineage.retry("tagging the pipeline run", lambda: lineage.client.set_tag(parent_run_id, f"stage.{spec.name}.status", "skipped"), echo)
        return _outcome(spec.name, "skipped", fp, workdir, marker, result)
    pid = stage_job.running_job(workdir)
    if pid is not None:  # started by a driver that is gone: wait for that job rather than start a second one
        echo(f"[{spec.name}] re-attaching to its running job (pid {pid}, logs in {workdir / 'logs'}); waiting for it to end")
        stage_job.wait_for_job(workdir)
        marker, result = read_json(workdir / MARKER), read_json(workdir / "result.json")
        if stage_job.is_done(marker, result, fp):
            lineage.client.set_tag(parent_run_id, f"stage.{spec.name}.status", "succeeded")
            out = _outcome(spec.name, "succeeded", fp, workdir, marker, result)
            echo(f"[{spec.name}] succeeded (re-attached)" + (f": model {spec.outputs.model} version {out.model_version}" if out.model_version else ""))
            return out
        echo(f"[{spec.name}] the job it re-attached to ended unfinished ({(marker or {}).get('status', 'no marker')}); running it again")
    job = render.render_stage(spec, cfg.executor.kubernetes, run=run, depends_on=depends_on)
    workdir.mkdir(parents=True, exist_ok=True)
    log_dir = workdir / "logs"
    echo(f"[{spec.name}] running {job['metadata']['name']} ({spec.resources.replicas} replica(s) x {spec.resources.nproc_per_node} process(es))")
    try:
        executor.run(job, log_dir=log_dir)
    except StageFailed as e:
        marker = read_json(workdir / MARKER) or {}
        if marker.get("fingerprint") != fp or marker.get("status") != "failed":  # the job could not record it (never started, killed)
            marker = stage_job.record_failure(resolved.spec, lineage, marker.get("mlflow_run_id") if marker.get("fingerprint") == fp else None,
                                              fp, str(e))
        _log_job(lineage, marker.get("mlflow_run_id"), job, log_dir)
        lineage.client.set_tag(parent_run_id, f"stage.{spec.name}.status", "failed")
        kept = "".join(f"\n{d['alias']}: {'promoted' if d['promoted'] else 'kept'} ({d['reason']})" for d in marker.get("decisions") or [])
        raise PipelineError(f"stage {spec.name} failed:\n{e}" + (f"\n{marker['error']}" if marker.get("error") and marker["error"] not in str(e) else "") + kept) from e
    marker, result = read_json(workdir / MARKER), read_json(workdir / "result.json")
    lineage.retry(f"logging the job of stage {spec.name}", lambda: _log_job(lineage, (marker or {}).get("mlflow_run_id"), job, log_dir), echo)
    if not stage_job.is_done(marker, result, fp):
        raise PipelineError(f"stage {spec.name}: its job succeeded but {workdir / MARKER} does not say it finished "
                            f"for fingerprint {fp[:12]} ({(marker or {}).get('status', 'missing')})")
    lineage.retry("tagging the pipeline run", lambda: lineage.client.set_tag(parent_run_id, f"stage.{spec.name}.status", "succeeded"), echo)
    out = _outcome(spec.name, "succeeded", fp, workdir, marker, result)
    echo(f"[{spec.name}] succeeded" + (f": model {spec.outputs.model} version {out.model_version}" if out.model_version else ""))
    return out


def _outcome(name: str, status: str, fp: str, workdir: Path, marker: dict[str, Any], result: dict[str, Any] | None) -> StageOutcome:
    from pipelines.lineage import Decision

    decisions = [Decision(**d) for d in marker.get("decisions") or []]
    return StageOutcome(name, status, fp, workdir, marker.get("mlflow_run_id"), marker.get("model_version"), marker.get("output_hash"), result, decisions)


def _log_job(lineage: Any, run_id: str | None, job: dict[str, Any], log_dir: Path) -> None:
    """The driver's part of a stage's record: the manifest it submitted and the replicas' logs it collected."""
    if not run_id:
        return
    lineage.client.log_text(run_id, render.to_yaml(job), "pytorchjob.yaml")
    if log_dir.is_dir():
        lineage.client.log_artifacts(run_id, str(log_dir), "logs")
