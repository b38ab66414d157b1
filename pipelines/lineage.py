"""Lineage and promotion in MLflow: a parent run per pipeline run, a child run per stage, registered models.

Models are registered from the *run artifact* of the stage's state_dict (``<run>/artifacts/model/``)
with ``MlflowClient.create_model_version(name, source=<artifact uri>, run_id=...)`` rather than as
an MLflow "logged model": a logged model needs a flavor (mlflow.pytorch pickles the module and
imports torch, which the control plane never does), while a plain artifact source is accepted by
MLflow 3 as is, keeps the file exactly as the trainer wrote it, and ``models:/<name>@<alias>``
resolves to it for download (:func:`resolve_model`).

Promotion (docs/architecture.md "Tracking and promotion"): a candidate takes an alias (``teacher``,
``champion``) only if its evaluation succeeded and it beats the holder on the configured metric by
more than ``min_delta``; the first candidate with a successful evaluation takes a free alias. Each
decision is recorded on the candidate version as ``promotion.<alias>.*`` tags.
"""
from __future__ import annotations

import json
import math
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from contract.models import model_version, resolve_model  # noqa: F401  (re-exported for the control plane)
from contract.spec import DEFAULT_OUTAGE_SECONDS, Promotion, StageSpec, metric_keys
from pipelines.config import PromotionPolicy

T = TypeVar("T")
ALIASES = ("teacher", "champion")
RUN_SCOPED = ("teacher",)  # aliases a pipeline run follows itself; champion is the best across runs
PARENT_TAG = "mlflow.parentRunId"


@dataclass
class Decision:
    """One promotion decision for one alias."""

    alias: str
    promoted: bool
    candidate_version: str
    candidate_value: float | None
    holder_version: str | None
    holder_value: float | None
    reason: str


class TrackingUnavailable(RuntimeError):
    """The MLflow server cannot be reached; what was refused changed nothing."""


