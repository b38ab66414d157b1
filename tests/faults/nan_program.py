"""``fit-objects``'s training with a loss made NaN/inf on one rank at one step: the engine's non-finite-loss check.

Run under torchrun with the spec in ``SELFTRAIN_SPEC`` and ``FAULT_NAN_STEP`` (1-based optimizer step),
``FAULT_NAN_RANK``, ``FAULT_NAN_VALUE`` (nan, inf, -inf). Rank 0 writes ``<workdir>/nan_result.json``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from contract.stages import params_of  # noqa: E402
from trainers.__main__ import load_spec  # noqa: E402
from trainers.engine import fit  # noqa: E402
from trainers.models.object_seg import ObjectSegNet, ToTensors, class_labels, collate, loss_fn  # noqa: E402


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = load_spec("env:SELFTRAIN_SPEC")
    p = params_of(spec)
    step, rank, value = int(os.environ["FAULT_NAN_STEP"]), int(os.environ["FAULT_NAN_RANK"]), os.environ["FAULT_NAN_VALUE"]
    labels = class_labels(spec.inputs.datasets["train"].path)
    me = int(os.environ.get("RANK", "0"))
    calls = {"n": 0}

    def poisoned(engine, batch):
        loss, extra = loss_fn(engine, batch)
        calls["n"] += 1  # one micro-batch per step here: call n is step n
        if calls["n"] == step and me == rank:
            loss = loss * float(value)  # NaN (or +-inf) loss, still a graph: training on would be silent
        return loss, extra

    result = fit(spec, p, build_model=lambda: ObjectSegNet(len(labels), p.width), loss_fn=poisoned,
                 transform=ToTensors(p.image_size, labels), collate=collate)
    if result.dist.is_main:
        finite = all(bool(torch.isfinite(v).all()) for v in result.state_dict.values() if v.is_floating_point())
        doc = {"steps": result.steps, "finite": finite, "metrics": result.metrics}
        Path(spec.outputs.workdir, "nan_result.json").write_text(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
