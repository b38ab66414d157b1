"""The stage spec: the one contract between the control plane and the data plane.

A trainer needs nothing but this document: ``python -m trainers <stage> --spec <file>``.
Defined once here (torch-free) and imported by both planes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class SpecError(ValueError):
    """A spec or config file is invalid; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetRef(_Strict):
    """A dataset version: a directory of shards plus its DVC hash (None before it is versioned)."""

    path: str = Field(description="Directory holding the shards and index.json.")
    dvc_hash: str | None = Field(default=None, description="DVC md5 of the directory (the version).")


class ModelRef(_Strict):
    """A model a stage reads: an MLflow model URI or a local state_dict path."""

    uri: str = Field(description="models:/<name>@<alias>, models:/<name>/<version>, or a local file path.")

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if v.startswith("models:/") and len(v) <= len("models:/"):
            raise ValueError("models:/ URI needs a registered model name")
        return v


class Inputs(_Strict):
    datasets: dict[str, DatasetRef] = Field(default_factory=dict, description="Named dataset versions the stage reads.")
    models: dict[str, ModelRef] = Field(default_factory=dict, description="Named models the stage reads.")


class Outputs(_Strict):
    dataset: str | None = Field(default=None, description="Directory the stage writes; becomes a DVC version.")
    model: str | None = Field(default=None, description="Registered-model name the stage's weights become a version of.")
    workdir: str = Field(description="Stage-private directory for checkpoints, logs and metrics.")


class Resources(_Strict):
    replicas: int = Field(default=1, ge=1, description="Replicas (pods): 1 Master + replicas-1 Workers.")
    nproc_per_node: int = Field(default=1, ge=1, description="Processes per replica (torchrun --nproc-per-node).")
    gpus_per_replica: int = Field(default=0, ge=0, description="nvidia.com/gpu per replica (0: CPU, gloo).")
    cpu: str = Field(default="2", description="CPU request per replica.")
    memory: str = Field(default="8Gi", description="Memory request per replica.")
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="DeepSpeed config overrides (zero stage, batch, ...).")


#: Seconds an MLflow outage may last by default (``tracking.outage_seconds`` of the pipeline config and the stage spec).
DEFAULT_OUTAGE_SECONDS = 600.0


class Tracking(_Strict):
    mlflow_uri: str = Field(default="sqlite:///mlflow.db", description="MLflow tracking URI.")
    experiment: str = Field(default="selftrain", description="MLflow experiment name.")
    parent_run_id: str | None = Field(default=None, description="MLflow run id of the pipeline run.")
    run_id: str | None = Field(default=None, description="MLflow run id of this stage (created by the control plane).")
    dvc_remote: str | None = Field(default=None, description="DVC remote name or URL datasets are pushed to.")
    outage_seconds: float = Field(default=DEFAULT_OUTAGE_SECONDS, gt=0, allow_inf_nan=False,
                                  description="How long an MLflow outage may last before the stage fails (metrics held, bookkeeping retried meanwhile; docs/faults.md).")


def metric_keys(metric: str) -> list[str]:
    """Keys that name ``metric`` in a stage's result metrics: as given, under ``eval/`` (the namespace every evaluating
    stage logs into, whichever split it scores), with ``@`` written ``_`` (MLflow names). ``AR@10`` -> ``AR@10``,
    ``eval/AR@10``, ``AR_10``, ``eval/AR_10``."""
    keys = [metric, f"eval/{metric}"]
    keys += [k.replace("@", "_") for k in keys]
    return list(dict.fromkeys(keys))


class Promotion(_Strict):
    """The promotion rule an evaluating stage applies to the model it evaluated (docs/architecture.md "Tracking and promotion").

    The candidate is the registered version named by ``inputs.models[candidate]``; it takes each alias
    from its holder when it beats it on ``metric`` (a key of the stage's result metrics, measured on a
    selection split, never on the reported one) by more than ``min_delta``. The alias and the decision
    tags move together.
    """

    candidate: str = Field(default="candidate", description="Name of the model input that is evaluated.")
    metric: str = Field(description="Result metric compared, e.g. AR_10: the evaluating stage logs it as eval/AR_10 "
                        "(eval/ is the namespace of evaluation metrics, not the split; the stage's datasets say which split).")
    direction: Literal["max", "min"] = Field(default="max", description="max: higher is better; min: lower is better.")
    min_delta: float = Field(default=0.0, ge=0, description="The candidate must beat the holder by more than this.")
    aliases: list[str] = Field(default_factory=lambda: ["teacher", "champion"], description="Aliases the rule moves.")


class StageSpec(_Strict):
    """Everything one stage needs (docs/architecture.md "The contract")."""

    api_version: Literal["selftrain/v1"] = "selftrain/v1"
    stage: str = Field(description="Trainer name, e.g. mine-parts, train-proposals, pseudo-label.")
    name: str = Field(description="Unique name of this stage instance in its pipeline, e.g. r1-train-proposals.")
    pipeline: str = Field(default="partdistillation", description="Pipeline this stage belongs to.")
    image: str = Field(default="selftrain:latest", description="Container image on a cluster.")
    inputs: Inputs = Field(default_factory=Inputs)
    outputs: Outputs
    params: dict[str, Any] = Field(default_factory=dict, description="The method's hyper-parameters.")
    resources: Resources = Field(default_factory=Resources)
    tracking: Tracking = Field(default_factory=Tracking)
    promotion: Promotion | None = Field(default=None, description="Set on an evaluating stage: the promotion rule it applies to its candidate.")

    # -- serialisation -------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def write(self, path: str | Path) -> Path:
        """Write atomically (temp file, then rename)."""
        from contract.io import write_atomic

        return write_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "StageSpec":
        return load_model(cls, path)


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """One line per bad key (``<key path>: <problem>``) under ``<source>: invalid configuration``.

    With ``model`` (the class validated), an unknown key lists the keys allowed at its place.
    """
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = allowed_keys(model, e["loc"][:-1]) if model is not None else []
            msg = f"unknown key (allowed: {', '.join(allowed)})" if allowed else "unknown key (not allowed)"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model found by following ``loc`` (field names, list indices) from ``model``; [] if none."""
    import typing

    def models_in(ann) -> list[type[BaseModel]]:
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return [ann]
        return [m for a in typing.get_args(ann) for m in models_in(a)]

    current: list[type[BaseModel]] = [model]
    for part in loc:
        if isinstance(part, int):
            continue
        nxt = [m for c in current if str(part) in c.model_fields for m in models_in(c.model_fields[str(part)].annotation)]
        if not nxt:
            return []
        current = nxt
    return sorted({f for c in current for f in c.model_fields})


def load_model(cls, path: str | Path):
    """Load a pydantic model from a YAML or JSON file; errors name the file and every bad key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from e
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, str(path), cls)) from e
