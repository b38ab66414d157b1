"""Stage definitions: every trainer declared once, importable without torch (docs/architecture.md "The stage registry").

A :class:`StageDefinition` names a trainer (``python -m trainers <name>``), says what kind of
work it does, which inputs it reads and outputs it writes, its typed params model (unknown keys
rejected; every default and its description live there and nowhere else) and its entry point, a
``module:function`` string imported only when the stage runs. The control plane validates every
stage's params against these models when it loads a pipeline config; the trainer parses its
params through the same model (:func:`params_of`).

:data:`STAGES` is a plain dict (no registration magic): adding a stage is one definition module
in this package and one line below.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

StageKind = Literal["train", "evaluate", "label"]


class Params(BaseModel):
    """Base of every stage's params model: unknown keys are an error, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ParamsError(ValueError):
    """Stage params that do not validate; the message names the source, the key path and the allowed keys."""


class UnknownStage(KeyError):
    """A trainer name that no definition declares."""

    def __str__(self) -> str:
        return f"unknown stage {self.args[0]!r}; known stages: {', '.join(sorted(STAGES))}"


@dataclass(frozen=True)
class StageDefinition:
    """One trainer: what it is, what it reads and writes, its params model and its entry point."""

    name: str  # the trainer name: python -m trainers <name>
    summary: str  # one line: what it does and the paper section it implements
    kind: StageKind  # train (writes a model), evaluate (reports metrics of a model), label (writes a dataset)
    params: type[Params]
    entry: str  # "module:function", imported only when the stage runs
    datasets: dict[str, str] = field(default_factory=dict)  # dataset inputs: name -> description
    models: dict[str, str] = field(default_factory=dict)  # model inputs: name -> description
    optional: frozenset[str] = frozenset()  # input names that may be absent
    output_dataset: bool = False  # writes outputs.dataset (a DVC version)
    output_model: bool = False  # writes a model that becomes a registered version of outputs.model

    def parse(self, params: dict[str, Any] | None, source: str = "params") -> Params:
        """``params`` validated by the params model; ParamsError names ``source``, the key path and the allowed keys."""
        try:
            return self.params.model_validate(params or {})
        except ValidationError as e:
            raise ParamsError(explain(e, self.params, source)) from None

    def check_params(self, params: dict[str, Any] | None, source: str = "params") -> dict[str, Any]:
        """``params`` unchanged after validating them (a pydantic field validator of pass-through dicts)."""
        self.parse(params, source)
        return params or {}

    def entry_point(self) -> Callable[..., Any]:
        """The stage function (imports its module: the data plane, with torch)."""
        module, func = self.entry.split(":")
        return getattr(importlib.import_module(module), func)

    def missing_inputs(self, datasets: set[str], models: set[str]) -> list[str]:
        """Required inputs a spec does not name, as ``datasets.<name>`` / ``models.<name>``."""
        out = [f"datasets.{n}" for n in self.datasets if n not in datasets and n not in self.optional]
        return out + [f"models.{n}" for n in self.models if n not in models and n not in self.optional]


def explain(err: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line per bad key: ``<source>.<key path>: <problem>``; an unknown key lists the allowed ones."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, e["loc"][:-1])
            lines.append(f"{source}.{path}: unknown key (allowed: {', '.join(allowed)})")
        else:
            lines.append(f"{source}.{path}: {e['msg']}" if path else f"{source}: {e['msg']}")
    return "\n".join(lines)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at ``loc``."""
    for part in loc:
        f = model.model_fields.get(str(part))
        ann = getattr(f, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return sorted(model.model_fields)


def get(name: str) -> StageDefinition:
    """The definition of trainer ``name``; UnknownStage lists the known ones."""
    try:
        return STAGES[name]
    except KeyError:
        raise UnknownStage(name) from None


def params_of(spec: Any) -> Params:
    """The typed params of a stage spec (what a trainer reads instead of ``spec.params``)."""
    return get(spec.stage).parse(spec.params, source=f"stage {spec.name!r} params")


_MODULES = ("fit_objects", "instance_teacher", "mine_parts", "train_proposals", "evaluate_proposals", "pseudo_label",
            "rank_parts", "train_ranker", "rank_pseudo_label", "evaluate_parts", "cluster_pixels",
            "detect_pseudo_label", "evaluate_instances", "join_datasets",
            "slotcon", "leopart", "evaluate_representation",
            "represent", "pixel_attention", "generate_labels", "finetune_segmentation", "evaluate_segmentation")


def _load() -> dict[str, StageDefinition]:
    return {d.name: d for d in (importlib.import_module(f"contract.stages.{m}").DEFINITION for m in _MODULES)}


#: Trainer name -> definition. One line per stage (in _MODULES).
STAGES: dict[str, StageDefinition] = _load()
