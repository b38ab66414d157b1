"""``python -m trainers <stage> --spec <file | env:VAR>``: run one stage of a pipeline from its spec.

Under ``torchrun -m trainers ...`` every process runs this; rank 0 writes ``<workdir>/result.json``
(temp file, then rename) when the stage succeeds. ``python -m trainers <stage> --help`` lists the
stage's inputs, outputs and params, generated from its definition in ``contract.stages``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from contract import stages as registry
from contract.io import write_json
from contract.spec import SpecError, StageSpec, format_validation_error
from trainers.stages import StageResult


def load_spec(source: str) -> StageSpec:
    """A spec from a YAML/JSON file, or from the JSON in an environment variable (``env:NAME``)."""
    if source.startswith("env:"):
        var = source[4:]
        text = os.environ.get(var)
        if text is None:
            raise SpecError(f"--spec {source}: environment variable {var} is not set")
        from pydantic import ValidationError

        try:
            return StageSpec.model_validate_json(text)
        except ValidationError as e:
            raise SpecError(format_validation_error(e, f"${var}", StageSpec)) from e
    return StageSpec.load(source)


def result_document(spec: StageSpec, result: StageResult) -> dict:
    return {"status": "succeeded", "stage": spec.stage, "metrics": result.metrics, "model_path": result.model_path,
            "dataset_path": result.dataset_path, "steps": result.steps}


def write_result(spec: StageSpec, result: StageResult) -> Path:
    return write_json(Path(spec.outputs.workdir) / "result.json", result_document(spec, result))


def check_spec(spec: StageSpec) -> registry.StageDefinition:
    """The stage's definition, after checking the spec against it (params, required inputs and outputs)."""
    d = registry.get(spec.stage)
    d.parse(spec.params, source=f"stage {spec.name!r} params")
    missing = d.missing_inputs(set(spec.inputs.datasets), set(spec.inputs.models))
    if missing:
        raise SpecError(f"stage {spec.name!r} ({spec.stage}) needs inputs {', '.join(missing)}")
    if d.output_dataset and not spec.outputs.dataset:
        raise SpecError(f"stage {spec.name!r} ({spec.stage}) needs outputs.dataset (the directory it writes)")
    return d


def run(stage: str, spec: StageSpec) -> StageResult | None:
    """Run ``stage`` with ``spec``; on rank 0 write result.json. Returns the stage's result."""
    if spec.stage != stage:
        raise SpecError(f"spec is for stage {spec.stage!r}, not {stage!r}")
    result = check_spec(spec).entry_point()(spec)
    if int(os.environ.get("RANK", "0")) == 0 and result is not None:
        write_result(spec, result)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears the process group down while rank 0 still writes its outputs
    return result


def stage_help(d: registry.StageDefinition) -> str:
    """The ``--help`` text of one stage, from its definition."""
    lines = [f"{d.name} ({d.kind}): {d.summary}", ""]
    for title, items in (("dataset inputs", d.datasets), ("model inputs", d.models)):
        if items:
            lines.append(f"{title}:")
            lines += [f"  {n}{' (optional)' if n in d.optional else ''}: {desc}" for n, desc in items.items()]
    outs = [o for o, on in (("outputs.dataset (a DVC version)", d.output_dataset), ("outputs.model (a registered model version)", d.output_model)) if on]
    if outs:
        lines.append("writes: " + ", ".join(outs))
    lines += ["", "params (spec.params; unknown keys are rejected):"]
    for name, f in d.params.model_fields.items():
        default = f.get_default(call_default_factory=True)
        lines.append(f"  {name} (default {json.dumps(default, default=str)}): {f.description or ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in registry.STAGES and any(a in ("-h", "--help") for a in argv[1:]):
        print(stage_help(registry.STAGES[argv[0]]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__.splitlines()[0])
    parser.add_argument("stage", help=f"one of: {', '.join(sorted(registry.STAGES))} (<stage> --help: its params)")
    parser.add_argument("--spec", required=True, help="stage spec file (YAML/JSON) or env:VAR holding its JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(name)s: %(message)s")
    try:
        spec = load_spec(args.spec)
        run(args.stage, spec)
    except (SpecError, registry.UnknownStage, registry.ParamsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if "torch" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
