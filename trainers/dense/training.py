"""What the dense representation stages share around ``trainers.engine.fit``: the ZeRO check and the model file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from contract.spec import StageSpec
from trainers.dense.io import save_representation
from trainers.engine import deepspeed_config
from trainers.inputs import StageInputError


def check_zero(spec: StageSpec, method: str) -> None:
    """The methods update parameters outside the optimizer (EMA teacher, normalised prototypes): ZeRO-3's
    partitioned parameters are not whole on any rank, so stages 0-2 only."""
    stage = deepspeed_config(spec).get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise StageInputError(f"resources.deepspeed.zero_optimization.stage 3: {method} updates parameters outside the "
                              "optimizer (teacher EMA / prototype normalisation); use ZeRO stage 0, 1 or 2")


def sub_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` (with it removed)."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def write_representation(path: Path, state_dict: dict[str, torch.Tensor], *, prefix: str, timm_name: str,
                         model_kwargs: dict[str, Any], stage: str, projector_prefix: str, projector_config: dict,
                         prototypes: torch.Tensor, **extra: Any) -> Path:
    """The representation file of a trained model: backbone weights under ``prefix`` (``<prefix>model.``: timm keys),
    the projector under ``projector_prefix`` and the prototypes (the 1x1 classifier of the evaluation)."""
    backbone = sub_state(state_dict, prefix + "model.")
    if not backbone:
        raise ValueError(f"no backbone weights under {prefix!r} in the trained state_dict")
    return save_representation(path, timm_name, backbone, stage, extra={
        "model_kwargs": model_kwargs, "prototypes": prototypes, "projector": sub_state(state_dict, projector_prefix),
        "projector_config": projector_config, **extra})
