"""``python -m trainers <stage> --spec <file | env:VAR>``: run one stage of a pipeline from its spec.

Under ``torchrun -m trainers ...`` every process runs this; rank 0 writes ``<workdir>/result.json``
(temp file, then rename) when the stage succeeds.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from contract.spec import SpecError, StageSpec, format_validation_error
from trainers.stages import STAGES, StageResult, UnknownStage, get_stage


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
            raise SpecError(format_validation_error(e, f"${var}")) from e
    return StageSpec.load(source)


def result_document(spec: StageSpec, result: StageResult) -> dict:
    return {"status": "succeeded", "stage": spec.stage, "metrics": result.metrics, "model_path": result.model_path,
            "dataset_path": result.dataset_path, "steps": result.steps}


def write_result(spec: StageSpec, result: StageResult) -> Path:
    from trainers.checkpoint import write_atomic

    return write_atomic(Path(spec.outputs.workdir) / "result.json", json.dumps(result_document(spec, result), indent=2))


def run(stage: str, spec: StageSpec) -> StageResult | None:
    """Run ``stage`` with ``spec``; on rank 0 write result.json. Returns the stage's result."""
    if spec.stage != stage:
        raise SpecError(f"spec is for stage {spec.stage!r}, not {stage!r}")
    result = get_stage(stage)(spec)
    if int(os.environ.get("RANK", "0")) == 0 and result is not None:
        write_result(spec, result)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears the process group down while rank 0 still writes its outputs
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__.splitlines()[0])
    parser.add_argument("stage", help=f"one of: {', '.join(sorted(STAGES))}")
    parser.add_argument("--spec", required=True, help="stage spec file (YAML/JSON) or env:VAR holding its JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(name)s: %(message)s")
    try:
        spec = load_spec(args.spec)
        run(args.stage, spec)
    except (SpecError, UnknownStage) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
