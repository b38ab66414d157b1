"""Generate the references from the typed models (``python -m pipelines.docs``).

The README's configuration reference comes from the config classes; ``docs/stages.md`` (every
trainer: kind, inputs, outputs, params with defaults and descriptions) from the stage definitions
in ``contract.stages`` — the one place those defaults live.
"""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

from pydantic import BaseModel

BEGIN, END = "<!-- BEGIN CONFIG REFERENCE -->", "<!-- END CONFIG REFERENCE -->"

# (title, "module:Class") — the configs a user writes or reads.
DOCUMENTED = [
    ("PartWorld dataset (`configs/partworld-demo.yaml`, `selftrain data generate -c`)", "trainers.data.partworld:PartWorldConfig"),
    ("Pipeline config (`selftrain run <config>`; PartDistillation)", "pipelines.partdistillation.config:PartDistillationConfig"),
    ("Pipeline config (`selftrain run <config>`; CaSP: the `casp` section)", "pipelines.casp.config:CaspConfig"),
    ("Pipeline config (`selftrain run <config>`; PASS / LUSS: the `luss` section)", "pipelines.luss.config:LussConfig"),
    ("Pipeline config (`selftrain run <config>`; SlotCon and Leopart: the `dense` section)", "pipelines.dense.config:DenseConfig"),
    ("Stage spec (`python -m trainers <stage> --spec <file>`)", "contract.spec:StageSpec"),
]


def _type_name(ann) -> str:
    s = getattr(ann, "__name__", None) if not getattr(ann, "__args__", None) else None
    return s or re.sub(r"\b(typing|pipelines\.\w+|trainers\.[\w.]+)\.", "", str(ann))


def _default(field) -> str:
    if field.is_required():
        return "*required*"
    if field.default_factory is not None:
        try:
            v = field.default_factory()
        except TypeError:
            return "(computed)"
        return "(see below)" if isinstance(v, BaseModel) else f"`{v!r}`"
    return f"`{field.default!r}`"


def _table(cls: type[BaseModel], prefix: str = "", nested: list | None = None) -> list[str]:
    rows = []
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((key, ann)) if nested is not None else None
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_name(ann).replace('|', 'or')} | {_default(field)} | {desc} |")
    return rows


def reference() -> str:
    out = []
    for title, target in DOCUMENTED:
        mod, _, cls_name = target.partition(":")
        try:
            cls = getattr(importlib.import_module(mod), cls_name)
        except (ImportError, AttributeError):
            continue
        out += [f"### {title}", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        queue: list = []
        out += _table(cls, "", queue)
        while queue:
            key, sub = queue.pop(0)
            out += _table(sub, f"{key}.", queue)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


STAGES_DOC = Path(__file__).resolve().parents[1] / "docs" / "stages.md"


def stage_reference() -> str:
    """``docs/stages.md``: one section per trainer, generated from its definition."""
    from contract import stages as registry

    out = ["# Stage reference", "",
           "Generated from the stage definitions in `contract/stages/` by `python -m pipelines.docs`; do not edit by hand.",
           "The same text, per stage: `python -m trainers <stage> --help`. Params go in a stage spec's `params`",
           "(or a pipeline config's pass-through params); unknown keys are rejected.", ""]
    for name in sorted(registry.STAGES):
        d = registry.STAGES[name]
        if d.entry.startswith("tests."):
            continue
        out += [f"## `{d.name}` ({d.kind})", "", d.summary, "", f"Entry point: `{d.entry}`.", ""]
        for title, items in (("Dataset inputs", d.datasets), ("Model inputs", d.models)):
            if items:
                out.append(f"{title}:")
                out += [f"- `{n}`{' (optional)' if n in d.optional else ''}: {desc}" for n, desc in items.items()]
                out.append("")
        writes = [w for w, on in (("`outputs.dataset` (a DVC version)", d.output_dataset), ("`outputs.model` (a registered model version)", d.output_model)) if on]
        if writes:
            out += ["Writes: " + ", ".join(writes) + ".", ""]
        out += ["| param | type | default | meaning |", "| --- | --- | --- | --- |"]
        queue: list = []
        out += _table(d.params, "", queue)
        while queue:
            key, sub = queue.pop(0)
            out += _table(sub, f"{key}.", queue)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def update_stage_reference(path: Path = STAGES_DOC) -> bool:
    text = stage_reference()
    if path.exists() and path.read_text() == text:
        return False
    from contract.io import write_atomic

    write_atomic(path, text)
    return True


def update_readme(path: Path = Path(__file__).resolve().parents[1] / "README.md") -> bool:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: markers {BEGIN} / {END} not found")
    new = text.split(BEGIN)[0] + BEGIN + "\n" + reference() + END + text.split(END, 1)[1]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    changed = update_readme()
    print("README.md configuration reference " + ("updated" if changed else "already up to date"))
    changed = update_stage_reference()
    print(f"{STAGES_DOC.relative_to(STAGES_DOC.parents[1])} " + ("updated" if changed else "already up to date"))
    sys.exit(0)