class Lineage:
    """MLflow bookkeeping of pipeline runs (one instance per tracking URI and experiment)."""

    def __init__(self, tracking_uri: str, experiment: str = "selftrain", artifact_location: str | None = None,
                 outage_seconds: float = DEFAULT_OUTAGE_SECONDS):
        self.tracking_uri = tracking_uri
        self.outage_seconds = outage_seconds  # how long bookkeeping waits out an outage (tracking.outage_seconds)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
            except MlflowException:  # created concurrently
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            self.experiment_id = exp.experiment_id

    # -- outages -------------------------------------------------------------------------------
    def reachable(self, timeout: float = 5.0) -> bool:
        """Whether the tracking server answers its health check now (a local store always does)."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return True
        try:
            with urllib.request.urlopen(self.tracking_uri.rstrip("/") + "/health", timeout=timeout) as r:  # noqa: S310
                return r.status == 200
        except OSError:
            return False

    def retry(self, what: str, fn: Callable[[], T], echo: Callable[[str], None] = print) -> T:
        """``fn()``, done again while the tracking server is unreachable, for at most ``outage_seconds`` (the pipeline
        config's and stage spec's ``tracking.outage_seconds``).

        ``fn`` must be safe to repeat (every bookkeeping step here is: tags and params are set again, a model version
        is registered once per run). An error while the server answers is raised at once; an outage longer than the
        limit raises TrackingUnavailable naming the server, what was not done and how long it waited.
        """
        limit = self.outage_seconds
        start = time.monotonic()
        while True:
            try:
                return fn()
            except Exception as e:
                if self.reachable():
                    raise
                waited = time.monotonic() - start
                if waited >= limit:
                    raise TrackingUnavailable(f"MLflow at {self.tracking_uri} unreachable for {waited:.0f} s (limit {limit:g} s, "
                                              f"tracking.outage_seconds): {what} not done ({type(e).__name__}: {str(e)[:300]})") from e
                echo(f"MLflow at {self.tracking_uri} is unreachable; {what} waits for it ({waited:.0f} of {limit:g} s)")
                while not self.reachable() and time.monotonic() - start < limit:
                    time.sleep(1.0)

    # -- runs ----------------------------------------------------------------------------------
    def pipeline_run(self, pipeline: str, run: str, params: dict[str, Any] | None = None, config_text: str | None = None,
                     resume: bool = True) -> str:
        """The parent run of pipeline run ``run``: found by its tags, else created.

        The driver (``resume``) marks a found one RUNNING again; a stage job only looks it up. Two
        jobs creating it at once both keep the oldest (the other is deleted), so a pipeline run has
        one parent whoever starts it.
        """
        found = self._pipeline_runs(pipeline, run)
        if found:
            run_id = found[0].info.run_id
            if resume:
                self.client.update_run(run_id, status="RUNNING")
            if config_text is not None and not any(a.path == "pipeline_config.yaml" for a in self.client.list_artifacts(run_id)):
                self.client.log_text(run_id, config_text, "pipeline_config.yaml")
            return run_id
        r = self.client.create_run(
            self.experiment_id, run_name=f"{pipeline}-{run}",
            tags={"selftrain.kind": "pipeline", "selftrain.pipeline": pipeline, "selftrain.run": run},
        )
        run_id = r.info.run_id
        found = self._pipeline_runs(pipeline, run)
        if found and found[0].info.run_id != run_id:  # created concurrently: the oldest wins
            self.client.delete_run(run_id)
            return self.pipeline_run(pipeline, run, params, config_text, resume)
        if params:
            self._log_params(run_id, params)
        if config_text is not None:
            self.client.log_text(run_id, config_text, "pipeline_config.yaml")
        return run_id

    def _pipeline_runs(self, pipeline: str, run: str) -> list:
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`selftrain.run` = '{run}' and tags.`selftrain.kind` = 'pipeline' and tags.`selftrain.pipeline` = '{pipeline}'",
        )
        return sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def stage_runs(self, pipeline: str, run: str, stage: str, status: str | None = None) -> list:
        """The child runs of stage ``stage`` in pipeline run ``run``, newest first (``status``: their ``selftrain.status`` tag)."""
        flt = (f"tags.`selftrain.kind` = 'stage' and tags.`selftrain.pipeline` = '{pipeline}' and "
               f"tags.`selftrain.run` = '{run}' and tags.`selftrain.stage` = '{stage}'")
        if status:
            flt += f" and tags.`selftrain.status` = '{status}'"
        found = self.client.search_runs([self.experiment_id], filter_string=flt)
        return sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id), reverse=True)

    def resume_stage(self, run_id: str) -> None:
        """A stage's run again RUNNING (its job restarted after an interruption or a failed attempt)."""
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "selftrain.status", "running")

    def start_stage(self, parent_run_id: str, spec: StageSpec, fingerprint: str, run: str,
                    inputs: dict[str, dict[str, dict[str, str]]] | None = None) -> str:
        """A child run for one stage: params, the spec as an artifact, what its inputs resolved to.

        ``inputs`` (:func:`pipelines.stage_job.resolve`) records each model input as declared
        (``model.<name>.ref``: ``stage:...``, ``models:/<name>@<alias>``, a file) and pinned
        (param ``model.<name>.uri``; a file's ``model.<name>.sha256``), and the DVC hash of each dataset read.
        """
        tags = {
            PARENT_TAG: parent_run_id,
            "selftrain.kind": "stage",
            "selftrain.pipeline": spec.pipeline,
            "selftrain.run": run,
            "selftrain.stage": spec.name,
            "selftrain.trainer": spec.stage,
            "selftrain.fingerprint": fingerprint,
            "selftrain.status": "running",
        }
        params: dict[str, Any] = {"stage": spec.stage, "fingerprint": fingerprint}
        for name, d in spec.inputs.datasets.items():
            tags[f"dataset.{name}.path"] = d.path
            if d.dvc_hash:
                tags[f"dataset.{name}.dvc_hash"] = d.dvc_hash
                params[f"dataset.{name}.dvc_hash"] = d.dvc_hash
        for name, m in spec.inputs.models.items():
            params[f"model.{name}.uri"] = m.uri
            rec = ((inputs or {}).get("models") or {}).get(name) or {}
            if rec.get("ref"):
                tags[f"model.{name}.ref"] = rec["ref"]
            if rec.get("sha256"):
                tags[f"model.{name}.sha256"] = rec["sha256"]
                params[f"model.{name}.sha256"] = rec["sha256"]
        params.update(_flatten(spec.params, "params"))
        params.update(_flatten(spec.resources.model_dump(), "resources"))
        r = self.client.create_run(self.experiment_id, run_name=spec.name, tags=tags)
        run_id = r.info.run_id
        self._log_params(run_id, params)
        self.client.log_text(run_id, spec.to_json(), "stage_spec.json")
        return run_id

    def finish_stage(
        self,
        run_id: str,
        spec: StageSpec,
        result: dict[str, Any],
        *,
        output_hash: str | None = None,
        job: dict[str, Any] | None = None,
        log_dir: Path | None = None,
    ) -> str | None:
        """Record a succeeded stage: final metrics, result and logs, the written dataset's DVC hash, the model version.

        Returns the registered model version (as a string) when the stage wrote a model.
        """
        steps = int(result.get("steps") or 0)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, steps) for k, v in (result.get("metrics") or {}).items() if _is_number(v)]
        tags = [RunTag("selftrain.status", "succeeded")]
        if output_hash:
            tags += [RunTag("dataset.output.dvc_hash", output_hash), RunTag("dataset.output.path", spec.outputs.dataset or "")]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        if output_hash:
            self._log_params(run_id, {"dataset.output.dvc_hash": output_hash})
        self.client.log_text(run_id, json.dumps(result, indent=2), "result.json")
        if job is not None:
            from pipelines.render import to_yaml

            self.client.log_text(run_id, to_yaml(job), "pytorchjob.yaml")
        if log_dir is not None and Path(log_dir).is_dir():
            self.client.log_artifacts(run_id, str(log_dir), "logs")
        version = None
        if spec.outputs.model and result.get("model_path"):
            run_tags = self.client.get_run(run_id).data.tags
            mv = self.register_model(run_id, spec.outputs.model, result["model_path"],
                                     tags={"selftrain.stage": spec.name, "selftrain.run": run_tags.get("selftrain.run", ""),
                                           "selftrain.pipeline": spec.pipeline})
            version = str(mv.version)
            self.client.set_tag(run_id, "model.version", f"{spec.outputs.model}/{version}")
        self.client.set_terminated(run_id, "FINISHED")
        return version

    def fail_stage(self, run_id: str, error: str, log_dir: Path | None = None) -> None:
        self.client.set_tag(run_id, "selftrain.status", "failed")
        self.client.set_tag(run_id, "selftrain.error", error[-4900:])
        if log_dir is not None and Path(log_dir).is_dir():
            self.client.log_artifacts(run_id, str(log_dir), "logs")
        self.client.set_terminated(run_id, "FAILED")

    def finish_pipeline(self, run_id: str, succeeded: bool) -> None:
        self.client.set_terminated(run_id, "FINISHED" if succeeded else "FAILED")

    # -- models --------------------------------------------------------------------------------
    def register_model(self, run_id: str, name: str, model_path: str | Path, tags: dict[str, str] | None = None):
        """Log the model file (or folder) as run artifact ``model/`` and make it a new version of ``name``.

        Once per run: a stage job stopped after registering (and re-run) gets the version its run already has (whose
        source, the run's ``model/`` artifact, now holds the file just logged).
        """
        path = Path(model_path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), "model")
        else:
            self.client.log_artifact(run_id, str(path), "model")
        for mv in self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            return mv
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = self.client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model"
        return self.client.create_model_version(name, source=source, run_id=run_id, tags=tags)

    def model_version(self, uri: str) -> tuple[str, str]:
        """(name, version) of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
        return model_version(self.client, uri)

    def record_evaluation(self, name: str, version: str | int, metrics: dict[str, Any], succeeded: bool, run_id: str | None = None) -> None:
        """Attach an evaluation's outcome to a model version (``evaluation.status``, ``evaluation.<metric>``)."""
        v = str(version)
        self.client.set_model_version_tag(name, v, "evaluation.status", "succeeded" if succeeded else "failed")
        if run_id:
            self.client.set_model_version_tag(name, v, "evaluation.run_id", run_id)
        for k, val in metrics.items():
            if _is_number(val):
                self.client.set_model_version_tag(name, v, f"evaluation.{k}", repr(float(val)))

    def promote(self, name: str, version: str | int, policy: "Promotion | PromotionPolicy", aliases: tuple[str, ...] = ALIASES) -> list[Decision]:
        """Move each alias to the candidate if the promotion rule says so; record every decision as version tags.

        ``policy`` is a stage's ``spec.promotion`` (or the config's policy: metric, direction,
        min_delta). The decision tags are written first, then the alias moves: a job stopped in
        between leaves its stage unfinished, and the stage's re-run takes the same decision again.
        """
        v = str(version)
        if not self.reachable():  # refused before anything is written: the alias and its decision move together
            raise TrackingUnavailable(f"MLflow at {self.tracking_uri} is unreachable: promotion of {name} version {v} "
                                      f"refused, no alias or decision changed")
        cand = self.client.get_model_version(name, v)
        cand_value = _evaluated(cand.tags, policy.metric)
        decisions = []
        for alias in aliases:
            try:
                holder = self.client.get_model_version_by_alias(name, alias)
            except MlflowException:
                holder = None
            holder_version = str(holder.version) if holder else None
            holder_value = _evaluated(holder.tags, policy.metric) if holder else None
            if cand_value is None:
                ok, reason = False, f"candidate has no successful evaluation of {policy.metric}"
            elif holder is None:
                ok, reason = True, "first candidate with a successful evaluation"
            elif holder_version == v:
                ok, reason = True, "candidate already holds the alias"
            elif holder_value is None:
                ok, reason = True, f"holder has no successful evaluation of {policy.metric}"
            elif alias in RUN_SCOPED and holder.tags.get("selftrain.run", "") != cand.tags.get("selftrain.run", ""):
                # a pipeline run learns from its own rounds: a holder from another run (other data or settings,
                # evaluated elsewhere) is not a comparable figure, so the run's first good candidate takes over
                ok, reason = True, f"holder version {holder_version} is from pipeline run {holder.tags.get('selftrain.run') or '?'}; this run starts its own {alias} line"
            else:
                gain = cand_value - holder_value if policy.direction == "max" else holder_value - cand_value
                ok = gain > policy.min_delta
                reason = (
                    f"{policy.metric} {cand_value:.6g} vs {holder_value:.6g} ({policy.direction}): "
                    f"gain {gain:.6g} {'>' if ok else '<='} min_delta {policy.min_delta:g}"
                )
            d = Decision(alias, ok, v, cand_value, holder_version, holder_value, reason)
            prefix = f"promotion.{alias}"
            for key, val in (
                ("decision", "promoted" if ok else "kept"),
                ("candidate_value", "" if cand_value is None else repr(cand_value)),
                ("holder_value", "" if holder_value is None else repr(holder_value)),
                ("holder_version", holder_version or ""),
                ("reason", reason),
            ):
                self.client.set_model_version_tag(name, v, f"{prefix}.{key}", val)
            if ok and holder_version != v:
                self.client.set_registered_model_alias(name, alias, v)
            decisions.append(d)
        return decisions

    # -- helpers -------------------------------------------------------------------------------
    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k[:250], _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])


def _evaluated(tags: dict[str, str], metric: str) -> float | None:
    """The metric of a version whose evaluation succeeded, else None."""
    if tags.get("evaluation.status") != "succeeded":
        return None
    for key in metric_keys(metric):
        try:
            v = float(tags[f"evaluation.{key}"])
        except (KeyError, ValueError):
            continue
        return v if math.isfinite(v) else None
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return s[:6000]


def _flatten(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out
